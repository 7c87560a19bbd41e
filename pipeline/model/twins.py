"""Dense twins of an MoE config: the two dense models the MoE is compared against.

- ``active``: the dense FFN a token touches in the MoE, ``top_k * expert_ffn_dim +
  num_shared_experts * shared_ffn_dim`` wide (the router excluded): the same compute
  per token, far fewer weights.
- ``total``: the dense FFN holding as many parameters as the whole MoE slot (routed
  experts, shared experts and router), rounded *down* to a multiple of ``multiple`` so
  that INT4 groups tile every matrix: the same INT4 weight memory, the paper's
  comparison (MobileMoE vs MobileLLM-Pro at comparable memory).

Everything but the feed-forward slot (depth, width, attention, vocabulary) is kept.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pipeline.model.config import ModelConfig

TwinMatch = Literal["active", "total"]


def dense_twin(cfg: ModelConfig, match: TwinMatch, multiple: int = 32) -> ModelConfig:
    """The dense model with the MoE's ``active`` or ``total`` FFN parameters per layer.

    ``multiple``: the ``total`` twin's ``ffn_dim`` is rounded *down* to a multiple of it
    (use the INT4 group size), so it holds up to ``multiple - 1`` hidden columns per layer
    fewer than the MoE (tiny: 1280 instead of 1285.3, -0.4% FFN): the rounding favours
    the dense twin, never the MoE. The ``active`` twin is exact.
    Raises ValueError for a dense ``cfg``, an unknown ``match``, or a total FFN width
    that rounds down to zero.
    """
    if cfg.moe is None:
        raise ValueError(f"{cfg.name} is dense already; a twin is made from an MoE config")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    moe = cfg.moe
    shared = moe.num_shared_experts * moe.shared_ffn_dim
    if match == "active":
        ffn_dim = moe.top_k * moe.expert_ffn_dim + shared
    elif match == "total":
        # Parameters of the whole slot, in units of one dense hidden column (3 * d_model:
        # w1, w3 and w2), router included.
        slot = 3 * cfg.d_model * (moe.num_experts * moe.expert_ffn_dim + shared) + cfg.d_model * moe.num_experts
        ffn_dim = slot // (3 * cfg.d_model) // multiple * multiple
        if ffn_dim == 0:
            raise ValueError(f"{cfg.name}: the total-parameter twin rounds to ffn_dim 0 at multiple {multiple}")
    else:
        raise ValueError(f"match must be 'active' or 'total', got {match!r}")
    return replace(cfg, name=f"{cfg.name}_dense_{match}", moe=None, ffn_dim=ffn_dim)
