"""The training loop as a Ray Train ``TorchTrainer`` job.

Workers join a torch process group (gloo on CPU, NCCL on GPU) set up by Ray Train.

Inputs on a cluster: the driver stages the mixture and the starting checkpoint into the
run storage (content-addressed, see storage.py); each rank fetches them to its node and,
like every rank of every run, checks the mixture against the manifest hash the driver
validated before step 0, so two ranks can never train on different data.

Faults: ``ray.max_failures`` restarts of the worker group (a lost node, a crashed
worker, but also a deterministic error, which fails again), each resuming from the last
checkpoint that every rank reported; the workers' placement is waited for at most
``ray.start_timeout_s`` (at the start and at each restart), after which the job fails
naming what the cluster lacks.

Resume: a run is named after a fingerprint of everything that determines its result
(config, world size, data manifest, the starting checkpoint's bytes, the library's
code), so re-running an interrupted stage reuses the same ``RunConfig(storage_path,
name)`` and Ray Train hands the worker its latest registered checkpoint; a changed input
gets a new name and starts fresh. If that checkpoint is damaged, the worker falls back
to the newest intact one of the same run and says so (a corrupt checkpoint must not
block every rerun). Once a stage has published its result the driver deletes the run
(``discard_run``), so only interrupted runs are ever resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.hashing import sha256_file, sha256_json, sha256_tree
from pipeline.runner.storage import RunStorage, fetch
from pipeline.train import hostalloc
from pipeline.train.callbacks import BalanceCallback, CheckpointCallback, MetricsCallback, ProgressCallback
from pipeline.train.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from pipeline.train.config import RayConfig
from pipeline.train.loop import WorkerJob, run_loop


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point: ``config = {"job": WorkerJob dict, "logger": ...}``."""
    import ray.train
    import ray.train.torch

    job = local_inputs(WorkerJob(**config["job"]), staged=config.get("staged", False))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    # Read on the CPU: the loop copies into the model (each rank only its shards, when
    # sharded), so no device ever holds a second full copy of a large model.
    resume = resume_point(ray.train.get_checkpoint(), "cpu", say=print if rank == 0 else None)
    callbacks = [
        BalanceCallback(),
        ProgressCallback(job.train["schedule"]["total_steps"], job.stage),
        MetricsCallback(job.train["log_every"], config.get("logger") if rank == 0 else None),
        CheckpointCallback(
            job.train["checkpoint_every"],
            report=ray_report,
            meta={"stage": job.stage, "model": job.model, "train": job.train, "seed": job.seed, **job.extra_meta},
        ),
    ]
    run_loop(job, rank, world, resume, callbacks, device)


class InputMismatchError(RuntimeError):
    """A rank's inputs differ from what the driver validated."""


def local_inputs(job: WorkerJob, staged: bool, cache: Path | None = None) -> WorkerJob:
    """``job`` with its mixture and starting checkpoint readable on this node, checked.

    ``staged``: the paths are URIs of staged copies, fetched into ``cache`` (default: the
    node's, see storage.fetch).
    Either way the mixture's manifest must hash to ``extra_meta["data_manifest_sha256"]``
    and every file it lists must match its sha256; the starting checkpoint's weights must
    hash to ``extra_meta["init_sha256"]``. Raises InputMismatchError naming the file (a
    fetched copy that fails is dropped from the cache first, so a retry fetches again)."""
    mixture = fetch(job.mixture_dir, cache) if staged else Path(job.mixture_dir)
    init = None
    if job.init_checkpoint:
        init = fetch(job.init_checkpoint, cache) if staged else Path(job.init_checkpoint)
    try:
        verify_mixture(mixture, job.extra_meta.get("data_manifest_sha256"))
        expected_init = job.extra_meta.get("init_sha256")
        if init is not None and expected_init and sha256_file(init / "model.safetensors") != expected_init:
            raise InputMismatchError(f"{init / 'model.safetensors'}: not the starting checkpoint the driver validated")
    except InputMismatchError:
        if staged:
            for fetched in (mixture, init):
                if fetched is not None:
                    shutil.rmtree(fetched, ignore_errors=True)
        raise
    return replace(job, mixture_dir=str(mixture), init_checkpoint=str(init) if init else None)


def verify_mixture(mixture: Path, manifest_sha256: str | None) -> None:
    """Raise InputMismatchError unless ``mixture``'s manifest hashes to ``manifest_sha256``
    (sha256 of its canonical JSON, as the driver computed it) and every file it lists
    matches the sha256 recorded there."""
    if manifest_sha256 is None:
        return
    manifest = json.loads((mixture / "manifest.json").read_text())
    if sha256_json(manifest) != manifest_sha256:
        raise InputMismatchError(
            f"{mixture}: manifest hash {sha256_json(manifest)[:12]} is not the {manifest_sha256[:12]} the driver "
            f"validated (this node reads another mixture)"
        )
    for name, info in manifest["files"].items():
        if sha256_file(mixture / name) != info["sha256"]:
            raise InputMismatchError(f"{mixture / name}: does not match the sha256 in its manifest")


def stage_inputs(job: WorkerJob, storage: RunStorage) -> WorkerJob:
    """``job`` with its mixture and starting checkpoint staged into ``storage`` (for
    ranks on nodes that cannot read the driver's disk); paths become URIs.

    Keys: the mixture's manifest hash (the manifest holds every file's sha256); the
    checkpoint folder's :func:`sha256_tree` (weights and metadata)."""
    mixture = storage.stage(Path(job.mixture_dir), f"mixture-{job.extra_meta['data_manifest_sha256'][:32]}")
    init = None
    if job.init_checkpoint:
        init = storage.stage(Path(job.init_checkpoint), f"checkpoint-{sha256_tree(job.init_checkpoint)[:32]}")
    return replace(job, mixture_dir=mixture, init_checkpoint=init)


def ray_report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def resume_point(latest: Any, device: Any = "cpu", say: Any = None) -> Checkpoint | None:
    """The checkpoint to resume from: Ray's latest registered one if it is intact, else
    the newest intact checkpoint of the same run (newest first), else None (start over).

    ``latest`` is a ``ray.train.Checkpoint`` (or None for a fresh run); the run's other
    checkpoints are its siblings in the run's storage, listed through the same
    filesystem (local disk or an object store). ``say`` reports a fallback."""
    if latest is None:
        return None
    say = say or (lambda message: None)
    for candidate in [latest, *_other_checkpoints(latest)]:
        try:
            with candidate.as_directory() as path:
                ckpt = load_checkpoint(Path(path), map_location=device)
        except CheckpointError as err:
            say(f"resume: checkpoint {candidate.path} is unusable ({err}); trying the previous one")
            continue
        if candidate is not latest:
            say(f"resume: falling back to the newest intact checkpoint {candidate.path} (step {ckpt.step})")
        return ckpt
    say("resume: no intact checkpoint in this run; starting over from step 0")
    return None


def _other_checkpoints(latest: Any) -> list:
    """The run's other checkpoint folders, newest first (Ray's latest excluded; an
    unregistered newer one, complete and verified on load, is as good as any)."""
    import ray.train
    from pyarrow.fs import FileSelector, FileType

    parent = latest.path.rstrip("/").rsplit("/", 1)[0]
    infos = latest.filesystem.get_file_info(FileSelector(parent))
    names = sorted(
        (
            i.path
            for i in infos
            if i.type == FileType.Directory
            and i.base_name.startswith("checkpoint_")
            and i.path.rstrip("/") != latest.path.rstrip("/")
        ),
        reverse=True,
    )  # Ray names them checkpoint_<timestamp>: newest first
    return [ray.train.Checkpoint(path=name, filesystem=latest.filesystem) for name in names]


def run_name(job: WorkerJob, cfg: RayConfig) -> str:
    """Name of the Ray Train run: the stage plus a hash of what determines the result.

    ``job.extra_meta`` carries the data, starting-checkpoint and code fingerprints, so the
    paths where this machine finds them are left out (the same work in another checkout
    is the same run); the world size matters because batches are drawn per rank."""
    key = {k: v for k, v in job.to_dict().items() if k not in ("mixture_dir", "init_checkpoint")}
    key["world"] = (cfg.num_workers, cfg.use_gpu)
    return f"{job.stage}-{sha256_json(key)[:12]}"


def discard_run(job: WorkerJob, cfg: RayConfig, storage: RunStorage) -> None:
    """Delete a finished run's Ray storage: its result is published, nothing to resume."""
    storage.delete(run_name(job, cfg))


def start_ray(cfg: RayConfig) -> None:
    """Start or join Ray for a training stage. Its worker processes start with
    ``hostalloc.PROCESS_ENV``: Ray Train runs the loop on a thread of its own, where glibc
    maps every block above 64 MiB afresh unless the process has one arena (hostalloc)."""
    from pipeline.runner import cluster

    cluster.start(cfg, worker_env=hostalloc.PROCESS_ENV)


def fit(job: WorkerJob, cfg: RayConfig, storage: RunStorage, logger: Any = None, staged: bool = False) -> Path:
    """Train on Ray; return a local copy of the final checkpoint (Ray Train's latest).

    ``logger`` (a picklable MLflow logger, or None) receives rank 0's metrics.
    ``staged``: stage the inputs into ``storage`` first (ranks on other nodes).
    Raises ResourceError when the workers' resources are not there within
    ``cfg.start_timeout_s``, naming what the cluster lacks."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.runner import cluster

    name = run_name(job, cfg)
    if staged:
        job = stage_inputs(job, storage)
    # Ray Train reads it in the driver and hands it to its controller: how long one
    # start (or restart) of the worker group waits for its placement. The placement's
    # demand is what an autoscaler sees and adds nodes for.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.start_timeout_s)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "logger": logger, "staged": staged},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage.uri,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=job.train["keep_checkpoints"]),
            # A start that times out is not retried (controller failures): waiting
            # longer than start_timeout_s for absent resources helps nobody.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=0),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        cluster.explain_start_failure(err, cfg)
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"stage {job.stage}: Ray Train finished without a checkpoint")
    local = Path(tempfile.mkdtemp(prefix=f"{job.stage}-final-"))
    result.checkpoint.to_directory(str(local))
    return local
