"""``mobilemoe::moe_experts_int4``: the routed experts of one MoE layer as one operator.

Exported as a single graph node per layer (the C++ kernel in
``pipeline/export/native/moe_int4.cpp`` runs it in ExecuTorch), instead of one XNNPACK
GEMM pair per expert: lowering time and memory no longer grow with the expert count, and
an idle expert costs nothing at decode. In PyTorch (eager, and the export's reference)
it runs :func:`reference`, the same 8da4w maths with ``quantized_decomposed`` ops.

Weights are INT4, two per byte (:func:`pack_int4`), with one FP32 scale per group of
input features: ``w13`` ``[E, 2F, D/2]`` (w1 rows, then w3 rows) and ``w2`` ``[E, D, F/2]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.ao.quantization.fx import _decomposed  # noqa: F401 - registers quantized_decomposed

_SIGNATURE = "Tensor x, Tensor experts, Tensor gates, Tensor w13, Tensor w13_scale, Tensor w2, Tensor w2_scale"
_lib = torch.library.Library("mobilemoe", "DEF")
_lib.define(f"moe_experts_int4({_SIGNATURE}) -> Tensor")
# The out variant: ExecuTorch's to_executorch swaps the functional op for it.
_lib.define(f"moe_experts_int4.out({_SIGNATURE}, *, Tensor(a!) out) -> Tensor(a!)")


def pack_int4(values_RC: torch.Tensor, group: int) -> torch.Tensor:
    """[R, C] integers in [-8, 7] -> [R, C/2] uint8: per group of ``group`` columns, byte j
    holds column j (low nibble) and column j + group/2 (high nibble), each + 8.
    Raises ValueError for an odd group or one that does not divide C."""
    R, C = values_RC.shape
    if group % 2 or C % group:
        raise ValueError(f"INT4 packing needs an even group dividing {C} columns, got {group}")
    u = (values_RC.to(torch.int16) + 8).to(torch.uint8).reshape(R, C // group, 2, group // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(R, C // 2).contiguous()


def unpack_int4(packed_RH: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: [R, C/2] uint8 -> [R, C] int8."""
    R, H = packed_RH.shape
    p = packed_RH.reshape(R, 2 * H // group, 1, group // 2)
    u = torch.cat([p & 0xF, p >> 4], dim=2)
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(R, 2 * H)


def dequantize_int4(packed_RH: torch.Tensor, scale_RG: torch.Tensor) -> torch.Tensor:
    """[R, C/2] packed INT4 (:func:`pack_int4`) with [R, C/g] scales -> [R, C] float32."""
    cols = packed_RH.shape[1] * 2
    group = cols // scale_RG.shape[1]
    w = unpack_int4(packed_RH, group).float().reshape(-1, scale_RG.shape[1], group)
    return (w * scale_RG.float()[..., None]).reshape(-1, cols)


def int8_per_token(x_ND: torch.Tensor) -> torch.Tensor:
    """x rounded through per-token asymmetric INT8 (the activations of 8da4w)."""
    qd = torch.ops.quantized_decomposed
    scale, zero = qd.choose_qparams_per_token_asymmetric(x_ND, torch.int8)
    q = qd.quantize_per_token(x_ND, scale, zero, -128, 127, torch.int8)
    return qd.dequantize_per_token(q, scale, zero, -128, 127, torch.int8, torch.float32)


def reference(x_TD, experts_TK, gates_TK, w13_EFH, w13_scale_EFG, w2_EDH, w2_scale_EDG) -> torch.Tensor:
    """out_TD = sum_k gates_TK[:, k] * SwiGLU_{experts_TK[:, k]}(x_TD), each expert an 8da4w
    SwiGLU (INT8 per-token activations into each GEMM, INT4 grouped weights)."""
    width = w13_EFH.shape[1] // 2
    x_TD = x_TD.float()
    xq_TD = int8_per_token(x_TD)
    out_TD = torch.zeros_like(x_TD)
    for e in torch.unique(experts_TK).tolist():
        tok_N, k_N = (experts_TK == e).nonzero(as_tuple=True)
        h_N2F = xq_TD[tok_N] @ dequantize_int4(w13_EFH[e], w13_scale_EFG[e]).T
        a_NF = int8_per_token(F.silu(h_N2F[:, :width]) * h_N2F[:, width:])
        y_ND = a_NF @ dequantize_int4(w2_EDH[e], w2_scale_EDG[e]).T
        out_TD.index_add_(0, tok_N, y_ND * gates_TK[tok_N, k_N][:, None])
    return out_TD


def _reference_out(x, experts, gates, w13, w13_scale, w2, w2_scale, *, out):
    result = reference(x, experts, gates, w13, w13_scale, w2, w2_scale)
    out.resize_(result.shape).copy_(result)
    return out


_lib.impl("moe_experts_int4", reference, "CompositeExplicitAutograd")
_lib.impl("moe_experts_int4.out", _reference_out, "CompositeExplicitAutograd")


@torch.library.register_fake("mobilemoe::moe_experts_int4")
def _fake(x, experts, gates, w13, w13_scale, w2, w2_scale):
    return torch.empty_like(x, dtype=torch.float32)


def moe_experts_int4(x_TD, experts_TK, gates_TK, w13_EFH, w13_scale_EFG, w2_EDH, w2_scale_EDG) -> torch.Tensor:
    """[T, D] float32: see :func:`reference`. Shapes: x [T, D], experts (int64) and gates
    [T, K], w13 [E, 2F, D/2] uint8 with w13_scale [E, 2F, D/g], w2 [E, D, F/2] uint8 with
    w2_scale [E, D, F/g]."""
    return torch.ops.mobilemoe.moe_experts_int4(
        x_TD, experts_TK, gates_TK, w13_EFH, w13_scale_EFG, w2_EDH, w2_scale_EDG
    )
