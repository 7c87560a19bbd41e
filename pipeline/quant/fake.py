"""QAT ``prepare``: fake quantization of every matrix of the model, experts included.

Shape legend: E experts, F expert hidden width, D model dim, V vocabulary, N routed
slots (tokens x top-k), T tokens.

- ``nn.Linear`` (attention, shared expert, an untied head): torchao's
  ``QATConfig(Int8DynamicActivationIntxWeightConfig(int4, PerGroup(g)), step="prepare")``
  (int3 or int2 for the study schemes 8da3w, 8da2w).
- Routed experts (3-D ``w*_E..`` parameters, which torchao does not touch): the same
  numerics from torchao's public pieces. The weight fake-quantizer groups along the last
  (input) dim, so quantizing ``w_EFD.reshape(E*F, D)`` is quantizing each expert's
  matrix. The per-token activation quantizer is applied to the rows entering each
  projection; its scale and zero point depend on one row only, so quantizing all slots
  at once is bit-identical to quantizing each expert's slice (and no empty slice is
  ever passed to it, which it refuses).
- The tied embedding/output head: its weight fake-quantized per group (at the scheme's
  weight bits) or per row (INT8), for the lookup and the head alike; the head's input
  per token, as a linear's.
- Router and norms: untouched (FP32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, PerGroup, quantize_
from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer, QATConfig

from pipeline.model.decoder import Transformer
from pipeline.model.layers import Embedding
from pipeline.model.moe import GroupedExperts
from pipeline.quant.config import QuantConfig

ACT_BITS = 8
# torch's sub-byte integer dtypes, which name the range torchao's intx quantizers use.
INT_DTYPES = {2: torch.int2, 3: torch.int3, 4: torch.int4, 8: torch.int8}


def linear_config(q: QuantConfig) -> Int8DynamicActivationIntxWeightConfig:
    """torchao's 8da{b}w config for ``nn.Linear`` layers (b = ``q.weight_bits``)."""
    granularity = PerAxis(0) if q.granularity == "per_channel" else PerGroup(q.group_size)
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=INT_DTYPES[q.weight_bits], weight_granularity=granularity)


def weight_quantizer(bits: int, group: int) -> IntxFakeQuantizer:
    """Symmetric per-group fake quantizer of a weight's rows (``group`` input features
    per scale; ``group`` = the input dim is one scale per row)."""
    dtype = INT_DTYPES[bits]
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(dtype, group_size=group, is_symmetric=True))


def activation_quantizer() -> IntxFakeQuantizer:
    """Asymmetric per-token INT8 fake quantizer (dynamic: qparams from each row)."""
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))


def fake_quantize_rows(quantizer: IntxFakeQuantizer, w: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a weight of any rank whose last dim is the input dim."""
    return quantizer(w.reshape(-1, w.shape[-1])).reshape(w.shape)


class FakeQuantExperts(GroupedExperts):
    """Routed experts with 8da{b}w fake quantization; the same parameters as the original
    (state-dict names unchanged, so checkpoints load either way)."""

    def __init__(self, experts: GroupedExperts, q: QuantConfig) -> None:
        nn.Module.__init__(self)
        self.w1_EFD, self.w3_EFD, self.w2_EDF = experts.w1_EFD, experts.w3_EFD, experts.w2_EDF
        D, F_ = self.w1_EFD.shape[-1], self.w2_EDF.shape[-1]
        self.bits, self.group_in, self.group_hidden = q.weight_bits, q.group_for(D), q.group_for(F_)
        self.w13_fq = weight_quantizer(self.bits, self.group_in)
        self.w2_fq = weight_quantizer(self.bits, self.group_hidden)
        self.act_fq = activation_quantizer()

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (
            fake_quantize_rows(self.w13_fq, self.w1_EFD),
            fake_quantize_rows(self.w13_fq, self.w3_EFD),
            fake_quantize_rows(self.w2_fq, self.w2_EDF),
        )

    def quantize_input(self, x_ND: torch.Tensor) -> torch.Tensor:
        if x_ND.numel() == 0:  # torchao's per-token quantizer refuses an empty tensor
            return x_ND
        return self.act_fq(x_ND)


class FakeQuantEmbedding(Embedding):
    """The embedding (and tied head) with a fake-quantized weight."""

    def __init__(self, embed: Embedding, q: QuantConfig) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = embed.num_embeddings, embed.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = (
            None,
            None,
            2.0,
            False,
            False,
        )
        self.weight = embed.weight
        self.bits = q.embedding_bits
        self.group = q.embedding_group(embed.embedding_dim)
        self.weight_fq = weight_quantizer(self.bits, self.group)
        self.act_fq = activation_quantizer()

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens_BS, self.weight_fq(self.weight))

    def head_operands(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.act_fq(x_BSD), self.weight_fq(self.weight)


def is_linear(module: nn.Module, fqn: str = "") -> bool:
    return type(module) is nn.Linear


def prepare(model: Transformer, q: QuantConfig) -> Transformer:
    """Insert fake quantization into ``model`` in place (before its optimizer is built)
    and return it. Raises ConfigError naming a weight the group size does not fit."""
    q.check_fits(model.cfg)
    quantize_(model, QATConfig(linear_config(q), step="prepare"), filter_fn=is_linear)
    for moe in model.moe_layers():
        moe.experts = FakeQuantExperts(moe.experts, q)
    model.embed = FakeQuantEmbedding(model.embed, q)
    return model
