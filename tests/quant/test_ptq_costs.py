"""tools/ptq_costs.py: PTQ's cost per setting, on the same batches as the QAT stage's PTQ."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from pipeline.quant.config import QuantConfig
from pipeline.quant.convert import post_training_quantize
from pipeline.train.batches import TokenBatches
from pipeline.train.compare import evaluate_models

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tools.ptq_costs import ptq_costs  # noqa: E402


def test_ptq_costs_are_the_stage_ptq_losses_of_each_setting(context_model, converted, micro_data):
    # The copy-task model on text is off its training distribution: its losses only pin
    # that each row is its own setting's PTQ on the same batches, not which costs more.
    def val() -> TokenBatches:
        return TokenBatches(micro_data / "pretrain", "val", 64, 4, seed=0)

    before = {k: v.clone() for k, v in context_model.state_dict().items()}
    settings = [QuantConfig(group_size=32), QuantConfig(scheme="8da2w", group_size=32)]
    base, costs = ptq_costs(context_model, val(), 3, settings)
    expected = evaluate_models({"fp32": context_model, "ptq": converted}, val(), 3)  # the 8da4w g32 PTQ fixture
    assert base == pytest.approx(expected["fp32"]["loss"], abs=1e-6)
    assert costs[0].loss == pytest.approx(expected["ptq"]["loss"], abs=1e-6)
    assert costs[0].gap == pytest.approx(expected["ptq"]["loss"] - expected["fp32"]["loss"], abs=1e-6)
    with torch.no_grad():
        int2 = post_training_quantize(copy.deepcopy(context_model), settings[1])
    assert costs[1].loss == pytest.approx(evaluate_models({"q": int2}, val(), 3)["q"]["loss"], abs=1e-6)
    assert abs(costs[1].loss - costs[0].loss) > 1e-3  # the width was applied
    assert costs[1].label == "8da2w per_group, INT2 embedding"
    assert all(torch.equal(v, before[k]) for k, v in context_model.state_dict().items())  # left unchanged
