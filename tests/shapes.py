"""Model shapes the tests share."""

from __future__ import annotations

import torch

from pipeline.model import ModelConfig, MoEConfig, Transformer

VOCAB = 512
MAX_CONTEXT = 64  # KV-cache positions of the shared micro program (conftest: lowered)


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


def trained_like(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Random weights, made less uniform than the init (larger weights, non-trivial
    norms and expert biases) so that routing and logits are not near ties."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(4.0)
        for moe in model.moe_layers():
            moe.router.expert_bias_E.uniform_(-0.05, 0.05)
    return model.eval()
