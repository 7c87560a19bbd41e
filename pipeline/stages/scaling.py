"""Stage ``scaling_fit``: fit the scaling law to a sweep's finished points (MLflow).

``python -m pipeline.stages scaling_fit`` (``make scaling-fit``) reads every FINISHED
``sweep_point`` run tagged with ``scaling.sweep`` from MLflow (the newest run of each
size x arch x tokens), fits the law with the sizes in ``scaling.hold_out_sizes`` at the
largest token budget held out, and publishes into ``outputs/scaling/``: ``fit.json``
(coefficients, fit and held-out errors, the paired comparisons), ``points.csv``,
``comparison.md`` (each architecture against its dense twin) and the figures. The
numbers and files are logged to the stage's MLflow run.

Not a DVC stage: its input is the tracking store, which DVC cannot hash; sweeps run
beside the recipe (DESIGN: "Sweeps (scaling) run pretrain points beside the recipe").
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.configbase import ConfigError, from_dict
from pipeline.model.config import ModelConfig
from pipeline.runner.errors import StageInputError
from pipeline.runner.spec import Stage, StageContext, StageResult
from pipeline.scaling import forms, noise
from pipeline.scaling.artifacts import OUTPUTS, read_points, write_fit
from pipeline.scaling.config import ScalingStageConfig
from pipeline.scaling.fit import Observation, ScalingFitError, check_identifiable
from pipeline.scaling.law import law_inputs
from pipeline.stages.sweep import STAGE as SWEEP_STAGE
from pipeline.stages.sweep import point_name

OUT_DIR = "outputs/scaling"


def scaling_config(raw: dict) -> ScalingStageConfig:
    return from_dict(ScalingStageConfig, raw.get("scaling") or {}, "scaling")


def observations(
    runs: list, hold_out_sizes: list[str], hold_out_budgets: str = "largest", saved: list[Observation] = ()
) -> list[Observation]:
    """Sweep points from MLflow runs (oldest first; a later run of the same point wins)
    and from ``saved`` points (a points table read by
    :func:`pipeline.scaling.artifacts.read_points`; a run in MLflow wins over a saved
    point of the same name).

    Each run's ``sweep.model`` tag is the model config (JSON); N and the FFN shape are
    computed from it with the model's accounting, D is ``final/tokens_seen``, the loss
    ``final/val_loss``, the training seconds ``perf/train_seconds`` (left out for a run
    that was resumed, ``perf/resumes`` > 0: its clock restarted). Then the points are
    marked held out by :func:`hold_out`. Raises ScalingFitError naming a run whose tags
    or metrics are missing, or a held-out size the sweep has no point of."""
    latest: dict[str, Observation] = {p.name: p for p in saved}
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        missing = [k for k in ("sweep.size", "sweep.arch", "sweep.tokens", "sweep.model") if k not in tags]
        missing += [k for k in ("final/val_loss", "final/tokens_seen") if k not in metrics]
        if missing:
            raise ScalingFitError(f"MLflow run {run.info.run_id} is missing {', '.join(missing)}")
        name = point_name(tags["sweep.size"], tags["sweep.arch"], tags["sweep.tokens"], tags.get("sweep.seed", "0"))
        try:
            model = from_dict(ModelConfig, json.loads(tags["sweep.model"]), "model")
        except (ConfigError, json.JSONDecodeError) as err:
            raise ScalingFitError(f"sweep point {name}: its sweep.model tag is not a model config: {err}") from None
        latest[name] = Observation(
            name=name,
            family=tags["sweep.arch"],
            inputs=law_inputs(model, metrics["final/tokens_seen"]),
            loss=float(metrics["final/val_loss"]),
            seconds=metrics.get("perf/train_seconds") if not metrics.get("perf/resumes") else None,
            size=tags["sweep.size"],
        )
    return hold_out([latest[name] for name in sorted(latest)], hold_out_sizes, hold_out_budgets)


def hold_out(points: list[Observation], sizes: list[str], budgets: str = "largest") -> list[Observation]:
    """``points`` with those of ``sizes`` at the largest token budget (or at every
    budget, ``budgets="all"``) marked held out, every other point not. The budget is the
    point name's third field (:func:`pipeline.stages.sweep.point_name`). Raises
    ScalingFitError for a size no point has."""
    budget = {p.name: int(p.name.split("-")[2]) for p in points}
    largest = max(budget.values(), default=0)
    present = {p.size for p in points}
    absent = [s for s in sizes if s not in present]
    if absent and points:
        raise ScalingFitError(f"hold_out_sizes {absent}: no point of that size (sizes: {sorted(present)})")
    return [replace(p, held_out=p.size in sizes and (budgets == "all" or budget[p.name] == largest)) for p in points]


@dataclass
class SweepPointsInput:
    """The finished points of a sweep in MLflow (and those of a saved points table):
    enough of them to fit at least one of the candidate law forms."""

    key: str
    tracking: object  # TrackingConfig
    sweep: str
    hold_out_sizes: list[str]
    hold_out_budgets: str = "largest"
    points_csv: str | None = None
    forms: list[str] = field(default_factory=lambda: ["joint"])
    noise_groups: list[str] = field(default_factory=list)

    def check(self) -> list[Observation]:
        from pipeline import tracking

        try:
            saved = read_points(Path(self.points_csv)) if self.points_csv else []
        except ScalingFitError as err:
            raise StageInputError(f"scaling.points_csv: {err}") from None
        runs = tracking.tagged_runs(self.tracking, {"stage": SWEEP_STAGE, "sweep": self.sweep})
        try:
            points = observations(runs, self.hold_out_sizes, self.hold_out_budgets, saved)
            if len(self.forms) == 1:
                check_identifiable(points, forms.get(self.forms[0]))
            sizes = sorted({p.size for p in points if not p.held_out})
            if len(self.forms) > 1 and len(sizes) < 2:
                raise ScalingFitError(
                    f"the fitted points have {len(sizes)} size(s) {sizes}: choosing between the law forms "
                    f"{self.forms} predicts each size from the others and needs two or more; fit one form "
                    "(scaling.forms=[joint]) or run more sizes"
                )
            errors = []
            for name in self.forms:
                try:
                    check_identifiable(points, forms.get(name))
                except ScalingFitError as err:
                    errors.append(f"{name}: {err}")
            if len(errors) == len(self.forms):
                raise ScalingFitError("no candidate law form can be fitted: " + "; ".join(errors))
            points, _ = noise.weigh(points, tuple(self.noise_groups))  # a group without replicates: named here
        except ScalingFitError as err:
            raise StageInputError(f"{self.key}: sweep {self.sweep!r}: {err}") from None
        return points


def _raw_inputs(raw: dict) -> list:
    from pipeline.recipe import repo_path, validate

    cfg = scaling_config(raw)
    recipe = validate({k: v for k, v in raw.items() if k not in ("sweep", "scaling")})
    table = str(repo_path(cfg.points_csv)) if cfg.points_csv else None  # relative to the repository, as out_dir
    return [
        SweepPointsInput(
            "scaling.sweep",
            recipe.tracking,
            cfg.sweep,
            cfg.hold_out_sizes,
            cfg.hold_out_budgets,
            table,
            cfg.forms,
            cfg.noise_groups,
        )
    ]


def _work(ctx: StageContext) -> StageResult:
    from pipeline.runner import cluster, remote

    cfg = scaling_config(ctx.raw)
    points = ctx.inputs["scaling.sweep"]
    pairs = [(p.a, p.b, p.label) for p in cfg.pairs]
    cluster.start(ctx.recipe.ray)
    summary = remote.call(
        ctx.recipe.ray,
        write_fit,
        points,
        pairs,
        remote.Out(ctx.scratch),
        cfg.dense,
        cfg.sweep,
        cfg.bootstrap_replicates,
        cfg.forms,
        noise_groups=cfg.noise_groups,
        shapes=sweep_shapes(ctx.raw.get("sweep"), cfg.sweep, ctx.recipe.model),
        num_cpus=1,
    )
    metrics = {
        "points": summary["points"],
        "held_out_points": summary["held_out_points"],
        "fit_rms_rel_error": summary["fit_error"]["rms"],
        "fit_max_rel_error": summary["fit_error"]["max"],
        "held_out_rms_rel_error": summary["held_out_error"]["rms"],
        "held_out_max_rel_error": summary["held_out_error"]["max"],
        "prediction_band": summary["prediction_band"],
        "held_out_inside_interval": summary["held_out_inside_interval"],
        **{f"coef_{k}": v for k, v in summary["coefficients"].items()},
    }

    def log(run, out_dir: Path) -> None:
        run.set_tags({"sweep": cfg.sweep, "scaling.formula": summary["formula"]})
        for name in OUTPUTS:
            run.log_artifact(out_dir / name)

    return StageResult(metrics, log=log)


def sweep_shapes(raw_sweep: dict | None, name: str, base: ModelConfig) -> dict[tuple[str, str], dict] | None:
    """:func:`pipeline.scaling.law.shape_of` for every (size, arch) model of the composed
    sweep config ``raw_sweep``, built on ``base`` as the sweep builds them; None when that
    config is not the sweep ``name`` whose points are fitted (its sizes and archs would be
    another sweep's) or is not a valid grid. A pair whose model cannot be built (e.g. a
    total twin that rounds to no width) is left out: the sweep never trained it, and a
    fitted point without its shape makes the fit claim no span."""
    from pipeline.scaling.grid import SweepConfig, point_model
    from pipeline.scaling.law import shape_of

    if not raw_sweep or raw_sweep.get("name") != name:
        return None
    try:
        grid = from_dict(SweepConfig, dict(raw_sweep), "sweep")
    except ConfigError:
        return None
    shapes = {}
    for size, arch in itertools.product(grid.sizes, grid.archs):
        try:
            shapes[size.name, arch.name] = shape_of(point_model(grid, base, size.name, arch.name))
        except ValueError:  # ConfigError included
            continue
    return shapes


def prepare_fit(raw: dict, sweep_dir: Path | None) -> tuple[dict, Path | None]:
    """The fit's config as composed (``sweep_dir`` unused: one fit per call)."""
    scaling_config(raw)  # a bad scaling section fails here, naming its key
    return raw, None


SCALING_FIT = Stage(
    name="scaling_fit",
    out_dir=lambda recipe: OUT_DIR,
    raw_out_dir=lambda raw: scaling_config(raw).out_dir,
    inputs=lambda recipe: [],
    params=lambda raw: {"scaling": raw.get("scaling", {})},
    work=_work,
    outputs=OUTPUTS,
    resources=lambda recipe: {"CPU": 1},
    extra_keys=("sweep", "scaling"),
    raw_inputs=_raw_inputs,
)
