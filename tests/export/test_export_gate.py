"""The export gate (pipeline/export/checks.py, noise.py) fails on each real bug it exists
for and passes on rounding differences, on a model whose predictions depend on the
context (the micro MoE trained on the copy task: conftest.py ``context_model``).

Each bug is planted in a copy of the exportable program and run eagerly (what the .pt2
holds and the .pte lowers; milliseconds instead of a lowering each). Rounding
differences are simulated on the eager model the way kernels differ (noise.py), with
other random draws than the ones that measured the noise floor.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from shapes import COPY_VOCAB, MAX_CONTEXT, VOCAB, copy_batch, micro_cfg, trained_like

from pipeline.export.checks import Gate, compare, teacher_forced
from pipeline.export.moe_op import pack_int4
from pipeline.export.noise import noise_floor, one_step, perturbed_rounding
from pipeline.export.program import ExportableLM, Int4Linear
from pipeline.export.runner import EagerRunner, ProgramRunner, PteRunner, _Runner
from pipeline.model.layers import rope_tables
from pipeline.quant.convert import QuantizedWeight


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return copy_batch(3, 40, torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def floor(converted, prompts):
    return noise_floor(converted, prompts, draws=8, fraction=0.05)


class ShiftedDecode(_Runner):
    """A runner that passes each decode step one position too far (its cache is written
    at the wrong row, and its RoPE rotates by the wrong angle)."""

    def __init__(self, inner: _Runner) -> None:
        self.inner, self.max_context = inner, inner.max_context - 1

    def _run(self, tokens_1S, start):
        return self.inner._run(tokens_1S, start + 1 if start > 0 else start)


class ForgetfulDecode(ProgramRunner):
    """A program whose decode step (S = 1) does not keep what it writes to the KV cache
    (a lost mutable-buffer write-back): each step attends to its own key only where the
    prefill left one."""

    def _run(self, tokens_1S, start):
        if tokens_1S.shape[1] > 1:
            return super()._run(tokens_1S, start)
        caches = [b for name, b in self._module.named_buffers() if name.endswith(("k_cache", "v_cache"))]
        kept = [c.clone() for c in caches]
        out = super()._run(tokens_1S, start)
        for cache, old in zip(caches, kept, strict=True):
            cache.copy_(old)
        return out


class PerturbedEager(EagerRunner):
    """The eager model with other one-step rounding draws than the floor's."""

    def _run(self, tokens_1S, start):
        with perturbed_rounding(self.model, 0.05, seed=1000 + start):
            return super()._run(tokens_1S, start)


def _fp32_linear(weight_OI: torch.Tensor) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight_OI.shape[1], weight_OI.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight_OI.detach().float())
    return linear


def _busiest_expert(program: ExportableLM, prompts: list[list[int]]) -> int:
    moe = program.layers[0].ffn
    seen: list[torch.Tensor] = []
    handle = moe.register_forward_hook(lambda _m, args, _out: seen.append(moe.route(args[0])[1].flatten()))
    with torch.no_grad():
        for p in prompts:
            program(torch.tensor([p]), torch.tensor([0]))
    handle.remove()
    return int(torch.bincount(torch.cat(seen), minlength=moe.cfg.num_experts).argmax())


def _planted(bug: str, fp32, converted, prompts) -> _Runner:
    """A runner of the program with ``bug`` planted (buffers replaced; written in place only
    where the program owns them, as the packed expert weights, since most of its tensors
    are the converted model's)."""
    # FP32 experts exist only in the per-expert form; every other bug is planted in the default.
    program = ExportableLM(converted, MAX_CONTEXT, moe="xnnpack" if bug == "unquantized layer" else "fused")
    if bug == "wrong KV position":
        return ShiftedDecode(ProgramRunner(program, MAX_CONTEXT))
    if bug == "decode forgets its cache write":
        return ForgetfulDecode(program, MAX_CONTEXT)
    if bug == "missing expert":
        routed = program.layers[0].ffn.routed
        routed.w2_EDH[_busiest_expert(program, prompts)] = pack_int4(torch.zeros(1, 2), 2)[0, 0]  # all zeros
    elif bug == "unquantized layer":
        block, moe = fp32.layers[1], program.layers[1].ffn
        attn = block.attn
        program.layers[1].attn.wqkv = _fp32_linear(torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))
        program.layers[1].attn.wo = _fp32_linear(attn.wo.weight)
        experts = block.ffn.experts
        for e, expert in enumerate(moe.routed.experts):
            expert.w13 = _fp32_linear(torch.cat([experts.w1_EFD[e], experts.w3_EFD[e]]))
            expert.w2 = _fp32_linear(experts.w2_EDF[e])
        shared = block.ffn.shared
        moe.shared.w13 = _fp32_linear(torch.cat([shared.w1.weight, shared.w3.weight]))
        moe.shared.w2 = _fp32_linear(shared.w2.weight)
    elif bug == "transposed weight":
        wo = program.layers[0].attn.wo
        w_OI = QuantizedWeight(wo.values_OI, wo.scale_OG, 4, wo.group).dequantize()
        program.layers[0].attn.wo = Int4Linear(QuantizedWeight.quantize(w_OI.T.contiguous(), 4, wo.group))
    elif bug == "wrong RoPE theta":
        cos, sin = rope_tables(converted.cfg.head_dim, MAX_CONTEXT, 10_000.0)  # the model's: 500,000
        program.rope_cos, program.rope_sin = cos, sin
    else:  # pragma: no cover
        raise ValueError(bug)
    return ProgramRunner(program, MAX_CONTEXT)


BUGS = (
    "wrong KV position",
    "decode forgets its cache write",
    "missing expert",
    "unquantized layer",
    "transposed weight",
    "wrong RoPE theta",
)


@pytest.mark.parametrize("bug", BUGS)
def test_the_gate_fails_on_each_real_bug(bug, context_model, converted, prompts, floor):
    runner = _planted(bug, context_model, converted, prompts)
    result = compare(floor, EagerRunner(converted, MAX_CONTEXT), runner, prompts, Gate())
    assert not result["passed"], (bug, result)
    # Only the bug moved: the converted model (the reference) is untouched.
    program = ProgramRunner(ExportableLM(converted, MAX_CONTEXT), MAX_CONTEXT)
    clean = compare(floor, EagerRunner(converted, MAX_CONTEXT), program, prompts, Gate())
    assert clean["passed"], clean


def test_a_wrong_kv_position_shows_in_the_decode_rows_only(converted, prompts, floor):
    shifted = _planted("wrong KV position", None, converted, prompts)
    result = compare(floor, EagerRunner(converted, MAX_CONTEXT), shifted, prompts, Gate())
    # Prefill rows: the program's prefill, whose maths equals eager's to float rounding.
    assert result["prefill_excess_noise_db"] < -60, result
    assert result["decode_excess_noise_db"] > 20 and result["top1_disagree_beyond_noise"] > 0, result


def test_the_gate_passes_rounding_differences_and_the_lowered_program(converted, lowered, prompts, floor):
    eager = EagerRunner(converted, MAX_CONTEXT)
    rounding = compare(floor, eager, PerturbedEager(copy.deepcopy(converted), MAX_CONTEXT), prompts, Gate())
    assert rounding["passed"], rounding
    assert rounding["sqnr_db_min"] < 60, rounding  # the perturbation did move the logits
    pte = compare(floor, eager, PteRunner(lowered["dir"] / "model.pte"), prompts, Gate())
    assert pte["passed"], pte


def test_top1_flips_at_near_ties_pass(converted):
    """A candidate that breaks eager's near-ties the other way (as another CPU's kernels
    may) passes: only flips beyond the rounding's reach count. Tokens the copy task never
    saw give the near-ties (on its own tokens the model is sure of every position)."""
    prompts = torch.randint(COPY_VOCAB, VOCAB, (3, 24), generator=torch.Generator().manual_seed(3)).tolist()
    floor = noise_floor(converted, prompts, draws=8, fraction=0.05)
    within = Gate().tie_factor * 2 * float(floor.max_abs_P.min())  # inside every position's tie band

    class TieBreaker(EagerRunner):
        def _run(self, tokens_1S, start):
            logits_SV = super()._run(tokens_1S, start).clone()
            top2 = logits_SV.topk(2, dim=-1)
            rows = ((top2.values[:, 0] - top2.values[:, 1]) < within).nonzero().flatten()
            logits_SV[rows, top2.indices[rows, 1]] = top2.values[rows, 0] + 1e-4  # the runner-up wins
            return logits_SV

    result = compare(floor, EagerRunner(converted, MAX_CONTEXT), TieBreaker(converted, MAX_CONTEXT), prompts, Gate())
    assert result["prefill_top1_agree"] < 1, result  # some tie was broken
    assert result["passed"], result


def test_one_step_moves_each_chosen_element_one_code_and_keeps_the_scale():
    x_ND = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 3
    moved = one_step(x_ND, 0.3, torch.Generator().manual_seed(1))

    def codes(t):  # asymmetric per-token INT8, by hand: 255 steps over [min(x,0), max(x,0)]
        lo, hi = t.amin(-1, keepdim=True).clamp(max=0), t.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / 255
        return torch.round((t - lo) / scale), scale

    (a, scale_a), (b, scale_b) = codes(x_ND), codes(moved)
    assert torch.equal(scale_a, scale_b)
    step = (b - a).abs()
    assert set(step.unique().tolist()) <= {0.0, 1.0}
    # 30% chosen; those clamped at their row's min or max stay: a little under 30%.
    assert 0.25 < float((step == 1).double().mean()) <= 0.31


def test_perturbed_rounding_hooks_every_quantized_activation_and_nothing_else(converted, context_model):
    with perturbed_rounding(converted, 0.05, seed=0) as hooked:
        # Per layer: wq, wk, wv, wo and the shared expert's w1, w3, w2 (torchao linears),
        # the routed experts' input; plus the tied head's input. The FP32 router: none.
        assert hooked == 2 * (4 + 3 + 1) + 1
    with pytest.raises(ValueError, match="quantizes no activation"):
        with perturbed_rounding(context_model, 0.05, seed=0):
            pass


def test_teacher_forcing_feeds_every_prompt_token_at_its_own_position(converted, prompts):
    calls: list[tuple[int, int]] = []

    class Recording(EagerRunner):
        def _run(self, tokens_1S, start):
            calls.append((start, tokens_1S.shape[1]))
            return super()._run(tokens_1S, start)

    prefill, decode, where = teacher_forced(Recording(converted, MAX_CONTEXT), prompts[:1])
    n = len(prompts[0])
    assert calls == [(0, n // 2), *((pos, 1) for pos in range(n // 2, n)), (0, n)]
    assert prefill.shape[0] == n and decode.shape[0] == n - n // 2
    assert where.tolist() == list(range(n // 2, n))


def test_a_random_init_hides_what_the_trained_model_shows(converted, prompts):
    """Why the gate's tests use a trained model: on random weights the argmax of a
    position barely depends on the earlier tokens (the wrong KV position goes unseen
    in the top-1), on the copy-task model it is all that matters."""
    from pipeline.quant.config import QuantConfig
    from pipeline.quant.convert import post_training_quantize

    with torch.no_grad():
        random = post_training_quantize(trained_like(micro_cfg()), QuantConfig(group_size=32))

    def flips(model) -> float:
        _, good, _ = teacher_forced(ProgramRunner(ExportableLM(model, MAX_CONTEXT), MAX_CONTEXT), prompts)
        _, bad, _ = teacher_forced(ShiftedDecode(ProgramRunner(ExportableLM(model, MAX_CONTEXT), MAX_CONTEXT)), prompts)
        return float((good.argmax(-1) != bad.argmax(-1)).double().mean())

    assert flips(converted) > 2 * flips(random)


def test_trimmed_excess_leaves_out_the_worst_rows_by_hand():
    from pipeline.export.checks import trimmed_excess_db

    error = torch.tensor([1.0, 2.0, 1.0, 400.0], dtype=torch.float64)
    energy = torch.tensor([1.0, 1.0, 2.0, 1.0], dtype=torch.float64)
    # 25%: the row of ratio 400 goes; (1 + 2 + 1) / (1 + 1 + 2) = 1 -> 0 dB.
    assert trimmed_excess_db(error, energy, 0.25) == pytest.approx(0.0)
    # Nothing trimmed: 404 / 5.
    assert trimmed_excess_db(error, energy, 0.0) == pytest.approx(10 * math.log10(404 / 5))
    # Any fraction above zero drops at least one row (ceil): 2% of 4 rows is one row.
    assert trimmed_excess_db(error, energy, 0.02) == pytest.approx(0.0)
