"""What was quantized: one row per weight tensor of a prepared or converted model.

Quantizers that only see ``nn.Linear`` silently leave MoE experts at full precision;
so the table is built from every parameter of the model, not from what a quantizer
claims to have touched, and :func:`require_coverage` fails naming any matrix left at
full precision other than the router (kept FP32 on purpose) and the norms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchao.quantization import IntxUnpackedToInt8Tensor
from torchao.quantization.granularity import PerAxis, PerGroup
from torchao.quantization.qat.linear import FakeQuantizedLinear

from pipeline.model.layers import RMSNorm
from pipeline.model.moe import Router
from pipeline.quant.convert import QuantizedEmbedding, QuantizedExperts, QuantizedWeight, stored_bits
from pipeline.quant.fake import INT_DTYPES, FakeQuantEmbedding, FakeQuantExperts

FP32_ON_PURPOSE = ("router", "norm")
SCALE_BYTES = 4  # FP32 scales: torchao 0.18's QATConfig refuses weight_scale_dtype, FP32 weights give FP32


class CoverageError(RuntimeError):
    """A matrix that should be quantized is at full precision."""


@dataclass(frozen=True)
class Row:
    name: str
    shape: tuple[int, ...]
    scheme: str  # e.g. "int4/g32 + int8 act (fake)", "fp32 router", "fp32"
    bytes: int  # in the converted format: packed values + FP32 scales, or 4 per FP32 value

    @property
    def full_precision(self) -> bool:
        return self.scheme.startswith("fp32")


def _int_row(name: str, shape: tuple[int, ...], bits: int, group: int, act: bool, stage: str) -> Row:
    numel = int(torch.Size(shape).numel())
    scheme = f"int{bits}/g{group}" + (" + int8 act" if act else "") + f" ({stage})"
    return Row(name, shape, scheme, numel * stored_bits(bits) // 8 + numel // group * SCALE_BYTES)


def quantized_weights(model: nn.Module) -> dict[str, QuantizedWeight]:
    """Every real quantized weight of a converted model, by state-dict name."""
    out: dict[str, QuantizedWeight] = {}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, nn.Linear) and isinstance(module.weight, IntxUnpackedToInt8Tensor):
            w = module.weight
            bits = {dtype: b for b, dtype in INT_DTYPES.items()}[w.target_dtype]
            # torchao's own tensors (no copy): loading a saved model writes into them
            out[f"{prefix}weight"] = QuantizedWeight(w.qdata, w.scale, bits, w.block_size[-1])
        elif isinstance(module, QuantizedExperts):
            out.update({f"{prefix}{k}": v for k, v in module.qweights.items()})
        elif isinstance(module, QuantizedEmbedding):
            out[f"{prefix}weight"] = module.qweight
    return out


def coverage(model: nn.Module) -> list[Row]:
    """One row per weight tensor of ``model`` (plain, prepared or converted), sorted by name."""
    rows: dict[str, Row] = {}
    tied = getattr(model, "head", None) is None
    for name, w in quantized_weights(model).items():
        act = _act(name, tied)
        rows[name] = Row(name, tuple(w.values.shape), f"int{w.bits}/g{w.group}{act} (converted)", w.nbytes())
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, FakeQuantizedLinear):
            granularity = module.weight_fake_quantizer.config.granularity
            group = module.in_features if isinstance(granularity, PerAxis) else granularity.group_size
            assert isinstance(granularity, (PerAxis, PerGroup))
            bits = {dtype: b for b, dtype in INT_DTYPES.items()}[module.weight_fake_quantizer.config.dtype]
            rows[f"{prefix}weight"] = _int_row(f"{prefix}weight", tuple(module.weight.shape), bits, group, True, "fake")
        elif isinstance(module, FakeQuantExperts):
            for k, group in (("w1_EFD", module.group_in), ("w3_EFD", module.group_in), ("w2_EDF", module.group_hidden)):
                shape = tuple(getattr(module, k).shape)
                rows[f"{prefix}{k}"] = _int_row(f"{prefix}{k}", shape, module.bits, group, True, "fake")
        elif isinstance(module, FakeQuantEmbedding):
            shape = tuple(module.weight.shape)
            act = mname == "embed" and tied  # the tied head quantizes its input per token
            rows[f"{prefix}weight"] = _int_row(f"{prefix}weight", shape, module.bits, module.group, act, "fake")
    kinds = {
        f"{mname}.{pname}" if mname else pname: kind
        for mname, module in model.named_modules()
        for kind, types in (("router", (Router,)), ("norm", (RMSNorm,)))
        if isinstance(module, types)
        for pname, _ in module.named_parameters(recurse=False)
    }
    for name, p in model.named_parameters(remove_duplicate=True):
        if name not in rows:
            kind = kinds.get(name)
            rows[name] = Row(name, tuple(p.shape), "fp32" + (f" {kind}" if kind else ""), p.numel() * 4)
    return [rows[k] for k in sorted(rows)]


def _act(name: str, tied: bool) -> str:
    """ " + int8 act" where the weight's input is INT8 per token: every matrix, and the
    embedding when it is also the (tied) output head; not an untied embedding's lookup."""
    return " + int8 act" if tied or not name.startswith("embed.") else ""


def require_coverage(rows: list[Row]) -> None:
    """Raise CoverageError naming every matrix at full precision that is neither the
    router nor a norm."""
    bad = [r.name for r in rows if r.full_precision and not r.scheme.endswith(FP32_ON_PURPOSE)]
    if bad:
        raise CoverageError(
            f"{len(bad)} weight tensor(s) left at full precision: {', '.join(bad)} "
            f"(only the router and the norms may stay FP32)"
        )


def table(rows: list[Row]) -> dict:
    """The coverage table as JSON: rows, and bytes and tensor counts per scheme."""
    per_scheme: dict[str, dict[str, int]] = {}
    for r in rows:
        s = per_scheme.setdefault(r.scheme, {"tensors": 0, "bytes": 0, "params": 0})
        s["tensors"] += 1
        s["bytes"] += r.bytes
        s["params"] += int(torch.Size(r.shape).numel())
    return {
        "rows": [{**asdict(r), "shape": list(r.shape)} for r in rows],
        "per_scheme": per_scheme,
        "total_bytes": sum(r.bytes for r in rows),
    }
