"""The one way a stage runs.

In this order, for every stage:

1. validate the whole recipe config (names the bad key; nothing has started);
2. check every input the stage declares: present, intact, fitting (names the key);
3. check that the embedded Ray can give what the job asks for (on a cluster: that the
   run storage is shared and tracking is a server), and that the tracking store
   answers (each in seconds);
4. take the stage's locks: its outputs, and its work (the fingerprint naming its Ray
   run); a second run of either stops here, naming the holder. A stage that reuses
   finished work (a sweep point) returns here the metrics of a FINISHED MLflow run with
   the same fingerprint and tags;
5. open the stage's MLflow run (continuing an interrupted one of the same work);
6. do the work (on Ray) into a scratch directory;
7. publish the outputs (each item atomically, only once all exist), then log them;
8. close the MLflow run with the right status, and clean up (e.g. a finished Ray run)
   while still holding the locks.

A failure before step 7 leaves every earlier output byte-identical. Tracking that is
lost during the work does not stop it, nor does a failure to log the published
outputs; the stage ends by saying what was not logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from pipeline.recipe import REPO_ROOT, validate
from pipeline.runner import cluster
from pipeline.runner.lock import stage_lock
from pipeline.runner.publish import publish, remove_stale_scratch, scratch_beside
from pipeline.runner.spec import Stage, StageContext, StageResult

log = logging.getLogger(__name__)

# Run-time state of the runner on this machine (locks, journals of what tracking lost):
# not an output, not an input, ignored by git and DVC.
STATE_DIR = REPO_ROOT / ".runner"


def run_stage(stage: Stage, raw: dict, sweep_dir: Path | None = None, state_dir: Path = STATE_DIR) -> dict:
    """Run ``stage`` on the config ``raw``; return its final metrics. See the module doc.

    ``state_dir`` holds the runner's local state (locks, tracking journals). Raises
    ConfigError, StageError (input, resources, lock), TrackingError (store unreachable)
    before any work starts, naming the problem."""
    from pipeline import tracking
    from pipeline.recipe import repo_path

    recipe = validate({k: v for k, v in raw.items() if k not in stage.extra_keys})
    configured = stage.raw_out_dir(raw) if stage.raw_out_dir else stage.out_dir(recipe)
    out_dir = (sweep_dir / stage.name) if sweep_dir else repo_path(configured)
    inputs = {item.key: item.check() for item in [*stage.inputs(recipe), *stage.raw_inputs(raw)]}
    cluster.check_resources(recipe.ray, stage.resources(recipe))
    cluster.check_cluster_config(recipe.ray, recipe.tracking)
    if recipe.tracking.enabled:
        tracking.check_store(recipe.tracking)
    locks = state_dir / "locks"
    with stage_lock(locks, stage.name, f"outputs {out_dir.resolve()}"):
        remove_stale_scratch(out_dir)  # left by a killed run; we hold the lock, nobody else writes here
        ctx = StageContext(stage.name, recipe, raw, out_dir, inputs)
        ctx.resume = stage.resume(ctx)
        key = ctx.resume.key if ctx.resume else None
        tags = stage.tags(ctx)
        if stage.reuse_finished and key and recipe.tracking.enabled:
            done = tracking.finished_stage_run(recipe.tracking, stage.name, key, tags)
            if done is not None:
                print(f"stage {stage.name}: {key} already finished (MLflow run {done['run_id']}); not run again")
                return done
        # Two runs of the same work (a by-hand run and a sweep point with equal configs)
        # would share one Ray Train run folder: the work is locked as well as the outputs.
        with stage_lock(locks, stage.name, f"run {key}") if key else contextlib.nullcontext():
            attempt = f"{stage.name}-{key or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            journal = state_dir / "untracked" / f"{attempt}.jsonl"
            ctx.journal = journal
            started = time.perf_counter()
            with tracking.stage_run(
                recipe.tracking,
                stage.name,
                params=stage.params(raw),
                tags=tags,
                resume_key=key,
                continue_run=_interrupted(ctx.resume, recipe),
                journal=journal,
            ) as run:
                ctx.run = run
                with scratch_beside(out_dir) as scratch:
                    ctx.scratch = scratch
                    result: StageResult = stage.work(ctx)
                    publish(scratch, out_dir, stage.outputs, stage.owns_out_dir)
                # From here on the result is published: tracking is best effort, and a
                # failure to log it must not turn the stage into a failure.
                _log_published(run, result, out_dir, time.perf_counter() - started)
            if result.on_published is not None:
                result.on_published()  # still under the locks: no rerun can race it
        _report_lost(stage.name, run, journal)
    return result.metrics


def _interrupted(plan, recipe) -> bool:
    """Whether an interrupted execution of the plan's work left a Ray Train run folder
    (a finished run deletes its own): only then is its MLflow run continued."""
    if plan is None:
        return False
    storage = cluster.storage(recipe.ray)
    return any(storage.exists(name) for name in plan.runs)


def _log_published(run, result: StageResult, out_dir: Path, seconds: float) -> None:
    run.log_metrics(
        {f"final/{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    )
    run.log_metrics({**result.perf, "perf/stage_seconds": seconds})
    if result.log is None:
        return
    try:
        result.log(run, out_dir)
    except Exception as err:  # noqa: BLE001 - reported below; the published result stands
        run.guard.record_failure("logging of the published outputs", err)
        log.warning("stage outputs are published, but logging them failed: %s: %s", type(err).__name__, err)


def _report_lost(name: str, run, journal: Path) -> None:
    """Say exactly what tracking did not record (driver and workers), if anything."""
    from pipeline.tracking import read_journal

    lines = []
    summary = run.lost_summary()
    if summary:
        lines.append(f"driver: {summary}")
    worker_journal = journal.with_suffix(".workers.jsonl")
    lost = read_journal(worker_journal)
    if lost:
        steps = sorted(
            {r["payload"]["step"] for r in lost if isinstance(r.get("payload"), dict) and "step" in r["payload"]}
        )
        span = f" (steps {steps[0]}-{steps[-1]})" if steps else ""
        lines.append(
            f"workers: {len(lost)} logging call(s) not recorded{span}; kept with their values in {worker_journal}"
        )
    if lines:
        print(
            f"stage {name} finished, but tracking was incomplete. The stage's own outputs (metrics.json, "
            f"loss.csv) hold every result.\n  " + "\n  ".join(lines),
            file=sys.stderr,
            flush=True,
        )
