"""The lifecycle of the recipe's MLflow runs: experiment, parent, stage runs, orphans.

One parent run per recipe execution, one nested run per stage. DVC runs each stage as
its own process, so the parent's id travels in the environment variable
``MOBILEMOE_PARENT_RUN_ID`` (``make repro`` opens the parent before ``dvc repro`` and
closes it after: :mod:`pipeline.runner.repro`). A stage started without it (by hand, or
by ``dvc repro`` alone) makes its own parent named ``stage:<stage>``, so the layout is
always parent -> nested.

Killed processes: every run records the process that owns it (``runner.host``,
``runner.pid``, ``runner.started``). Whenever a run opens, RUNNING runs of the
experiment whose owner on this host is gone are closed as KILLED, and a stage that
resumes an interrupted training run (same ``resume_key``) continues *its* MLflow run
(moved under the current parent, ``resumes`` counted) instead of starting a second one,
so the UI shows each stage execution once.

Side-service faults: after a run is open, every call goes through
:class:`~pipeline.tracking.resilient.Resilient`, so a busy or vanished store delays the
stage at most ``retry_seconds`` per call and then stops being used; the stage finishes
and reports what was not logged. Opening a run is the exception: it is retried the
same way, then fails with a clear error, since no work has started yet.

Only MLflow's client API is used: no run is ever MLflow's "active run" in any process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.configbase import require
from pipeline.process import ProcessId
from pipeline.tracking.config import (
    REPO_ROOT,
    TrackingConfig,
    TrackingError,
    default_artifact_root,
    resolve_tracking_uri,
)
from pipeline.tracking.keys import str_tags
from pipeline.tracking.lineage import dvc_input_hashes, git_tags
from pipeline.tracking.logger import RunLogger, client_for
from pipeline.tracking.resilient import Resilient, is_service_error

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
PARENT_ENV = "MOBILEMOE_PARENT_RUN_ID"
# Opens the experiment on the training-runs view of the UI instead of its GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(client: MlflowClient, cfg: TrackingConfig, uri: str) -> str:
    """Experiment id for ``cfg.experiment``, creating it (with its artifact root) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = cfg.artifact_root or default_artifact_root(uri)
        try:
            return client.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            # Two stage processes may race to create it; the loser reads the winner's.
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if exp.tags.get(key) != value:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def close_orphans(client: MlflowClient, experiment_id: str, keep: str | None = None) -> list[str]:
    """Mark KILLED every RUNNING run whose owner process on this host is gone.

    Runs owned by a live process, by another host, or by no recorded process are left
    alone. Returns the ids closed.
    """
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000):
        owner = ProcessId.from_tags(run.data.tags)
        if run.info.run_id == keep or owner is None or owner.is_alive() is not False:
            continue
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    if closed:
        log.info("closed %d MLflow run(s) left RUNNING by killed processes: %s", len(closed), ", ".join(closed))
    return closed


def _context_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus what MLflow records of any run it starts (user, source, entry point)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(dict(tags))


def start_recipe_run(
    cfg: TrackingConfig | None = None,
    tags: Mapping[str, Any] | None = None,
    name: str = "recipe",
    repo_root: Path = REPO_ROOT,
    owner: ProcessId | None = None,
) -> str:
    """Create the parent run of one recipe execution and return its id (left RUNNING).

    ``owner`` is the process whose death means the recipe was killed (``make``'s shell);
    it defaults to this process.
    """
    cfg = cfg or TrackingConfig()
    uri = resolve_tracking_uri(cfg)
    client = client_for(uri)
    guard = Resilient(cfg.retry_seconds)
    exp_id = guard.retrying(ensure_experiment, client, cfg, uri)
    guard.retrying(close_orphans, client, exp_id)
    all_tags = {
        **git_tags(repo_root),
        **str_tags(tags or {}),
        **(owner or ProcessId.current()).to_tags(),
        "mlflow.runName": name,
    }
    return guard.retrying(client.create_run, exp_id, run_name=name, tags=all_tags).info.run_id


def end_recipe_run(run_id: str, status: str = "FINISHED", cfg: TrackingConfig | None = None) -> None:
    require(status in ("FINISHED", "FAILED", "KILLED"), "status", f"must be FINISHED, FAILED or KILLED, got {status!r}")
    cfg = cfg or TrackingConfig()
    Resilient(cfg.retry_seconds).retrying(client_for(resolve_tracking_uri(cfg)).set_terminated, run_id, status=status)


def _find_resumable(client: MlflowClient, exp_id: str, stage: str, resume_key: str) -> Run | None:
    """The newest unfinished run of ``stage`` for the same training run, whose owner is gone."""
    runs = client.search_runs(
        [exp_id],
        f"tags.stage = '{stage}' and tags.resume_key = '{resume_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        owner = ProcessId.from_tags(run.data.tags)
        if run.info.status != "FINISHED" and (owner is None or owner.is_alive() is False):
            return run
    return None


@contextmanager
def stage_run(
    cfg: TrackingConfig,
    stage: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    repo_root: Path = REPO_ROOT,
    resume_key: str | None = None,
    continue_run: bool = False,
    journal: Path | None = None,
) -> Iterator[RunLogger]:
    """Open the nested MLflow run of one stage; FINISHED on success, FAILED on exception,
    KILLED on Ctrl-C.

    Logs ``params`` flattened (dotted keys) plus the nested original as ``config.yaml``,
    and tags the run with ``stage``, ``git_commit``, ``git_dirty``, the owning process
    and ``dvc_input.<path>`` for each upstream output the stage depends on, and
    ``resume_key`` (the training run's fingerprint). With ``continue_run`` (the caller
    found the interrupted work of that key to resume), the unfinished MLflow run of the
    same key is continued rather than duplicated. ``journal`` receives what could not be
    logged. Raises TrackingError when the run cannot be opened (after
    ``cfg.retry_seconds``).
    """
    if not cfg.enabled:
        yield RunLogger(None, None, 0.0)
        return
    uri = resolve_tracking_uri(cfg)
    client = client_for(uri)
    guard = Resilient(cfg.retry_seconds, journal)
    me = ProcessId.current()
    lineage = {
        "stage": stage,
        **git_tags(repo_root),
        **me.to_tags(),
        **{f"dvc_input.{p}": md5 for p, md5 in dvc_input_hashes(repo_root, stage).items()},
        **({"resume_key": resume_key} if resume_key else {}),
    }
    all_tags = str_tags({**lineage, **(tags or {})})
    continue_key = resume_key if continue_run else None
    try:
        parent_id, own_parent, run_id, resumes = guard.retrying(
            _open, client, cfg, uri, stage, continue_key, all_tags, me, repo_root
        )
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - classified right below
        if not is_service_error(err):
            raise
        raise TrackingError(
            f"cannot open the MLflow run of stage {stage} in {uri}: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:300] if str(err) else ''}"
        ) from None
    run = RunLogger(uri, run_id, cfg.retry_seconds, journal, resumes=resumes)
    run.guard = guard  # one budget and one journal for the whole stage
    status = "FINISHED"
    try:
        if params and resumes == 0:
            run.log_params(params)
            run.log_dict(params, "config.yaml")
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as err:
        status = "FAILED"
        run.record_failure(err)
        raise
    finally:
        # A failure leaves the runs RUNNING for the next start's orphan sweep instead of
        # raising over the stage's own outcome.
        guard("end of run", client.set_terminated, run_id, status=status)
        if own_parent:
            guard("end of parent run", client.set_terminated, parent_id, status=status)


def _open(
    client: MlflowClient,
    cfg: TrackingConfig,
    uri: str,
    stage: str,
    continue_key: str | None,
    tags: dict[str, str],
    me: ProcessId,
    repo_root: Path,
) -> tuple[str, bool, str, int]:
    """(parent id, whether we created it, the stage run's id, resume count); see
    stage_run. ``continue_key``: continue the unfinished run of this resume key, if any."""
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    parent_id = os.environ.get(PARENT_ENV) or None
    if parent_id is None:
        exp_id = ensure_experiment(client, cfg, uri)
    else:
        try:
            exp_id = client.get_run(parent_id).info.experiment_id  # children join the parent's experiment
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(
                f"{PARENT_ENV}={parent_id} is not a run in the store {uri}; unset it or start a recipe run first"
            ) from None
    resumable = _find_resumable(client, exp_id, stage, continue_key) if continue_key else None
    close_orphans(client, exp_id, keep=resumable.info.run_id if resumable else None)
    own_parent = parent_id is None
    if own_parent:
        parent_tags = _context_tags({**git_tags(repo_root), **me.to_tags()})
        parent_id = client.create_run(exp_id, run_name=f"stage:{stage}", tags=parent_tags).info.run_id
    if resumable is not None:
        run_id = resumable.info.run_id
        resumes = int(resumable.data.tags.get("resumes", "0")) + 1
        moved = {**tags, "resumes": str(resumes), "mlflow.parentRunId": parent_id}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in moved.items()])
        client.update_run(run_id, status="RUNNING")  # last: the run is live again
        log.info("continuing MLflow run %s of the interrupted stage %s (resume %d)", run_id, stage, resumes)
        return parent_id, own_parent, run_id, resumes
    try:
        run_tags = _context_tags({**tags, "resumes": "0", "mlflow.parentRunId": parent_id})
        run_id = client.create_run(exp_id, run_name=stage, tags=run_tags).info.run_id
    except BaseException:
        if own_parent:  # do not leave an empty parent RUNNING forever
            client.set_terminated(parent_id, status="FAILED")
        raise
    return parent_id, own_parent, run_id, 0
