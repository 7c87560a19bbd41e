"""The MobileMoE model family: configs, accounting, layers, MoE and the decoder."""

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
