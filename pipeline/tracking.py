"""MLflow, in one place: stores, run layout, lineage tags, artifacts, models, datasets.

Run layout: one *parent* run per recipe execution and one *nested* run per stage. DVC
runs each stage as its own process, so the parent's id travels in the environment
variable ``MOBILEMOE_PARENT_RUN_ID`` (``make repro`` calls ``python -m pipeline.tracking
start`` before ``dvc repro`` and ``... end`` after it). A stage started without it (by
hand, or by ``dvc repro`` alone) makes its own parent named ``stage:<stage>`` so the
layout is always parent -> nested.

Store: an explicit ``TrackingConfig.uri`` wins, then ``MLFLOW_TRACKING_URI``, then an
embedded SQLite database at ``<repo>/mlflow.db``. For any SQLite store the artifacts of
a newly created experiment live next to the database (``<db dir>/mlartifacts``), so a
repo-local store never scatters ``mlruns/`` into whatever directory a stage ran from.

Training workers in other processes (Ray Train) use :class:`RemoteMetricLogger`, which
writes to an existing run by id and never touches MLflow's global "active run".

Nothing here runs at import: mlflow is imported lazily so that ``import pipeline`` stays
cheap and side-effect free (importing mlflow takes seconds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from pipeline.configbase import require
from pipeline.hashing import sha256_json

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[1]
PARENT_ENV = "MOBILEMOE_PARENT_RUN_ID"
DEFAULT_EXPERIMENT = "mobilemoe"

# MLflow's limits (mlflow.utils.validation); copied as numbers so flattening does not
# need mlflow imported, and checked against mlflow in the tests.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
MAX_PARAMS_PER_BATCH = 100
MAX_DATASET_DIGEST = 36


class TrackingError(RuntimeError):
    """Tracking is misconfigured or an artifact cannot be logged as asked."""


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    enabled: bool = True
    artifact_root: str | None = None  # None: <db dir>/mlartifacts for SQLite stores

    def __post_init__(self) -> None:
        require(self.uri is None or (isinstance(self.uri, str) and self.uri.strip() != ""),
                "uri", f"must be null or a non-empty URI string, got {self.uri!r}")
        require(isinstance(self.experiment, str) and self.experiment.strip() != "",
                "experiment", "must be a non-empty string")
        require(isinstance(self.enabled, bool), "enabled", f"must be true or false, got {self.enabled!r}")
        require(self.artifact_root is None or (isinstance(self.artifact_root, str) and self.artifact_root != ""),
                "artifact_root", "must be null or a non-empty path/URI")


# --------------------------------------------------------------------------- stores


def resolve_tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def default_artifact_root(uri: str) -> str | None:
    """Artifact root for a new experiment on ``uri``: beside a SQLite file, else the server's."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def ensure_experiment(client: "MlflowClient", cfg: TrackingConfig, uri: str) -> str:
    """Experiment id for ``cfg.experiment``, creating it (with its artifact root) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_root or default_artifact_root(uri)
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location)
    except MlflowException:
        # Two stage processes may race to create it; the loser reads the winner's.
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


def _client(uri: str) -> "MlflowClient":
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# --------------------------------------------------------------------------- recipe (parent) runs


def start_recipe_run(cfg: TrackingConfig | None = None, tags: Mapping[str, Any] | None = None,
                     name: str = "recipe", repo_root: Path = REPO_ROOT) -> str:
    """Create the parent run of one recipe execution and return its id (left RUNNING)."""
    cfg = cfg or TrackingConfig()
    uri = resolve_tracking_uri(cfg)
    client = _client(uri)
    exp_id = ensure_experiment(client, cfg, uri)
    all_tags = {**git_tags(repo_root), **_str_tags(tags or {}), "mlflow.runName": name}
    return client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id


def end_recipe_run(run_id: str, status: str = "FINISHED", cfg: TrackingConfig | None = None) -> None:
    require(status in ("FINISHED", "FAILED", "KILLED"), "status", f"must be FINISHED, FAILED or KILLED, got {status!r}")
    _client(resolve_tracking_uri(cfg or TrackingConfig())).set_terminated(run_id, status=status)


def runs_of_parent(parent_run_id: str, tracking_uri: str | None = None) -> list["Run"]:
    """Nested runs of ``parent_run_id``, oldest first."""
    client = _client(tracking_uri or resolve_tracking_uri(TrackingConfig()))
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs(
        [exp_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
    )


# --------------------------------------------------------------------------- lineage


def git_tags(repo_root: Path = REPO_ROOT) -> dict[str, str]:
    """``git_commit`` (or "unknown") and ``git_dirty`` (tracked files modified)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    # Untracked files (outputs, caches) do not change what the code does; edits do.
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git_commit": commit, "git_dirty": dirty}


def dvc_input_hashes(repo_root: Path, stage: str) -> dict[str, str]:
    """For each dep of ``stage`` (dvc.yaml) produced by another stage, that out's md5 (dvc.lock).

    Reads the upstream *outs* rather than the stage's own lock entry because DVC rewrites
    a stage's lock entry only after the stage finishes: while it runs, the upstream outs
    are what it actually reads. A dep inside an upstream out directory reports the
    directory's hash under the directory's path. Missing files give an empty dict (a
    stage run outside DVC has no lineage to report).
    """
    import yaml

    repo_root = Path(repo_root)
    try:
        dvc_yaml = yaml.safe_load((repo_root / "dvc.yaml").read_text()) or {}
        dvc_lock = yaml.safe_load((repo_root / "dvc.lock").read_text()) or {}
    except FileNotFoundError:
        return {}
    stage_def = (dvc_yaml.get("stages") or {}).get(stage)
    if stage_def is None:
        return {}
    outs: dict[str, str] = {}
    for name, entry in (dvc_lock.get("stages") or {}).items():
        if name == stage:
            continue
        for out in (entry or {}).get("outs") or []:
            if "md5" in out:
                outs[_norm(out["path"])] = out["md5"]
    try:
        params = yaml.safe_load((repo_root / "params.yaml").read_text()) or {}
    except FileNotFoundError:
        params = {}
    hashes: dict[str, str] = {}
    for dep in stage_def.get("deps") or []:
        path = _norm(_interpolate(dep if isinstance(dep, str) else next(iter(dep)), params))
        for out_path, md5 in outs.items():
            if path == out_path or path.startswith(out_path + "/"):
                hashes[out_path] = md5
    return hashes


def _interpolate(text: str, params: Mapping[str, Any]) -> str:
    """Resolve DVC's ``${a.b.c}`` templating against params.yaml (unresolvable: unchanged)."""
    def lookup(match: "re.Match[str]") -> str:
        node: Any = params
        for key in match.group(1).strip().split("."):
            if not isinstance(node, Mapping) or key not in node:
                return match.group(0)
            node = node[key]
        return str(node)

    return re.sub(r"\$\{([^}]+)\}", lookup, text)


def _norm(path: str) -> str:
    return os.path.normpath(str(path)).replace(os.sep, "/")


# --------------------------------------------------------------------------- params and keys


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists of mappings are indexed (``sources.0.name``)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value):
            flat.update(flatten_params({str(i): v for i, v in enumerate(value)}, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = _truncate(text, MAX_PARAM_VALUE)
    return {sanitize_key(k): v for k, v in flat.items()}


def sanitize_key(key: str) -> str:
    """Make ``key`` a legal MLflow param/metric/tag key (chars, no ``//``, length)."""
    key = re.sub(r"[^/\w.\- ]", "_", str(key))
    key = re.sub(r"/+", "/", key).strip("/") or "_"
    return key[:MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    return value[: limit - len(marker)] + marker


def _str_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    # mlflow.* system tags (runName, parentRunId) pass through untouched.
    return {
        (k if k.startswith("mlflow.") else sanitize_key(k)): _truncate(str(v), MAX_TAG_VALUE)
        for k, v in tags.items()
    }


# --------------------------------------------------------------------------- stage runs


class StageRun:
    """Handle on a stage's nested run. Every method is a no-op when tracking is disabled."""

    def __init__(self, run_id: str | None, tracking_uri: str | None):
        self._run_id = run_id
        self._uri = tracking_uri

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str | None:
        return self._uri

    @property
    def enabled(self) -> bool:
        return self._run_id is not None

    def remote_logger(self) -> "RemoteMetricLogger | None":
        """A picklable logger for worker processes writing into this run."""
        return RemoteMetricLogger(self._uri, self._run_id) if self.enabled else None

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):  # MLflow's per-batch cap
            _client(self._uri).log_batch(self._run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            _log_metrics(_client(self._uri), self._run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        _client(self._uri).log_batch(self._run_id, tags=[RunTag(k, v) for k, v in _str_tags(tags).items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            _log_artifact(_client(self._uri), self._run_id, path, artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """``name`` ending in .yaml/.yml is written as YAML, anything else as JSON."""
        if self.enabled:
            _client(self._uri).log_dict(self._run_id, dict(d), name)

    def log_dataset(self, manifest: Mapping[str, Any], name: str, context: str,
                    source: str | Path | None = None) -> str | None:
        """Record a data manifest as an MLflow dataset input; returns its digest.

        The digest is a hash of the whole manifest (which carries the per-file hashes), so
        two runs show the same dataset exactly when they read the same bytes. The
        manifest itself is logged as ``datasets/<name>.json``; unless ``source`` is given,
        the dataset's source points at that artifact.
        """
        if not self.enabled:
            return None
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        text = json.dumps(manifest, sort_keys=True, default=str)
        digest = sha256_json(manifest)[:MAX_DATASET_DIGEST]
        artifact = f"datasets/{sanitize_key(name)}.json"
        client = _client(self._uri)
        client.log_text(self._run_id, text, artifact)
        if source is None:
            source = f"{client.get_run(self._run_id).info.artifact_uri.rstrip('/')}/{artifact}"
        with warnings.catch_warnings():
            # MLflow registers the local source twice ("" and "file" schemes) and warns
            # that the path "can be interpreted in multiple ways"; both are the same class.
            warnings.simplefilter("ignore", UserWarning)
            src = resolve_dataset_source(str(source))
        dataset = MetaDataset(src, name=name, digest=digest)
        self._require_active()
        mlflow.log_input(dataset, context=context)
        return digest

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
        _client(self._uri).log_figure(self._run_id, fig, f"plots/{file}")

    def log_model(self, model: "torch.nn.Module", input_example: "torch.Tensor", name: str,
                  dynamic_dims: Sequence[int] = (0, 1)) -> str | None:
        """Log ``model`` as an MLflow 3 LoggedModel in pt2 (torch.export) form; returns its URI.

        ``dynamic_dims`` are the input dims left symbolic (batch and sequence for token
        ids ``[B, T]``). MLflow marks only those as ``Dim.AUTO``; a size-1 example dim is
        specialised to 1 by torch.export, so pass ``T > 1``. The model is exported in eval
        mode (dropout off) and its training flag restored afterwards. If torch.export
        cannot trace the model this raises TrackingError: there is deliberately no pickle
        fallback, because pickled models execute code on load.
        """
        if not self.enabled:
            return None
        import mlflow
        import mlflow.pytorch
        import torch

        if not isinstance(input_example, torch.Tensor):
            raise TrackingError(
                f"log_model({name}): input_example must be a tensor, got {type(input_example).__name__}"
            )
        self._require_active()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                output = model(input_example)
            signature = _tensor_signature(input_example, output, dynamic_dims)
            info = mlflow.pytorch.log_model(
                model,
                name=sanitize_key(name).replace("/", "_"),
                input_example=input_example.cpu().numpy(),
                signature=signature,
                serialization_format="pt2",
                # Explicit requirements skip MLflow's requirement inference, which
                # re-imports the model in a subprocess (~6 s) and warns about "+cpu" tags.
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            )
        except Exception as err:
            raise TrackingError(
                f"log_model({name}): exporting {type(model).__name__} with torch.export (pt2) failed: "
                f"{type(err).__name__}: {err}"
            ) from err
        finally:
            model.train(was_training)
        return info.model_uri

    def _require_active(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self._run_id:
            raise TrackingError(
                "log_dataset/log_model need this stage run to be MLflow's active run: call them "
                "inside the `with stage_run(...)` block of the process that opened it"
            )


def _tensor_signature(example: "torch.Tensor", output: Any, dynamic_dims: Sequence[int]):
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


@contextmanager
def stage_run(cfg: TrackingConfig, stage: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, repo_root: Path = REPO_ROOT) -> Iterator[StageRun]:
    """Open the nested MLflow run of one stage; FINISHED on success, FAILED on exception.

    Logs ``params`` flattened (dotted keys) plus the nested original as ``config.yaml``,
    and tags the run with ``stage``, ``git_commit``, ``git_dirty`` and
    ``dvc_input.<path>`` for each upstream output the stage depends on.
    """
    if not cfg.enabled:
        yield StageRun(None, None)
        return
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    client = _client(uri)
    parent_id = os.environ.get(PARENT_ENV) or None
    own_parent = parent_id is None
    if own_parent:
        exp_id = ensure_experiment(client, cfg, uri)
        parent_id = client.create_run(exp_id, run_name=f"stage:{stage}", tags=git_tags(repo_root)).info.run_id
    else:
        try:
            # Children join the parent's experiment so the UI shows them nested.
            exp_id = client.get_run(parent_id).info.experiment_id
        except Exception as err:
            raise TrackingError(
                f"{PARENT_ENV}={parent_id} is not a run in the store {uri} ({type(err).__name__}); "
                f"unset it or start a recipe run first"
            ) from None
    lineage = {
        "stage": stage,
        **git_tags(repo_root),
        **{f"dvc_input.{p}": md5 for p, md5 in dvc_input_hashes(repo_root, stage).items()},
    }
    try:
        active = mlflow.start_run(experiment_id=exp_id, run_name=stage, parent_run_id=parent_id,
                                  tags=_str_tags({**lineage, **(tags or {})}))
    except BaseException:
        if own_parent:  # do not leave an empty parent RUNNING forever
            client.set_terminated(parent_id, status="FAILED")
        raise
    run = StageRun(active.info.run_id, uri)
    status = "FINISHED"
    try:
        if params:
            run.log_params(params)
            run.log_dict(params, "config.yaml")
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status=status)
        if own_parent:
            client.set_terminated(parent_id, status=status)


# --------------------------------------------------------------------------- worker-side logging


class RemoteMetricLogger:
    """Logs into an existing run from any process (Ray workers) without an active run.

    Holds only two strings, so it pickles cheaply; the MlflowClient is built on first use
    in the receiving process.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client_obj: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"])

    @property
    def _client(self) -> "MlflowClient":
        if self._client_obj is None:
            self._client_obj = _client(self.tracking_uri)
        return self._client_obj

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        _log_metrics(self._client, self.run_id, metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _log_artifact(self._client, self.run_id, path, artifact_path)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        self._client.log_dict(self.run_id, dict(d), name)


def _log_metrics(client: "MlflowClient", run_id: str, metrics: Mapping[str, float], step: int | None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(sanitize_key(k), float(v), now, int(step or 0)) for k, v in metrics.items()]
    if items:
        client.log_batch(run_id, metrics=items)


def _log_artifact(client: "MlflowClient", run_id: str, path: str | Path, artifact_path: str | None) -> None:
    path = Path(path)
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise TrackingError(f"log_artifact: {path} does not exist")


# --------------------------------------------------------------------------- CLI for make repro


def main(argv: Sequence[str] | None = None) -> int:
    """``start [--experiment E] [--tag k=v ...]`` prints a parent run id; ``end ID [--status S]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.tracking")
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="create the recipe's parent run and print its id")
    start.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    start.add_argument("--name", default="recipe")
    start.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    end = sub.add_parser("end", help="mark a parent run finished/failed")
    end.add_argument("run_id")
    end.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    end.add_argument("--status", default="FINISHED", choices=["FINISHED", "FAILED", "KILLED"])
    args = parser.parse_args(argv)
    cfg = TrackingConfig(experiment=args.experiment)
    if args.cmd == "start":
        bad = [t for t in args.tag if "=" not in t]
        if bad:
            parser.error(f"--tag expects KEY=VALUE, got {bad[0]!r}")
        tags = dict(t.split("=", 1) for t in args.tag)
        # Only the id goes to stdout so `export ID=$(python -m pipeline.tracking start)` works.
        print(start_recipe_run(cfg, tags, name=args.name))
    else:
        end_recipe_run(args.run_id, args.status, cfg)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
