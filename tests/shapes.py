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


# The copy task of context_trained(): token t repeats token t - LAG, so after the first
# LAG positions the next token is fully determined by the context, at a fixed distance.
LAG = 3
COPY_VOCAB = 48  # tokens the task draws (of VOCAB): small, so a few hundred steps learn it


def copy_batch(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) sequences of the copy task: LAG random tokens, repeated."""
    head_BL = torch.randint(2, COPY_VOCAB, (batch, LAG), generator=generator)
    return head_BL.repeat(1, -(-length // LAG))[:, :length]


def context_trained(cfg: ModelConfig, steps: int = 150, seed: int = 0) -> Transformer:
    """A model whose predictions depend on the context: ``cfg`` trained (AdamW, a few
    seconds on 2 cores) on the copy task. A random init's argmax barely depends on
    earlier tokens, so an oracle built on it cannot see a wrong cache position or
    RoPE; this model's next token is LAG positions back, so it sees both."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        tokens_BL = copy_batch(16, 33, gen)
        logits_BSV = model(tokens_BL[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits_BSV.flatten(0, 1), tokens_BL[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def small_moe(**overrides) -> MoEConfig:
    """8 experts of width 16, top-2, a shared expert, sigmoid router; ``overrides`` replace fields."""
    base = dict(
        num_experts=8,
        top_k=2,
        expert_ffn_dim=16,
        num_shared_experts=1,
        shared_ffn_dim=16,
        score_func="sigmoid",
        route_norm=True,
        route_scale=2.5,
    )
    base.update(overrides)
    return MoEConfig(**base)


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer MoE of width 32 at vocabulary 64 (``small_moe`` experts)."""
    base = dict(
        name="t",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        max_seq_len=64,
        moe=small_moe(),
    )
    base.update(overrides)
    return ModelConfig(**base)
