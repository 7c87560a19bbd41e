"""Shared fixtures: a small built data mixture (tokenizer + pretrain/midtrain/sft), and one
micro MoE converted to INT4 and lowered to a .pte (about 30 s on 2 cores, built once for
the export and profile tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data.build import build_all
from pipeline.data.mixing import MixtureConfig

VOCAB = 512


def _mixture(kind: str, sources: list[dict]) -> MixtureConfig:
    return MixtureConfig(sources=sources, total_tokens=15000, val_fraction=0.1, seed=0, kind=kind)


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> Path:
    """data/mix as the mix stage writes it, small enough to build in a few seconds."""
    out = tmp_path_factory.mktemp("mix") / "mix"
    text = [
        {"name": "arithmetic", "kind": "arithmetic", "weight": 1.0, "domain": "math", "options": {"n_docs": 300}},
        {"name": "fortunes", "kind": "fortunes", "weight": 1.0, "domain": "literature", "max_docs": 300},
    ]
    chat = [{"name": "math", "kind": "math", "weight": 1.0, "domain": "math", "options": {"n_docs": 300}}]
    build_all(
        _mixture("text", text),
        _mixture("text", text[:1]),
        _mixture("chat", chat),
        VOCAB,
        out,
        tokenizer_max_bytes=200_000,
    )
    return out


@pytest.fixture(scope="session")
def context_model():
    """The micro MoE (tests/shapes.py) trained on the copy task: its predictions depend on
    the context, so a wrong cache position or RoPE changes them (FP32, a few seconds)."""
    from shapes import context_trained, micro_cfg

    return context_trained(micro_cfg())


@pytest.fixture(scope="session")
def converted(context_model):
    """``context_model`` converted to 8da4w (a copy: the FP32 model stays as it is)."""
    import copy

    import torch

    from pipeline.quant.config import QuantConfig
    from pipeline.quant.convert import post_training_quantize

    with torch.no_grad():
        return post_training_quantize(copy.deepcopy(context_model), QuantConfig(group_size=32))


@pytest.fixture(scope="session")
def lowered(converted, tmp_path_factory) -> dict:
    """``converted`` through the export stage's path: model.pt2, model.pte (the last
    position's logits, MAX_CONTEXT positions) and its converted weights, model.safetensors."""
    from shapes import MAX_CONTEXT, VOCAB

    from pipeline.export.lower import export_program, lower_to_pte, save_pt2
    from pipeline.export.program import ExportableLM
    from pipeline.quant.config import QuantConfig
    from pipeline.quant.format import save_quantized

    out = tmp_path_factory.mktemp("export")
    program = ExportableLM(converted, MAX_CONTEXT, last_logits_only=True)
    exported = export_program(program)
    save_pt2(exported, out / "model.pt2")
    meta = {"max_context": MAX_CONTEXT, "vocab_size": VOCAB, "bos_id": 0, "eos_id": 1}
    result = lower_to_pte(exported, meta)
    result.write(out / "model.pte")
    save_quantized(converted, QuantConfig(group_size=32), out / "model.safetensors")
    return {"dir": out, "operators": result.operators, "program": program, "meta": meta}
