"""Where tracking goes: the config, the store's URI, and a fast reachability check.

Store: an explicit ``TrackingConfig.uri`` wins, then ``MLFLOW_TRACKING_URI``, then an
embedded SQLite database at ``<repo>/mlflow.db``. For any SQLite store the artifacts of
a newly created experiment live next to the database (``<db dir>/mlartifacts``), so a
repo-local store never scatters ``mlruns/`` into whatever directory a stage ran from.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.configbase import require

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERIMENT = "mobilemoe"


class TrackingError(RuntimeError):
    """Tracking is misconfigured, unreachable, or an artifact cannot be logged as asked."""


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = DEFAULT_EXPERIMENT
    enabled: bool = True
    artifact_root: str | None = None  # None: <db dir>/mlartifacts for SQLite stores
    # How long one tracking call is retried (busy database, server restarting) before
    # tracking is declared lost for the rest of the stage; training goes on without it.
    retry_seconds: float = 120.0
    # A server that does not accept a connection within this many seconds at stage
    # start is reported as unreachable before any work starts.
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        require(self.uri is None or self.uri.strip() != "", "uri", f"must be null or a non-empty URI, got {self.uri!r}")
        require(self.experiment.strip() != "", "experiment", "must be a non-empty string")
        require(
            self.artifact_root is None or self.artifact_root != "",
            "artifact_root",
            "must be null or a non-empty path/URI",
        )
        require(self.retry_seconds >= 0, "retry_seconds", f"must be >= 0, got {self.retry_seconds}")
        require(self.connect_timeout > 0, "connect_timeout", f"must be > 0, got {self.connect_timeout}")


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
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def check_store(cfg: TrackingConfig) -> str:
    """Fail within ``cfg.connect_timeout`` seconds, naming the store, if it cannot be used.

    A server (http, https, or a database URI with a host) must accept a TCP connection;
    a SQLite store's directory must exist and be writable. Returns the resolved URI.
    MLflow's own client would instead retry a closed port for minutes.
    """
    uri = resolve_tracking_uri(cfg)
    source = (
        "tracking.uri"
        if cfg.uri
        else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "the embedded default")
    )
    advice = (
        "start the server, point tracking.uri / MLFLOW_TRACKING_URI at a reachable store, "
        "or run with tracking.enabled=false"
    )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(
                f"tracking store {uri} ({source}): folder {folder} is missing or not writable; {advice}"
            )
        return uri
    parsed = urlparse(uri)
    if parsed.hostname:
        port = parsed.port or {"https": 443, "http": 80, "postgresql": 5432, "mysql": 3306}.get(parsed.scheme)
        if port is None:
            return uri
        try:
            with socket.create_connection((parsed.hostname, port), timeout=cfg.connect_timeout):
                pass
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise TrackingError(
                f"tracking store {uri} ({source}) is unreachable: {reason} "
                f"(no connection to {parsed.hostname}:{port} within {cfg.connect_timeout:g} s); "
                f"{advice}"
            ) from None
    return uri
