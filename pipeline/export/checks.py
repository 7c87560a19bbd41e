"""Equivalence of an exported artifact with the eager model, teacher-forced, position by
position, against the rounding noise measured on the eager model (noise.py).

Every artifact runs the same held-out prompts twice: a prefill of the first half followed
by one decode step per remaining token, each fed the prompt's own next token (teacher
forcing: a near-tie never sends the two sides down different continuations), then one
prefill of the whole prompt (see teacher_forced). Every row of logits is compared with
the eager model's row at the same position:

- SQNR (signal-to-quantization-noise ratio, dB): 10 log10(||ref||^2 / ||ref - x||^2),
  the measure torchao and ExecuTorch use for quantized numerics, and cosine similarity:
  both reported (worst and median).
- Excess noise (dB): 10 log10(||ref - x||^2 / E||ref - ref'||^2), ref' the eager model
  with one-step rounding differences in its INT8 activations (noise.py). 0 dB means
  "as noisy as a kernel that rounds a ``fraction`` of the elements the other way".
  Gated summed over the prefill rows and over the decode rows: at most
  ``max_excess_noise_db``, leaving the ``trim_fraction`` rows of largest excess out of
  the sums. One position can be far off on any CPU: rounding can flip a discrete choice
  (an expert, an attention peak) at a near-tie, and one row's ratio of two noisy
  energies has a long tail; the worst position is reported. A bug (a wrong cache
  position, a lost expert, a layer left in full precision, a transposed weight, another
  RoPE) moves many rows by far more than rounding does.
- Top-1 agreement beyond noise: a position where the argmax differs counts only when
  the eager model's top-1 margin exceeds ``tie_factor`` x 2 x the largest logit change
  that rounding caused at that position (two logits each move by at most that much, so
  a smaller margin is a tie that rounding may break). Gated: no such position.

A free-running greedy continuation is reported (``greedy_agree_tokens``) and never
gated: it flips at the first near-tie, which depends on the CPU's kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.export.noise import NoiseFloor
from pipeline.export.runner import _Runner, greedy


def sqnr_db(ref_SV: torch.Tensor, x_SV: torch.Tensor) -> torch.Tensor:
    """SQNR per row (S,), in dB; +inf where the rows are equal."""
    signal = ref_SV.double().pow(2).sum(-1)
    noise = (ref_SV.double() - x_SV.double()).pow(2).sum(-1)
    return 10 * torch.log10(signal / noise)


# Reported SQNRs are capped here: equal logits give +inf, which JSON metrics cannot hold.
SQNR_CAP_DB = 300.0


def _capped(db: float) -> float:
    return max(min(db, SQNR_CAP_DB), -SQNR_CAP_DB)


def cosine(ref_SV: torch.Tensor, x_SV: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per row (S,)."""
    return torch.nn.functional.cosine_similarity(ref_SV.double(), x_SV.double(), dim=-1)


def top1_margin(logits_SV: torch.Tensor) -> torch.Tensor:
    """Per row (S,): the top logit minus the second."""
    top2_S2 = logits_SV.double().topk(2, dim=-1).values
    return top2_S2[:, 0] - top2_S2[:, 1]


def trimmed_excess_db(error_R: torch.Tensor, energy_R: torch.Tensor, trim_fraction: float) -> float:
    """10 log10(sum error / sum noise energy) over the rows, leaving out the
    ceil(trim_fraction x R) rows of largest error/energy ratio (module doc: a discrete
    event, such as a routing or attention choice flipped at a near-tie, can put a row
    far off on any CPU; a bug moves more rows than that)."""
    drop = math.ceil(trim_fraction * error_R.numel())
    keep_R = torch.argsort(error_R / energy_R)[: error_R.numel() - drop]
    return float(10 * torch.log10(error_R[keep_R].sum() / energy_R[keep_R].sum()))


@dataclass(frozen=True)
class Gate:
    """What an artifact must meet against the eager model (see the module doc); the
    defaults are the export stage's (ExportStageConfig)."""

    max_excess_noise_db: float = 6.0  # over the prefill rows, and over the decode rows
    trim_fraction: float = 0.02  # the rows of largest excess left out of those sums
    tie_factor: float = 2.0
    greedy_tokens: int = 16  # reported only

    def __post_init__(self) -> None:
        if not self.tie_factor >= 1:
            raise ValueError(f"tie_factor must be >= 1, got {self.tie_factor}")


def teacher_forced(runner: _Runner, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runner's logits on ``prompts``, teacher-forced: (prefill rows (P, V), decode
    rows (Q, V), the index in 0..P-1 of each decode row's position).

    Per prompt, the decode pass comes first: a prefill of the first half, then one call
    per remaining token at its own position, so every decode step reads cache rows that
    only the steps before it wrote (the rows beyond the half hold the previous prompt's
    keys and values, or the initial zeros: a step that does not write its row shows).
    Then one prefill of the whole prompt gives the prefill rows; a program that returns
    the last position's logits only (what a generating runner needs) is prefilled once
    per prefix length instead, its last row standing for that position."""
    prefill, decode, where = [], [], []
    offset = 0
    for prompt in prompts:
        half = max(1, len(prompt) // 2)
        runner.logits(prompt[:half], 0)
        for pos in range(half, len(prompt)):
            decode.append(runner.logits([prompt[pos]], pos))
            where.append(offset + pos)
        rows_SV = runner.logits(prompt, 0)
        if rows_SV.shape[0] != len(prompt):  # the last position only
            rows_SV = torch.cat([*(runner.logits(prompt[:n], 0) for n in range(1, len(prompt))), rows_SV])
        prefill.append(rows_SV)
        offset += len(prompt)
    return torch.cat(prefill), torch.cat(decode), torch.tensor(where, dtype=torch.long)


def compare(floor: NoiseFloor, eager: _Runner, candidate: _Runner, prompts: list[list[int]], gate: Gate) -> dict:
    """``candidate`` against the eager model's ``floor`` (measured on the same
    ``prompts``), teacher-forced; ``eager`` (the reference's runner) only gives the
    reported greedy agreement. Returns the metrics and ``passed`` (module doc)."""
    if prompts != floor.prompts:
        raise ValueError("the noise floor was measured on other prompts than the ones compared")
    prefill_PV, decode_QV, where_Q = teacher_forced(candidate, prompts)
    rows = [("prefill", prefill_PV, torch.arange(prefill_PV.shape[0])), ("decode", decode_QV, where_Q)]
    finite = bool(torch.isfinite(prefill_PV).all() and torch.isfinite(decode_QV).all())
    result: dict = {"positions": int(prefill_PV.shape[0] + decode_QV.shape[0]), "finite": finite}
    excess_all, cos_all, sqnr_all = [], [], []
    beyond = 0
    max_abs = 0.0
    for name, got_RV, at_R in rows:
        ref_RV = floor.logits_PV[at_R]
        error_R = (got_RV.double() - ref_RV).pow(2).sum(-1)
        energy_R = floor.energy_P[at_R].clamp_min(torch.finfo(torch.float64).tiny)  # never 0/0
        excess_R = 10 * torch.log10(error_R / energy_R)
        tie_R = gate.tie_factor * 2 * floor.max_abs_P[at_R]
        flipped_R = got_RV.argmax(-1) != ref_RV.argmax(-1)
        counted_R = flipped_R & (top1_margin(ref_RV) > tie_R)
        beyond += int(counted_R.sum())
        result[f"{name}_top1_agree"] = float(1 - flipped_R.double().mean())
        result[f"{name}_excess_noise_db_max"] = _capped(float(excess_R.max()))
        result[f"{name}_excess_noise_db"] = _capped(trimmed_excess_db(error_R, energy_R, gate.trim_fraction))
        excess_all.append(excess_R)
        cos_all.append(cosine(ref_RV, got_RV))
        sqnr_all.append(sqnr_db(ref_RV, got_RV))
        max_abs = max(max_abs, float((got_RV.double() - ref_RV).abs().max()))
    excess, cos, sqnr = torch.cat(excess_all), torch.cat(cos_all), torch.cat(sqnr_all)
    overall = max(result["prefill_excess_noise_db"], result["decode_excess_noise_db"])
    agree = gate.greedy_tokens
    for prompt in prompts:
        a, b = greedy(eager, prompt, gate.greedy_tokens), greedy(candidate, prompt, gate.greedy_tokens)
        agree = min(agree, _common_prefix(a, b))
    result.update(
        {
            "excess_noise_db_max": _capped(float(excess.max())),
            "excess_noise_db_median": _capped(float(excess.median())),
            "top1_disagree_beyond_noise": beyond,
            "cosine_min": float(cos.min()),
            "sqnr_db_min": _capped(float(sqnr.min())),
            "sqnr_db_median": _capped(float(sqnr.median())),
            "max_abs_logit_diff": max_abs,
            "greedy_agree_tokens": agree,  # reported, never gated
            "passed": finite and overall <= gate.max_excess_noise_db and beyond == 0,
        }
    )
    return result


def exact_compare(reference: _Runner, candidate: _Runner, prompts: list[list[int]], max_abs_diff: float) -> dict:
    """Two runners that compute the same FP32 maths (the HF directory against the
    dequantized eager model): teacher-forced, every row within ``max_abs_diff``; a
    top-1 disagreement counts only where the reference's margin exceeds 2 x
    ``max_abs_diff`` (smaller margins are ties that summation order may break)."""
    ref_PV, ref_QV, _ = teacher_forced(reference, prompts)
    got_PV, got_QV, _ = teacher_forced(candidate, prompts)
    ref, got = torch.cat([ref_PV, ref_QV]).double(), torch.cat([got_PV, got_QV]).double()
    diff = float((got - ref).abs().max())
    # Implied by diff < max_abs_diff (no logit moved far enough to flip such a margin);
    # counted so that the report says which positions disagree when diff is too large.
    beyond = int(((got.argmax(-1) != ref.argmax(-1)) & (top1_margin(ref) > 2 * max_abs_diff)).sum())
    return {
        "max_abs_logit_diff": diff,
        "top1_disagree_beyond_noise": beyond,
        "positions": int(ref.shape[0]),
        "passed": diff < max_abs_diff and beyond == 0 and math.isfinite(diff),
    }


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
