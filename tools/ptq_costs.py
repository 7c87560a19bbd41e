"""``python -m tools.ptq_costs [--stage sft] [--batches 16]``: what post-training
quantization costs one of the recipe's trained models, for every weight width
(8da4w, 8da3w, 8da2w), granularity and embedding setting, on the same held-out batches.

It is the measurement behind the choice of a QAT study (docs/qat.md): the recipe's QAT
stage can only show what QAT recovers where PTQ costs something. Each row is the
model quantized by :func:`pipeline.quant.convert.post_training_quantize` (the QAT
stage's PTQ), its loss on ``--batches`` validation batches of the stage's own mixture
(nats per target token: chats for sft, text for pretrain and midtrain) and the change
from the full-precision model, in nats and in percent of its loss.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from pipeline.quant.config import SCHEMES, QuantConfig

# Every setting the QAT stage accepts, coarsest weight width last.
SETTINGS = tuple(
    QuantConfig(scheme=scheme, group_size=32, granularity=granularity, embedding=embedding)
    for scheme in SCHEMES
    for granularity, embedding in (("per_group", "int4"), ("per_channel", "int4"), ("per_group", "int8"))
)


@dataclass(frozen=True)
class PTQCost:
    quant: QuantConfig
    loss: float  # nats per target token, quantized
    gap: float  # loss - the full-precision loss, nats

    @property
    def label(self) -> str:
        emb = "INT8 embedding" if self.quant.embedding == "int8" else f"INT{self.quant.weight_bits} embedding"
        return f"{self.quant.scheme} {self.quant.granularity}, {emb}"


def ptq_costs(model: torch.nn.Module, val, n_batches: int, settings: Iterable[QuantConfig]) -> tuple[float, list]:
    """``(full-precision loss, [PTQCost per setting])`` of ``model`` (a full-precision
    Transformer, left unchanged) on the first ``n_batches`` of ``val`` (a
    :class:`~pipeline.train.batches.TokenBatches`; each model sees the same batches)."""
    from pipeline.quant.convert import post_training_quantize
    from pipeline.train.compare import evaluate_models

    base = evaluate_models({"fp32": model.eval()}, val, n_batches)["fp32"]["loss"]
    costs = []
    for q in settings:
        q.check_fits(model.cfg)
        with torch.no_grad():
            quantized = post_training_quantize(copy.deepcopy(model), q)
        loss = evaluate_models({"ptq": quantized}, val, n_batches)["ptq"]["loss"]
        costs.append(PTQCost(q, loss, loss - base))
    return base, costs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ptq_costs", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--stage", choices=("pretrain", "midtrain", "sft"), default="sft")
    parser.add_argument("--batches", type=int, default=16, help="validation batches per model")
    args = parser.parse_args(argv)

    from pipeline.model import Transformer
    from pipeline.recipe import load_params, repo_path, validate
    from pipeline.train.batches import TokenBatches
    from pipeline.train.checkpoint import load_checkpoint

    recipe = validate(load_params(args.params))
    stage = getattr(recipe.stage, args.stage)
    model = Transformer(recipe.model)
    model.load_state_dict(load_checkpoint(repo_path(stage.out_dir) / "model").model_state)
    val = TokenBatches(repo_path(stage.mixture), "val", stage.seq_len, stage.batch_size, recipe.seed)
    base, costs = ptq_costs(model, val, args.batches, SETTINGS)
    print(f"# PTQ of outputs/{args.stage}/model, {args.batches} val batches of its mixture: FP32 loss {base:.4f}")
    print("| setting | loss | change (nats) | change |")
    print("|---|---|---|---|")
    for c in costs:
        print(f"| {c.label} | {c.loss:.4f} | {c.gap:+.4f} | {100 * c.gap / base:+.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
