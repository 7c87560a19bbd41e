"""The tied table's C++ kernels (``mobilemoe::embedding_int4`` and ``linear_int4``,
pipeline/export/native/table_int4.cpp) run by ExecuTorch's runtime against their eager
references (pipeline/export/table_ops.py).

Tolerance, and why: the lookup multiplies each INT4 value by its scale once in FP32 on
both sides, so it is exact. The head quantizes x to INT8 with the same FP32 formulas on
both sides, so the INT8 inputs are equal and only the order of the dot product's sums
differs (the integer path sums a group exactly in int32): relative error of order
sqrt(D) x 2^-24 of the sum of |terms|, under 1e-5 of the output's range at these shapes,
held to 1e-4. Measured (AVX-512 EPYC): 3.6e-7. A packing or scale bug moves outputs by
the order of their range.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim, export

from pipeline.export import native
from pipeline.export.moe_op import pack_int4
from pipeline.export.table_ops import embedding_int4, embedding_reference, linear_int4, linear_reference

V = 300
FLOAT = 1e-4  # of the output's range: float summation order only


class _Table(torch.nn.Module):
    def __init__(self, table_VH, scale_VG) -> None:
        super().__init__()
        self.register_buffer("table_VH", table_VH)
        self.register_buffer("scale_VG", scale_VG)

    def forward(self, tokens_1S, x_SD):
        return embedding_int4(self.table_VH, self.scale_VG, tokens_1S), linear_int4(x_SD, self.table_VH, self.scale_VG)


def _table(D, g, seed, interleaved=False):
    gen = torch.Generator().manual_seed(seed)
    values_VD = torch.randint(-8, 8, (V, D), generator=gen)
    if interleaved:  # ExecuTorch's embedding_4bit order: column 2j high nibble, 2j + 1 low
        u = (values_VD + 8).to(torch.uint8)
        packed = (u[:, 0::2] << 4) | u[:, 1::2]
    else:
        packed = pack_int4(values_VD, g)
    return packed, torch.rand(V, D // g, generator=gen) * 0.02 + 0.001, pack_int4(values_VD, g)


def _program(table_VH, scale_VG):
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.runtime import Runtime

    D = table_VH.shape[1] * 2
    S = Dim("S", min=1, max=64)
    ep = export(
        _Table(table_VH, scale_VG),
        (torch.zeros(1, 3, dtype=torch.long), torch.randn(3, D)),
        dynamic_shapes=({1: S}, {0: S}),
    )
    manager = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    native.load()
    program = Runtime.get().load_program(manager.buffer)
    method = program.load_method("forward")
    method.program = program  # the method reads the program's memory: keep it alive
    return method, len(manager.buffer)


@pytest.mark.parametrize(("D", "g"), [(128, 32), (96, 96)], ids=["grouped", "per-channel"])
def test_lookup_and_head_equal_their_references_and_the_table_is_stored_once(D, g):
    table_VH, scale_VG, _ = _table(D, g, seed=D)
    method, pte_bytes = _program(table_VH, scale_VG)
    # Two operators read one table: the program holds it once (plus a few KiB of graph).
    table_bytes = table_VH.numel() + scale_VG.numel() * 4
    assert table_bytes < pte_bytes < table_bytes + 16_384, (pte_bytes, table_bytes)
    for S in (1, 2, 17, 64):
        gen = torch.Generator().manual_seed(S)
        tokens_1S, x_SD = torch.randint(0, V, (1, S), generator=gen), torch.randn(S, D, generator=gen) * 3
        rows, logits = method.execute([tokens_1S, x_SD])
        assert torch.equal(rows, embedding_reference(table_VH, scale_VG, tokens_1S))
        ref = linear_reference(x_SD, table_VH, scale_VG)
        assert float((logits - ref).abs().max()) <= FLOAT * float(ref.abs().max()), S


def test_another_packing_fails_the_comparison():
    interleaved, scale_VG, right = _table(64, 32, seed=3, interleaved=True)
    method, _ = _program(interleaved, scale_VG)
    gen = torch.Generator().manual_seed(0)
    tokens_1S, x_SD = torch.randint(0, V, (1, 5), generator=gen), torch.randn(5, 64, generator=gen)
    rows, logits = method.execute([tokens_1S, x_SD])
    ref_rows, ref = embedding_reference(right, scale_VG, tokens_1S), linear_reference(x_SD, right, scale_VG)
    assert float((rows - ref_rows).abs().max()) > 0.1 * float(ref_rows.abs().max())
    assert float((logits - ref).abs().max()) > 0.1 * float(ref.abs().max())


def test_a_token_out_of_the_vocabulary_is_an_error_not_a_wild_read():
    method, _ = _program(*_table(64, 32, seed=4)[:2])
    with pytest.raises(RuntimeError):
        method.execute([torch.tensor([[0, V]]), torch.randn(2, 64)])
