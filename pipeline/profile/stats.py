"""One timed generation, with the fields and definitions of ExecuTorch's LLM runner.

ExecuTorch's ``TextLLMRunner`` (extension/llm/runner, its ``Stats`` and ``print_report``)
stamps ``inference_start`` before the prompt is run, ``prompt_eval_end`` and
``first_token`` together once prefill has returned the first sampled token, and
``inference_end`` after the last decode step; ``num_generated_tokens`` counts the decode
steps after that first token. From those:

    TTFT            = first_token - inference_start
    prefill tok/s   = num_prompt_tokens / (prompt_eval_end - inference_start)
    decode tok/s    = num_generated_tokens / (inference_end - prompt_eval_end)

Model loading is outside the window. Here the prompt is already token ids, so the
runner's tokenizer time (``token_encode_end``) is not in TTFT either.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class GenerationStats:
    """Timestamps in seconds (any origin, one clock) and token counts of one generation."""

    inference_start: float
    prompt_eval_end: float
    first_token: float
    inference_end: float
    num_prompt_tokens: int
    num_generated_tokens: int

    @property
    def ttft_ms(self) -> float:
        return 1e3 * (self.first_token - self.inference_start)

    @property
    def prefill_tok_s(self) -> float:
        return self.num_prompt_tokens / (self.prompt_eval_end - self.inference_start)

    @property
    def decode_tok_s(self) -> float:
        return self.num_generated_tokens / (self.inference_end - self.prompt_eval_end)

    def summary(self) -> dict[str, float]:
        return {"ttft_ms": self.ttft_ms, "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s}

    def as_dict(self) -> dict:
        return asdict(self)


def timed_generation(
    logits: Callable[[list[int], int], object],
    prompt: Sequence[int],
    continuation: Sequence[int],
    clock: Clock = time.perf_counter,
) -> GenerationStats:
    """Prefill ``prompt`` at position 0, sample (argmax) the first token, then run one
    decode step per token of ``continuation``, each followed by its argmax.

    ``logits(tokens, start)`` runs the program and returns logits whose last row is the
    next-token distribution (a (S, V) or (1, V) tensor). Decode steps feed the held-out
    ``continuation`` rather than the sampled token (teacher forcing): the cost of a step
    is the same, but routing follows real text, where a sampled loop of repeated tokens
    would touch fewer experts and understate an MoE's cost.
    """
    if len(prompt) < 1 or len(continuation) < 1:
        raise ValueError(f"need a prompt and a continuation, got {len(prompt)} and {len(continuation)} tokens")
    start = clock()
    int(logits(list(prompt), 0)[-1].argmax())
    prompt_end = clock()
    pos = len(prompt)
    for token in continuation:
        int(logits([int(token)], pos)[-1].argmax())
        pos += 1
    end = clock()
    return GenerationStats(start, prompt_end, prompt_end, end, len(prompt), len(continuation))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (p25, p75; inclusive method) of measured runs."""
    if not values:
        raise ValueError("no runs to summarise")
    if len(values) == 1:
        return {"median": values[0], "p25": values[0], "p75": values[0], "runs": 1}
    p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return {"median": statistics.median(values), "p25": p25, "p75": p75, "runs": len(values)}


def speedup(moe: Sequence[float], dense: Sequence[float], higher_is_better: bool = True) -> float:
    """Median over paired runs of the MoE's speed-up over a dense program (> 1: the MoE
    is faster). Runs are paired by index: they ran back to back on the same prompt, so
    machine drift cancels. Throughputs divide MoE by dense; latencies dense by MoE."""
    if len(moe) != len(dense) or not moe:
        raise ValueError(f"paired runs needed, got {len(moe)} and {len(dense)}")
    pairs = zip(moe, dense, strict=True)
    return statistics.median(m / d if higher_is_better else d / m for m, d in pairs)
