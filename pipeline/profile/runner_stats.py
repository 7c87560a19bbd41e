"""The program timed by ExecuTorch's own LLM runner (``TextLLMRunner``, what a phone app
links), read from the ``Stats`` it reports, beside the profile's own timings.

The runner takes text: each held-out prompt is decoded to text and the runner tokenizes
it again with the recipe's ``tokenizer.json`` (its prompt token count is its own, from
``Stats``). It samples greedily and stops at ``max_new_tokens`` or an end token.
Its rates are computed as ExecuTorch's ``print_report`` computes them (extension/llm/
runner/stats.h), the same definitions as :mod:`pipeline.profile.stats`:

    prefill tok/s = num_prompt_tokens / (prompt_eval_end - inference_start)
    decode tok/s  = num_generated_tokens / (inference_end - prompt_eval_end)
    TTFT          = first_token - inference_start
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from pathlib import Path


def runner_timings(pte: Path, tokenizer_json: Path, prompts: dict[int, list[str]], new_tokens: int) -> dict:
    """Per prompt length: the runner's medians over the prompts of that length and its
    raw ``Stats``: ``{length: {"ttft_ms", "prefill_tok_s", "decode_tok_s", "runs": [...]}}``.

    ``prompts``: texts per prompt length (the profile's held-out windows, decoded).
    Raises RuntimeError when the runner reports no generated token (nothing to time)."""
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from pipeline.export.kernels import load_kernels

    load_kernels(pte)
    runner = TextLLMRunner(str(pte), str(tokenizer_json))
    config = GenerationConfig(echo=False, max_new_tokens=new_tokens, temperature=0.0, num_bos=0, num_eos=0)
    out: dict[int, dict] = {}
    for length, texts in prompts.items():
        runs = []
        for text in texts:
            seen: list = []
            runner.reset()
            # No token callback: a byte-level token may be part of a UTF-8 character, which
            # the binding cannot hand to Python as text; the runner then prints to stdout.
            with _stdout_to_devnull():
                runner.generate(text, config, stats_callback=seen.append)
            if not seen or seen[-1].num_generated_tokens < 1:
                raise RuntimeError(f"{pte}: TextLLMRunner reported no generated token for a {length}-token prompt")
            runs.append(_rates(seen[-1]))
        out[length] = {k: _median(r[k] for r in runs) for k in ("ttft_ms", "prefill_tok_s", "decode_tok_s")}
        out[length]["runs"] = runs
    return out


@contextlib.contextmanager
def _stdout_to_devnull():
    """Silence file descriptor 1 (the runner prints each token and its Stats there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _as_reported(stats) -> dict | str:
    """The runner's own JSON of its Stats (kept as text if its rates are not valid JSON,
    e.g. an infinite rate over a zero-millisecond phase)."""
    text = stats.to_json_string()
    try:
        return json.loads(text)
    except ValueError:
        return text


def _median(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _rates(stats) -> dict:
    """One generation's rates; None where the runner's millisecond clock saw no time pass
    (a phase shorter than its resolution, on micro programs)."""
    prefill_ms = stats.prompt_eval_end_ms - stats.inference_start_ms
    decode_ms = stats.inference_end_ms - stats.prompt_eval_end_ms
    return {
        "stats": _as_reported(stats),
        "num_prompt_tokens": stats.num_prompt_tokens,
        "num_generated_tokens": stats.num_generated_tokens,
        "ttft_ms": float(stats.first_token_ms - stats.inference_start_ms),
        "prefill_tok_s": 1e3 * stats.num_prompt_tokens / prefill_ms if prefill_ms > 0 else None,
        "decode_tok_s": 1e3 * stats.num_generated_tokens / decode_ms if decode_ms > 0 else None,
    }
