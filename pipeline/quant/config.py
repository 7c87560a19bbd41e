"""The quantization scheme of QAT, PTQ and the converted model, as a config.

"8da4w" is the on-device scheme of the paper and of ExecuTorch/XNNPACK: weights INT4
symmetric, one scale per ``group_size`` consecutive input features of a row (or one per
row with ``granularity: per_channel``); activations INT8 asymmetric, one scale and zero
point per token, computed at run time. The router and the norms stay FP32. The tied
embedding/output head is INT4 per group like every other matrix (``embedding: int4``,
what :func:`pipeline.model.accounting.int4_weight_bytes` counts) or INT8 per row
(``embedding: int8``).

"8da3w" and "8da2w" are the same scheme with 3- and 2-bit weights (torchao's intx
weights, one of its experimental ARM kernels' widths): a study of QAT where
post-training quantization costs more than at INT4 (docs/qat.md). The export lowers
8da4w only (XNNPACK's INT4 GEMMs); the embedding's ``int4`` setting follows the scheme's
weight bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.configbase import ConfigError, require
from pipeline.model.config import ModelConfig

# Scheme name -> weight bits; activations are INT8 per token in all of them.
SCHEMES = {"8da4w": 4, "8da3w": 3, "8da2w": 2}
DEPLOYED_SCHEME = "8da4w"  # what the export lowers
GRANULARITIES = ("per_group", "per_channel")
EMBEDDINGS = ("int4", "int8")


@dataclass
class QuantConfig:
    scheme: str = "8da4w"
    group_size: int = 32  # input features per INT4 scale (per_group)
    granularity: Literal["per_group", "per_channel"] = "per_group"
    embedding: Literal["int4", "int8"] = "int4"  # the tied embedding/output head

    def __post_init__(self) -> None:
        require(self.scheme in SCHEMES, "scheme", f"unknown scheme {self.scheme!r} (known: {', '.join(SCHEMES)})")
        require(
            self.granularity in GRANULARITIES,
            "granularity",
            f"unknown granularity {self.granularity!r} (known: {', '.join(GRANULARITIES)})",
        )
        require(
            self.embedding in EMBEDDINGS,
            "embedding",
            f"unknown embedding scheme {self.embedding!r} (known: {', '.join(EMBEDDINGS)})",
        )
        require(
            isinstance(self.group_size, int) and self.group_size >= 2 and self.group_size % 2 == 0,
            "group_size",
            f"must be an even int >= 2, got {self.group_size!r}",
        )

    @property
    def weight_bits(self) -> int:
        """Bits of every quantized matrix (the embedding's too, unless ``embedding: int8``)."""
        return SCHEMES[self.scheme]

    @property
    def embedding_bits(self) -> int:
        return 8 if self.embedding == "int8" else self.weight_bits

    def group_for(self, in_dim: int) -> int:
        """Input features per scale for a weight with ``in_dim`` input features."""
        return in_dim if self.granularity == "per_channel" else self.group_size

    def embedding_group(self, d_model: int) -> int:
        """Features per scale of the embedding: INT8 is per row, INT4 as the matrices."""
        return d_model if self.embedding == "int8" else self.group_for(d_model)

    def check_fits(self, model: ModelConfig, key: str = "group_size") -> None:
        """Raise ConfigError naming the first weight whose input dim the group does not
        divide (``key`` is the dotted config key reported)."""
        if self.granularity == "per_channel":
            return
        for name, in_dim in quantized_input_dims(model):
            if name == "embed.weight" and self.embedding == "int8":
                continue  # INT8 embedding: one scale per row, no groups
            if in_dim % self.group_size:
                raise ConfigError(
                    f"{key}: {self.group_size} does not divide the input dim {in_dim} of {name} "
                    f"(every quantized weight needs whole groups)"
                )


def quantized_input_dims(cfg: ModelConfig) -> list[tuple[str, int]]:
    """``(tensor name, input features)`` of every weight that 8da4w quantizes, named as
    in the built model's state dict, from the config alone (a test checks the names
    against a built model). The router and the norms are not quantized."""
    D, A = cfg.d_model, cfg.n_heads * cfg.head_dim
    dims: list[tuple[str, int]] = [("embed.weight", D)]
    for i in range(cfg.n_layers):
        p = f"layers.{i}"
        dims += [(f"{p}.attn.{w}.weight", D) for w in ("wq", "wk", "wv")] + [(f"{p}.attn.wo.weight", A)]
        if cfg.moe is None:
            dims += [(f"{p}.ffn.w1.weight", D), (f"{p}.ffn.w3.weight", D), (f"{p}.ffn.w2.weight", cfg.ffn_dim)]
            continue
        moe = cfg.moe
        F_ = moe.expert_ffn_dim
        dims += [(f"{p}.ffn.experts.w1_EFD", D), (f"{p}.ffn.experts.w3_EFD", D), (f"{p}.ffn.experts.w2_EDF", F_)]
        if moe.num_shared_experts * moe.shared_ffn_dim > 0:
            S = moe.num_shared_experts * moe.shared_ffn_dim
            dims += [
                (f"{p}.ffn.shared.w1.weight", D),
                (f"{p}.ffn.shared.w3.weight", D),
                (f"{p}.ffn.shared.w2.weight", S),
            ]
    if not cfg.tie_embeddings:
        dims.append(("head.weight", D))
    return dims
