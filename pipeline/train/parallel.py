"""How the ranks of a training job share the model: DDP or FSDP2, and torch.compile.

- ``ddp``: every rank holds the whole model and optimizer; gradients are all-reduced
  (averaged) after the last micro-batch. Expert-bias buffers are not broadcast: every
  rank updates them alike from all-reduced token counts (see balance.py).
- ``fsdp2``: torch's ``fully_shard`` on every transformer block and on the root, so
  parameters, gradients and AdamW's moments are sharded over the ranks (dim 0 of each
  tensor: the expert dimension of the 3-D expert weights) and gathered block by block
  for the forward and backward. Gradients are reduce-scattered as averages, like DDP's,
  so the loop's loss scaling is the same. Parameters are gathered in FP32 and
  ``dtype: bfloat16`` is autocast's, per op, exactly as under DDP: a BF16
  ``MixedPrecisionPolicy`` would halve the all-gather bytes but round the router and
  norm weights, which this recipe keeps in FP32 (a measured trade to make per cluster,
  not a default). Runs on CPU (gloo) and CUDA (NCCL) alike. One rank has nothing to
  shard: ``fsdp2`` with one worker trains the plain module.

Checkpoints do not depend on this choice: checkpoint.py reads and writes full tensors
through ``get_state_dict``/``set_state_dict``, so a sharded run resumes unsharded, on
another world size or device, and back.

Compile: ``compile: true`` compiles each block (the unit FSDP2 gathers) rather than the
whole model, so a recompile is per block shape. The grouped expert GEMM stays eager: its
compiler (meta) kernel accepts only BF16 operands in torch 2.13, and the MoE's FP32 path
must not change numerics when compiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def shard(model: nn.Module) -> None:
    """Shard ``model`` (a Transformer, on its device) in place with FSDP2.

    Call before the optimizer is built: its parameters become DTensors. Needs an
    initialised process group."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    # The root holds the embedding (tied to the output head) and the final norm.
    fully_shard(model)


def compile_blocks(model: nn.Module) -> None:
    """``torch.compile`` each block in place, keeping the grouped expert GEMM eager."""
    from pipeline.model.moe import GroupedExperts

    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.forward = torch.compiler.disable(module.forward, recursive=False)
    for block in model.layers:
        block.compile()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this backward only if ``sync`` (the last
    micro-batch of a step); accumulate locally otherwise. ``module`` is what the loop
    calls: a DDP wrapper, an FSDP2-sharded model, or a plain one (no-op)."""
    from torch.nn.parallel import DistributedDataParallel

    if sync:
        yield
    elif isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (a DTensor's local shard), or ``t`` itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> float:
    """A scalar that may be a DTensor (clip_grad_norm_ of sharded gradients) as a float.
    Collective for a DTensor: every rank calls it."""
    from torch.distributed.tensor import DTensor

    return float(t.full_tensor() if isinstance(t, DTensor) else t)
