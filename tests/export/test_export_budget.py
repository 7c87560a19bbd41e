"""The lowering's memory estimate: its arithmetic by hand, and the stage's refusal
naming the keys before any work (pipeline/export/budget.py)."""

from __future__ import annotations

import pytest
from shapes import micro_cfg

from pipeline.export import budget
from pipeline.runner.errors import StageInputError
from pipeline.runner.inputs import LoweringMemoryInput


def test_program_bytes_and_nodes_by_hand():
    cfg = micro_cfg()  # 2 layers, d 64, 4/2 heads of 16, 4 experts of 32, shared 64, tied vocab 512
    L, E = 2, 4
    attn = 64 * 64 + 2 * 64 * 32 + 64 * 64  # wq, wk|wv, wo
    ffn = 3 * 64 * 32 * 4 + 3 * 64 * 64  # routed experts, shared expert
    router = 64 * 4
    norms = L * (2 * 64 + 2 * 16) + 64  # attn/ffn norms, q/k norms; the final norm
    quantized = 512 * 64 + L * (attn + ffn)
    weights = quantized * (1 + 4 / 32) + (L * router + norms) * 4  # int8 storage + FP32 scale per 32
    tied = 512 * 64 * (1 + 4 / 32)  # the head's second copy of the table
    cache = L * 2 * 48 * 2 * 16 * 4  # K and V, 48 positions, 2 heads of 16, FP32
    assert budget.program_weight_bytes(cfg, 48) == int(weights + tied + cache)
    assert budget.graph_nodes(cfg, "fused") == L * budget.NODES_PER_LAYER
    assert budget.graph_nodes(cfg, "xnnpack") == L * (budget.NODES_PER_LAYER + E * budget.NODES_PER_EXPERT)
    peak = budget.lowering_peak_bytes(cfg, "xnnpack", 48)
    assert peak == int(
        budget.BASE_BYTES
        + budget.WEIGHT_COPIES * budget.program_weight_bytes(cfg, 48)
        + budget.BYTES_PER_NODE * budget.graph_nodes(cfg, "xnnpack")
    )


def test_a_lowering_that_will_not_fit_is_refused_naming_the_keys(monkeypatch):
    cfg = micro_cfg()
    need = budget.lowering_peak_bytes(cfg, "xnnpack", 48)
    check = LoweringMemoryInput("stage.export", cfg, "xnnpack", 48)
    monkeypatch.setattr(budget, "available_bytes", lambda: need + 1)
    assert check.check() == need
    monkeypatch.setattr(budget, "available_bytes", lambda: need - 1)
    with pytest.raises(StageInputError) as err:
        check.check()
    message = str(err.value)
    for key in (
        "stage.export.moe=xnnpack",
        "stage.export.max_context=48",
        f"model={cfg.name}",
        "stage.export.moe=fused",
    ):
        assert key in message, message
    # A cluster's worker has its own memory: the driver does not judge it.
    assert LoweringMemoryInput("stage.export", cfg, "xnnpack", 48, on_cluster=True).check() == need


def test_available_memory_is_positive_and_at_most_the_machines():
    import psutil

    assert 0 < budget.available_bytes() <= psutil.virtual_memory().total
