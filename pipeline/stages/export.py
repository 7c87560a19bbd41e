"""Stage ``export``: QAT's converted model as an ExecuTorch program, a .pt2 and a Hugging
Face directory, each checked against the eager converted model (pipeline/export).

Published into ``stage.export.out_dir``:
  model.pte       ExecuTorch program (XNNPACK, 8da4w, sparse MoE, KV cache); one method
                  ``forward(tokens[1, S], input_pos[1]) -> logits[1, 1, V]`` (the last
                  position's) for prefill (S <= max_context) and decode (S = 1), and constant methods
                  max_context, vocab_size, bos_id, eos_id (and those ExecuTorch's LLM runner reads)
  model.kernels.json  what a runtime needs to run model.pte beyond the portable kernels:
                  kernel libraries (CMake target, Python import, operators) and backends
  model.pt2       the same program before lowering (torch.export.save)
  hf/             config.json, model.safetensors (dequantized FP32), tokenizer, generation
                  config: Glm4MoeForCausalLM for the MoE, Qwen3ForCausalLM for dense
  operators.json  delegated vs portable operators; INT4 bytes per expert and per token
  sample.json     a greedy continuation of a held-out prompt by the .pte
  metrics.json    sizes, every check's numbers, operator counts (DVC metrics)
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.recipe import repo_path
from pipeline.runner.inputs import (
    HFMappableInput,
    LoweringMemoryInput,
    MixtureInput,
    QuantizedModelInput,
    TokenizerInput,
)
from pipeline.runner.spec import Dvc, Out, Stage, StageContext, StageResult, metric

KEY = "stage.export"
PUBLISHED = ("model.pte", "model.kernels.json", "model.pt2", "hf", "operators.json", "sample.json")


def _inputs(recipe) -> list:
    from pipeline.runner.cluster import cluster_address

    cfg = recipe.stage.export
    return [
        QuantizedModelInput(f"{KEY}.quantized", repo_path(cfg.quantized), recipe.model),
        TokenizerInput(f"{KEY}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size),
        MixtureInput(f"{KEY}.prompts_mixture", repo_path(cfg.prompts_mixture), cfg.prompt_tokens),
        HFMappableInput("model", recipe.model),
        LoweringMemoryInput(KEY, recipe.model, cfg.moe, cfg.max_context, on_cluster=bool(cluster_address(recipe.ray))),
    ]


def _work(ctx: StageContext) -> StageResult:
    from pipeline.export.artifacts import export_all
    from pipeline.runner import cluster, remote
    from pipeline.tracking.keys import flat_numbers

    recipe, cfg = ctx.recipe, ctx.recipe.stage.export
    cluster.start(recipe.ray)
    # One Ray task: on a cluster the lowering runs on a worker like every other stage.
    metrics, seconds = remote.call(
        recipe.ray,
        export_all,
        cfg,
        remote.In(ctx.inputs[f"{KEY}.quantized"]),
        remote.In(repo_path(cfg.tokenizer)),
        remote.In(repo_path(cfg.prompts_mixture)),
        remote.Out(ctx.scratch),
    )
    (ctx.scratch / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))

    def log(run, out_dir: Path) -> None:
        for item in ("metrics.json", "operators.json", "sample.json", "model.pte", "model.kernels.json", "model.pt2"):
            run.log_artifact(out_dir / item)
        run.log_artifact(out_dir / "hf", "hf")
        run.log_metrics(flat_numbers(metrics))

    return StageResult(metrics, log=log, perf={f"perf/{k}_seconds": v for k, v in seconds.items()})


EXPORT = Stage(
    name="export",
    out_dir=lambda recipe: recipe.stage.export.out_dir,
    inputs=_inputs,
    params=lambda raw: {"model": raw["model"], "stage": raw["stage"]["export"]},
    work=_work,
    outputs=(*PUBLISHED, "metrics.json"),
    resources=lambda recipe: {"CPU": 1},
    dvc=Dvc(
        order=60,
        desc="the converted model as .pte (ExecuTorch/XNNPACK, sparse MoE), .pt2 and a HF directory",
        code=(
            "pipeline/stages/export.py",
            "pipeline/export",
            "pipeline/model",
            "pipeline/quant",
            "pipeline/data/tokenizer.py",
            "pipeline/data/mixing.py",
            "pipeline/configbase.py",
            "pipeline/recipe.py",
        ),
        deps=(f"${{{KEY}.quantized}}", f"${{{KEY}.tokenizer}}", f"${{{KEY}.prompts_mixture}}"),
        params=("model", KEY),
        outs=(*(Out(f"${{{KEY}.out_dir}}/{item}") for item in PUBLISHED), metric(f"${{{KEY}.out_dir}}/metrics.json")),
    ),
)

STAGES = (EXPORT,)
