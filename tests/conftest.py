"""Shared fixtures: a small built data mixture (tokenizer + pretrain/midtrain/sft), and one
micro MoE converted to INT4 and lowered to a .pte (about 30 s on 2 cores, built once for
the export and profile tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.data.build import build_all
from pipeline.data.mixing import MixtureConfig

VOCAB = 512

# Modules that take minutes, in the order a worker should start them: xdist's loadscope
# hands out whole modules (Makefile: --no-loadscope-reorder keeps this order), and a long
# module that starts last leaves the other worker idle for its whole length (the recovery
# drill did: 7 of the suite's 23 minutes on one core). Longest first, the rest as collected.
LONG_MODULES = (
    "tests/e2e/test_pipeline_e2e.py",
    "tests/e2e/test_recovery_and_sweep.py",
    "tests/e2e/test_cluster.py",
    "tests/export/test_kv_cache.py",
    "tests/profile/test_profile.py",
    "tests/tracking/test_tracking_faults.py",
)


def pytest_configure(config):
    """One intra-op thread per worker when the workers fill the cores. torch's default (one
    thread per core) in each of two workers oversubscribes 2 cores, and the micro models'
    small ops spend the difference spinning: measured on a 2-core Xeon, 30 micro training
    steps took 1.89 s with 2 threads and 0.51 s with 1, alone; under two workers the
    KV-cache module's fixture took 106 s against 10 s. Subprocesses (Ray, make repro) keep
    their own settings; tests that compare results across processes compare within one."""
    missing = [name for name in LONG_MODULES if not (config.rootpath / name).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py LONG_MODULES names modules that do not exist: {missing}")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 0:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


def pytest_collection_modifyitems(config, items):
    """Put LONG_MODULES first, in their order; the sort is stable, so every worker collects
    the same list (xdist checks) and the other modules keep pytest's order."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


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
