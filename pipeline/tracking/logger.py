"""One logger for a stage's MLflow run, in the driver and in Ray workers alike.

:class:`RunLogger` holds plain values only (store URI, run id, retry budget, journal,
metric prefix), so it pickles into any process; the MLflow client and the
:class:`~pipeline.tracking.resilient.Resilient` guard are built on first use where it
lands. Every call goes through MLflow's client API (no active run, no global state) and
is best effort: a store that stays unreachable for ``retry_seconds`` is dropped and
what was not logged goes to ``journal``. A logger without a run id is disabled: every
method is a no-op.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.hashing import sha256_json
from pipeline.tracking.config import TrackingError
from pipeline.tracking.keys import MAX_DATASET_DIGEST, MAX_PARAMS_PER_BATCH, flatten_params, sanitize_key, str_tags
from pipeline.tracking.resilient import Resilient

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient


PARENT_TAG = "mlflow.parentRunId"
# What a logger carries into another process (the client and the guard are rebuilt there).
_STATE = ("tracking_uri", "run_id", "retry_seconds", "journal", "prefix", "resumes")


@functools.lru_cache(maxsize=8)
def client_for(uri: str) -> MlflowClient:
    """One MlflowClient per store URI in this process: building one opens the store (for
    SQLite, a schema check of about 1.5 s), which a stage would otherwise pay per call."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class RunLogger:
    """Writes into one existing run by id. ``prefix`` goes before every metric name
    (two jobs of one stage keep apart curves); ``resumes`` counts the executions that
    continued this run (set by :func:`~pipeline.tracking.lifecycle.stage_run`)."""

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        retry_seconds: float = 120.0,
        journal: Path | str | None = None,
        prefix: str = "",
        resumes: int = 0,
    ):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.retry_seconds = retry_seconds
        self.journal = str(journal) if journal else None
        self.prefix = prefix
        self.resumes = resumes
        self.guard = Resilient(retry_seconds, Path(journal) if journal else None)
        self._client_obj: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self) -> MlflowClient:
        if self._client_obj is None:
            self._client_obj = client_for(self.tracking_uri)
        return self._client_obj

    def for_workers(self, journal: Path | None = None, prefix: str = "") -> RunLogger | None:
        """A logger for worker processes writing into this run (its own journal and
        prefix); None when tracking is disabled."""
        if not self.enabled:
            return None
        return RunLogger(self.tracking_uri, self.run_id, self.retry_seconds, journal, prefix)

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):  # MLflow's per-batch cap
            batch = items[i : i + MAX_PARAMS_PER_BATCH]
            payload = {p.key: p.value for p in batch}
            self.guard("params", self.client.log_batch, self.run_id, params=batch, payload=payload)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(sanitize_key(self.prefix + k), float(v), now, int(step or 0)) for k, v in metrics.items()]
        if items:
            payload = {"step": int(step or 0), "metrics": {m.key: m.value for m in items}}
            self.guard("metrics", self.client.log_batch, self.run_id, metrics=items, payload=payload)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        tags = str_tags(tags)
        items = [RunTag(k, v) for k, v in tags.items()]
        self.guard("tags", self.client.log_batch, self.run_id, tags=items, payload=tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """A file or a directory (its contents) under ``artifact_path``; into ``run_id``
        instead of this run when given. Raises TrackingError if ``path`` does not exist."""
        if not self.enabled:
            return
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"log_artifact: {path} does not exist")
        call = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        what = f"artifact {artifact_path + '/' if artifact_path else ''}{path.name}"
        self.guard(what, call, run_id or self.run_id, str(path), artifact_path, payload={"path": str(path)})

    def log_artifact_to_parent(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log into this run's parent (the recipe run), if it has one: what the whole
        recipe produced, such as its report."""
        if not self.enabled:
            return
        parent = self.guard("parent lookup", lambda: self.client.get_run(self.run_id).data.tags.get(PARENT_TAG))
        if parent:
            self.log_artifact(path, artifact_path, run_id=parent)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """``name`` ending in .yaml/.yml is written as YAML, anything else as JSON."""
        if self.enabled:
            self.guard(f"artifact {name}", self.client.log_dict, self.run_id, dict(d), name, payload=d)

    def log_text(self, text: str, name: str) -> None:
        if self.enabled:
            self.guard(f"artifact {name}", self.client.log_text, self.run_id, text, name, payload={"chars": len(text)})

    def log_figure(self, figure: Figure, name: str) -> None:
        """A matplotlib figure as ``plots/<name>``."""
        if self.enabled:
            self.guard(f"plot {name}", self.client.log_figure, self.run_id, figure, f"plots/{name}")

    def log_dataset(self, manifest: Mapping[str, Any], name: str, context: str, source: str | Path | None = None):
        """Record a data manifest as an MLflow dataset input; returns its digest.

        The digest is a hash of the whole manifest (which carries the per-file hashes), so
        two runs show the same dataset exactly when they read the same bytes. The
        manifest itself is logged as ``datasets/<name>.json``; unless ``source`` is given,
        the dataset's source points at that artifact.
        """
        if not self.enabled:
            return None
        digest = sha256_json(manifest)[:MAX_DATASET_DIGEST]
        self.guard(
            f"dataset {name}", self._log_dataset, manifest, name, context, source, digest, payload={"digest": digest}
        )
        return digest

    def _log_dataset(self, manifest, name: str, context: str, source, digest: str) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        artifact = f"datasets/{sanitize_key(name)}.json"
        self.client.log_text(self.run_id, json.dumps(manifest, sort_keys=True, default=str), artifact)
        if source is None:
            root = self.client.get_run(self.run_id).info.artifact_uri.rstrip("/")
            source = artifact_url(self.tracking_uri, f"{root}/{artifact}")
        if str(source).startswith(("http://", "https://")):
            src = HTTPDatasetSource(str(source))
        else:
            with warnings.catch_warnings():
                # MLflow registers the local source twice ("" and "file" schemes) and warns
                # that the path "can be interpreted in multiple ways"; both are the same class.
                warnings.simplefilter("ignore", UserWarning)
                src = resolve_dataset_source(str(source))
        dataset = MetaDataset(src, name=name, digest=digest)._to_mlflow_entity()
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])

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
            self.log_text(record["traceback"], "error.txt")
            if record["details"] is not None:
                self.log_dict(record["details"], "error_details.json")
        except Exception as record_err:  # noqa: BLE001 - the stage's own error is what propagates
            import logging

            logging.getLogger(__name__).warning(
                "could not record why stage failed: %s: %s", type(record_err).__name__, record_err
            )

    def lost_summary(self) -> str | None:
        """What tracking failed to record in this process (None when nothing was lost)."""
        return self.guard.summary()


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
