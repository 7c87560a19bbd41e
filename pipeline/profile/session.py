"""Profile several programs side by side: interleaved runs on the same held-out prompts,
then medians, spreads and the MoE's paired speed-ups over each dense program."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from pipeline.profile.stats import Clock, GenerationStats, speedup, spread, timed_generation

METRICS = ("ttft_ms", "prefill_tok_s", "decode_tok_s")

Logits = Callable[[list[int], int], object]
Samples = dict[str, dict[int, list[GenerationStats]]]  # program -> prompt length -> measured runs


def profile_interleaved(
    programs: dict[str, Logits],
    windows: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    decode_tokens: int,
    warmup: int,
    clock: Clock = time.perf_counter,
) -> Samples:
    """One timed generation per (window, prompt length, program): prefill the window's
    first ``length`` tokens, decode its next ``decode_tokens``. Programs take turns
    within each (window, length), and the first to go rotates with the window, so a
    drifting machine (thermal, a noisy neighbour) hits every program alike. The first
    ``warmup`` windows are run and discarded. Windows must hold
    ``max(prompt_lengths) + decode_tokens`` tokens."""
    need = max(prompt_lengths) + decode_tokens
    short = [i for i, w in enumerate(windows) if len(w) < need]
    if short:
        raise ValueError(f"windows {short} hold fewer than the {need} tokens a run needs")
    if len(windows) <= warmup:
        raise ValueError(f"{len(windows)} windows leave none to measure after {warmup} warm-up runs")
    names = list(programs)
    samples: Samples = {name: {n: [] for n in prompt_lengths} for name in names}
    for r, window in enumerate(windows):
        first = (r - warmup) % len(names)  # measured windows start with each program in turn
        order = names[first:] + names[:first]
        for length in prompt_lengths:
            prompt, continuation = window[:length], window[length : length + decode_tokens]
            for name in order:
                stats = timed_generation(programs[name], prompt, continuation, clock)
                if r >= warmup:
                    samples[name][length].append(stats)
    return samples


def summarize(samples: Samples) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{program: {length: {metric: {median, p25, p75, runs}}}}`` (lengths as strings)."""
    return {
        name: {
            str(length): {m: spread([getattr(s, m) for s in runs]) for m in METRICS}
            for length, runs in by_length.items()
        }
        for name, by_length in samples.items()
    }


def speedups(samples: Samples, moe: str, dense: str) -> dict[str, dict[str, float]]:
    """The MoE's paired speed-ups over ``dense`` per prompt length: prefill and decode
    tok/s (MoE / dense) and TTFT (dense / MoE); > 1 means the MoE is faster."""
    out: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}, "ttft": {}}
    for length, runs in samples[moe].items():
        other = samples[dense][length]
        out["prefill"][str(length)] = speedup([s.prefill_tok_s for s in runs], [s.prefill_tok_s for s in other])
        out["decode"][str(length)] = speedup([s.decode_tok_s for s in runs], [s.decode_tok_s for s in other])
        out["ttft"][str(length)] = speedup([s.ttft_ms for s in runs], [s.ttft_ms for s in other], False)
    return out
