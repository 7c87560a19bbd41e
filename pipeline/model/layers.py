"""Small building blocks: RMSNorm, rotary embeddings and the dense SwiGLU FFN.

Shape legend: B batch, S sequence, D model dim, H heads, Dh head dim, F FFN width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        x_f32 = x.float()
        normed = x_f32 * torch.rsqrt(x_f32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_tables(
    head_dim: int, max_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_len, head_dim // 2) in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    pos = torch.arange(max_len, device=device).float()
    angles_SDh2 = torch.outer(pos, inv_freq)
    return angles_SDh2.cos(), angles_SDh2.sin()


def apply_rope(x_BHSDh: torch.Tensor, cos_SDh2: torch.Tensor, sin_SDh2: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by position-dependent angles."""
    half = x_BHSDh.shape[-1] // 2
    x1, x2 = x_BHSDh[..., :half].float(), x_BHSDh[..., half:].float()
    cos, sin = cos_SDh2[None, None], sin_SDh2[None, None]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x_BHSDh.dtype)


class Embedding(nn.Embedding):
    """Token embedding that is also the output head when embeddings are tied.

    ``forward(tokens_BS) -> x_BSD`` looks rows up; ``attend(x_BSD) -> logits_BSV`` is the
    tied head. Both read the weight through one module so that QAT can swap in a
    fake-quantized (or quantized) weight for the lookup and the head alike.
    """

    def reset_parameters(self) -> None:
        # A module built on the meta device (the stages' checkpoint shape checks) has no
        # values to set, and torch's normal_ on a meta tensor imports torch._dynamo, seconds
        # of every stage process that checks a checkpoint input (docs/stages.md).
        if not self.weight.is_meta:
            super().reset_parameters()

    def head_operands(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, W)`` with ``attend(x) = h @ W.T``: what the fused head-and-loss takes."""
        return x_BSD, self.weight

    def attend(self, x_BSD: torch.Tensor) -> torch.Tensor:
        h_BSD, W_VD = self.head_operands(x_BSD)
        return F.linear(h_BSD, W_VD)


class SwiGLU(nn.Module):
    """Dense gated FFN: w2(silu(w1 x) * w3 x). Also used for the shared experts."""

    def __init__(self, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w3 = nn.Linear(d_model, ffn_dim, bias=False)
        self.w2 = nn.Linear(ffn_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
