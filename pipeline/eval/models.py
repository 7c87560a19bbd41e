"""Load any model this recipe produces for evaluation: a training stage's checkpoint
directory, one checkpoint, or QAT's converted INT4 file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.configbase import from_dict
from pipeline.model import ModelConfig, Transformer


def load_model(path: str | Path, model_cfg: ModelConfig | None = None) -> tuple[Transformer, str]:
    """``(model in eval mode, form)`` where form is ``"fp32"`` or ``"int4"``.

    ``path``: a ``.safetensors`` written by QAT's conversion (``int4``), or a checkpoint
    directory (a stage's ``model/``). A checkpoint's architecture is read from its own metadata unless ``model_cfg`` is
    given. Raises FileNotFoundError / CheckpointError / QuantizedFormatError naming the
    path."""
    from pipeline.train.checkpoint import CheckpointError, load_checkpoint

    path = Path(path)
    if path.suffix == ".safetensors":
        from pipeline.quant.format import load_quantized

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such converted model")
        model, _ = load_quantized(path)
        return model.eval(), "int4"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a converted .safetensors")
    ckpt = load_checkpoint(path)
    if model_cfg is None:
        raw = ckpt.meta.get("model")
        if raw is None:
            raise CheckpointError(f"{path}: the checkpoint does not record its model config; pass one")
        model_cfg = from_dict(ModelConfig, json.loads(raw) if isinstance(raw, str) else raw, "model")
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    model.load_state_dict(ckpt.model_state)
    return model.eval(), "fp32"
