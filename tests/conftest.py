"""Shared fixtures: a small built data mixture (tokenizer + pretrain/midtrain/sft)."""

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
