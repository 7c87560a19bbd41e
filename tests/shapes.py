"""Model shapes the tests share."""

from __future__ import annotations

from pipeline.model import ModelConfig, MoEConfig

VOCAB = 512


def micro_cfg(**overrides) -> ModelConfig:
    """The micro MoE: 2 layers x 4 experts, top-2, a shared expert, QK-norm, GQA, tied
    embeddings, at vocabulary 512 (the shared mixture's); ``overrides`` replace fields."""
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, shared_ffn_dim=64, route_scale=2.5)
    base = dict(
        name="micro", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, max_seq_len=128
    )
    base.update(overrides)
    base.setdefault("moe", moe)
    return ModelConfig(**base)
