"""Stage ``report``: the recipe's report, last in the DAG (pipeline/report).

Published into ``stage.report.out_dir``: ``report.md``, its self-contained twin
``report.html`` (images embedded) and ``plots/``. A stage that has not run is shown as
missing. Everything here names MLflow runs or carries the profile's timings, so it is
uncached in dvc.yaml; the HTML is also logged to the recipe's parent MLflow run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.recipe import repo_path
from pipeline.report.scaling import CONTROLS
from pipeline.runner.spec import Dvc, Stage, StageContext, StageResult, uncached

log = logging.getLogger(__name__)

KEY = "stage.report"


def run_stages() -> tuple[str, ...]:
    """The stages whose MLflow runs the report links, in recipe order (the registry's)."""
    from pipeline.stages.registry import recipe_stages

    return tuple(stage.name for stage in recipe_stages() if stage.name != REPORT.name)


def report_inputs(recipe, raw: dict, runs: dict):
    """Where every upstream stage of ``recipe`` publishes, as the report reads it."""
    from pipeline.report import ReportInputs

    stage, targets = recipe.stage, recipe.stage.eval.targets
    return ReportInputs(
        model=raw["model"],
        mixtures={name: repo_path(recipe.data.out_dir) / name for name in ("pretrain", "midtrain", "sft")},
        train_dirs={name: repo_path(getattr(stage, name).out_dir) for name in ("pretrain", "midtrain", "sft", "qat")},
        eval_dirs={
            name: repo_path(stage.eval.out_dir) / name
            for name in ("pretrain", "midtrain", "sft", "qat")
            if getattr(targets, name) is not None
        },
        export_dir=repo_path(stage.export.out_dir),
        profile_dir=repo_path(stage.profile.out_dir),
        runs=runs,
        run_order=run_stages(),
        title=stage.report.title,
        scaling_dir=repo_path(stage.report.scaling_dir),
        scaling_plan=stage.report.scaling_plan,
    )


def _runs(recipe, raw: dict) -> dict:
    from pipeline.stages.registry import get
    from pipeline.tracking import OUT_DIR_PARAM, TrackingError, flatten_params, latest_stage_runs

    if not recipe.tracking.enabled:
        return {}
    # Each stage's output directory as its run logs it (the stage's own params): the
    # report links the runs that wrote what it reads, not a study of the same stage.
    out_dirs = {name: flatten_params(get(name).params(raw)).get(OUT_DIR_PARAM) for name in run_stages()}
    try:
        return latest_stage_runs(
            recipe.tracking,
            run_stages(),
            recipe.stage.report.ui_url,
            {name: d for name, d in out_dirs.items() if d is not None},
        )
    except TrackingError as err:  # the report stands without links
        log.warning("the report links no MLflow runs: %s", err)
        return {}


def _work(ctx: StageContext) -> StageResult:
    from pipeline.report import collect, write_report
    from pipeline.runner import cluster, remote

    recipe = ctx.recipe
    # The stages' outputs are read here, on the driver (DVC's declared inputs live on
    # its disk); the plots and pages are drawn by the task, wherever it runs.
    data = collect(report_inputs(recipe, ctx.raw, _runs(recipe, ctx.raw)))
    cluster.start(recipe.ray)
    summary = remote.call(recipe.ray, write_report, data, remote.Out(ctx.scratch), num_cpus=1)
    metrics = {"missing": len(summary["missing"]), "plots": len(summary["plots"])}
    if summary["missing"]:
        log.warning("the report shows these as missing (not run): %s", ", ".join(summary["missing"]))

    def log_outputs(run, out_dir: Path) -> None:
        for item in ("report.html", "report.md"):
            run.log_artifact(out_dir / item)
            run.log_artifact_to_parent(out_dir / item, "report")
        run.log_artifact(out_dir / "plots", "plots")

    return StageResult(metrics, log=log_outputs)


REPORT = Stage(
    name="report",
    out_dir=lambda recipe: recipe.stage.report.out_dir,
    inputs=lambda recipe: [],
    params=lambda raw: {"model": raw["model"], "stage": raw["stage"]["report"]},
    work=_work,
    outputs=("report.md", "report.html", "plots"),
    resources=lambda recipe: {"CPU": 1},
    dvc=Dvc(
        order=100,
        desc="last: the recipe's report (HTML + markdown) from every stage's outputs",
        code=(
            "pipeline/stages/report.py",
            "pipeline/report",
            "pipeline/model/accounting.py",
            "pipeline/configbase.py",
            "pipeline/recipe.py",
        ),
        deps=(
            *(f"${{data.out_dir}}/{name}/manifest.json" for name in ("pretrain", "midtrain", "sft")),
            *(
                f"${{stage.{name}.out_dir}}/{item}"
                for name in ("pretrain", "midtrain", "sft", "qat")
                # the final checkpoint (model/meta.json) gives the expert-load table
                for item in ("metrics.json", "loss.csv", "model")
            ),
            "${stage.export.out_dir}/metrics.json",
            "${stage.profile.out_dir}/metrics.json",
            "${stage.profile.out_dir}/plots",
            *(f"${{stage.eval.out_dir}}/{name}/metrics.json" for name in ("pretrain", "midtrain", "sft", "qat")),
            # the scaling tools' published results (committed; make scaling-fit / plan / closed-loop)
            f"${{{KEY}.scaling_dir}}/fit.json",
            f"${{{KEY}.scaling_dir}}/predicted_vs_measured.png",
            f"${{{KEY}.scaling_dir}}/closed_loop.json",
            *(f"${{{KEY}.scaling_dir}}/{name}" for name, _ in CONTROLS),
            f"${{{KEY}.scaling_dir}}/plan/${{{KEY}.scaling_plan}}/plan.json",
        ),
        params=("model", KEY),
        # Links to MLflow runs and the profile's timings: never cached.
        outs=tuple(uncached(f"${{{KEY}.out_dir}}/{item}") for item in ("report.html", "report.md", "plots")),
    ),
)

STAGES = (REPORT,)
