"""Which experts decode touches: the eager model replays the profiled token stream.

The .pte does not expose its routing, so the expert load is counted on the eager model
that was exported (the same INT4 weights, hence the same top-k up to rounding ties),
fed exactly the tokens the profile fed the program.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.model.decoder import Transformer
from pipeline.model.moe import Router


def decode_expert_load(
    model: Transformer, runs: Sequence[tuple[Sequence[int], Sequence[int]]], max_context: int
) -> torch.Tensor:
    """Tokens routed to each expert during the decode steps of ``runs`` (each a
    ``(prompt, continuation)``: prefill, not counted, then one step per continuation
    token); returns counts ``[n_layers_moe, E]`` (int64). Every row sums to
    ``top_k * decode steps``. Raises ValueError for a dense model."""
    from pipeline.export.runner import EagerRunner

    routers = [m for m in model.modules() if isinstance(m, Router)]
    if not routers:
        raise ValueError(f"{model.cfg.name} is dense: it has no experts to count")
    counts_LE = torch.zeros(len(routers), routers[0].cfg.num_experts, dtype=torch.long)
    counting = [False]

    def hook(layer: int):
        def count(_module, _args, out) -> None:
            if counting[0]:
                counts_LE[layer] += torch.bincount(out.experts_TK.reshape(-1), minlength=counts_LE.shape[1])

        return count

    handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]
    try:
        for prompt, continuation in runs:
            runner = EagerRunner(model, max_context)
            counting[0] = False
            runner.logits(list(prompt), 0)
            counting[0] = True
            for i, token in enumerate(continuation):
                runner.logits([int(token)], len(prompt) + i)
    finally:
        for h in handles:
            h.remove()
    return counts_LE


def _max_over_mean(counts_LE: torch.Tensor) -> float:
    counts = counts_LE.double()
    mean_L1 = counts.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return float((counts.max(dim=1, keepdim=True).values / mean_L1).mean())


def uniform_max_over_mean(num_experts: int, top_k: int, steps: int, layers: int, trials: int = 100) -> float:
    """Expected busiest-expert load over the mean when each of ``steps`` tokens picks
    ``top_k`` distinct experts uniformly at random, per layer (mean of seeded trials): the
    noise floor a measured load is read against."""
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(trials):
        picks_LTK = torch.rand(layers, steps, num_experts, generator=gen).argsort(dim=-1)[..., :top_k]
        counts_LE = torch.zeros(layers, num_experts, dtype=torch.long)
        counts_LE.scatter_add_(1, picks_LTK.reshape(layers, -1), torch.ones(layers, steps * top_k, dtype=torch.long))
        values.append(_max_over_mean(counts_LE))
    return sum(values) / len(values)


def load_summary(counts_LE: torch.Tensor, top_k: int) -> dict[str, float]:
    """How evenly decode spread over the experts: the fraction of (layer, expert) pairs
    that got any token, the busiest expert's load over the mean averaged over layers
    (1.0 = perfectly even), the same under uniform random routing of as many tokens, and
    the number of decode steps counted."""
    layers, experts = counts_LE.shape
    steps = int(counts_LE[0].sum()) // top_k
    return {
        "experts_touched_fraction": float((counts_LE > 0).double().mean()),
        "max_over_mean_load": _max_over_mean(counts_LE),
        "uniform_max_over_mean_load": uniform_max_over_mean(experts, top_k, steps, layers),
        "decode_steps": steps,
    }
