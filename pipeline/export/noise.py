"""The rounding noise of INT8 activations, measured on the eager converted model.

An exported program quantizes each token's activations to INT8 with its own kernels:
XNNPACK on AVX2, on AVX-512 VNNI and on a phone's Arm cores compute the per-token scale
and round x / scale in different instruction orders, so a few elements land one step
away from where torchao's eager quantizer puts them. That is not a bug, and how much
it moves the logits depends on the model and on the position (a token whose hidden
state has an outlier channel has a coarse step).

This module measures that noise instead of assuming it: :func:`perturbed_rounding`
moves a random ``fraction`` of the elements of every quantized activation one step up
or down (scale and zero point unchanged), and :func:`noise_floor` runs the eager model
with ``draws`` such perturbations, giving per position the noise energy and the largest
logit change that one-step rounding differences cause. The equivalence checks
(checks.py) count an artifact's error against this floor, position by position.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# INT8 asymmetric per-token activations (8da4w): 256 levels over [min(x, 0), max(x, 0)].
_LEVELS = 255


def _quantizes_activations(module: nn.Module) -> bool:
    """Modules whose input is quantized per token to INT8 in the converted model:
    torchao-converted linears (their weight carries the activation quantization) and
    the activation fake quantizers of the routed experts and the tied head."""
    from torchao.quantization.qat import IntxFakeQuantizer

    if isinstance(module, IntxFakeQuantizer):
        config = module.config
        return config.dtype == torch.int8 and not config.is_symmetric
    if isinstance(module, nn.Linear):
        return type(module.weight).__name__ == "IntxUnpackedToInt8Tensor"
    return False


def one_step(x_ND: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``x_ND`` with a random ``fraction`` of its elements moved by one INT8 step of
    their row (up or down at random). The row's extremes stay, and moves are clamped to
    the row's range, so the row's scale and zero point (hence the codes of the elements
    not chosen) stay as they were."""
    if x_ND.numel() == 0:
        return x_ND
    row_lo, row_hi = x_ND.amin(-1, keepdim=True), x_ND.amax(-1, keepdim=True)
    step_N1 = (row_hi.clamp(min=0) - row_lo.clamp(max=0)) / _LEVELS
    chosen = (torch.rand(x_ND.shape, generator=generator) < fraction) & (x_ND > row_lo) & (x_ND < row_hi)
    sign = torch.where(torch.rand(x_ND.shape, generator=generator) < 0.5, -1.0, 1.0)
    moved = torch.where(chosen, sign, 0.0).to(x_ND.dtype)
    return torch.minimum(torch.maximum(x_ND + moved * step_N1, row_lo), row_hi)


@contextlib.contextmanager
def perturbed_rounding(model: nn.Module, fraction: float, seed: int) -> Iterator[int]:
    """Within the block, every INT8-quantized activation of ``model`` has a random
    ``fraction`` of its elements rounded one step off (see :func:`one_step`); yields the
    number of quantization points hooked. Raises ValueError when there is none (a
    full-precision model has no activation rounding to perturb)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)

    def hook(_module, args):
        return (one_step(args[0], fraction, generator), *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if _quantizes_activations(m)]
    if not handles:
        raise ValueError("the model quantizes no activation: there is no rounding noise to measure")
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class NoiseFloor:
    """The eager model's logits and their one-step rounding noise, per position.

    ``prompts``: the token ids it was measured on. ``logits_PV``: the reference logits,
    the rows of every prompt one after another (P positions in all). ``energy_P``: the
    mean over the draws of ||perturbed - reference||^2 per row. ``max_abs_P``: the
    largest |perturbed - reference| logit change per row over every draw."""

    prompts: list[list[int]]
    logits_PV: torch.Tensor
    energy_P: torch.Tensor
    max_abs_P: torch.Tensor
    draws: int
    fraction: float


@torch.no_grad()
def noise_floor(model: nn.Module, prompts: list[list[int]], draws: int, fraction: float, seed: int = 0) -> NoiseFloor:
    """Run the eager converted ``model`` (a Transformer; full forward, no cache) on each
    prompt, plainly and under ``draws`` one-step rounding perturbations (seeds seed,
    seed+1, ...); see :class:`NoiseFloor`."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    model.eval()
    ref = torch.cat([model(torch.tensor([p]))[0].double() for p in prompts])
    energy = torch.zeros(ref.shape[0], dtype=torch.float64)
    max_abs = torch.zeros(ref.shape[0], dtype=torch.float64)
    for d in range(draws):
        with perturbed_rounding(model, fraction, seed + d):
            got = torch.cat([model(torch.tensor([p]))[0].double() for p in prompts])
        diff = got - ref
        energy += diff.pow(2).sum(-1) / draws
        max_abs = torch.maximum(max_abs, diff.abs().amax(-1))
    return NoiseFloor([list(p) for p in prompts], ref, energy, max_abs, draws, fraction)
