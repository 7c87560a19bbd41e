"""MLflow runs of the recipe: one parent per recipe execution, one nested run per stage.

DVC runs each stage as its own process, so the parent's id travels in the environment
variable ``MOBILEMOE_PARENT_RUN_ID`` (``make repro`` calls ``python -m pipeline.tracking
start`` before ``dvc repro`` and ``... end`` after it). A stage started without it (by
hand, or by ``dvc repro`` alone) makes its own parent named ``stage:<stage>`` so the
layout is always parent -> nested.

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

Training workers in other processes (Ray Train) use :class:`RemoteMetricLogger`, which
writes to an existing run by id and never touches MLflow's global "active run".
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.configbase import require
from pipeline.hashing import sha256_json
from pipeline.process import ProcessId
from pipeline.tracking.config import (
    REPO_ROOT,
    TrackingConfig,
    TrackingError,
    default_artifact_root,
    resolve_tracking_uri,
)
from pipeline.tracking.keys import MAX_DATASET_DIGEST, MAX_PARAMS_PER_BATCH, flatten_params, sanitize_key, str_tags
from pipeline.tracking.lineage import dvc_input_hashes, git_tags
from pipeline.tracking.resilient import Resilient, is_service_error

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
PARENT_ENV = "MOBILEMOE_PARENT_RUN_ID"
# Opens the experiment on the training-runs view of the UI instead of its GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _client(uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


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


# --------------------------------------------------------------------------- recipe (parent) runs


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
    client = _client(uri)
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
    Resilient(cfg.retry_seconds).retrying(_client(resolve_tracking_uri(cfg)).set_terminated, run_id, status=status)


def runs_of_parent(parent_run_id: str, tracking_uri: str | None = None) -> list[Run]:
    """Nested runs of ``parent_run_id``, oldest first."""
    client = _client(tracking_uri or resolve_tracking_uri(TrackingConfig()))
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


def latest_stage_runs(cfg: TrackingConfig, stages: Sequence[str], ui_url: str) -> dict[str, dict[str, str]]:
    """The newest FINISHED run of each stage in the experiment, as
    ``{stage: {"run_id", "url"}}`` with ``url`` the run's page under ``ui_url`` (the
    local MLflow UI, e.g. ``http://127.0.0.1:5000``). Stages without one are left out.
    Raises TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return {}
        found = {}
        for stage in stages:
            runs = client.search_runs(
                [experiment.experiment_id],
                f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if runs:
                run_id = runs[0].info.run_id
                url = f"{ui_url.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{run_id}"
                found[stage] = {"run_id": run_id, "url": url}
        return found
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(f"cannot read the stage runs from {uri}: {type(err).__name__}: {err}") from None


def _search_experiment(client: MlflowClient, cfg: TrackingConfig) -> str | None:
    """The experiment stage runs of this process go to: the parent run's when one is set
    (children join it), else ``cfg.experiment``'s; None if it does not exist yet."""
    parent_id = os.environ.get(PARENT_ENV)
    if parent_id:
        return client.get_run(parent_id).info.experiment_id
    experiment = client.get_experiment_by_name(cfg.experiment)
    return None if experiment is None else experiment.experiment_id


def finished_stage_run(cfg: TrackingConfig, stage: str, resume_key: str, tags: Mapping[str, str]) -> dict | None:
    """The final metrics (``final/`` prefix removed) of the newest FINISHED run of
    ``stage`` with this ``resume_key`` and every tag in ``tags``, or None if there is
    none: a sweep point that already ran to the end is not run again. Raises
    TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    query = " and ".join(
        [f"tags.stage = '{stage}'", f"tags.resume_key = '{resume_key}'", "attributes.status = 'FINISHED'"]
        + [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
    )
    try:
        client = _client(uri)
        experiment_id = _search_experiment(client, cfg)
        if experiment_id is None:
            return None
        runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(f"cannot search the finished {stage} runs in {uri}: {type(err).__name__}: {err}") from None
    if not runs:
        return None
    metrics = runs[0].data.metrics
    return {"run_id": runs[0].info.run_id, **{k[6:]: v for k, v in metrics.items() if k.startswith("final/")}}


def tagged_runs(cfg: TrackingConfig, tags: Mapping[str, str], status: str = "FINISHED") -> list[Run]:
    """Every run of the experiment with all ``tags`` and ``status``, oldest first
    (e.g. the points of one sweep). Raises TrackingError when the store cannot be read."""
    uri = resolve_tracking_uri(cfg)
    query = " and ".join([f"attributes.status = '{status}'"] + [f"tags.`{k}` = '{v}'" for k, v in tags.items()])
    try:
        client = _client(uri)
        experiment_id = _search_experiment(client, cfg)
        if experiment_id is None:
            return []
        runs, token = [], None
        while True:
            page = client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs
    except Exception as err:  # noqa: BLE001 - any store failure: say which store
        raise TrackingError(
            f"cannot search the runs tagged {dict(tags)} in {uri}: {type(err).__name__}: {err}"
        ) from None


# --------------------------------------------------------------------------- stage runs


class StageRun:
    """Handle on a stage's nested run. Every method is a no-op when tracking is disabled,
    and best effort otherwise (see the module docstring)."""

    def __init__(self, run_id: str | None, tracking_uri: str | None, guard: Resilient | None = None, resumes: int = 0):
        self._run_id = run_id
        self._uri = tracking_uri
        self._guard = guard or Resilient(0.0)
        self.resumes = resumes

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        return self._uri

    @property
    def enabled(self) -> bool:
        return self._run_id is not None

    @property
    def guard(self) -> Resilient:
        return self._guard

    def remote_logger(self, journal: Path | None = None, prefix: str = "") -> RemoteMetricLogger | None:
        """A picklable logger for worker processes writing into this run; ``prefix`` is
        put before every metric name (two jobs of one stage keep apart curves)."""
        if not self.enabled:
            return None
        return RemoteMetricLogger(self._uri, self._run_id, self._guard.retry_seconds, journal, prefix)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):  # MLflow's per-batch cap
            batch = items[i : i + MAX_PARAMS_PER_BATCH]
            self._guard(
                "params",
                _client(self._uri).log_batch,
                self._run_id,
                params=batch,
                payload={p.key: p.value for p in batch},
            )

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            _log_metrics(self._guard, _client(self._uri), self._run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        tags = str_tags(tags)
        self._guard(
            "tags",
            _client(self._uri).log_batch,
            self._run_id,
            tags=[RunTag(k, v) for k, v in tags.items()],
            payload=tags,
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            _log_artifact(self._guard, _client(self._uri), self._run_id, path, artifact_path)

    def log_artifact_to_parent(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log into this run's parent (the recipe run), if it has one: what the whole
        recipe produced, such as its report."""
        if not self.enabled:
            return
        parent = self._guard(
            "parent lookup", lambda: _client(self._uri).get_run(self._run_id).data.tags.get("mlflow.parentRunId")
        )
        if parent:
            _log_artifact(self._guard, _client(self._uri), parent, path, artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """``name`` ending in .yaml/.yml is written as YAML, anything else as JSON."""
        if self.enabled:
            self._guard(f"artifact {name}", _client(self._uri).log_dict, self._run_id, dict(d), name, payload=d)

    def log_dataset(
        self, manifest: Mapping[str, Any], name: str, context: str, source: str | Path | None = None
    ) -> str | None:
        """Record a data manifest as an MLflow dataset input; returns its digest.

        The digest is a hash of the whole manifest (which carries the per-file hashes), so
        two runs show the same dataset exactly when they read the same bytes. The
        manifest itself is logged as ``datasets/<name>.json``; unless ``source`` is given,
        the dataset's source points at that artifact.
        """
        if not self.enabled:
            return None
        digest = sha256_json(manifest)[:MAX_DATASET_DIGEST]
        self._require_active()
        self._guard(
            f"dataset {name}", self._log_dataset, manifest, name, context, source, digest, payload={"digest": digest}
        )
        return digest

    def _log_dataset(
        self, manifest: Mapping[str, Any], name: str, context: str, source: str | Path | None, digest: str
    ) -> None:
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset

        artifact = f"datasets/{sanitize_key(name)}.json"
        client = _client(self._uri)
        client.log_text(self._run_id, json.dumps(manifest, sort_keys=True, default=str), artifact)
        if source is None:
            source = artifact_url(self._uri, f"{client.get_run(self._run_id).info.artifact_uri.rstrip('/')}/{artifact}")
        if str(source).startswith(("http://", "https://")):
            src = HTTPDatasetSource(str(source))
        else:
            with warnings.catch_warnings():
                # MLflow registers the local source twice ("" and "file" schemes) and warns
                # that the path "can be interpreted in multiple ways"; both are the same class.
                warnings.simplefilter("ignore", UserWarning)
                src = resolve_dataset_source(str(source))
        mlflow.log_input(MetaDataset(src, name=name, digest=digest), context=context)

    def log_figure_loss_curve(self, history: Mapping[str, Sequence[tuple[int, float]]], name: str) -> None:
        """One line per series, step on x, log-scale y when all values are positive."""
        if not self.enabled:
            return
        from matplotlib.figure import Figure

        # A bare Figure renders with the Agg canvas and never touches pyplot's global
        # state or a GUI backend, which matters inside Ray workers and headless CI.
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.add_subplot()
        positive = True
        for series, points in history.items():
            if not points:
                continue
            steps, values = zip(*points)
            positive = positive and min(values) > 0
            ax.plot(steps, values, label=series)
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        file = name if name.endswith(".png") else f"{name}.png"
        self._guard(f"plot {file}", _client(self._uri).log_figure, self._run_id, fig, f"plots/{file}")

    def log_model(
        self, model: torch.nn.Module, input_example: torch.Tensor, name: str, dynamic_dims: Sequence[int] = (0, 1)
    ) -> str | None:
        """Log ``model`` as an MLflow 3 LoggedModel in pt2 (torch.export) form; returns its URI.

        ``dynamic_dims`` are the input dims left symbolic (batch and sequence for token
        ids ``[B, T]``). MLflow marks only those as ``Dim.AUTO``; a size-1 example dim is
        specialised to 1 by torch.export, so pass ``T > 1``. The model is exported in eval
        mode (dropout off) and its training flag restored afterwards. If torch.export
        cannot trace the model this raises TrackingError: there is deliberately no pickle
        fallback, because pickled models execute code on load. A store that fails is a
        lost log (None), like every other call.
        """
        if not self.enabled:
            return None
        import torch

        if not isinstance(input_example, torch.Tensor):
            raise TrackingError(
                f"log_model({name}): input_example must be a tensor, got {type(input_example).__name__}"
            )
        self._require_active()
        was_training = model.training
        model.eval()
        try:
            info = self._guard(f"model {name}", _log_pt2_model, model, input_example, name, dynamic_dims)
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(
                f"log_model({name}): exporting {type(model).__name__} with torch.export (pt2) failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        finally:
            model.train(was_training)
        return info.model_uri if info is not None else None

    def record_failure(self, err: BaseException) -> None:
        """Say in the run why the stage failed (tracking/failure.py); best effort, never
        raises over the stage's own error."""
        if not self.enabled:
            return
        from pipeline.tracking.failure import failure_record

        try:
            record = failure_record(err)
            self.set_tags(record["tags"])
            self.log_metrics(record["metrics"])
            self._guard("error.txt", _client(self._uri).log_text, self._run_id, record["traceback"], "error.txt")
            if record["details"] is not None:
                self.log_dict(record["details"], "error_details.json")
        except Exception as record_err:  # noqa: BLE001 - the stage's own error is what propagates
            log.warning("could not record why stage failed: %s: %s", type(record_err).__name__, record_err)

    def lost_summary(self) -> str | None:
        """What tracking failed to record in this process (None when nothing was lost)."""
        return self._guard.summary()

    def _require_active(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self._run_id:
            raise TrackingError(
                "log_dataset/log_model need this stage run to be MLflow's active run: call them "
                "inside the `with stage_run(...)` block of the process that opened it"
            )


def artifact_url(tracking_uri: str, artifact_uri: str) -> str:
    """Where an artifact can be read: an ``mlflow-artifacts:`` URI (a tracking server
    that proxies artifacts) becomes the server's HTTP download URL; any other URI (a
    file or object-store location) is returned as it is."""
    from urllib.parse import urlparse

    if not artifact_uri.startswith("mlflow-artifacts:"):
        return artifact_uri
    parsed = urlparse(artifact_uri)
    # mlflow-artifacts:/<path> is served by the tracking server itself;
    # mlflow-artifacts://host:port/<path> names the serving host.
    base = f"{urlparse(tracking_uri).scheme or 'http'}://{parsed.netloc}" if parsed.netloc else tracking_uri
    return f"{base.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{parsed.path.lstrip('/')}"


def _log_pt2_model(model: torch.nn.Module, example: torch.Tensor, name: str, dynamic_dims: Sequence[int]):
    import mlflow.pytorch
    import torch

    with torch.no_grad():
        output = model(example)
    return mlflow.pytorch.log_model(
        model,
        name=sanitize_key(name).replace("/", "_"),
        input_example=example.cpu().numpy(),
        signature=_tensor_signature(example, output, dynamic_dims),
        serialization_format="pt2",
        # Explicit requirements skip MLflow's requirement inference, which re-imports
        # the model in a subprocess (~6 s) and warns about "+cpu" tags.
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )


def _tensor_signature(example: torch.Tensor, output: Any, dynamic_dims: Sequence[int]):
    import numpy as np
    import torch
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(t: torch.Tensor, dyn: Sequence[int]) -> TensorSpec:
        shape = tuple(-1 if i in dyn else s for i, s in enumerate(t.shape))
        return TensorSpec(np.dtype(str(t.dtype).removeprefix("torch.")), shape)

    dims = [d % example.ndim for d in dynamic_dims]
    outputs = None
    if isinstance(output, torch.Tensor) and output.dtype != torch.bfloat16:
        # Output dims that follow the dynamic input dims (logits [B, T, V]) are dynamic too.
        outputs = Schema([spec(output, [d for d in dims if d < output.ndim])])
    return ModelSignature(inputs=Schema([spec(example, dims)]), outputs=outputs)


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
) -> Iterator[StageRun]:
    """Open the nested MLflow run of one stage; FINISHED on success, FAILED on exception,
    KILLED on Ctrl-C.

    Logs ``params`` flattened (dotted keys) plus the nested original as ``config.yaml``,
    and tags the run with ``stage``, ``git_commit``, ``git_dirty``, the owning process
    and ``dvc_input.<path>`` for each upstream output the stage depends on, and
    ``resume_key`` (the training run's fingerprint). With ``continue_run`` (the caller
    found the interrupted work of that key to resume), the unfinished MLflow run of the
    same key is continued rather than duplicated. ``journal`` receives what could not be
    logged.
    Raises TrackingError when the run cannot be opened (after ``cfg.retry_seconds``).
    """
    if not cfg.enabled:
        yield StageRun(None, None)
        return
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = _client(uri)
    guard = Resilient(cfg.retry_seconds, journal)
    me = ProcessId.current()
    lineage = {
        "stage": stage,
        **git_tags(repo_root),
        **me.to_tags(),
        **{f"dvc_input.{p}": md5 for p, md5 in dvc_input_hashes(repo_root, stage).items()},
        **({"resume_key": resume_key} if resume_key else {}),
    }
    try:
        parent_id, own_parent, active, resumes = guard.retrying(
            _open,
            client,
            cfg,
            uri,
            stage,
            resume_key if continue_run else None,
            str_tags({**lineage, **(tags or {})}),
            me,
            repo_root,
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
    run = StageRun(active.info.run_id, uri, guard, resumes)
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
        _close(mlflow, client, guard, status, parent_id if own_parent else None)


def _open(
    client: MlflowClient,
    cfg: TrackingConfig,
    uri: str,
    stage: str,
    continue_key: str | None,
    tags: dict[str, str],
    me: ProcessId,
    repo_root: Path,
):
    """(parent id, whether we created it, the active run, resume count); see stage_run.
    ``continue_key``: continue the unfinished run of this resume key, if there is one."""
    import mlflow
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
        parent_id = client.create_run(
            exp_id, run_name=f"stage:{stage}", tags={**git_tags(repo_root), **me.to_tags()}
        ).info.run_id
    if resumable is not None:
        resumes = int(resumable.data.tags.get("resumes", "0")) + 1
        client.log_batch(
            resumable.info.run_id, tags=_run_tags({**tags, "resumes": str(resumes), "mlflow.parentRunId": parent_id})
        )
        active = mlflow.start_run(run_id=resumable.info.run_id)  # last: sets it RUNNING again
        log.info("continuing MLflow run %s of the interrupted stage %s (resume %d)", active.info.run_id, stage, resumes)
        return parent_id, own_parent, active, resumes
    try:
        active = mlflow.start_run(
            experiment_id=exp_id, run_name=stage, parent_run_id=parent_id, tags={**tags, "resumes": "0"}
        )
    except BaseException:
        if own_parent:  # do not leave an empty parent RUNNING forever
            client.set_terminated(parent_id, status="FAILED")
        raise
    return parent_id, own_parent, active, 0


def _run_tags(tags: Mapping[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def _close(mlflow, client: MlflowClient, guard: Resilient, status: str, own_parent: str | None) -> None:
    """End the stage run (and a parent it created); a failure leaves them RUNNING for the
    next start's orphan sweep instead of raising over the stage's own outcome."""
    if guard("end of run", mlflow.end_run, status=status) is None and guard.lost:
        try:  # the store is gone: forget the run locally so this process can open another
            mlflow.tracking.fluent._active_run_stack.get().clear()
        except AttributeError:  # pragma: no cover - only the local bookkeeping is at stake
            pass
    if own_parent:
        guard("end of parent run", client.set_terminated, own_parent, status=status)


# --------------------------------------------------------------------------- worker-side logging


class RemoteMetricLogger:
    """Logs into an existing run from any process (Ray workers) without an active run.

    Holds only plain values, so it pickles cheaply; the MlflowClient is built on first
    use in the receiving process. Best effort, like :class:`StageRun`: a store that stays
    unreachable for ``retry_seconds`` is dropped and what was not logged goes to
    ``journal``.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        retry_seconds: float = 120.0,
        journal: Path | None = None,
        prefix: str = "",
    ):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retry_seconds = retry_seconds
        self.journal = str(journal) if journal else None
        self.prefix = prefix
        self._client_obj: MlflowClient | None = None
        self.guard = Resilient(retry_seconds, Path(journal) if journal else None)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.tracking_uri,
            "run_id": self.run_id,
            "retry_seconds": self.retry_seconds,
            "journal": self.journal,
            "prefix": self.prefix,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _log_metrics(self.guard, self._client, self.run_id, {self.prefix + k: v for k, v in metrics.items()}, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _log_artifact(self.guard, self._client, self.run_id, path, artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        self.guard(f"artifact {name}", self._client.log_dict, self.run_id, dict(d), name, payload=d)


def _log_metrics(
    guard: Resilient, client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None
) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(sanitize_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
    if items:
        guard(
            "metrics",
            client.log_batch,
            run_id,
            metrics=items,
            payload={"step": int(step or 0), "metrics": {m.key: m.value for m in items}},
        )


def _log_artifact(
    guard: Resilient, client: MlflowClient, run_id: str, path: str | Path, artifact_path: str | None
) -> None:
    path = Path(path)
    what = f"artifact {artifact_path + '/' if artifact_path else ''}{path.name}"
    call: Callable
    if path.is_dir():
        call = client.log_artifacts
    elif path.is_file():
        call = client.log_artifact
    else:
        raise TrackingError(f"log_artifact: {path} does not exist")
    guard(what, call, run_id, str(path), artifact_path, payload={"path": str(path)})
