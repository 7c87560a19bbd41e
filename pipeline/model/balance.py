"""Auxiliary-loss-free load balancing and load statistics.

After each optimizer step, every router's expert bias moves by a fixed rate towards
balance: up for experts that received fewer tokens than the mean, down for those that
received more (DeepSeek-V3's sign update). Counts are summed over data-parallel ranks
first, so every rank applies the same update and the biases never drift apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.model.moe import MoE


@torch.no_grad()
def load_stats(counts_E: torch.Tensor) -> dict[str, float]:
    """Load histogram summary of one layer: max/mean load and the fraction of idle experts."""
    counts_E = counts_E.float()
    mean = counts_E.mean().clamp_min(1e-9)
    return {
        "max_over_mean": float(counts_E.max() / mean),
        "min_over_mean": float(counts_E.min() / mean),
        "dead_fraction": float((counts_E == 0).float().mean()),
    }


class ExpertBiasBalancer:
    """The post-optimizer-step hook that updates expert biases from token counts."""

    def __init__(self, moe_layers: list[MoE]) -> None:
        self.routers = [moe.router for moe in moe_layers]
        self.last_counts_LE: torch.Tensor | None = None  # all-reduced counts of the last step

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Update biases from the counts since the last call, reset the counts and
        return load statistics averaged over layers (empty for a dense model)."""
        if not self.routers:
            return {}
        counts_LE = torch.stack([r.tokens_per_expert_E for r in self.routers])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_LE)
        self.last_counts_LE = counts_LE  # for load histograms
        stats = [load_stats(c) for c in counts_LE]
        for router, counts_E in zip(self.routers, counts_LE):
            rate = router.cfg.bias_update_rate
            if rate > 0 and counts_E.sum() > 0:
                router.expert_bias_E += rate * torch.sign(counts_E.mean() - counts_E)
            router.tokens_per_expert_E.zero_()
        return {f"moe/{key}": sum(s[key] for s in stats) / len(stats) for key in stats[0]}
