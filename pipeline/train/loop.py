"""The one training loop of pre-training, mid-training and SFT (a Ray Train worker).

The loop only computes: forward, loss, backward, clip, step. Everything with a side
effect (expert-bias balancing, metric logging, checkpoints and Ray reports) is a
callback (see callbacks.py) invoked at fixed points.

``train_loop_per_worker`` receives a plain dict (``WorkerJob.to_dict()``), so it runs
the same under Ray Train on a laptop or a cluster, and in a unit test without Ray.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.configbase import from_dict
from pipeline.model import ModelConfig, Transformer
from pipeline.train.batches import IGNORE_INDEX, TokenBatches
from pipeline.train.checkpoint import (Checkpoint, load_checkpoint, optimizer_param_names,
                                      restore_optimizer, restore_rng_state)
from pipeline.train.config import TrainStageConfig
from pipeline.train.schedule import lr_at


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain values (it crosses a process boundary)."""

    stage: str
    model: dict
    train: dict
    seed: int
    init_checkpoint: str | None = None  # absolute path of a checkpoint step dir
    bytes_per_token: float = 0.0  # validation bytes / tokens, for bits per byte
    tracking_uri: str | None = None
    run_id: str | None = None
    extra_meta: dict = field(default_factory=dict)  # recorded in every checkpoint

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoopState:
    step: int
    tokens_seen: int
    rank: int
    world: int
    model: Transformer  # the unwrapped module
    optimizer: torch.optim.Optimizer
    history: dict[str, list[list[float]]]  # metric -> [[step, value], ...], rank 0 only
    resumed_at: list[int] = field(default_factory=list)  # steps this run was resumed from


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and 3-D expert weights); never norms, which are 1-D."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def masked_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over positions with a label, and how many there were."""
    n = int((labels_BS != IGNORE_INDEX).sum())
    loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(n, 1), n


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: TokenBatches, n_batches: int, rank: int, world: int,
             autocast: contextlib.AbstractContextManager) -> tuple[float, int]:
    """Mean validation loss (nats/token) over the fixed batches, summed over ranks."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for inputs_BS, labels_BS in val.eval_batches(n_batches, rank, world):
        with autocast:
            logits_BSV = model(inputs_BS)
        loss, n = masked_loss(logits_BSV, labels_BS)
        total += torch.tensor([loss.item() * n, n], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1)), int(total[1])


def _autocast(dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_loop(job: WorkerJob, rank: int, world: int, resume: Checkpoint | None, callbacks: list) -> LoopState:
    """Train from ``resume`` (or the job's initial checkpoint, or scratch) to the last step."""
    model_cfg = from_dict(ModelConfig, job.model, "model")
    train = from_dict(TrainStageConfig, job.train, f"stage.{job.stage}")
    torch.manual_seed(job.seed)
    model = Transformer(model_cfg)
    if job.init_checkpoint and resume is None:
        model.load_state_dict(load_checkpoint(job.init_checkpoint).model_state)
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.schedule.lr,
                                  betas=train.betas)
    state = LoopState(step=0, tokens_seen=0, rank=rank, world=world, model=model,
                      optimizer=optimizer, history={})
    if resume is not None:
        model.load_state_dict(resume.model_state)
        restore_optimizer(optimizer, optimizer_param_names(model, optimizer), resume)
        restore_rng_state(resume.extra)
        state.step = resume.step
        state.tokens_seen = int(resume.meta["tokens_seen"])
        state.history = resume.meta.get("history", {})
        state.resumed_at = [*resume.meta.get("resumed_at", []), resume.step]

    # Expert-bias updates come from all-reduced counts, so every rank applies the same
    # update; broadcasting buffers from rank 0 would instead clobber each rank's counts.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    data = TokenBatches(job.train["mixture"], "train", train.seq_len, train.batch_size, job.seed)
    val = TokenBatches(job.train["mixture"], "val", train.seq_len, train.batch_size, job.seed)
    autocast = _autocast(train.dtype)
    for cb in callbacks:
        cb.on_train_start(state)

    model.train()
    while state.step < train.steps:
        started = time.perf_counter()
        lr = lr_at(train.schedule, state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss, step_aux, step_tokens = 0.0, 0.0, 0
        for micro in range(train.grad_accum):
            inputs_BS, labels_BS = data.train_batch(state.step, micro, rank)
            last = micro == train.grad_accum - 1
            sync = contextlib.nullcontext() if (last or world == 1) else ddp.no_sync()
            with sync:
                with autocast:
                    logits_BSV, aux = ddp(inputs_BS, return_aux=True)
                loss, n = masked_loss(logits_BSV, labels_BS)
                (loss + aux).div(train.grad_accum).backward()
            step_loss += loss.item() / train.grad_accum
            step_aux += float(aux) / train.grad_accum
            step_tokens += n
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += step_tokens * world
        elapsed = time.perf_counter() - started
        metrics = {"train/loss": step_loss, "train/aux_loss": step_aux, "train/lr": lr,
                   "train/grad_norm": float(grad_norm),
                   "train/tokens_per_s": step_tokens * world / max(elapsed, 1e-9),
                   "train/tokens_seen": float(state.tokens_seen)}
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"stage {job.stage}: loss is {step_loss} at step {state.step}")
        if state.step % train.eval_every == 0 or state.step == train.steps:
            val_loss, _ = evaluate(model, val, train.eval_batches, rank, world, autocast)
            metrics["val/loss"] = val_loss
            if job.bytes_per_token > 0:
                metrics["val/bpb"] = val_loss / math.log(2) / job.bytes_per_token
        for cb in callbacks:
            cb.on_step_end(state, metrics)
    for cb in callbacks:
        cb.on_train_end(state)
    return state
