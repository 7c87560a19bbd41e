"""A training stage from the driver's side: check inputs, track, fit on Ray, publish.

Order matters: every input is checked before Ray starts or a tracking run opens, and
the stage's output directory is replaced only once the new one is complete, so a bad
input costs a second and never destroys what an earlier run produced.

Outputs (``stage.<name>.out_dir``):
  model/          final checkpoint root (latest.json + step_N/, weights without optimizer)
  metrics.json    final train/val loss, bits per byte, tokens, steps (DVC metrics)
  loss.csv        step, train_loss, val_loss (DVC plots)
  samples.json    answers to held-out chat prompts of each task type (empty unless
                  stage.<name>.sample_prompts > 0; SFT sets it)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.configbase import ConfigError, from_dict
from pipeline.data.document import DataError
from pipeline.data.mixing import load_split, load_val_domains
from pipeline.data.tokenizer import Tokenizer
from pipeline.hashing import sha256_file, sha256_json
from pipeline.model import ModelConfig, Transformer
from pipeline.recipe import RecipeConfig, repo_path
from pipeline.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from pipeline.train.config import TrainStageConfig
from pipeline.train.loop import WorkerJob

log = logging.getLogger(__name__)


class StageInputError(RuntimeError):
    """An upstream output this stage needs is missing or does not fit."""


def check_inputs(stage: str, recipe: RecipeConfig) -> tuple[Path | None, dict]:
    """Fail fast, naming the missing piece. Returns (initial checkpoint dir, manifest)."""
    cfg: TrainStageConfig = getattr(recipe.stage, stage)
    mixture = repo_path(cfg.mixture)
    if not (mixture / "manifest.json").is_file():
        raise StageInputError(f"stage {stage}: missing upstream output {mixture / 'manifest.json'} "
                              f"(stage.{stage}.mixture; run the mix stage first: make mix)")
    try:  # the mixture module owns its file layout; its loaders name a missing file
        splits = {split: load_split(mixture, split)[0] for split in ("train", "val")}
        load_val_domains(mixture)
    except (FileNotFoundError, DataError) as err:
        raise StageInputError(f"stage {stage}: missing upstream output: {err} (stage.{stage}.mixture)") from None
    tokenizer = repo_path(cfg.tokenizer)
    if not tokenizer.is_file():
        raise StageInputError(f"stage {stage}: missing tokenizer {tokenizer} (stage.{stage}.tokenizer)")
    n_vocab = Tokenizer.load(tokenizer).vocab_size
    if n_vocab > recipe.model.vocab_size:
        raise StageInputError(f"stage {stage}: tokenizer has {n_vocab} tokens but model.vocab_size="
                              f"{recipe.model.vocab_size}")
    manifest = json.loads((mixture / "manifest.json").read_text())
    for split, tokens in splits.items():
        n_tokens = len(tokens)
        if n_tokens < cfg.seq_len + 1:
            raise StageInputError(f"stage {stage}: the {split} split of {mixture} has {n_tokens} tokens, "
                                  f"fewer than one window of stage.{stage}.seq_len+1={cfg.seq_len + 1}")
    if cfg.sample_prompts > 0 and not (mixture / "val_conversations.jsonl").is_file():
        raise StageInputError(f"stage {stage}: stage.{stage}.sample_prompts > 0 needs held-out conversations "
                              f"({mixture / 'val_conversations.jsonl'}), which only a chat mixture has")
    init = None
    if cfg.init_checkpoint:
        root = repo_path(cfg.init_checkpoint)
        init = latest_checkpoint(root)
        if init is None:
            raise StageInputError(f"stage {stage}: no complete checkpoint under {root} "
                                  f"(stage.{stage}.init_checkpoint; has the upstream stage run?)")
        try:
            upstream_model = load_checkpoint(init).meta["model"]
        except (CheckpointError, KeyError) as err:
            raise StageInputError(f"stage {stage}: cannot read model config of {init}: {err}") from None
        # A stage inherits the architecture of the checkpoint it starts from; a config
        # that disagrees is a mistake to report, not to paper over.
        ours = asdict(recipe.model)
        diff = sorted(k for k in set(ours) | set(upstream_model) if ours.get(k) != upstream_model.get(k))
        if diff:
            raise StageInputError(f"stage {stage}: model config differs from {init} in "
                                  f"{', '.join('model.' + k for k in diff)}")
    return init, manifest


def run_training_stage(stage: str, recipe: RecipeConfig, raw: dict, sweep_dir: Path | None) -> dict:
    from pipeline import tracking
    from pipeline.train import ray_job

    cfg: TrainStageConfig = getattr(recipe.stage, stage)
    init, manifest = check_inputs(stage, recipe)
    out_dir = (sweep_dir / stage) if sweep_dir else repo_path(cfg.out_dir)
    val_totals = manifest["totals"]["val"]
    # Bits per byte only means something when the loss covers all the text's bytes.
    bytes_per_token = (val_totals["bytes"] / max(val_totals["target_tokens"], 1)
                       if manifest["kind"] == "text" else 0.0)
    job = WorkerJob(
        stage=stage, model=asdict(recipe.model), seed=recipe.seed,
        train={**asdict(cfg), "mixture": str(repo_path(cfg.mixture)), "tokenizer": str(repo_path(cfg.tokenizer))},
        init_checkpoint=str(init) if init else None,
        bytes_per_token=bytes_per_token,
        extra_meta={"data_manifest_sha256": sha256_json(manifest),
                    "init_checkpoint": str(init) if init else None,
                    "init_sha256": sha256_file(init / "model.safetensors") if init else None,
                    "code_sha256": code_fingerprint()},
    )
    params = {"model": raw["model"], "stage": raw["stage"][stage], "ray": raw["ray"], "seed": raw["seed"]}
    with tracking.stage_run(recipe.tracking, stage, params=params) as run:
        run.log_dataset(manifest, name=f"{stage}-mixture", context="training")
        run.log_artifact(repo_path(cfg.tokenizer), "tokenizer")
        job.tracking_uri, job.run_id = run.tracking_uri, run.run_id
        ray_result = ray_job.fit(job, recipe.ray)
        try:
            final = load_checkpoint(latest_checkpoint(ray_result))
        finally:
            shutil.rmtree(ray_result, ignore_errors=True)
        metrics = final_metrics(final.meta)
        model = Transformer(from_dict(ModelConfig, final.meta["model"], "model"))
        model.load_state_dict(final.model_state)
        samples = []
        if cfg.sample_prompts > 0:
            from pipeline.train.samples import answer_heldout

            samples = answer_heldout(model, Tokenizer.load(repo_path(cfg.tokenizer)), repo_path(cfg.mixture),
                                     per_task=cfg.sample_prompts, max_len=recipe.model.max_seq_len)
        publish(out_dir, final, metrics, samples)
        run.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(out_dir / "model", "checkpoint")
        run.log_artifact(out_dir / "samples.json")
        if final.meta.get("expert_load"):
            run.log_dict({"tokens_per_layer_expert": final.meta["expert_load"]}, "moe_load_histogram.json")
        run.log_figure_loss_curve(_curves(final.meta["history"]), f"{stage}_loss.png")
        # The logged model is a torch.export program; the grouped GEMM does not export
        # on CPU in fp32, so it is traced with the equivalent gather dispatch.
        example = torch.zeros(1, min(16, cfg.seq_len), dtype=torch.long)
        run.log_model(model.eval().set_moe_dispatch("gather"), example, name=f"{stage}-model")
    # Only now is the stage complete; until here a re-run resumes instead of retraining.
    ray_job.discard_run(job, recipe.ray)
    return metrics


def final_metrics(meta: dict) -> dict:
    history = meta["history"]
    last = {k: v[-1][1] for k, v in history.items() if v}
    out = {"step": meta["step"], "tokens_seen": meta["tokens_seen"],
           "resumes": len(meta.get("resumed_at", [])),
           "train_loss": last.get("train/loss"), "val_loss": None}
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


def _curves(history: dict) -> dict[str, list[tuple[int, float]]]:
    return {k: [(int(s), float(v)) for s, v in history.get(k, [])] for k in ("train/loss", "val/loss")}


def publish(out_dir: Path, final, metrics: dict, samples: list) -> None:
    """Write the stage's outputs into a scratch directory, then move each into place.

    Items are swapped one by one (rather than the whole directory) so files DVC keeps
    beside them, such as its .gitignore, survive.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".publish-", dir=out_dir))
    try:
        save_checkpoint(scratch / "model", final.step, final.model_state, None,
                        meta={k: v for k, v in final.meta.items() if k != "checkpoint"}, keep_last=1)
        (scratch / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        _write_loss_csv(scratch / "loss.csv", final.meta["history"])
        (scratch / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False))
        for item in sorted(scratch.iterdir()):
            _swap_into(item, out_dir / item.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _swap_into(new: Path, dest: Path) -> None:
    """Replace ``dest`` by ``new`` with renames only; the old one is removed last."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.is_dir():
        shutil.rmtree(old)
    elif old.exists():
        old.unlink()


def _write_loss_csv(path: Path, history: dict) -> None:
    train = dict((int(s), v) for s, v in history.get("train/loss", []))
    val = dict((int(s), v) for s, v in history.get("val/loss", []))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "train_loss", "val_loss"])
        for step in sorted(set(train) | set(val)):
            writer.writerow([step, train.get(step, ""), val.get(step, "")])


def code_fingerprint() -> str:
    """Hash of the library's source: a code change must not resume an old run."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
