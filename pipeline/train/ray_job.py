"""Run the training loop as a Ray Train ``TorchTrainer`` job.

Ray starts embedded unless ``ray.address`` (or ``RAY_ADDRESS``) names a cluster.
Workers join a torch process group (gloo on CPU, NCCL on GPU) set up by Ray Train.
Resume: a run is named after a fingerprint of everything that determines its result
(config, world size, data manifest, the starting checkpoint's bytes, the library's
code), so re-running an interrupted stage reuses the same ``RunConfig(storage_path,
name)`` and Ray Train hands the worker its latest reported checkpoint; a changed input
gets a new name and starts fresh, leaving the old run's checkpoints where they were.
Once a stage has published its result the driver deletes the run (``discard_run``), so
only interrupted runs are ever resumed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.hashing import sha256_json
from pipeline.recipe import repo_path
from pipeline.train.callbacks import BalanceCallback, CheckpointCallback, MetricsCallback
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.train.config import RayConfig
from pipeline.train.loop import WorkerJob, run_loop


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point."""
    import ray.train

    from pipeline.tracking import RemoteMetricLogger

    import ray.train.torch

    job = WorkerJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    resume = None
    ray_ckpt = ray.train.get_checkpoint()
    if ray_ckpt is not None:
        with ray_ckpt.as_directory() as root:
            path = latest_checkpoint(Path(root))
            if path is None:
                raise RuntimeError(f"Ray returned checkpoint {root} without a complete step_* directory")
            resume = load_checkpoint(path, map_location=device)
    logger = None
    if rank == 0 and job.run_id and job.tracking_uri:
        logger = RemoteMetricLogger(job.tracking_uri, job.run_id)
    callbacks = [
        BalanceCallback(),
        MetricsCallback(job.train["log_every"], logger),
        CheckpointCallback(job.train["checkpoint_every"],
                           meta={"stage": job.stage, "model": job.model, "train": job.train,
                                 "seed": job.seed, **job.extra_meta}),
    ]
    run_loop(job, rank, world, resume, callbacks, device)


def run_name(job: WorkerJob, cfg: RayConfig) -> str:
    """Name of the Ray Train run: the stage plus a hash of what determines the result.

    ``job.extra_meta`` carries the data, starting-checkpoint and code fingerprints; the
    world size matters because batches are drawn per rank."""
    key = {k: v for k, v in job.to_dict().items() if k not in ("run_id", "tracking_uri")}
    key["world"] = (cfg.num_workers, cfg.use_gpu)
    return f"{job.stage}-{sha256_json(key)[:12]}"


def discard_run(job: WorkerJob, cfg: RayConfig) -> None:
    """Delete a finished run's Ray storage: its result is published, nothing to resume."""
    shutil.rmtree(repo_path(cfg.storage_path) / run_name(job, cfg), ignore_errors=True)


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address)
    else:
        # Embedded: size the local cluster to the job so Ray does not oversubscribe.
        # address="local" starts a new instance; None would join a cluster that some
        # earlier `ray start` left running on this machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cfg.num_workers * cfg.cpus_per_worker),
                 include_dashboard=False, log_to_driver=True)


def fit(job: WorkerJob, cfg: RayConfig) -> Path:
    """Train on Ray; return a local directory holding the final checkpoint root."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(cfg)
    storage = repo_path(cfg.storage_path)
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job.to_dict(),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name(job, cfg), storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train["keep_checkpoints"])),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {job.stage}: Ray Train finished without a checkpoint")
    local = Path(tempfile.mkdtemp(prefix=f"{job.stage}-final-"))
    result.checkpoint.to_directory(str(local))
    return local
