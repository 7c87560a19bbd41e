"""Stage ``sweep_point``: one point of a scaling sweep, a short pre-training run.

``python -m pipeline.stages sweep -m sweep=moe_grid`` (``make sweep``) is a Hydra multirun over
the sweep's sizes x architectures x token budgets (``conf/sweep/``). Each point is the
pretrain stage's own Ray Train job on the pretrain mixture, with the point's model and
``stage.pretrain.schedule.total_steps`` set from its token budget, published into
``outputs/sweep/<sweep>/<point>/`` and tracked in MLflow with the tags ``sweep``,
``sweep.size``, ``sweep.arch``, ``sweep.tokens``, ``sweep.model`` (the
model config as JSON, from which the fit computes the point's active parameters) and,
for a seed other than 0, ``sweep.seed`` (absent for seed 0, so the runs of a sweep made
before replicates existed still count as finished: a rerun looks them up by tags). The
point is ``<size>-<arch>-<tokens>``, with ``-seed<n>`` for a recipe ``seed`` other than
0: seed replicates (``make seeds``) are points of their own.

A point whose fingerprint (the training run's resume key: model, schedule, data,
code, world size) already has a FINISHED run tagged with the same sweep is not run
again, so an interrupted sweep continues where it stopped; an interrupted point
resumes from its last Ray Train checkpoint.

Before the first point runs, every model of the grid is built and the whole recipe
validated with it, so a bad size or architecture stops the sweep before any training.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import asdict, replace
from pathlib import Path

from pipeline.configbase import from_dict
from pipeline.recipe import validate
from pipeline.runner.spec import StageContext, StageResult
from pipeline.scaling.grid import SweepConfig, point_model, steps_for_tokens
from pipeline.stages.train import PRETRAIN

STAGE = "sweep_point"
OUT_ROOT = "outputs/sweep"


def point_config(raw: dict, sweep_dir: Path | None = None) -> tuple[dict, None]:
    """The recipe config of the job's sweep point (``raw`` holds a ``sweep`` section).

    Raises ConfigError naming the key for a bad sweep, or for a grid model the recipe
    rejects (every size x arch is checked, not only this job's)."""
    raw = copy.deepcopy(raw)
    raw.pop("scaling", None)  # the fit's and planner's config: not the point's
    sweep = from_dict(SweepConfig, raw.pop("sweep"), "sweep")
    base = validate(raw)
    for size in sweep.sizes:
        for arch in sweep.archs:
            validate({**raw, "model": asdict(point_model(sweep, base.model, size.name, arch.name))})
    model = point_model(sweep, base.model)
    raw["model"] = asdict(model)
    train = raw["stage"]["pretrain"]
    tokens_per_step = train["seq_len"] * train["batch_size"] * train["grad_accum"] * base.ray.num_workers
    train["schedule"]["total_steps"] = steps_for_tokens(sweep.tokens, tokens_per_step)
    train["out_dir"] = f"{OUT_ROOT}/{sweep.name}/{point_name(sweep.size, sweep.arch, sweep.tokens, base.seed)}"
    train["sample_prompts"] = 0
    raw["sweep_point"] = {"sweep": sweep.name, "size": sweep.size, "arch": sweep.arch, "tokens": sweep.tokens,
                          "seed": base.seed}  # fmt: skip
    validate({k: v for k, v in raw.items() if k != "sweep_point"})
    # The point's own directory, not Hydra's per-job one: a rerun finds its outputs.
    return raw, None


def point_name(size: str, arch: str, tokens: int | str, seed: int) -> str:
    """A sweep point's name: ``<size>-<arch>-<tokens>``, ``-seed<n>`` for a seed other than 0."""
    return f"{size}-{arch}-{tokens}" + (f"-seed{seed}" if int(seed) else "")


def point_base(name: str) -> str:
    """The point's name without its seed: what seed replicates of one point share."""
    return re.sub(r"-seed\d+$", "", name)


def _point(ctx: StageContext) -> dict:
    return ctx.raw["sweep_point"]


def _tags(ctx: StageContext) -> dict[str, str]:
    point = _point(ctx)
    return {
        "sweep": point["sweep"],
        "sweep.size": point["size"],
        "sweep.arch": point["arch"],
        "sweep.tokens": str(point["tokens"]),
        "sweep.model": json.dumps(asdict(ctx.recipe.model), sort_keys=True),
        **({"sweep.seed": str(point["seed"])} if int(point["seed"]) else {}),
    }


def _work(ctx: StageContext) -> StageResult:
    result = PRETRAIN.work(ctx)

    # The point's numbers and curve; no model export or checkpoint upload per point.
    def log(run, out_dir: Path) -> None:
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(out_dir / "loss.csv")

    return replace(result, log=log)


SWEEP_POINT = replace(
    PRETRAIN,
    name=STAGE,
    params=lambda raw: {**PRETRAIN.params(raw), "sweep_point": raw["sweep_point"]},
    work=_work,
    tags=_tags,
    reuse_finished=True,
    extra_keys=("sweep_point",),
    dvc=None,  # runs beside the recipe (make sweep), not in its DAG
)
