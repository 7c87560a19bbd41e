"""Equivalence of an exported artifact with the eager model, position by position.

SQNR (signal-to-quantization-noise ratio) in dB: 10 log10(||ref||^2 / ||ref - x||^2)
over one position's logits, the measure torchao and ExecuTorch use for quantized
numerics. Cosine similarity over the same vector. Both are taken at every position of
every prompt and the worst is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.export.runner import _Runner, greedy


def sqnr_db(ref_SV: torch.Tensor, x_SV: torch.Tensor) -> torch.Tensor:
    """SQNR per row (S,), in dB; +inf where the rows are equal."""
    signal = ref_SV.double().pow(2).sum(-1)
    noise = (ref_SV.double() - x_SV.double()).pow(2).sum(-1)
    return 10 * torch.log10(signal / noise)


# Reported SQNRs are capped here: equal logits give +inf, which JSON metrics cannot hold.
SQNR_CAP_DB = 300.0


def _capped(db: float) -> float:
    return min(db, SQNR_CAP_DB)


def cosine(ref_SV: torch.Tensor, x_SV: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row (S,)."""
    return torch.nn.functional.cosine_similarity(ref_SV.double(), x_SV.double(), dim=-1)


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = 0.99
    min_sqnr_db: float = 20.0
    greedy_tokens: int = 16  # greedy generations must agree for at least this many tokens


def compare(reference: _Runner, candidate: _Runner, prompts: list[list[int]], t: Thresholds) -> dict:
    """Worst cosine/SQNR over every position of every prompt (full prefill), the
    shortest greedy agreement over ``t.greedy_tokens`` new tokens, and max |diff|."""
    cos_min, sqnr_min, max_abs = 1.0, math.inf, 0.0
    agree = t.greedy_tokens
    sqnrs = []
    for prompt in prompts:
        ref, got = reference.logits(prompt, 0), candidate.logits(prompt, 0)
        cos_min = min(cos_min, float(cosine(ref, got).min()))
        sqnrs.append(sqnr_db(ref, got))
        sqnr_min = min(sqnr_min, float(sqnrs[-1].min()))
        max_abs = max(max_abs, float((ref - got).abs().max()))
        a, b = greedy(reference, prompt, t.greedy_tokens), greedy(candidate, prompt, t.greedy_tokens)
        agree = min(agree, _common_prefix(a, b))
    return {
        "cosine_min": cos_min,
        "sqnr_db_min": _capped(sqnr_min),
        "sqnr_db_median": _capped(float(torch.cat(sqnrs).median())),
        "max_abs_logit_diff": max_abs,
        "greedy_agree_tokens": agree,
        "passed": cos_min > t.min_cosine and sqnr_min > t.min_sqnr_db and agree >= t.greedy_tokens,
    }


def prefill_matches_decode(runner: _Runner, prompt: list[int], t: Thresholds) -> dict:
    """The last position's logits after prefill(prompt[:-1]) + decode(prompt[-1])
    against one prefill of the whole prompt, in the same runner."""
    full = runner.logits(prompt, 0)[-1:]
    runner.logits(prompt[:-1], 0)
    stepped = runner.logits(prompt[-1:], len(prompt) - 1)
    cos, sqnr = float(cosine(full, stepped)[0]), _capped(float(sqnr_db(full, stepped)[0]))
    return {
        "cosine": cos,
        "sqnr_db": sqnr,
        "same_argmax": bool(full.argmax() == stepped.argmax()),
        "passed": cos > t.min_cosine and sqnr > t.min_sqnr_db and bool(full.argmax() == stepped.argmax()),
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
