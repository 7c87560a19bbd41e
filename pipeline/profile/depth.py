"""Full-depth speed from programs of the same width and fewer layers.

A model that is too large to lower on this machine is profiled at full width (which
decides cache residency and bandwidth) with n = 1, 2, ... layers. Per-token time is a
sum over layers plus what does not depend on depth (embedding, final norm, head,
runtime overhead), so each latency is fitted as ``a + b * n`` and read off at the full
depth. Latencies are fitted, never rates: TTFT (ms) for prefill, and ms per decoded
token for decode; tok/s are derived from the extrapolated latencies.
"""

from __future__ import annotations


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b * x``; needs two or more distinct ``xs``."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"need values at two or more distinct depths, got {xs}")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def extrapolate(by_depth: dict[int, dict[str, float]], prompt_tokens: int, full_layers: int) -> dict[str, float]:
    """Full-depth TTFT (ms), prefill and decode tok/s from per-depth medians.

    ``by_depth``: ``{layers: {"ttft_ms": ..., "decode_tok_s": ...}}`` at one prompt
    length (``prompt_tokens``). Also returns the fitted per-layer and fixed costs and
    the largest relative residual of the fit (0 with two depths: a line through two
    points; with three or more it tests the linearity assumption)."""
    depths = sorted(by_depth)
    out: dict[str, float] = {}
    residual = 0.0
    for name, values in (
        ("ttft_ms", [by_depth[n]["ttft_ms"] for n in depths]),
        ("decode_ms_per_token", [1e3 / by_depth[n]["decode_tok_s"] for n in depths]),
    ):
        a, b = fit_line([float(n) for n in depths], values)
        out[name] = a + b * full_layers
        out[f"{name}_per_layer"] = b
        out[f"{name}_fixed"] = a
        residual = max(residual, *(abs(a + b * n - v) / v for n, v in zip(depths, values, strict=True)))
    out["prefill_tok_s"] = prompt_tokens / (out["ttft_ms"] / 1e3)
    out["decode_tok_s"] = 1e3 / out["decode_ms_per_token"]
    out["fit_max_relative_residual"] = residual
    return out
