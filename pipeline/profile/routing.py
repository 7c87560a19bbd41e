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


def load_summary(counts_LE: torch.Tensor) -> dict[str, float]:
    """How evenly decode spread over the experts: the fraction of (layer, expert) pairs
    that got any token, and the busiest expert's load over the mean (1.0 = perfectly even),
    averaged over layers."""
    counts = counts_LE.double()
    mean_E = counts.mean(dim=1, keepdim=True).clamp_min(1e-12)
    return {
        "experts_touched_fraction": float((counts_LE > 0).double().mean()),
        "max_over_mean_load": float((counts.max(dim=1, keepdim=True).values / mean_E).mean()),
    }
