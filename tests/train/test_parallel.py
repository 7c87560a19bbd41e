"""FSDP2 against DDP on two gloo ranks, and checkpoints that do not care how (or on how
many ranks) the model was held.

Tolerance: FSDP2 and DDP average the same two gradients (a sum of two floats is exact
in either order), so the one difference is the gradient norm that clipping divides by:
FSDP2 sums per-shard squared norms, DDP per-tensor ones, and the norms differ in the
last float32 bits. With clipping active (``grad_clip`` 0.3, below the norms of these
steps) the weights after ten steps differed by at most 2.4e-7 absolute and the AdamW
moments by 5e-9 (measured on this machine: Zen 4, AVX-512); without clipping they were
bit-identical. The bound, 2e-6 absolute, is 8x that: summation order, not kernels,
causes it, so it holds across CPU kinds. A wrong gradient scale shows in the gradient
norms (compared at 1e-5 relative), which AdamW's scale invariance would hide in the
weights."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from jobs import Reports, micro_job

from pipeline.train.callbacks import BalanceCallback, CheckpointCallback, MetricsCallback
from pipeline.train.checkpoint import load_checkpoint, training_state
from pipeline.train.loop import run_loop

ATOL, RTOL = 2e-6, 1e-5
STEPS = 10


def _job(micro_data: Path, parallel: str, dtype: str = "float32"):
    job = micro_job(micro_data, steps=STEPS)
    # Two micro-batches (no gradient sync on the first) and 3 validation batches over 2
    # ranks: the sharded model must run the same number of forwards on every rank.
    job.train.update(parallel=parallel, grad_accum=2, eval_batches=3, dtype=dtype, grad_clip=0.3)
    return job


def _worker(rank: int, world: int, init: str, micro_data: Path, out: Path, parallel: str, resume: str | None) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        job = _job(micro_data, parallel)
        reports = Reports(out) if rank == 0 else (lambda metrics, checkpoint: None)
        callbacks = [BalanceCallback(), MetricsCallback(1, None), CheckpointCallback(5, {"model": job.model}, reports)]
        run_loop(job, rank, world, load_checkpoint(Path(resume)) if resume else None, callbacks)
    finally:
        dist.destroy_process_group()


def _train_two_ranks(micro_data: Path, out: Path, parallel: str, resume: Path | None = None) -> list[Path]:
    """Checkpoint directories rank 0 reported (steps 5 and 10, or 10 when resumed)."""
    out.mkdir()
    args = (2, str(out / "init"), micro_data, out, parallel, str(resume) if resume else None)
    ranks = mp.spawn(_worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail(f"{parallel}: two ranks did not finish in 300 s (a collective one rank skipped?)")
    return sorted(out.glob("report_*"))


def _assert_close_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert tensor.shape == b[name].shape, name
        torch.testing.assert_close(tensor, b[name], atol=ATOL, rtol=RTOL, msg=name)


@pytest.fixture(scope="module")
def runs(micro_data, tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("parallel")
    ddp = _train_two_ranks(micro_data, root / "ddp", "ddp")
    fsdp2 = _train_two_ranks(micro_data, root / "fsdp2", "fsdp2")
    # Resumed sharded from the checkpoint DDP wrote at step 5.
    resumed = _train_two_ranks(micro_data, root / "fsdp2_from_ddp", "fsdp2", resume=ddp[0])
    return {"ddp": ddp, "fsdp2": fsdp2, "fsdp2_from_ddp": resumed}


def test_fsdp2_trains_what_ddp_trains_and_writes_the_same_checkpoint(runs):
    for ddp_dir, fsdp2_dir in zip(runs["ddp"], runs["fsdp2"], strict=True):
        ddp, fsdp2 = load_checkpoint(ddp_dir), load_checkpoint(fsdp2_dir)
        assert ddp.step == fsdp2.step
        # Full, unsharded tensors under the same names: the format does not record sharding.
        _assert_close_states(ddp.model_state, fsdp2.model_state)
        assert ddp.optimizer_state["state"].keys() == fsdp2.optimizer_state["state"].keys()
        for fqn, moments in ddp.optimizer_state["state"].items():
            _assert_close_states(moments, fsdp2.optimizer_state["state"][fqn])
    history = {k: load_checkpoint(runs[k][-1]).meta["history"] for k in ("ddp", "fsdp2")}
    # val/loss: validation ran on both ranks with an odd batch count (3 over 2 ranks).
    for metric in ("train/loss", "train/grad_norm", "train/aux_loss", "val/loss"):
        ddp, fsdp2 = ([v for _, v in history[k][metric]] for k in ("ddp", "fsdp2"))
        assert fsdp2 == pytest.approx(ddp, rel=RTOL), metric
    assert history["fsdp2"]["train/loss"][-1][1] < history["fsdp2"]["train/loss"][0][1]
    assert min(v for _, v in history["ddp"]["train/grad_norm"]) > 0.3  # clipping was active


def test_a_sharded_run_resumes_a_replicated_checkpoint_and_continues_alike(runs):
    resumed = load_checkpoint(runs["fsdp2_from_ddp"][-1])
    straight = load_checkpoint(runs["ddp"][-1])
    assert resumed.meta["resumed_at"] == [5] and resumed.step == straight.step == STEPS
    _assert_close_states(straight.model_state, resumed.model_state)


def test_a_sharded_checkpoint_resumes_on_one_process(runs, micro_data, tmp_path):
    """World size 2 (sharded) -> 1 (plain module): restored state equals the file."""
    ckpt = load_checkpoint(runs["fsdp2"][0])
    job = replace(_job(micro_data, "fsdp2"))
    job.train["schedule"]["total_steps"] = ckpt.step  # restore only: no step is taken

    state = run_loop(job, 0, 1, ckpt, [])
    model_state, optimizer_state = training_state(state.model, state.optimizer)
    for name, tensor in ckpt.model_state.items():
        torch.testing.assert_close(model_state[name], tensor, rtol=0, atol=0, msg=name)
    for fqn, moments in ckpt.optimizer_state["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(optimizer_state["state"][fqn][key], value, rtol=0, atol=0, msg=f"{fqn}/{key}")
    # And it trains on from there.
    job.train["schedule"]["total_steps"] = ckpt.step + 2
    state = run_loop(job, 0, 1, ckpt, [MetricsCallback(1, None)])
    assert state.step == ckpt.step + 2 and torch.isfinite(torch.tensor(state.history["train/loss"][-1][1]))
