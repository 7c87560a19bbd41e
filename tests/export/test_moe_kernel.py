"""The project's C++ MoE kernel (``mobilemoe::moe_experts_int4``, pipeline/export/native)
run by ExecuTorch's runtime against its eager reference (pipeline/export/moe_op.py).

Tolerance, and why: both sides quantize x to INT8 with the same float32 formulas, so
the INT8 inputs are equal; the GEMM sums run in another order (float rounding, about
1e-7 relative) and silu's exp comes from another library, so an element of the hidden
INT8 activation that sits at a rounding boundary may round one step the other way: that
moves an output by at most one step of that activation times a weight column, under
1e-3 of the output's range at these shapes. Measured (AVX-512 EPYC): max |diff| 5.4e-7 and
mean 1.1e-7 of the range.
A packing or scale bug moves outputs by the order of their range.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.export import Dim, export

from pipeline.export import native
from pipeline.export.moe_op import moe_experts_int4, pack_int4, reference, unpack_int4

ONE_STEP = 2e-3  # of the output's range: a few one-step roundings of the hidden INT8
FLOAT = 1e-5  # mean |diff| of the range: float summation order only


class _Experts(torch.nn.Module):
    def __init__(self, w13, w13_scale, w2, w2_scale) -> None:
        super().__init__()
        for name, t in dict(w13=w13, w13_scale=w13_scale, w2=w2, w2_scale=w2_scale).items():
            self.register_buffer(name, t)

    def forward(self, x_TD, experts_TK, gates_TK):
        return moe_experts_int4(x_TD, experts_TK, gates_TK, self.w13, self.w13_scale, self.w2, self.w2_scale)


def _weights(E, D, F, g1, g2, seed, pack_group=None):
    gen = torch.Generator().manual_seed(seed)
    w13_v = torch.randint(-8, 8, (E, 2 * F, D), generator=gen)
    w2_v = torch.randint(-8, 8, (E, D, F), generator=gen)
    w13 = torch.stack([pack_int4(w13_v[e], pack_group or g1) for e in range(E)])
    w2 = torch.stack([pack_int4(w2_v[e], g2) for e in range(E)])
    w13_scale = torch.rand(E, 2 * F, D // g1, generator=gen) * 0.02 + 0.001
    w2_scale = torch.rand(E, D, F // g2, generator=gen) * 0.02 + 0.001
    return w13, w13_scale, w2, w2_scale


def _program(weights, K, max_tokens=64):
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.runtime import Runtime

    T, D = 3, weights[2].shape[1]
    example = (torch.randn(T, D), torch.zeros(T, K, dtype=torch.long), torch.rand(T, K))
    tokens = Dim("tokens", min=1, max=max_tokens)
    ep = export(_Experts(*weights), example, dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    manager = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    native.load()
    program = Runtime.get().load_program(manager.buffer)
    method = program.load_method("forward")
    method.program = program  # the method reads the program's memory: keep it alive
    return method


def _close(out, ref):
    diff, scale = (out - ref).abs(), float(ref.abs().max())
    return float(diff.max()) <= ONE_STEP * scale and float(diff.mean()) <= FLOAT * scale, float(diff.max()) / scale


@pytest.mark.parametrize(
    ("E", "K", "D", "F", "g1", "g2"),
    [(6, 2, 64, 96, 32, 32), (5, 1, 96, 64, 96, 64), (8, 4, 128, 32, 64, 32)],
    ids=["grouped", "per-channel", "top-4"],
)
def test_kernel_equals_the_eager_reference_at_decode_and_prefill(E, K, D, F, g1, g2):
    weights = _weights(E, D, F, g1, g2, seed=E)
    method = _program(weights, K)
    for T in (1, 2, 17, 64):
        gen = torch.Generator().manual_seed(T)
        x_TD = torch.randn(T, D, generator=gen) * 2
        # Only the first E - 2 experts are routed: idle experts must not matter.
        experts_TK = torch.stack([torch.randperm(E - 2, generator=gen)[:K] for _ in range(T)])
        gates_TK = torch.rand(T, K, generator=gen)
        out = method.execute([x_TD, experts_TK, gates_TK])[0]
        ref = reference(x_TD, experts_TK, gates_TK, *weights)
        ok, worst = _close(out, ref)
        assert ok, (T, worst)
    # The operator's contract allows one expert twice for a token: two slots, two gates.
    gen = torch.Generator().manual_seed(5)
    x_TD, twice_TK, gates_TK = torch.randn(3, D, generator=gen), torch.ones(3, K, dtype=torch.long), torch.rand(3, K)
    ok, worst = _close(method.execute([x_TD, twice_TK, gates_TK])[0], reference(x_TD, twice_TK, gates_TK, *weights))
    assert ok, worst


def test_a_wrong_packing_fails_the_comparison():
    right = _weights(4, 64, 32, 32, 32, seed=1)
    wrong = _weights(4, 64, 32, 32, 32, seed=1, pack_group=16)  # same values, other nibble order
    method = _program(wrong, 1)
    gen = torch.Generator().manual_seed(0)
    x_TD, experts_TK, gates_TK = (
        torch.randn(5, 64, generator=gen),
        torch.randint(0, 4, (5, 1), generator=gen),
        torch.ones(5, 1),
    )
    ok, worst = _close(method.execute([x_TD, experts_TK, gates_TK])[0], reference(x_TD, experts_TK, gates_TK, *right))
    assert not ok and worst > 0.05, worst


def test_packing_round_trips_and_bad_groups_are_named():
    values = torch.randint(-8, 8, (3, 96), generator=torch.Generator().manual_seed(0))
    for group in (2, 32, 96):
        packed = pack_int4(values, group)
        assert packed.shape == (3, 48) and packed.dtype == torch.uint8
        assert torch.equal(unpack_int4(packed, group), values.to(torch.int8))
    # Byte j of a group: column j low, column j + group/2 high, each + 8.
    assert pack_int4(torch.tensor([[-8, 7, 0, -1]]), 4).tolist() == [[0x80 | 0x00, 0x70 | 0x0F]]
    with pytest.raises(ValueError, match="even group dividing 96"):
        pack_int4(values, 7)


def test_an_expert_id_out_of_range_or_a_bad_weight_is_an_error_not_a_wild_read():
    method = _program(_weights(4, 64, 32, 32, 32, seed=2), 1)
    with pytest.raises(RuntimeError):
        method.execute([torch.randn(2, 64), torch.tensor([[0], [4]]), torch.ones(2, 1)])
    # w13 with an odd number of rows is not w1|w3: refused, not truncated.
    w13, w13_scale, w2, w2_scale = _weights(4, 64, 32, 32, 32, seed=2)
    odd = _program((w13[:, :-1].contiguous(), w13_scale[:, :-1].contiguous(), w2, w2_scale), 1)
    with pytest.raises(RuntimeError):
        odd.execute([torch.randn(2, 64), torch.tensor([[0], [1]]), torch.ones(2, 1)])


def test_a_missing_compiler_is_named(tmp_path):
    env = {**os.environ, "CXX": "no-such-c++", "MOBILEMOE_NATIVE_CACHE": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "pipeline.export.native"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "no C++ compiler 'no-such-c++'" in run.stderr, run.stderr[-500:]
