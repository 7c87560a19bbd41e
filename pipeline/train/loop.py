"""The one training loop of pre-training, mid-training and SFT (a Ray Train worker).

The loop only computes: forward, loss, backward, clip, step. Everything with a side
effect (expert-bias balancing, metric logging, checkpoints and Ray reports) is a
callback (see callbacks.py) invoked at fixed points.

The Ray Train worker entry point (pipeline/runner/train_job.py) receives a plain dict
(``WorkerJob.to_dict()``), so the loop runs the same under Ray Train on a laptop or a
cluster, and in a unit test without Ray.

Numerical safety: before every optimizer step, each loss term and the gradient norm
(all-reduced, so every rank decides alike) must be finite; otherwise the loop stops,
naming the step, the term and the first parameter whose gradient is not finite, before
the optimizer or a checkpoint can take in the damage.

Metrics named ``perf/*`` describe the execution (tokens per second), not the result:
they are logged, never kept in the checkpoint's history (which DVC hashes).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from pipeline.configbase import from_dict
from pipeline.model import ModelConfig, Transformer
from pipeline.quant import QuantConfig
from pipeline.train import hostalloc
from pipeline.train.batches import IGNORE_INDEX, TokenBatches
from pipeline.train.checkpoint import Checkpoint, load_checkpoint, restore_rng_state, restore_training_state
from pipeline.train.config import TrainStageConfig
from pipeline.train.parallel import compile_blocks, full_value, gradient_sync, is_sharded, local_tensor, shard
from pipeline.train.schedule import lr_at


@dataclass
class WorkerJob:
    """Everything a worker needs, as plain values (it crosses a process boundary)."""

    stage: str
    model: dict
    train: dict  # the stage's TrainStageConfig as configured (paths as written in conf/)
    seed: int
    mixture_dir: str  # the mixture to read, resolved for this machine
    init_checkpoint: str | None = None  # absolute path of a checkpoint directory
    bytes_per_token: float = 0.0  # validation bytes / tokens, for bits per byte
    extra_meta: dict = field(default_factory=dict)  # recorded in every checkpoint
    quant: dict | None = None  # a QuantConfig: train the fake-quantized model (QAT)

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
    expert_load: list[list[float]] = field(default_factory=list)  # tokens per (layer, expert)
    # Seconds spent in training steps by this process (validation excluded); execution,
    # not result: logged as perf/train_seconds, never checkpointed, so it restarts at 0
    # in a resumed run.
    train_seconds: float = 0.0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (and 3-D expert weights); never norms, which are 1-D."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with torch's fused kernel where every parameter
    lives on a device that has it (CPU, CUDA): one pass over each tensor instead of the
    for-loop's ten or so element-wise ops. On 2 cores the tiny MoE's step went from 13.0
    to 2.6 ms (its dense twin's from 5.9 to 1.6): the optimizer is one of the costs that
    grow with total, not active, parameters. The update is AdamW's either way; the
    rounding differs from the for-loop's in the last bits."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum across data-parallel ranks (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, val: TokenBatches, n_batches: int, rank: int, world: int, device: torch.device, dtype: str
) -> dict[str, float]:
    """Validation loss (nats per target token) over the fixed batches of all ranks:
    ``{"all": mean, <domain>: mean over that domain's targets, ...}``."""
    was_training = model.training
    model.eval()
    # [loss sum, target count] per domain; the overall mean is derived from them.
    sums_D2 = torch.zeros(len(val.domain_names), 2, dtype=torch.float64)
    batches = list(val.eval_batches(n_batches, rank, world))
    if is_sharded(model):
        # Every forward of a sharded model is collective: a rank with fewer batches
        # (n_batches not a multiple of world) runs a filler batch and drops the result.
        filler_BS = (batches[-1] if batches else next(iter(val.eval_batches(n_batches, 0, world))))[0]
        for _ in range(-(-n_batches // world) - len(batches)):
            with _autocast(dtype, device):
                model(filler_BS.to(device))
    for inputs_BS, labels_BS, domains_BS in batches:
        with _autocast(dtype, device):
            logits_BSV = model(inputs_BS.to(device))
        loss_N = (
            F.cross_entropy(
                logits_BSV.float().flatten(0, 1),
                labels_BS.to(device).flatten(),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            )
            .cpu()
            .double()
        )
        target_N = (labels_BS != IGNORE_INDEX).flatten()
        domain_N = domains_BS.flatten()[target_N]
        sums_D2[:, 0].index_add_(0, domain_N, loss_N[target_N])
        sums_D2[:, 1].index_add_(0, domain_N, torch.ones_like(loss_N[target_N]))
    sums_D2 = torch.tensor(all_reduce_sum(sums_D2.flatten().tolist(), device), dtype=torch.float64).view(-1, 2)
    model.train(was_training)
    total = sums_D2.sum(0)
    if total[1] == 0:
        raise ValueError("the validation batches hold no target tokens: there is no loss to report")
    means = {"all": float(total[0] / total[1])}
    for name, (loss_sum, count) in zip(val.domain_names, sums_D2.tolist()):
        if count > 0:
            means[name] = loss_sum / count
    return means


def _require_finite(stage: str, step: int, model: torch.nn.Module, terms: dict[str, float]) -> None:
    """Raise FloatingPointError unless every term is finite (called before the optimizer step)."""
    bad = [name for name, value in terms.items() if not math.isfinite(value)]
    if not bad:
        return
    layer = next(
        (
            name
            for name, p in model.named_parameters()
            if p.grad is not None and not torch.isfinite(local_tensor(p.grad)).all()
        ),
        None,
    )
    where = f"; first non-finite gradient: {layer}" if layer else "; every gradient is finite"
    raise FloatingPointError(
        f"stage {stage}: non-finite {', '.join(f'{n} ({terms[n]})' for n in bad)} at step {step}{where}. "
        f"The optimizer did not step and no checkpoint holds this state; resuming restarts from the last "
        f"checkpoint"
    )


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_loop(
    job: WorkerJob,
    rank: int,
    world: int,
    resume: Checkpoint | None,
    callbacks: list,
    device: torch.device = torch.device("cpu"),
) -> LoopState:
    """Train from ``resume`` (or the job's initial checkpoint, or scratch) to the last step."""
    model_cfg = from_dict(ModelConfig, job.model, "model")
    train = from_dict(TrainStageConfig, job.train, f"stage.{job.stage}")
    if device.type == "cpu":
        hostalloc.keep_freed_blocks()  # every step's gradients reuse the last step's pages
    torch.manual_seed(job.seed)
    model = Transformer(model_cfg)
    if job.init_checkpoint and resume is None:
        model.load_state_dict(load_checkpoint(job.init_checkpoint).model_state)
    if job.quant is not None:
        # Fake quantization holds no state of its own (scales are recomputed from the
        # weights every step), so a resumed run rebuilds it from the config alone.
        from pipeline.quant.fake import prepare  # imports torchao: only where QAT runs

        prepare(model, from_dict(QuantConfig, job.quant, f"stage.{job.stage}"))
    model.to(device)
    if train.compile:
        compile_blocks(model)
    if train.parallel == "fsdp2" and world > 1:
        shard(model)  # before the optimizer: it must hold the sharded parameters
    optimizer = adamw(model, train.schedule.lr, train.weight_decay, tuple(train.betas))
    state = LoopState(step=0, tokens_seen=0, rank=rank, world=world, model=model, optimizer=optimizer, history={})
    if resume is not None:
        restore_training_state(model, optimizer, resume)
        restore_rng_state(resume.extra)
        state.step = resume.step
        state.tokens_seen = int(resume.meta["tokens_seen"])
        state.history = resume.meta.get("history", {})
        state.resumed_at = [*resume.meta.get("resumed_at", []), resume.step]
        state.expert_load = resume.meta.get("expert_load", [])

    # Expert-bias updates come from all-reduced counts, so every rank applies the same
    # update; broadcasting buffers from rank 0 would instead clobber each rank's counts.
    ddp = DistributedDataParallel(model, broadcast_buffers=False) if world > 1 and not is_sharded(model) else model
    data = TokenBatches(job.mixture_dir, "train", train.seq_len, train.batch_size, job.seed)
    val = TokenBatches(job.mixture_dir, "val", train.seq_len, train.batch_size, job.seed)
    for cb in callbacks:
        cb.on_train_start(state)

    def eval_metrics() -> dict[str, float]:
        losses = evaluate(model, val, train.eval_batches, rank, world, device, train.dtype)
        metrics = {"val/loss": losses.pop("all")}
        metrics.update({f"val/loss_{domain}": value for domain, value in losses.items()})
        if job.bytes_per_token > 0:
            metrics["val/bpb"] = metrics["val/loss"] / math.log(2) / job.bytes_per_token
        return metrics

    if state.step == 0 and job.init_checkpoint:
        # The starting model's loss on this stage's validation data: what it improves on.
        start = eval_metrics()
        for cb in callbacks:
            cb.on_eval(state, start)

    model.train()
    while state.step < train.steps:
        started = time.perf_counter()
        lr = lr_at(train.schedule, state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = [data.train_batch(state.step, micro, rank) for micro in range(train.grad_accum)]
        # Token-weighted mean over every target of the step, on all ranks: SFT batches
        # carry different numbers of assistant tokens, so a mean of per-batch means
        # would overweight short answers. DDP averages gradients over ranks, hence * world.
        local_targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
        (global_targets,) = all_reduce_sum([local_targets], device)
        scale = world / max(global_targets, 1.0)
        loss_sum, aux_sum = 0.0, 0.0
        for micro, (inputs_BS, labels_BS) in enumerate(batches):
            last = micro == train.grad_accum - 1
            with gradient_sync(ddp, sync=last or world == 1):
                with _autocast(train.dtype, device):
                    # the head and the cross-entropy as one chunked operation (model/loss.py)
                    loss, aux = ddp(inputs_BS.to(device), labels_BS=labels_BS.to(device))
                (loss * scale + aux / train.grad_accum).backward()
            loss_sum += loss.item()
            aux_sum += float(aux) / train.grad_accum
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip))
        loss_sum, aux_sum = all_reduce_sum([loss_sum, aux_sum], device)
        step_loss = loss_sum / max(global_targets, 1.0)
        _require_finite(
            job.stage,
            state.step + 1,
            model,
            {"cross-entropy loss": step_loss, "auxiliary loss": aux_sum, "gradient norm": grad_norm},
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        step_inputs = world * sum(inputs.numel() for inputs, _ in batches)
        state.tokens_seen += step_inputs
        elapsed = time.perf_counter() - started
        state.train_seconds += elapsed
        metrics = {
            "train/loss": step_loss,
            "train/aux_loss": aux_sum / world,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "perf/tokens_per_s": step_inputs / max(elapsed, 1e-9),
            "perf/train_seconds": state.train_seconds,
            "train/target_tokens": global_targets,
            "train/tokens_seen": float(state.tokens_seen),
        }
        if state.step % train.eval_every == 0 or state.step == train.steps:
            metrics.update(eval_metrics())
        for cb in callbacks:
            cb.on_step_end(state, metrics)
    for cb in callbacks:
        cb.on_train_end(state)
    return state
