"""QAT ``convert`` (and PTQ): a real quantized model, integer values (INT4, or the
study schemes' INT3/INT2) plus scales.

- ``nn.Linear``: torchao's ``QATConfig(..., step="convert")``; each weight becomes an
  ``IntxUnpackedToInt8Tensor`` (the values held in int8, FP32 scales per group) whose
  forward quantizes its input per token to INT8, as on the device.
- Routed experts and the embedding: :class:`QuantizedWeight` (INT values in int8,
  FP32 scales), quantized with torchao's ``choose_qparams_affine`` /
  ``quantize_affine`` over 3-D blocks ``(1, 1, group)``; dequantizing gives exactly the
  weight the fake quantizer produced, so the converted forward equals the fake-quant
  forward up to float summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.qat import QATConfig
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.quantization.quant_primitives import (
    MappingType,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
)

from pipeline.model.decoder import Transformer
from pipeline.model.layers import Embedding
from pipeline.model.moe import GroupedExperts
from pipeline.quant.config import QuantConfig
from pipeline.quant.fake import FakeQuantEmbedding, FakeQuantExperts, activation_quantizer, linear_config, prepare


def stored_bits(bits: int) -> int:
    """Bits a ``bits``-bit value takes in the quantized format (format.py): a nibble for
    2 to 4 bits (2- and 3-bit values are not packed tighter: no runtime of the recipe
    reads them, so their file is a lossless study artifact), a byte for 8."""
    return 4 if bits <= 4 else 8


@dataclass
class QuantizedWeight:
    """Symmetric integer weight: ``values`` (int8 holding ``bits``-bit ints, shape of
    the weight) and ``scale`` (FP32, the weight's shape with the last dim divided by
    ``group``). Dequantized weight = values * scale, per group of the last dim."""

    values: torch.Tensor
    scale: torch.Tensor
    bits: int
    group: int

    @property
    def block(self) -> tuple[int, ...]:
        return (1,) * (self.values.ndim - 1) + (self.group,)

    @property
    def qrange(self) -> tuple[int, int]:
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    @classmethod
    def quantize(cls, w: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        block = (1,) * (w.ndim - 1) + (group,)
        w = w.detach().float()
        scale, zero = choose_qparams_affine(w, MappingType.SYMMETRIC, block, torch.int8, lo, hi)
        values = quantize_affine(w, block, scale, zero, torch.int8, lo, hi)
        return cls(values, scale.float(), bits, group)

    def dequantize(self) -> torch.Tensor:
        lo, hi = self.qrange
        zero = torch.zeros_like(self.scale, dtype=torch.int32)
        return dequantize_affine(
            self.values, self.block, self.scale, zero, torch.int8, lo, hi, output_dtype=torch.float32
        )

    def nbytes(self) -> int:
        """Bytes of the stored format: :func:`stored_bits` per value, plus the FP32 scales."""
        return self.values.numel() * stored_bits(self.bits) // 8 + self.scale.numel() * self.scale.element_size()


def _register(module: nn.Module, name: str, weight: QuantizedWeight) -> None:
    """Hold a quantized weight's tensors as buffers (``.to(device)`` moves them); not
    persistent: the quantized format (format.py) saves them, packed."""
    module.register_buffer(f"{name}_values", weight.values, persistent=False)
    module.register_buffer(f"{name}_scale", weight.scale, persistent=False)
    module._qlayout[name] = (weight.bits, weight.group)


def _registered(module: nn.Module, name: str) -> QuantizedWeight:
    bits, group = module._qlayout[name]
    return QuantizedWeight(module.get_buffer(f"{name}_values"), module.get_buffer(f"{name}_scale"), bits, group)


class QuantizedExperts(GroupedExperts):
    """Routed experts from INT weights; inputs quantized per token to INT8."""

    def __init__(self, weights: dict[str, QuantizedWeight]) -> None:
        nn.Module.__init__(self)
        self._qlayout: dict[str, tuple[int, int]] = {}
        for name, weight in weights.items():  # keys w1_EFD, w3_EFD, w2_EDF
            _register(self, name, weight)
        self.act_fq = activation_quantizer()

    @property
    def qweights(self) -> dict[str, QuantizedWeight]:
        return {name: _registered(self, name) for name in self._qlayout}

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.qweights[k].dequantize() for k in ("w1_EFD", "w3_EFD", "w2_EDF"))  # type: ignore[return-value]

    def quantize_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        return x_ND if x_ND.numel() == 0 else self.act_fq(x_ND)


class QuantizedEmbedding(Embedding):
    """Embedding (and tied head) from an INT weight; the head's input per token INT8."""

    def __init__(self, weight: QuantizedWeight) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.values.shape
        self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = (
            None,
            None,
            2.0,
            False,
            False,
        )
        self._qlayout: dict[str, tuple[int, int]] = {}
        _register(self, "weight", weight)
        self.act_fq = activation_quantizer()

    @property
    def qweight(self) -> QuantizedWeight:
        return _registered(self, "weight")

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens_BS, self.qweight.dequantize())

    def head_operands(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act_fq(x_BSD), self.qweight.dequantize()


@torch.no_grad()
def convert(model: Transformer, q: QuantConfig) -> Transformer:
    """Replace the fake quantization of a prepared ``model`` by real INT weights, in
    place; returns it (in eval mode: a converted model is not trained further)."""
    quantize_(
        model,
        QATConfig(linear_config(q), step="convert"),
        filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear),
    )
    for moe in model.moe_layers():
        fake = moe.experts
        if not isinstance(fake, FakeQuantExperts):
            raise TypeError(f"convert: {type(fake).__name__} experts were not prepared for QAT")
        moe.experts = QuantizedExperts(
            {
                "w1_EFD": QuantizedWeight.quantize(fake.w1_EFD, fake.bits, fake.group_in),
                "w3_EFD": QuantizedWeight.quantize(fake.w3_EFD, fake.bits, fake.group_in),
                "w2_EDF": QuantizedWeight.quantize(fake.w2_EDF, fake.bits, fake.group_hidden),
            }
        )
    if not isinstance(model.embed, FakeQuantEmbedding):
        raise TypeError("convert: the embedding was not prepared for QAT")
    embed = model.embed
    model.embed = QuantizedEmbedding(QuantizedWeight.quantize(embed.weight, embed.bits, embed.group))
    return model.eval()


def post_training_quantize(model: Transformer, q: QuantConfig) -> Transformer:
    """PTQ: the same scheme with no training (prepare, then convert at once), in place."""
    return convert(prepare(model, q), q)
