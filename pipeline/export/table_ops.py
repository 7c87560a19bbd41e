"""``mobilemoe::embedding_int4`` and ``mobilemoe::linear_int4``: a tied vocabulary table
stored once.

With tied embeddings the lookup and the head use one matrix. Written as ExecuTorch's
``embedding_4bit`` plus an XNNPACK INT4 GEMM, the program holds it twice: packed for the
lookup, and repacked inside the XNNPACK delegate (at a 128k vocabulary, 59 MiB of S's
803). These two operators read the same packed table (:func:`~pipeline.export.moe_op.pack_int4`,
``[V, D/2]`` uint8 with ``[V, D/g]`` FP32 scales), and ExecuTorch stores equal constants
once. Their C++ kernels are in ``pipeline/export/native/table_int4.cpp``; in PyTorch they
run the references below.
"""

from __future__ import annotations

import torch

from pipeline.export.moe_op import dequantize_int4, int8_per_token

_lib = torch.library.Library("mobilemoe", "FRAGMENT")
_lib.define("embedding_int4(Tensor table, Tensor scale, Tensor tokens) -> Tensor")
_lib.define("embedding_int4.out(Tensor table, Tensor scale, Tensor tokens, *, Tensor(a!) out) -> Tensor(a!)")
_lib.define("linear_int4(Tensor x, Tensor weight, Tensor scale) -> Tensor")
_lib.define("linear_int4.out(Tensor x, Tensor weight, Tensor scale, *, Tensor(a!) out) -> Tensor(a!)")


def embedding_reference(table_VH: torch.Tensor, scale_VG: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [...] int64 -> [..., D] float32: the looked-up rows, dequantized."""
    rows_ND = dequantize_int4(
        table_VH.index_select(0, tokens.reshape(-1)), scale_VG.index_select(0, tokens.reshape(-1))
    )
    return rows_ND.reshape(*tokens.shape, -1)


def linear_reference(x_TD: torch.Tensor, weight_OH: torch.Tensor, scale_OG: torch.Tensor) -> torch.Tensor:
    """x [T, D] -> [T, O] float32, 8da4w: x through per-token asymmetric INT8, times the
    dequantized INT4 rows."""
    return int8_per_token(x_TD.float()) @ dequantize_int4(weight_OH, scale_OG).T


def _embedding_out(table, scale, tokens, *, out):
    result = embedding_reference(table, scale, tokens)
    return out.resize_(result.shape).copy_(result)


def _linear_out(x, weight, scale, *, out):
    result = linear_reference(x, weight, scale)
    return out.resize_(result.shape).copy_(result)


_lib.impl("embedding_int4", embedding_reference, "CompositeExplicitAutograd")
_lib.impl("embedding_int4.out", _embedding_out, "CompositeExplicitAutograd")
_lib.impl("linear_int4", linear_reference, "CompositeExplicitAutograd")
_lib.impl("linear_int4.out", _linear_out, "CompositeExplicitAutograd")


@torch.library.register_fake("mobilemoe::embedding_int4")
def _embedding_fake(table, scale, tokens):
    return table.new_empty((*tokens.shape, table.shape[1] * 2), dtype=torch.float32)


@torch.library.register_fake("mobilemoe::linear_int4")
def _linear_fake(x, weight, scale):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.float32)


def embedding_int4(table_VH: torch.Tensor, scale_VG: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[..., D] float32: see :func:`embedding_reference`."""
    return torch.ops.mobilemoe.embedding_int4(table_VH, scale_VG, tokens)


def linear_int4(x_TD: torch.Tensor, weight_OH: torch.Tensor, scale_OG: torch.Tensor) -> torch.Tensor:
    """[T, O] float32: see :func:`linear_reference`."""
    return torch.ops.mobilemoe.linear_int4(x_TD, weight_OH, scale_OG)
