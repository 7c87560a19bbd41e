"""Stage ``qat``: INT4 quantization-aware training of SFT's model, measured against PTQ.

Two Ray Train jobs through the one training loop, from SFT's final model on the SFT
chats: QAT (the model fake-quantized with 8da4w, every matrix; router and norms FP32)
and, unless ``stage.qat.control`` is false, a full-precision control with the same
steps, data and seed. Then, on the driver: PTQ of SFT's model, convert of the QAT
model to real INT4, coverage tables after prepare and after convert (the stage fails,
naming the tensor, if a matrix other than the router and the norms stayed full
precision), and four models evaluated on the same held-out batches.

Published into ``stage.qat.out_dir``:
  model/            QAT's trained weights as a training checkpoint (full-precision
                    values; prepare + convert reproduce the quantized model from them)
  quantized/model.safetensors   the converted model: packed INT4 + FP32 scales
                    (pipeline/quant/format.py), loadable without pickle
  coverage.json     every weight tensor: name, shape, scheme, bytes; after prepare and
                    after convert
  metrics.json      the losses (SFT val, nats per assistant token) of SFT, its PTQ, QAT
                    converted, the control and the control's PTQ, their bits per byte on
                    the pre-training val text, the PTQ gaps, the fraction of the gap QAT
                    recovers against SFT and against the control, weight bytes, expert
                    load during QAT (DVC metrics)
  loss.csv          step, train_loss, val_loss of QAT (DVC plots)
  execution.json    resumes of this execution (not tracked by DVC)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.hashing import sha256_file, sha256_json
from pipeline.recipe import RecipeConfig, repo_path
from pipeline.runner.inputs import CheckpointInput, CompilerInput, MixtureInput, TokenizerInput, storage_inputs
from pipeline.runner.spec import ResumePlan, Stage, StageContext, StageResult
from pipeline.stages.train import (
    EXECUTION_FILE,
    RESULT_CODE,
    code_fingerprint,
    final_metrics,
    train_to_end,
    training_dvc,
    write_outputs,
)
from pipeline.train.loop import WorkerJob

KEY = "stage.qat"
# The code that determines this stage's result (names a resumable run; its dvc.yaml code deps).
QAT_RESULT_CODE = (*(e for e in RESULT_CODE if e != "quant/config.py"), "quant", "stages/qat.py")


def _inputs(recipe: RecipeConfig) -> list:
    cfg = recipe.stage.qat
    return [
        MixtureInput(f"{KEY}.mixture", repo_path(cfg.mixture), cfg.seq_len),
        MixtureInput(f"{KEY}.text_mixture", repo_path(cfg.text_mixture), cfg.seq_len),
        TokenizerInput(f"{KEY}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size),
        CheckpointInput(f"{KEY}.init_checkpoint", repo_path(cfg.init_checkpoint), recipe.model),
        *([CompilerInput(f"{KEY}.compile", gpu=recipe.ray.use_gpu)] if cfg.compile else []),
        *storage_inputs(recipe),
    ]


def _params(raw: dict) -> dict:
    return {"model": raw["model"], "stage": raw["stage"]["qat"], "ray": raw["ray"], "seed": raw["seed"]}


def _jobs(ctx: StageContext) -> list[WorkerJob]:
    """The QAT job, then the full-precision control (same steps, data and seed)."""
    recipe, cfg = ctx.recipe, ctx.recipe.stage.qat
    init: Path = ctx.inputs[f"{KEY}.init_checkpoint"]
    quant = asdict(cfg.quant())
    qat = WorkerJob(
        stage="qat",
        model=asdict(recipe.model),
        train=asdict(cfg.train_config()),
        seed=recipe.seed,
        mixture_dir=str(repo_path(cfg.mixture)),
        init_checkpoint=str(init),
        extra_meta={
            "data_manifest_sha256": sha256_json(ctx.inputs[f"{KEY}.mixture"]),
            "init_sha256": sha256_file(init / "model.safetensors"),
            "code_sha256": code_fingerprint(QAT_RESULT_CODE),
            "quant": quant,
        },
        quant=quant,
    )
    jobs = [qat]
    if cfg.control:
        meta = {k: v for k, v in qat.extra_meta.items() if k != "quant"}
        jobs.append(replace(qat, stage="qat-control", quant=None, extra_meta=meta))
    return jobs


def _resume(ctx: StageContext) -> ResumePlan:
    """QAT and its control: two Ray Train runs, named together by the key."""
    from pipeline.runner import train_job

    jobs = _jobs(ctx)
    names = tuple(train_job.run_name(job, ctx.recipe.ray) for job in jobs)
    return ResumePlan(key=f"qat-{sha256_json(list(names))[:12]}", jobs=tuple(jobs), runs=names)


def _work(ctx: StageContext) -> StageResult:
    from pipeline.quant.format import save_quantized, weight_bytes
    from pipeline.runner import cluster, train_job
    from pipeline.train.batches import TokenBatches
    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.train.compare import compare_quantized

    recipe, cfg = ctx.recipe, ctx.recipe.stage.qat
    q = cfg.quant()
    jobs = ctx.resume.jobs
    train_job.start_ray(recipe.ray)
    qat_final = train_to_end(jobs[0], ctx)
    control_final = train_to_end(jobs[1], ctx, metric_prefix="control/") if cfg.control else None

    text_totals = ctx.inputs[f"{KEY}.text_mixture"]["totals"]["val"]
    compared = compare_quantized(
        recipe.model,
        q,
        load_checkpoint(ctx.inputs[f"{KEY}.init_checkpoint"]).model_state,
        qat_final.model_state,
        control_final.model_state if control_final is not None else None,
        TokenBatches(repo_path(cfg.mixture), "val", cfg.seq_len, cfg.batch_size, recipe.seed),
        TokenBatches(repo_path(cfg.text_mixture), "val", cfg.seq_len, cfg.batch_size, recipe.seed),
        cfg.compare_batches,
        text_totals["bytes"] / max(text_totals["target_tokens"], 1),
    )
    metrics = final_metrics(qat_final.meta)  # QAT's own training: fake-quant losses, expert load
    metrics = {f"qat_train_{k}" if k not in ("step", "tokens_seen") else k: v for k, v in metrics.items()}
    metrics.update(compared.metrics)
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # QAT's own training numbers as well as the comparison's
        raise RuntimeError(f"stage qat: non-finite metrics {bad}")

    write_outputs(ctx.scratch, qat_final, metrics, samples=[])
    (ctx.scratch / "samples.json").unlink()
    quantized = ctx.scratch / "quantized" / "model.safetensors"
    save_quantized(compared.qat_int4, q, quantized)
    metrics["weight_bytes"] = weight_bytes(quantized)
    (ctx.scratch / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    (ctx.scratch / "coverage.json").write_text(json.dumps(compared.tables, indent=2))
    resumed = {job.stage: [] for job in jobs}
    resumed["qat"] = qat_final.meta.get("resumed_at", [])
    if control_final is not None:
        resumed["qat-control"] = control_final.meta.get("resumed_at", [])

    def log(run, out_dir: Path) -> None:
        run.set_tags({"resumed_at_steps": json.dumps(resumed)})
        for item in ("metrics.json", "coverage.json"):
            run.log_artifact(out_dir / item)
        run.log_artifact(out_dir / "quantized", "quantized")
        run.log_artifact(out_dir / "model", "checkpoint")
        run.log_dataset(ctx.inputs[f"{KEY}.mixture"], name="qat-mixture", context="training")
        if qat_final.meta.get("expert_load"):
            run.log_dict({"tokens_per_layer_expert": qat_final.meta["expert_load"]}, "moe_load_histogram.json")

    storage = cluster.storage(recipe.ray)
    return StageResult(
        metrics,
        log=log,
        on_published=lambda: [train_job.discard_run(job, recipe.ray, storage) for job in jobs],
        perf={"perf/resumes": float(sum(len(v) for v in resumed.values()))},
    )


QAT = Stage(
    name="qat",
    out_dir=lambda recipe: recipe.stage.qat.out_dir,
    inputs=_inputs,
    params=_params,
    work=_work,
    outputs=("model", "quantized", "coverage.json", "metrics.json", "loss.csv", EXECUTION_FILE),
    resume=_resume,
    dvc=training_dvc(
        "qat",
        50,
        "INT4 quantization-aware training of sft's model, against PTQ and an FP32 control",
        QAT_RESULT_CODE,
        ("mixture", "text_mixture", "tokenizer", "init_checkpoint"),
        outs=("quantized", "coverage.json"),
    ),
)

STAGES = (QAT,)
