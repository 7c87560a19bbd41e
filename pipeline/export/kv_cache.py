"""The program's KV cache and attention on ExecuTorch's LLM kernels.

Shape legend: S new positions, L cache positions (max context), H / Hkv query /
key-value heads, Dh head dim.

The caches are ``[1, L, Hkv, Dh]`` buffers written in place by ``llama::update_cache``
(no copy of the cache per step), and attention is ``llama::custom_sdpa``: GQA inside the
kernel (no key/value heads expanded by copying) and, for a causal (global) layer, only the
``start_pos + S`` positions written so far are read. A windowed layer passes its mask
``[S, L]`` instead; the kernel then reads every cache position under the mask (its masked
form has no start position), which costs L rows where the window needs at most ``window``.

Cache dtypes (``stage.export.kv_cache``):
- ``float32``: keys and values as computed.
- ``float16`` / ``bfloat16``: stored and attended in that dtype (the kernel's own 16-bit
  path); queries are cast down, outputs back to FP32.
- ``int8``: ExecuTorch's quantized-cache form: per position and head, keys and values
  quantized asymmetrically to INT8 (one FP32 scale and INT8 zero point each, in cache
  buffers of their own), queries quantized the same way, attention by
  ``llama::custom_quantized_sdpa``.
The accuracy each costs is measured by the export gate against the eager model (FP32
attention) and is listed in docs/export.md.

These ops come from ExecuTorch's LLM custom-ops library; a runtime must link it (or, in
Python, import ``executorch.extension.llm.custom_ops.custom_ops``):
:mod:`pipeline.export.kernels` lists it beside the program.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers quantized_decomposed ops
from torch import nn

from pipeline.export.config import KV_CACHE_DTYPE_NAMES

KV_CACHE_DTYPES = {name: getattr(torch, name) for name in KV_CACHE_DTYPE_NAMES}


def kv_element_bytes(dtype: str, head_dim: int) -> float:
    """Bytes one cached key or value element costs in memory reads: the dtype's size; an
    INT8 cache also reads, per position and head, a 4-byte FP32 scale and a 1-byte zero
    point, spread over the head's ``head_dim`` elements."""
    size = torch.empty((), dtype=KV_CACHE_DTYPES[dtype]).element_size()
    return size + (5 / head_dim if dtype == "int8" else 0)


INT8_MIN, INT8_MAX = -128, 127


def register_custom_ops() -> None:
    """Load ExecuTorch's LLM custom ops (``torch.ops.llama.*``) for export and eager runs."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


def _check_start(start_pos, seq_len: int, max_len: int) -> None:
    # Bounds for torch.export: start_pos is read from a tensor, so it is unbacked.
    torch._check(start_pos >= 0)
    torch._check(start_pos + seq_len <= max_len)


class KVCacheAttention(nn.Module):
    """One layer's cache and its attention: ``forward(q_1SHDh, k_1SHkvDh, v_1SHkvDh,
    start_pos, mask_SL) -> out_1SHDh`` (FP32) writes the new keys and values at
    ``start_pos ..`` and attends. ``mask_SL`` is None for a causal layer; for a windowed
    one an FP32 ``[S, L]`` mask of 0 (may attend) and -inf."""

    def __init__(self, max_len: int, n_kv_heads: int, head_dim: int, dtype: str = "float32") -> None:
        super().__init__()
        if dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"KV cache dtype {dtype!r} is not one of {sorted(KV_CACHE_DTYPES)}")
        register_custom_ops()
        self.max_len, self.dtype_name = max_len, dtype
        cache_dtype = KV_CACHE_DTYPES[dtype]
        shape = (1, max_len, n_kv_heads, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=cache_dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=cache_dtype), persistent=False)
        if dtype == "int8":
            scale_shape = (1, max_len, n_kv_heads, 1)
            for name in ("k", "v"):
                self.register_buffer(f"{name}_scale", torch.ones(scale_shape), persistent=False)
                self.register_buffer(f"{name}_zero", torch.zeros(scale_shape, dtype=torch.int8), persistent=False)

    def reset(self) -> None:
        for buffer in self.buffers():
            buffer.zero_()
        if self.dtype_name == "int8":
            self.k_scale.fill_(1.0)
            self.v_scale.fill_(1.0)

    def forward(self, q_1SHDh, k_1SHkvDh, v_1SHkvDh, start_pos, mask_SL=None) -> torch.Tensor:
        _check_start(start_pos, q_1SHDh.shape[1], self.max_len)
        if self.dtype_name == "int8":
            return self._int8(q_1SHDh, k_1SHkvDh, v_1SHkvDh, start_pos, mask_SL)
        dtype = self.k_cache.dtype
        torch.ops.llama.update_cache(k_1SHkvDh.to(dtype), self.k_cache, start_pos)
        torch.ops.llama.update_cache(v_1SHkvDh.to(dtype), self.v_cache, start_pos)
        causal = mask_SL is None
        out_1SHDh = torch.ops.llama.custom_sdpa(
            q_1SHDh.to(dtype), self.k_cache, self.v_cache, start_pos, mask_SL, 0.0, causal
        )
        return out_1SHDh.float()

    def _int8(self, q_1SHDh, k_1SHkvDh, v_1SHkvDh, start_pos, mask_SL) -> torch.Tensor:
        for x, cache, scale, zero in (
            (k_1SHkvDh, self.k_cache, self.k_scale, self.k_zero),
            (v_1SHkvDh, self.v_cache, self.v_scale, self.v_zero),
        ):
            xq, x_scale, x_zero = quantize_per_head(x)
            torch.ops.llama.update_cache(xq, cache, start_pos)
            torch.ops.llama.update_cache(x_scale, scale, start_pos)
            torch.ops.llama.update_cache(x_zero, zero, start_pos)
        qq, q_scale, q_zero = quantize_per_head(q_1SHDh)
        return torch.ops.llama.custom_quantized_sdpa(
            qq,
            self.k_cache,
            self.v_cache,
            start_pos,
            mask_SL,
            0.0,
            mask_SL is None,
            None,
            q_zero,
            q_scale,
            self.k_zero,
            self.k_scale,
            self.v_zero,
            self.v_scale,
        )


def quantize_per_head(x_1SND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 values, FP32 scale ``[1, S, N, 1]``, INT8 zero point ``[1, S, N, 1]``): one
    asymmetric INT8 grid per position and head (torch's per-token quantization over the
    last dim)."""
    qd = torch.ops.quantized_decomposed
    scale, zero = qd.choose_qparams_per_token_asymmetric(x_1SND, torch.int8)
    xq = qd.quantize_per_token(x_1SND, scale, zero, INT8_MIN, INT8_MAX, torch.int8)
    return xq, scale.float(), zero.to(torch.int8)


def window_mask(pos_S: torch.Tensor, max_len: int, window: int) -> torch.Tensor:
    """FP32 ``[S, L]``: 0 where query position p may attend key position j
    (p - window < j <= p), -inf elsewhere (the additive mask ``custom_sdpa`` takes)."""
    k_pos_L = torch.arange(max_len, device=pos_S.device)
    diff_SL = pos_S[:, None] - k_pos_L[None, :]
    allowed_SL = (diff_SL >= 0) & (diff_SL < window)
    return torch.zeros(allowed_SL.shape).masked_fill(~allowed_SL, float("-inf"))
