"""The MobileMoE model family: configs, accounting, layers, MoE and the decoder.

The names below load their module on first use (PEP 562), so that reading a config
(``pipeline.model.config``, which the recipe's validation imports) never imports torch:
``make repro``'s no-op check and the config tools stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - the static view of what __getattr__ gives
    from pipeline.model.accounting import (
        flops_per_token,
        int4_weight_bytes,
        kv_cache_bytes,
        kv_cache_bytes_per_token,
        param_counts,
        summary,
    )
    from pipeline.model.attention import KVCache
    from pipeline.model.balance import ExpertBiasBalancer, load_stats
    from pipeline.model.config import ModelConfig, MoEConfig
    from pipeline.model.decoder import Transformer, generate
    from pipeline.model.moe import MoE

_HOME = {
    "flops_per_token": "accounting",
    "int4_weight_bytes": "accounting",
    "kv_cache_bytes": "accounting",
    "kv_cache_bytes_per_token": "accounting",
    "param_counts": "accounting",
    "summary": "accounting",
    "KVCache": "attention",
    "ExpertBiasBalancer": "balance",
    "load_stats": "balance",
    "ModelConfig": "config",
    "MoEConfig": "config",
    "Transformer": "decoder",
    "generate": "decoder",
    "MoE": "moe",
}
__all__ = [
    "ExpertBiasBalancer",
    "KVCache",
    "MoE",
    "ModelConfig",
    "MoEConfig",
    "Transformer",
    "flops_per_token",
    "generate",
    "int4_weight_bytes",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "load_stats",
    "param_counts",
    "summary",
]
assert sorted(__all__) == sorted(_HOME)  # one list of names, checked at import


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.model.{_HOME[name]}"), name)
