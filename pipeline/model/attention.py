"""Grouped-query attention with QK-norm, RoPE, optional sliding window and a KV cache.

Shape legend: B batch, S new positions, L cached+new positions, D model dim,
H query heads, Hkv key/value heads, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.config import ModelConfig
from pipeline.model.layers import RMSNorm, apply_rope


class KVCache:
    """Preallocated keys and values for every layer, filled as decoding proceeds."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.max_len = max_len
        self.k_BHkvLDh = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v_BHkvLDh = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]


def attention_mask(q_pos_S: torch.Tensor, k_pos_L: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (S, L) mask: True where query i may attend to key j (causal, windowed)."""
    diff_SL = q_pos_S[:, None] - k_pos_L[None, :]
    allowed_SL = diff_SL >= 0
    if window is not None:
        allowed_SL = allowed_SL & (diff_SL < window)
    return allowed_SL


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.layer = layer
        self.window = cfg.layer_window(layer)
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # QK-norm keeps attention logits bounded, which matters for low-precision
        # training and for INT8 activations after QAT.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos_SDh2: torch.Tensor,
        sin_SDh2: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BHSDh = self.q_norm(self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)).transpose(1, 2)
        k_BHkvSDh = self.k_norm(self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v_BHkvSDh = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSDh = apply_rope(q_BHSDh, cos_SDh2, sin_SDh2)
        k_BHkvSDh = apply_rope(k_BHkvSDh, cos_SDh2, sin_SDh2)

        if cache is None:
            k_all, v_all, key_start = k_BHkvSDh, v_BHkvSDh, start_pos
        else:
            end = start_pos + S
            if end > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions, asked for {end}")
            cache.k_BHkvLDh[self.layer][:, :, start_pos:end] = k_BHkvSDh
            cache.v_BHkvLDh[self.layer][:, :, start_pos:end] = v_BHkvSDh
            k_all = cache.k_BHkvLDh[self.layer][:, :, :end]
            v_all = cache.v_BHkvLDh[self.layer][:, :, :end]
            key_start = 0

        if cache is None and start_pos == 0 and self.window is None:
            out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_all, v_all, is_causal=True, enable_gqa=True)
        else:
            q_pos_S = torch.arange(start_pos, start_pos + S, device=x_BSD.device)
            k_pos_L = torch.arange(key_start, key_start + k_all.shape[2], device=x_BSD.device)
            mask_SL = attention_mask(q_pos_S, k_pos_L, self.window)
            out_BHSDh = F.scaled_dot_product_attention(q_BHSDh, k_all, v_all, attn_mask=mask_SL, enable_gqa=True)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
