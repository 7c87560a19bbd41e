"""Parameter, FLOP and memory accounting from a config alone (no module is built).

The counts mirror the modules in :mod:`pipeline.model` exactly; a test builds every
named config on the meta device and checks ``param_counts(cfg).total`` against it.

Conventions:
- "active" parameters are those touched by one token: embeddings, attention, norms,
  the router, the shared experts and ``top_k`` routed experts.
- FLOPs count a multiply-add as 2 and include attention score/value products; the
  embedding lookup is free, the output projection is not.
- INT4 memory follows the recipe's 8da4w scheme: every matmul weight (and the tied
  embedding) at 4 bits with one bf16 scale per group; router weights stay FP32 and
  norms bf16 (they are never quantized).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.model.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int  # input embedding (+ output head when untied)
    router: int  # FP32 router weights, all layers
    norms: int


def _attention_params(cfg: ModelConfig) -> int:
    q = cfg.d_model * cfg.n_heads * cfg.head_dim
    kv = 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
    o = cfg.n_heads * cfg.head_dim * cfg.d_model
    return q + kv + o


def _norm_params_per_layer(cfg: ModelConfig) -> int:
    qk = 2 * cfg.head_dim if cfg.qk_norm else 0
    return 2 * cfg.d_model + qk


def _ffn_params(cfg: ModelConfig) -> tuple[int, int, int]:
    """(total, active, router) feed-forward parameters of one layer."""
    swiglu = 3 * cfg.d_model  # w1, w3: D->F and w2: F->D, per unit of hidden width
    if cfg.moe is None:
        dense = swiglu * cfg.ffn_dim
        return dense, dense, 0
    moe = cfg.moe
    routed_one = swiglu * moe.expert_ffn_dim
    shared = swiglu * moe.shared_ffn_dim * moe.num_shared_experts
    router = cfg.d_model * moe.num_experts
    total = moe.num_experts * routed_one + shared + router
    active = moe.top_k * routed_one + shared + router
    return total, active, router


def param_counts(cfg: ModelConfig) -> ParamCounts:
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    attn = _attention_params(cfg)
    norms = cfg.n_layers * _norm_params_per_layer(cfg) + cfg.d_model  # + final norm
    ffn_total, ffn_active, router = _ffn_params(cfg)
    total = embed + norms + cfg.n_layers * (attn + ffn_total)
    active = embed + norms + cfg.n_layers * (attn + ffn_active)
    return ParamCounts(total=total, active=active, embedding=embed, router=cfg.n_layers * router, norms=norms)


def _attended_positions(cfg: ModelConfig, context: int, causal_mean: bool) -> float:
    """Key positions one query attends to, summed over layers.

    ``causal_mean`` averages over the positions of a prefill of length ``context``;
    otherwise this is the last (decode) position with ``context`` tokens cached.
    """
    total = 0.0
    for layer in range(cfg.n_layers):
        window = cfg.layer_window(layer)
        if causal_mean:
            # mean over i in 1..context of min(i, window)
            if window is None or window >= context:
                total += (context + 1) / 2
            else:
                total += (window * (window + 1) / 2 + (context - window) * window) / context
        else:
            total += context if window is None else min(context, window)
    return total


def flops_per_token(cfg: ModelConfig, context: int, phase: str = "prefill") -> float:
    """Forward FLOPs per token for a prompt (``prefill``) or one new token (``decode``).

    ``context`` is the prompt length for prefill and the cached length for decode.
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase: must be 'prefill' or 'decode', got {phase!r}")
    positions = _attended_positions(cfg, context, causal_mean=(phase == "prefill"))
    attention = 2 * 2 * cfg.n_heads * cfg.head_dim * positions  # QK^T and AV
    return 2.0 * matmul_params_active(cfg) + attention


def matmul_params_active(cfg: ModelConfig) -> int:
    """The active parameters one token multiplies (one multiply-add each): every active
    parameter but the norms and the input lookup. A tied embedding is used once, as the
    output head; an untied one has its own head. ``2 * matmul_params_active`` is the
    compute per token without attention (the paper's "2 N_act FLOPs/token"), and the
    scaling law's N (pipeline.scaling.law)."""
    counts = param_counts(cfg)
    matmul = counts.active - counts.norms
    if not cfg.tie_embeddings:
        matmul -= cfg.vocab_size * cfg.d_model
    return matmul


@dataclass(frozen=True)
class FFNShape:
    """The feed-forward slot's shape in the terms of fine-grained MoE scaling laws.

    - ``expansion``: total FFN width / active FFN width (routed and shared experts; a
      dense slot is 1): how much more memory than compute the slot holds (the sparsity).
    - ``granularity``: active FFN width / one routed expert's width (Krajewski et al.
      2024's G at constant active width; a dense slot is 1). MobileMoE-S: (4 x 384 +
      1536) / 384 = 8.
    - ``shared``: whether a shared expert is present.
    """

    active_width: int
    total_width: int
    expansion: float
    granularity: float
    shared: bool


def ffn_shape(cfg: ModelConfig) -> FFNShape:
    """The :class:`FFNShape` of ``cfg``'s feed-forward slot (widths in hidden units)."""
    if cfg.moe is None:
        return FFNShape(cfg.ffn_dim, cfg.ffn_dim, 1.0, 1.0, False)
    moe = cfg.moe
    shared = moe.num_shared_experts * moe.shared_ffn_dim
    active = moe.top_k * moe.expert_ffn_dim + shared
    total = moe.num_experts * moe.expert_ffn_dim + shared
    return FFNShape(active, total, total / active, active / moe.expert_ffn_dim, moe.num_shared_experts > 0)


def int4_weight_bytes(
    cfg: ModelConfig, group_size: int = 32, scale_bytes: int = 2, norm_bytes: int = 2, embedding_bits: int = 4
) -> int:
    """Weight memory of the 8da4w format in bytes: INT4 values with one scale of
    ``scale_bytes`` per ``group_size`` weights, the FP32 router, norms at ``norm_bytes``.

    ``embedding_bits=8`` counts the (input) embedding at INT8 with one scale per row
    instead. The defaults are the on-device estimate (bf16 scales and norms); the
    recipe's converted file keeps torchao's FP32 scales and FP32 norms
    (``scale_bytes=4, norm_bytes=4``; see pipeline/quant/format.py).
    """
    if embedding_bits not in (4, 8):
        raise ValueError(f"embedding_bits: must be 4 or 8, got {embedding_bits}")
    counts = param_counts(cfg)
    quantized = counts.total - counts.router - counts.norms
    embed = cfg.vocab_size * cfg.d_model if embedding_bits == 8 else 0
    int4 = quantized - embed
    memory = int4 // 2 + (int4 // group_size) * scale_bytes
    memory += embed + cfg.vocab_size * scale_bytes if embed else 0
    return memory + 4 * counts.router + norm_bytes * counts.norms


def _int4_bytes(n_weights: int, group_size: int, scale_bytes: int) -> int:
    return n_weights // 2 + (n_weights // group_size) * scale_bytes


def decode_read_bytes(
    cfg: ModelConfig,
    kv_positions: int,
    group_size: int = 32,
    scale_bytes: int = 2,
    norm_bytes: int = 2,
    kv_dtype_bytes: int = 2,
) -> dict[str, int]:
    """Bytes one decode step reads from memory in the 8da4w format: the memory-bandwidth
    bound of decode is (read bandwidth) / ``total``.

    Weights: every *active* matmul weight at INT4 with one scale per group (attention,
    shared and ``top_k`` routed experts; the output head, tied or not, is read whole), the
    FP32 router, the norms, and one INT4 row of the input embedding (a lookup reads only
    the token's row). KV cache: K and V of ``kv_positions`` cached positions per layer
    (sliding-window layers at most their window) at ``kv_dtype_bytes``.

    Returns ``{"weights": B, "kv_cache": B, "total": B}`` in bytes.
    """
    counts = param_counts(cfg)
    head = cfg.vocab_size * cfg.d_model
    int4_active = counts.active - counts.router - counts.norms - counts.embedding + head
    weights = (
        _int4_bytes(int4_active, group_size, scale_bytes)
        + _int4_bytes(cfg.d_model, group_size, scale_bytes)  # the looked-up embedding row
        + 4 * counts.router
        + norm_bytes * counts.norms
    )
    kv = kv_cache_bytes(cfg, kv_positions, kv_dtype_bytes)
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype_bytes: int = 2) -> int:
    """K and V bytes one cached token costs, summed over all layers (bf16 by default)."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes at ``context`` tokens; sliding-window layers keep only their window."""
    per_layer_token = 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes
    cached = 0
    for layer in range(cfg.n_layers):
        window = cfg.layer_window(layer)
        cached += context if window is None else min(context, window)
    return per_layer_token * cached


def summary(cfg: ModelConfig, context: int = 1024) -> dict[str, float]:
    """The numbers a planner or report needs, in one flat dict."""
    counts = param_counts(cfg)
    return {
        "params_total": counts.total,
        "params_active": counts.active,
        "params_embedding": counts.embedding,
        "flops_per_token_prefill": flops_per_token(cfg, context, "prefill"),
        "flops_per_token_decode": flops_per_token(cfg, context, "decode"),
        "int4_weight_bytes": int4_weight_bytes(cfg),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(cfg),
        "context": context,
    }
