"""Stages ``pretrain``, ``midtrain``, ``sft``: one training loop, three configurations.

Each trains the model on its mixture as a Ray Train job (from scratch, or from the
upstream stage's final model) and publishes into ``stage.<name>.out_dir``:

  model/          the final checkpoint (weights without optimizer state), one directory
  metrics.json    final train/val loss (overall and per domain), bits per byte, tokens,
                  steps (DVC metrics)
  loss.csv        step, train_loss, val_loss (DVC plots)
  samples.json    answers to held-out chat prompts of each task type (empty unless
                  stage.<name>.sample_prompts > 0; SFT sets it)
  execution.json  how this result was produced (resumes): not an output DVC tracks,
                  because it describes the run, not the result

Everything published is a function of the inputs: an interrupted and resumed run
publishes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import asdict
from functools import partial
from pathlib import Path

from pipeline.hashing import sha256_file, sha256_json
from pipeline.recipe import RecipeConfig, repo_path
from pipeline.runner.inputs import CheckpointInput, CompilerInput, MixtureInput, TokenizerInput, storage_inputs
from pipeline.runner.spec import Dvc, Out, ResumePlan, Stage, StageContext, StageResult, metric, plot
from pipeline.train.config import TrainStageConfig
from pipeline.train.loop import WorkerJob

EXECUTION_FILE = "execution.json"
# Checkpoint metadata that describes the execution, not the result: kept in the Ray
# run's checkpoints (resume needs it), left out of the published model.
EXECUTION_META = ("resumed_at",)


def _cfg(recipe: RecipeConfig, name: str) -> TrainStageConfig:
    return getattr(recipe.stage, name)


def _inputs(name: str, recipe: RecipeConfig) -> list:
    cfg = _cfg(recipe, name)
    items = [
        MixtureInput(
            f"stage.{name}.mixture", repo_path(cfg.mixture), cfg.seq_len, needs_conversations=cfg.sample_prompts > 0
        ),
        TokenizerInput(f"stage.{name}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size),
    ]
    if cfg.init_checkpoint:
        items.append(CheckpointInput(f"stage.{name}.init_checkpoint", repo_path(cfg.init_checkpoint), recipe.model))
    if cfg.compile:
        items.append(CompilerInput(f"stage.{name}.compile", gpu=recipe.ray.use_gpu))
    return [*items, *storage_inputs(recipe)]


def _params(name: str, raw: dict) -> dict:
    return {"model": raw["model"], "stage": raw["stage"][name], "ray": raw["ray"], "seed": raw["seed"]}


def _job(name: str, ctx: StageContext) -> WorkerJob:
    recipe, cfg = ctx.recipe, _cfg(ctx.recipe, name)
    manifest = ctx.inputs[f"stage.{name}.mixture"]
    init: Path | None = ctx.inputs.get(f"stage.{name}.init_checkpoint")
    val_totals = manifest["totals"]["val"]
    # Bits per byte only means something when the loss covers all the text's bytes.
    bytes_per_token = val_totals["bytes"] / max(val_totals["target_tokens"], 1) if manifest["kind"] == "text" else 0.0
    return WorkerJob(
        stage=name,
        model=asdict(recipe.model),
        train=asdict(cfg),
        seed=recipe.seed,
        mixture_dir=str(repo_path(cfg.mixture)),
        init_checkpoint=str(init) if init else None,
        bytes_per_token=bytes_per_token,
        extra_meta={
            "data_manifest_sha256": sha256_json(manifest),
            "init_sha256": sha256_file(init / "model.safetensors") if init else None,
            "code_sha256": code_fingerprint(),
        },
    )


def _resume(name: str, ctx: StageContext) -> ResumePlan:
    """One Ray Train job, whose run name (a hash of what determines it) is the key."""
    from pipeline.runner import train_job

    job = _job(name, ctx)
    run = train_job.run_name(job, ctx.recipe.ray)
    return ResumePlan(key=run, jobs=(job,), runs=(run,))


def _work(name: str, ctx: StageContext) -> StageResult:
    import torch

    from pipeline.configbase import from_dict
    from pipeline.model import ModelConfig, Transformer
    from pipeline.runner import artifacts, cluster, train_job

    recipe, cfg, (job,) = ctx.recipe, _cfg(ctx.recipe, name), ctx.resume.jobs
    storage = cluster.storage(recipe.ray)
    train_job.start_ray(recipe.ray)
    final = train_to_end(job, ctx)
    metrics = final_metrics(final.meta)
    model = Transformer(from_dict(ModelConfig, final.meta["model"], "model"))
    model.load_state_dict(final.model_state)
    samples = []
    if cfg.sample_prompts > 0:
        from pipeline.data.tokenizer import Tokenizer
        from pipeline.train.samples import answer_heldout

        samples = answer_heldout(
            model,
            Tokenizer.load(repo_path(cfg.tokenizer)),
            repo_path(cfg.mixture),
            per_task=cfg.sample_prompts,
            max_len=recipe.model.max_seq_len,
        )
    write_outputs(ctx.scratch, final, metrics, samples)
    resumed_at = final.meta.get("resumed_at", [])

    def log(run, out_dir: Path) -> None:
        run.set_tags({"resumed_at_steps": json.dumps(resumed_at)})
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(out_dir / "model", "checkpoint")
        run.log_artifact(out_dir / "samples.json")
        run.log_artifact(repo_path(cfg.tokenizer), "tokenizer")
        run.log_dataset(ctx.inputs[f"stage.{name}.mixture"], name=f"{name}-mixture", context="training")
        if final.meta.get("expert_load"):
            run.log_dict({"tokens_per_layer_expert": final.meta["expert_load"]}, "moe_load_histogram.json")
        artifacts.log_loss_curve(run, _curves(final.meta["history"]), f"{name}_loss.png")
        # The logged model is a torch.export program; the grouped GEMM does not export
        # on CPU in fp32, so it is traced with the equivalent gather dispatch.
        example = torch.zeros(2, min(16, cfg.seq_len), dtype=torch.long)  # batch 2 stays a dynamic dim
        artifacts.log_model(run, model.eval().set_moe_dispatch("gather"), example, name=f"{name}-model")

    return StageResult(
        metrics,
        log=log,
        on_published=lambda: train_job.discard_run(job, recipe.ray, storage),
        perf={"perf/resumes": float(len(resumed_at))},
    )


def train_to_end(job: WorkerJob, ctx: StageContext, metric_prefix: str = ""):
    """Run ``job`` as a Ray Train job (resuming an interrupted run of the same work) and
    return its final checkpoint, loaded. Rank 0's metrics go to the stage's MLflow run,
    named with ``metric_prefix`` in front."""
    from pipeline.runner import cluster, train_job
    from pipeline.train.checkpoint import load_checkpoint

    ray_cfg = ctx.recipe.ray
    journal = ctx.journal.with_suffix(".workers.jsonl")
    logger = ctx.run.for_workers(journal=journal, prefix=metric_prefix)
    final_dir = train_job.fit(job, ray_cfg, cluster.storage(ray_cfg), logger, staged=cluster.on_cluster(ray_cfg))
    try:
        return load_checkpoint(final_dir)
    finally:
        shutil.rmtree(final_dir, ignore_errors=True)


def final_metrics(meta: dict) -> dict:
    """The stage's DVC metrics from the final checkpoint's history (result only)."""
    history = meta["history"]
    last = {k: v[-1][1] for k, v in history.items() if v}
    out = {
        "step": meta["step"],
        "tokens_seen": meta["tokens_seen"],
        "train_loss": last.get("train/loss"),
        "val_loss": None,
    }
    if "val/bpb" in last:
        out["val_bpb"] = last["val/bpb"]
    # val_loss, and val_loss_<domain> for each domain of the stage's validation split
    for key in sorted(k for k in history if k.startswith("val/loss")):
        name = key.replace("/", "_")
        out[name] = history[key][-1][1]
        if history[key][0][0] == 0:  # evaluated before the first step (started from a checkpoint)
            out[f"{name}_at_start"] = history[key][0][1]
    for key in ("moe/max_over_mean", "moe/dead_fraction"):
        if key in last:
            out[key.replace("/", "_")] = last[key]
    if out["val_loss"] is None or not math.isfinite(out["val_loss"]):
        raise RuntimeError(f"stage finished without a finite validation loss: {out}")
    return out


def write_outputs(scratch: Path, final, metrics: dict, samples: list) -> None:
    """The stage's published items, written into the runner's scratch directory."""
    from pipeline.train.checkpoint import save_checkpoint

    meta = {k: v for k, v in final.meta.items() if k != "checkpoint" and k not in EXECUTION_META}
    save_checkpoint(scratch / "model", final.step, final.model_state, None, meta=meta)
    (scratch / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    _write_loss_csv(scratch / "loss.csv", final.meta["history"])
    (scratch / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
    resumed_at = final.meta.get("resumed_at", [])
    (scratch / EXECUTION_FILE).write_text(
        json.dumps({"resumes": len(resumed_at), "resumed_at_steps": resumed_at}, indent=2)
    )


def _curves(history: dict) -> dict[str, list[tuple[int, float]]]:
    return {k: [(int(s), float(v)) for s, v in history.get(k, [])] for k in ("train/loss", "val/loss")}


def _write_loss_csv(path: Path, history: dict) -> None:
    train = dict((int(s), v) for s, v in history.get("train/loss", []))
    val = dict((int(s), v) for s, v in history.get("val/loss", []))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "val_loss"])
        for step in sorted(set(train) | set(val)):
            writer.writerow([step, train.get(step, ""), val.get(step, "")])


# The code that determines a training stage's result, relative to pipeline/: it names a
# resumable run (code_fingerprint) and is the stage's code deps in dvc.yaml.
RESULT_CODE = (
    "stages/train.py",
    "runner/train_job.py",
    "model",
    "quant/config.py",  # the training config reads it; fake quantization only QAT runs
    "train",
    "data",
    "configbase.py",
    "hashing.py",
    "recipe.py",
)


def code_fingerprint(entries: tuple[str, ...] = RESULT_CODE) -> str:
    """Hash of the code that determines the result: a change must not resume an old run."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for entry in entries:
        for path in sorted([root / entry] if entry.endswith(".py") else (root / entry).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def training_dvc(name: str, order: int, desc: str, code: tuple[str, ...], deps: tuple[str, ...], outs=()) -> Dvc:
    """The DAG entry of a training stage (``stage.<name>`` of params.yaml): its code,
    data ``deps``, every stage's model/metrics/loss outputs plus ``outs``."""
    out = f"${{stage.{name}.out_dir}}"
    return Dvc(
        order=order,
        desc=desc,
        code=tuple(f"pipeline/{entry}" for entry in code),
        deps=tuple(f"${{stage.{name}.{key}}}" for key in deps),
        params=("model", f"stage.{name}", "ray.num_workers", "ray.use_gpu", "seed"),
        outs=(
            Out(f"{out}/model"),
            *(Out(f"{out}/{item}") for item in outs),
            metric(f"{out}/metrics.json"),
            plot(f"{out}/loss.csv"),
        ),
    )


def training_stage(name: str, order: int, desc: str, from_checkpoint: bool) -> Stage:
    """The stage that trains ``stage.<name>`` (from scratch, or from its init_checkpoint)."""
    deps = ("mixture", "tokenizer", *(("init_checkpoint",) if from_checkpoint else ()))
    return Stage(
        name=name,
        out_dir=lambda recipe: _cfg(recipe, name).out_dir,
        inputs=partial(_inputs, name),
        params=partial(_params, name),
        work=partial(_work, name),
        outputs=("model", "metrics.json", "loss.csv", "samples.json", EXECUTION_FILE),
        resume=partial(_resume, name),
        dvc=training_dvc(name, order, desc, RESULT_CODE, deps, outs=("samples.json",)),
    )


PRETRAIN = training_stage("pretrain", 20, "pre-train from scratch", from_checkpoint=False)
MIDTRAIN = training_stage("midtrain", 30, "continue from pretrain's model", from_checkpoint=True)
SFT = training_stage("sft", 40, "instruction-tune midtrain's model", from_checkpoint=True)
STAGES = (PRETRAIN, MIDTRAIN, SFT)
