"""The program's attention on ExecuTorch's LLM kernels (pipeline/export/kv_cache.py):
``llama::update_cache`` into a cache of each dtype and ``llama::custom_sdpa`` (or its
quantized form), against the eager model, on a copy-task model with windowed layers.

Run eagerly (the custom ops' own CPU kernels, as the .pte calls them), and the INT8
cache lowered; the .pte of the FP32 cache is checked in test_export.py and
test_export_gate.py. Tolerances: an FP32 cache holds what eager computes, so only
summation order differs, under 1e-4 of logits of order 10 in full precision. But the
model is converted (INT8 activations per token), and a summation-order difference of
about 1e-7 can put an activation on the other side of an INT8 rounding boundary, one
step of its row's range / 255: on an AMD Zen 5 that moved logits by up to 0.016, where an
Intel Xeon's kernels happened to agree bit for bit. So every position's error is held
to the measured INT8 rounding noise of the model itself, and every cache dtype passes
or fails the export gate, whose yardstick is that noise; the 16-bit and INT8 caches
also round every key and value.
"""

from __future__ import annotations

import pytest
import torch
from shapes import MAX_CONTEXT, VOCAB, context_trained, copy_batch, micro_cfg

from pipeline.configbase import ConfigError
from pipeline.export.checks import Gate, compare
from pipeline.export.config import ExportStageConfig
from pipeline.export.kv_cache import KV_CACHE_DTYPES
from pipeline.export.noise import noise_floor
from pipeline.export.program import ExportableLM, ExportInputError
from pipeline.export.runner import EagerRunner, ProgramRunner

WINDOW = 5  # layer 0 windowed, layer 1 global (global_every 2); the copy task looks 3 back


@pytest.fixture(scope="module")
def windowed():
    """The micro MoE with a windowed first layer, trained on the copy task, converted."""
    from pipeline.quant.config import QuantConfig
    from pipeline.quant.convert import post_training_quantize

    model = context_trained(micro_cfg(sliding_window=WINDOW, global_every=2))
    with torch.no_grad():
        return post_training_quantize(model, QuantConfig(group_size=32))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return copy_batch(3, 24, torch.Generator().manual_seed(3)).tolist()


def _chunked(runner, prompt: list[int]) -> torch.Tensor:
    """Logits of every position, fed as a prefill, a decode step, and a second prefill
    chunk starting mid-cache (the causal kernel's start position)."""
    cut, end = len(prompt) // 2, len(prompt) - 5
    return torch.cat(
        [
            runner.logits(prompt[:cut], 0),
            runner.logits(prompt[cut : cut + 1], cut),
            runner.logits(prompt[cut + 1 : end], cut + 1),
            *(runner.logits([t], pos) for pos, t in enumerate(prompt[end:], start=end)),
        ]
    )


def test_fp32_cache_equals_eager_at_every_position_prefill_chunks_and_decode(windowed, prompts):
    """Position by position, within what INT8 rounding flips can move (module doc): each
    row's largest logit error at most the largest change that one-step roundings of 5%
    of every activation's elements caused at that position in the eager model. A row
    whose kernels agree with eager's bit for bit is within 1e-4; a wrong cache row,
    start position or window is far beyond either."""
    assert windowed.cfg.layer_window(0) == WINDOW and windowed.cfg.layer_window(1) is None
    floor = noise_floor(windowed, prompts, draws=4, fraction=0.05)
    start = 0
    for prompt in prompts:
        eager = EagerRunner(windowed, MAX_CONTEXT).logits(prompt, 0)
        program = _chunked(ProgramRunner(ExportableLM(windowed, MAX_CONTEXT), MAX_CONTEXT), prompt)
        assert program.shape == eager.shape
        error_P = (program.double() - eager.double()).abs().amax(-1)
        bound_P = torch.maximum(floor.max_abs_P[start : start + len(prompt)], torch.tensor(1e-4, dtype=torch.float64))
        assert (error_P <= bound_P).all(), (error_P - bound_P).max()
        start += len(prompt)


@pytest.mark.parametrize("dtype", sorted(KV_CACHE_DTYPES))
def test_every_cache_dtype_passes_the_gate_and_a_lost_window_fails_it(windowed, prompts, dtype):
    floor = noise_floor(windowed, prompts, draws=4, fraction=0.05)
    eager = EagerRunner(windowed, MAX_CONTEXT)
    program = ExportableLM(windowed, MAX_CONTEXT, kv_cache=dtype)
    assert program.layers[0].attn.cache.k_cache.dtype == KV_CACHE_DTYPES[dtype]
    result = compare(floor, eager, ProgramRunner(program, MAX_CONTEXT), prompts, Gate())
    assert result["passed"], (dtype, result)
    # The same cache with the window dropped (layer 0 attends to everything): the gate sees it.
    program.windows = []
    program.layers[0].attn.window = None
    result = compare(floor, eager, ProgramRunner(program, MAX_CONTEXT), prompts, Gate())
    assert not result["passed"], (dtype, result)


@pytest.mark.slow
def test_the_int8_cache_lowers_runs_within_the_gate_and_lists_its_kernels(windowed, prompts, tmp_path):
    """The INT8 cache's per-token quantization sits beside XNNPACK's 8da4w patterns: the
    lowered program (windowed layer included) must still pass the gate."""
    import json

    from pipeline.export.lower import export_program, lower_to_pte
    from pipeline.export.runner import PteRunner

    program = ExportableLM(windowed, MAX_CONTEXT, kv_cache="int8")
    meta = {"max_context": MAX_CONTEXT, "vocab_size": VOCAB, "bos_id": 0, "eos_id": 1}
    lower_to_pte(export_program(program), meta).write(tmp_path / "int8.pte")
    kernels = json.loads((tmp_path / "int8.kernels.json").read_text())
    ops = {op for lib in kernels["kernel_libraries"] for op in lib["operators"]}
    assert {"llama::custom_quantized_sdpa.out", "quantized_decomposed::quantize_per_token.out"} <= ops
    assert "llama::custom_sdpa.out" not in ops
    floor = noise_floor(windowed, prompts, draws=4, fraction=0.05)
    result = compare(floor, EagerRunner(windowed, MAX_CONTEXT), PteRunner(tmp_path / "int8.pte"), prompts, Gate())
    assert result["passed"], result


def test_bad_cache_dtype_and_context_are_named_before_any_work(windowed):
    from pipeline.recipe import compose, validate

    with pytest.raises(ConfigError, match=r"kv_cache: must be one of .*'float16'.* got 'fp8'"):
        ExportStageConfig(quantized="q", tokenizer="t", prompts_mixture="m", kv_cache="fp8")
    with pytest.raises(ConfigError, match=r"stage\.export\.kv_cache: must be one of"):
        validate(compose(["stage.export.kv_cache=fp8"]))
    assert validate(compose(["stage.export.kv_cache=int8"])).stage.profile.kv_cache == "int8"
    with pytest.raises(ConfigError, match=r"stage\.export\.max_context: 9000 exceeds model\.max_seq_len"):
        validate(compose(["stage.export.max_context=9000"]))
    with pytest.raises(ExportInputError, match="kv_cache='int4'"):
        ExportableLM(windowed, MAX_CONTEXT, kv_cache="int4")
    with pytest.raises(ExportInputError, match="max_len=.*max_seq_len"):
        ExportableLM(windowed, windowed.cfg.max_seq_len + 1)
