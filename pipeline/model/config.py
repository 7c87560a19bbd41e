"""Model configs: plain dataclasses that validate themselves at construction.

A config is the whole description of a model. Parameter counts, FLOPs and memory are
computed from it in :mod:`pipeline.model.accounting` without building a module, so the
scaling planner can sweep thousands of shapes cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import require

# torch._grouped_mm needs every row stride to be a multiple of 16 bytes; 8 elements
# covers bf16 (and therefore fp32) for the expert weights and their activations.
GROUPED_MM_ALIGN = 8


@dataclass
class MoEConfig:
    """A feed-forward slot of fine-grained routed experts plus optional shared experts."""

    num_experts: int  # E routed experts
    top_k: int  # K experts chosen per token
    expert_ffn_dim: int  # F: hidden width of one routed expert
    num_shared_experts: int = 0
    shared_ffn_dim: int = 0  # hidden width of each shared expert
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    # Normalise the K chosen gates to sum to one (DeepSeek-V3 does for sigmoid scores).
    route_norm: bool = True
    route_scale: float = 1.0  # the paper uses 2.5 with sigmoid scores
    # Auxiliary-loss-free balancing: the per-expert bias moves by this much after each
    # optimizer step, towards the mean load. 0 disables the update.
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0  # switch-style load-balancing loss (OLMoE: 0.01)
    z_loss_coef: float = 0.0  # router z-loss (OLMoE: 0.001)

    def __post_init__(self) -> None:
        require(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        require(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        require(
            self.top_k <= self.num_experts,
            "top_k",
            f"top_k={self.top_k} exceeds num_experts={self.num_experts}",
        )
        require(self.expert_ffn_dim >= 1, "expert_ffn_dim", "must be >= 1")
        require(
            self.expert_ffn_dim % GROUPED_MM_ALIGN == 0,
            "expert_ffn_dim",
            f"must be a multiple of {GROUPED_MM_ALIGN} for grouped GEMM, got {self.expert_ffn_dim}",
        )
        require(self.num_shared_experts >= 0, "num_shared_experts", "must be >= 0")
        require(
            self.num_shared_experts == 0 or self.shared_ffn_dim > 0,
            "shared_ffn_dim",
            "must be > 0 when num_shared_experts > 0",
        )
        require(
            self.score_func in ("sigmoid", "softmax"),
            "score_func",
            f"must be 'sigmoid' or 'softmax', got {self.score_func!r}",
        )
        require(self.route_scale > 0, "route_scale", "must be > 0")
        require(self.bias_update_rate >= 0, "bias_update_rate", "must be >= 0")
        require(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")
        require(self.z_loss_coef >= 0, "z_loss_coef", "must be >= 0")


@dataclass
class ModelConfig:
    """A decoder-only transformer whose feed-forward slot is dense SwiGLU or an MoE."""

    name: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int = 0  # dense SwiGLU width; used when moe is None
    moe: MoEConfig | None = None
    rope_theta: float = 500_000.0
    qk_norm: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    # Local attention: layers use a sliding window except every `global_every`-th layer
    # (MobileLLM-Pro: window 512, global_every 4 gives local:global = 3:1).
    sliding_window: int | None = None
    global_every: int = 1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        require(bool(self.name), "name", "must be non-empty")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be a positive int, got {value!r}")
        require(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}",
        )
        require(self.head_dim % 2 == 0, "head_dim", f"must be even for RoPE, got {self.head_dim}")
        require(self.rope_theta > 0, "rope_theta", "must be > 0")
        if self.moe is None:
            require(self.ffn_dim >= 1, "ffn_dim", "a dense model needs ffn_dim >= 1")
        else:
            require(
                self.d_model % GROUPED_MM_ALIGN == 0,
                "d_model",
                f"must be a multiple of {GROUPED_MM_ALIGN} for grouped GEMM, got {self.d_model}",
            )
        if self.sliding_window is not None:
            require(self.sliding_window >= 1, "sliding_window", "must be >= 1 or null")
        require(self.global_every >= 1, "global_every", "must be >= 1")
        require(self.init_std > 0, "init_std", "must be > 0")

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def layer_window(self, layer: int) -> int | None:
        """Attention window of ``layer``: None means full (global) causal attention."""
        if self.sliding_window is None or (layer + 1) % self.global_every == 0:
            return None
        return self.sliding_window
