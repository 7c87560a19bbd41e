"""Side-by-side evaluation of model variants on the same held-out batches (QAT vs PTQ).

The QAT stage compares models on one validation set: the full-precision starting model,
the same model quantized post-training (PTQ), the QAT model after convert, a
full-precision control trained for the same steps on the same data, and the control
quantized post-training (:func:`compare_quantized`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from pipeline.model import ModelConfig
from pipeline.quant import QuantConfig
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


@dataclass
class QuantComparison:
    """What :func:`compare_quantized` measured and built."""

    metrics: dict[str, float | None]  # loss_*/bpb_* per model, the gaps, the recovered fractions
    qat_int4: torch.nn.Module  # the QAT model converted to real INT4
    tables: dict  # the scheme and the coverage tables after prepare and after convert


def compare_quantized(
    model_cfg: ModelConfig,
    quant: QuantConfig,
    sft_state: dict[str, torch.Tensor],
    qat_state: dict[str, torch.Tensor],
    control_state: dict[str, torch.Tensor] | None,
    chat_val: TokenBatches,
    text_val: TokenBatches,
    n_batches: int,
    bytes_per_token: float,
) -> QuantComparison:
    """QAT against PTQ on the same held-out batches.

    Builds SFT's model (``sft_state``), its PTQ (group-wise as ``quant``, and
    per-channel), QAT's model converted to INT4 (``qat_state`` prepared then converted;
    coverage required after both: a matrix other than the router and the norms left in
    full precision raises, naming it) and, with ``control_state``, the full-precision
    control and its PTQ. Every model is scored on ``n_batches`` of ``chat_val`` (loss,
    nats per target token) and of ``text_val`` (bits per byte at ``bytes_per_token``).
    Gaps are loss differences in nats; recovered fractions as :func:`recovered_fraction`.
    Raises RuntimeError when a metric is not finite."""
    import copy

    from pipeline.model import Transformer
    from pipeline.quant.convert import convert, post_training_quantize
    from pipeline.quant.coverage import coverage, require_coverage, table
    from pipeline.quant.fake import prepare

    def build(state: dict[str, torch.Tensor]) -> torch.nn.Module:
        model = Transformer(model_cfg)
        model.load_state_dict(state)
        return model.eval()

    sft = build(sft_state)
    qat_fake = prepare(build(qat_state), quant)
    prepared_rows = coverage(qat_fake)
    require_coverage(prepared_rows)
    with torch.no_grad():
        qat_int4 = convert(qat_fake, quant)
        ptq = post_training_quantize(copy.deepcopy(sft), quant)
        ptq_per_channel = post_training_quantize(copy.deepcopy(sft), replace(quant, granularity="per_channel"))
    converted_rows = coverage(qat_int4)
    require_coverage(converted_rows)

    models = {"sft_fp32": sft, "ptq": ptq, "qat_int4": qat_int4}
    if control_state is not None:
        # The control's own PTQ: QAT against "train as long in FP32, then quantize".
        models["control_fp32"] = build(control_state)
        with torch.no_grad():
            models["control_ptq"] = post_training_quantize(copy.deepcopy(models["control_fp32"]), quant)
    models["ptq_per_channel"] = ptq_per_channel
    chat = evaluate_models(models, chat_val, n_batches)
    text = evaluate_models(models, text_val, n_batches, bytes_per_token)

    metrics: dict[str, float | None] = {}
    for name in models:
        metrics[f"loss_{name}"] = chat[name]["loss"]
        metrics[f"bpb_{name}"] = text[name]["bpb"]
    metrics["ptq_gap"] = chat["ptq"]["loss"] - chat["sft_fp32"]["loss"]
    metrics["qat_gap"] = chat["qat_int4"]["loss"] - chat["sft_fp32"]["loss"]
    metrics["ptq_per_channel_gap"] = chat["ptq_per_channel"]["loss"] - chat["sft_fp32"]["loss"]
    metrics["recovered_vs_sft"] = recovered_fraction(
        chat["ptq"]["loss"], chat["qat_int4"]["loss"], chat["sft_fp32"]["loss"]
    )
    if control_state is not None:
        # Same steps on both sides: the control's PTQ gap, and how much of it QAT closes.
        metrics["control_ptq_gap"] = chat["control_ptq"]["loss"] - chat["control_fp32"]["loss"]
        metrics["recovered_vs_control"] = recovered_fraction(
            chat["control_ptq"]["loss"], chat["qat_int4"]["loss"], chat["control_fp32"]["loss"]
        )
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"stage qat: non-finite metrics {bad}")
    tables = {"scheme": asdict(quant), "after_prepare": table(prepared_rows), "after_convert": table(converted_rows)}
    return QuantComparison(metrics, qat_int4, tables)
