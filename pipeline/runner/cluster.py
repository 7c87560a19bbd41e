"""Where stage work runs: the embedded Ray of this machine, or a cluster.

Ray starts embedded (``address="local"``: a new instance sized to this machine, never a
stray cluster some earlier ``ray start`` left behind) unless ``ray.address`` or
``RAY_ADDRESS`` names a cluster; under ``make repro`` every stage joins the recipe's one
embedded Ray instead (recipe_ray.py). What a job asks for is checked against what Ray can
give *before* Ray starts: an embedded Ray cannot grow, so asking for more CPUs than the
machine has is refused with the numbers; a cluster may grow (autoscaling), so a
shortfall there is reported as pending instead of waited on in silence, and waited on
for at most ``ray.start_timeout_s`` (then the job fails naming what is missing).

On a cluster nodes share no repository. What a node needs besides the pinned
environment (``requirements.lock``) is shipped: the ``pipeline`` package travels with
every job as a Ray ``py_modules`` entry (no worker imports the driver's editable
install); inputs travel through the run storage (storage.py) or, for a stage's Ray
task, through Ray itself (remote.py). Tracking must be a server every node reaches.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pipeline.configbase import ConfigError
from pipeline.runner.errors import ResourceError
from pipeline.runner.storage import RunStorage, is_uri, run_storage
from pipeline.train.config import RayConfig

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/, shipped to cluster workers

log = logging.getLogger(__name__)

# For every Ray worker process of our jobs: Ray Train's print patch makes each line a
# worker prints appear twice in the driver (once printed, once logged); off.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# On the embedded Ray only: Ray Train's controller polls its workers every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default 2 s; also each poll's wait, after which the
# same poll is awaited again, so nothing is lost), and a worker's ray.train.report blocks
# until a poll has taken its previous report (a queue of one): a start, each checkpoint
# and the end wait up to a poll interval. At 0.2 s a trivial TorchTrainer.fit took 11.3 s
# against 14.6 s (means of 6 fits each on a 2-core Xeon). A poll is one actor call per
# worker: cheap for the embedded Ray's few workers; a cluster's many keep Ray's default.
EMBEDDED_WORKER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
EMBEDDED_FLAG = "MOBILEMOE_EMBEDDED_RAY"  # set for the worker processes of the embedded Ray
# The address of the recipe's one embedded Ray, set by recipe_ray.py for the stages it runs.
RECIPE_RAY_ENV = "MOBILEMOE_RECIPE_RAY"

# The custom resource of the node that stands for the phone: the profile stage's task
# requests it. The embedded Ray declares one (this machine is the device); on a cluster,
# start the profiling node with `ray start ... --resources='{"device": 1}'`.
DEVICE = "device"


def cluster_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def on_cluster(cfg: RayConfig) -> bool:
    return cluster_address(cfg) is not None


def storage(cfg: RayConfig) -> RunStorage:
    """The run storage of ``ray.storage_path`` (see storage.py); ConfigError if unusable."""
    from pipeline.recipe import REPO_ROOT

    return run_storage(cfg.storage_path, on_cluster(cfg), REPO_ROOT)


def check_cluster_config(cfg: RayConfig, tracking) -> None:
    """On a cluster: the run storage must be shared and tracking a server (ConfigError,
    naming the key, before anything starts); a no-op for the embedded Ray.

    ``tracking`` is the recipe's TrackingConfig."""
    if not on_cluster(cfg):
        return
    storage(cfg)
    if not tracking.enabled:
        return
    from pipeline.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking)
    scheme = uri.split(":", 1)[0].lower() if is_uri(uri) else ""
    if scheme in ("file", "sqlite") or (not scheme and uri != "databricks"):  # a path: a file store
        raise ConfigError(
            f"tracking.uri: {uri} is a store on this machine, but ray.address (or RAY_ADDRESS) names a cluster whose "
            f"ranks on other nodes log to the same run; start a tracking server every node reaches "
            f"(mlflow server --host <this host's address> ...) and set tracking.uri or MLFLOW_TRACKING_URI "
            f"to it (http://host:5000), or run with tracking.enabled=false"
        )


def local_cpus() -> int:
    """CPUs this process may run on (affinity-aware, so a container's limit counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def check_resources(cfg: RayConfig, need: dict[str, int]) -> None:
    """Refuse a job the embedded Ray cannot run (``need``: ``{"CPU": n, "GPU": g}``);
    a no-op for a cluster, which may grow (see start())."""
    if cluster_address(cfg):
        return
    have = {"CPU": local_cpus(), DEVICE: 1}
    if need.get("GPU"):
        import torch

        have["GPU"] = torch.cuda.device_count()
    for resource, amount in need.items():
        if amount > have.get(resource, 0):
            fix = (
                "set ray.use_gpu=false or lower ray.num_workers"
                if resource == "GPU"
                else "lower ray.num_workers or ray.cpus_per_worker"
            )
            raise ResourceError(
                f"the job needs {amount} {resource}s (ray.num_workers={cfg.num_workers} x "
                f"ray.cpus_per_worker={cfg.cpus_per_worker}, ray.use_gpu={str(cfg.use_gpu).lower()}), but the "
                f"embedded Ray has this machine's {have.get(resource, 0)}; {fix}, or set ray.address to a cluster"
            )


# Ray's switch for "this machine is a cluster node": on (Linux's default), the embedded
# Ray binds GCS, raylet, object manager and every worker on all interfaces, with no
# authentication unless token auth is on; off, every listener binds 127.0.0.1. Ray reads it
# when it is imported (ray._private.ray_constants) and from the environment its processes
# inherit.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_only() -> None:
    """Keep the embedded Ray of this process (and the processes it starts) on loopback."""
    os.environ[LOOPBACK_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:  # ray was imported before the variable was set: Ray reads
        constants.ENABLE_RAY_CLUSTER = False  # the flag from here when it picks its address


def start(cfg: RayConfig, worker_env: Mapping[str, str] | None = None) -> None:
    """Start (or join) Ray for this process; idempotent. The embedded Ray listens on
    127.0.0.1 only (tests/e2e/test_pipeline_e2e.py lists every listener of `make repro`).
    ``worker_env``: more environment for this job's worker processes, set before they
    start (what a C library reads at start-up, e.g. pipeline.train.hostalloc.PROCESS_ENV)."""
    address = cluster_address(cfg)
    if not address and not _ray_initialized():
        _loopback_only()
    import ray

    if ray.is_initialized():
        return
    # Every worker process of our jobs runs worker_setup() first (see there).
    env_vars = {**WORKER_ENV, **(worker_env or {})}
    runtime_env: dict = {"env_vars": env_vars, "worker_process_setup_hook": f"{__name__}.worker_setup"}
    if address:
        # The code travels with the job (Ray stores the package in the cluster and puts
        # it first on every worker's sys.path); nodes need only the pinned environment.
        runtime_env["py_modules"] = [str(PACKAGE_DIR)]
        runtime_env["excludes"] = ["__pycache__", "*.pyc"]
        ray.init(address=address, runtime_env=runtime_env)
        _report_pending(cfg)
        return
    runtime_env["env_vars"].update({EMBEDDED_FLAG: "1", **EMBEDDED_WORKER_ENV})
    recipe_ray = os.environ.get(RECIPE_RAY_ENV)
    if recipe_ray:  # the recipe's one embedded Ray (recipe_ray.py): join it, do not start another
        ray.init(address=recipe_ray, log_to_driver=True, runtime_env=runtime_env)
        return
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        resources={DEVICE: 1},
        include_dashboard=False,
        log_to_driver=True,
        runtime_env=runtime_env,
    )


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _report_pending(cfg: RayConfig) -> None:
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    for resource, amount in cfg.job_resources().items():
        if free.get(resource, 0.0) < amount:
            print(
                f"resources pending: the job needs {amount} {resource}s ({cfg.num_workers} workers); the "
                f"cluster has {free.get(resource, 0.0):g} free of {total.get(resource, 0.0):g}. Training "
                f"starts when they are free (or an autoscaler adds nodes), waiting at most "
                f"ray.start_timeout_s={cfg.start_timeout_s:g} s.",
                flush=True,
            )


def _room(nodes: list[dict], cfg: RayConfig) -> int:
    """How many workers of ``cfg`` the alive ``nodes`` (``ray.nodes()``) can hold at once."""
    per_worker = cfg.worker_resources()
    room = 0
    for node in nodes:
        if node.get("Alive"):
            have = node.get("Resources", {})
            room += int(min(have.get(k, 0.0) // v for k, v in per_worker.items()))
    return room


def _nodes_text(nodes: list[dict]) -> str:
    alive = [n for n in nodes if n.get("Alive")]
    parts = []
    for node in alive:
        offered = sorted((k, v) for k, v in node.get("Resources", {}).items() if k in ("CPU", "GPU"))
        parts.append(f"{node.get('NodeManagerAddress', '?')} ({', '.join(f'{k} {v:g}' for k, v in offered)})")
    return f"{len(alive)} alive node(s): {'; '.join(parts) or 'none'}"


def missing_text(cfg: RayConfig, nodes: list[dict]) -> str:
    """What the job asks for against what the alive nodes offer (for error messages)."""
    ask = f"{cfg.num_workers} workers x {cfg.cpus_per_worker} CPU{' + 1 GPU' if cfg.use_gpu else ''}"
    return (
        f"the job needs {ask}, each on one node; the cluster's nodes can hold {_room(nodes, cfg)} "
        f"({_nodes_text(nodes)})"
    )


def explain_start_failure(err: BaseException, cfg: RayConfig) -> None:
    """Re-raise a Ray Train start-up timeout (the worker group found no placement within
    ``ray.start_timeout_s``, e.g. after a node was lost) as a ResourceError naming what
    is missing; any other error is left to the caller."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, WorkerGroupStartupTimeoutError) or isinstance(
            getattr(cause, "controller_failure", None), WorkerGroupStartupTimeoutError
        ):
            import ray

            raise ResourceError(
                f"the training workers found no placement within ray.start_timeout_s={cfg.start_timeout_s:g} s: "
                f"{missing_text(cfg, ray.nodes())}"
            ) from err
        cause = cause.__cause__


class _DropStateApiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to query Ray Train Controller actor state" not in record.getMessage()


def worker_setup() -> None:
    """Ray ``worker_process_setup_hook`` of every job (see start()).

    - Rank 0's torch rendezvous store listens on its node's address only (rendezvous.py;
      applied when torch's rendezvous module is imported: most workers never import torch).
    - Ray Train's placement-group cleaner polls the State API, which a Ray without a
      dashboard (the embedded one, a bare test cluster) lacks, and warns every few
      seconds; its job (removing a dead controller's placement group) is done anyway
      when such a Ray ends, so the warning is dropped.
    - The embedded Ray pins ``RAY_ADDRESS`` to itself: Ray's State API client otherwise
      scans the machine for clusters and fails outright when another Ray (another
      user's, another test's) runs beside ours."""
    import ray

    from pipeline.runner.rendezvous import bind_store_when_imported

    bind_store_when_imported()
    if os.environ.get(EMBEDDED_FLAG) == "1":
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        _DropStateApiWarning()
    )
