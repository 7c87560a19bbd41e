"""Where stage work runs: the embedded Ray of this machine, or a cluster.

Ray starts embedded (``address="local"``: a new instance sized to this machine, never a
stray cluster some earlier ``ray start`` left behind) unless ``ray.address`` or
``RAY_ADDRESS`` names a cluster. What a job asks for is checked against what Ray can
give *before* Ray starts: an embedded Ray cannot grow, so asking for more CPUs than the
machine has is refused with the numbers; a cluster may grow (autoscaling), so a
shortfall there is reported as pending instead of waited on in silence.
"""

from __future__ import annotations

import logging
import os

from pipeline.runner.errors import ResourceError
from pipeline.train.config import RayConfig

log = logging.getLogger(__name__)

# For every Ray worker process of our jobs: Ray Train's print patch makes each line a
# worker prints appear twice in the driver (once printed, once logged); off.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}

# The custom resource of the node that stands for the phone: the profile stage's task
# requests it. The embedded Ray declares one (this machine is the device); on a cluster,
# start the profiling node with `ray start ... --resources='{"device": 1}'`.
DEVICE = "device"


def cluster_address(cfg: RayConfig) -> str | None:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


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
            raise ResourceError(
                f"the job needs {amount} {resource}s (ray.num_workers={cfg.num_workers} x "
                f"ray.cpus_per_worker={cfg.cpus_per_worker}, ray.use_gpu={str(cfg.use_gpu).lower()}), but the "
                f"embedded Ray has this machine's {have.get(resource, 0)}; lower ray.num_workers or "
                f"ray.cpus_per_worker, or set ray.address to a cluster"
            )


def start(cfg: RayConfig) -> None:
    """Start (or join) Ray for this process; idempotent."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    runtime_env = {"env_vars": dict(WORKER_ENV)}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        _report_pending(cfg)
        return
    # The embedded Ray runs no dashboard, hence no State API; Ray Train's placement-group
    # cleaner polls that API and would warn every few seconds that it is unavailable.
    # Its job (removing a dead controller's placement group) ends with the local
    # instance anyway, so the warning is filtered in our worker processes (see the hook).
    runtime_env["worker_process_setup_hook"] = "pipeline.runner.cluster.embedded_worker_setup"
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        resources={DEVICE: 1},
        include_dashboard=False,
        log_to_driver=True,
        runtime_env=runtime_env,
    )


def _report_pending(cfg: RayConfig) -> None:
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    for resource, amount in cfg.job_resources().items():
        if free.get(resource, 0.0) < amount:
            print(
                f"resources pending: the job needs {amount} {resource}s ({cfg.num_workers} workers); the "
                f"cluster has {free.get(resource, 0.0):g} free of {total.get(resource, 0.0):g}. Training "
                f"starts when they are free (or an autoscaler adds nodes).",
                flush=True,
            )


class _DropStateApiWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Failed to query Ray Train Controller actor state" not in record.getMessage()


def embedded_worker_setup() -> None:
    """Ray ``worker_process_setup_hook`` of the embedded Ray (see start()).

    Pins ``RAY_ADDRESS`` to this instance: Ray's State API client otherwise scans the
    machine for clusters and fails outright when another Ray (another user's, another
    test's) runs beside ours. Then drops the cleaner's State-API warning."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
        _DropStateApiWarning()
    )
