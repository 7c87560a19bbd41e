"""Side-by-side evaluation of model variants on the same held-out batches (QAT vs PTQ).

The QAT stage compares models on one validation set: the full-precision starting model,
the same model quantized post-training (PTQ), the QAT model after convert, a
full-precision control trained for the same steps on the same data, and the control
quantized post-training.
"""

from __future__ import annotations

import math

import torch

from pipeline.train.batches import TokenBatches
from pipeline.train.loop import evaluate


def recovered_fraction(loss_ptq: float, loss_qat: float, loss_reference: float) -> float | None:
    """Share of PTQ's quantization gap that QAT closes, against a full-precision reference:

        (L_ptq - L_qat) / (L_ptq - L_ref)

    1 means the quantized QAT model is as good as the reference, 0 no better than PTQ,
    negative worse than PTQ. None when PTQ is not worse than the reference (there is no
    gap to recover, and the ratio would be meaningless). Losses in nats per token."""
    gap = loss_ptq - loss_reference
    if not gap > 0:
        return None
    return (loss_ptq - loss_qat) / gap


def evaluate_models(
    models: dict[str, torch.nn.Module],
    val: TokenBatches,
    n_batches: int,
    bytes_per_token: float = 0.0,
    device: torch.device = torch.device("cpu"),
) -> dict[str, dict[str, float]]:
    """``{model name: {"loss": nats/token, ["bpb": bits/byte]}}`` on the same ``n_batches``
    validation batches for every model (one process). Bits per byte = loss / ln 2 /
    (bytes per token), given when ``bytes_per_token`` > 0 (text, not chat)."""
    out = {}
    for name, model in models.items():
        loss = evaluate(model, val, n_batches, rank=0, world=1, device=device, dtype="float32")["all"]
        out[name] = {"loss": loss}
        if bytes_per_token > 0:
            out[name]["bpb"] = loss / math.log(2) / bytes_per_token
    return out
