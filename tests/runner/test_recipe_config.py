"""conf/ composition, params.yaml sync, and whole-config validation (keys, types, preflight)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.configbase import ConfigError
from pipeline.recipe import REPO_ROOT, compose, load_params, validate

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO_ROOT),
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def test_params_yaml_is_conf_composed():
    assert load_params(REPO_ROOT / "params.yaml") == compose(), "params.yaml drifted from conf/: run `make params`"


@pytest.mark.parametrize("model", sorted(p.stem for p in (REPO_ROOT / "conf" / "model").glob("*.yaml")))
def test_every_model_composes_and_validates(model):
    recipe = validate(compose([f"model={model}"]))
    assert recipe.model.name == model


def test_micro_experiment_composes():
    recipe = validate(compose(["experiment=micro"]))
    assert recipe.stage.pretrain.steps < 20 and recipe.data.pretrain.total_tokens < 100_000


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.moe.top_k=32"], "model.moe.top_k"),
        (["model.n_kv_heads=3"], "model.n_kv_heads"),
        (["stage.sft.seq_len=4096"], "stage.sft.seq_len"),
        (["data.pretrain.sources.0.weight=-1"], "data.pretrain.sources[0].weight"),
        (["+model.bogus=1"], "model.bogus"),
        (["+stage.pretrain.schedule.gamma=1"], "stage.pretrain.schedule.gamma"),
    ],
)
def test_bad_config_is_named(overrides, key):
    # How fast validation is belongs to bench/bench_config.py (printed, not asserted).
    raw = compose(overrides)
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value).startswith(key + ":"), str(err.value)


def test_zero_weight_sum_is_rejected():
    raw = compose()
    for src in raw["data"]["midtrain"]["sources"]:
        src["weight"] = 0
    with pytest.raises(ConfigError, match=r"^data.midtrain.sources: weights sum to 0"):
        validate(raw)


@pytest.mark.parametrize(
    "path, value, key",
    [
        (("seed",), True, "seed"),  # a bool is an int in Python; not here
        (("stage", "pretrain", "batch_size"), True, "stage.pretrain.batch_size"),
        (("stage", "sft", "schedule", "total_steps"), 6.0, "stage.sft.schedule.total_steps"),
        (("stage", "pretrain", "schedule", "lr"), "1e-3", "stage.pretrain.schedule.lr"),  # YAML 1.1 reads a string
        (("ray", "use_gpu"), 1, "ray.use_gpu"),
        (("model", "moe", "top_k"), False, "model.moe.top_k"),
    ],
)
def test_values_of_the_wrong_type_are_named(path, value, key):
    raw = compose()
    node = raw
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value).startswith(f"{key}: must be "), str(err.value)


def test_a_config_only_mismatch_is_caught_by_validation_not_by_a_stage():
    raw = compose()
    raw["data"]["sft"]["kind"] = "text"
    with pytest.raises(ConfigError, match=r"^data.sft"):
        validate(raw)


def preflight(params: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.runner.preflight", str(params)],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_preflight_rejects_a_top_level_key_no_stage_reads(tmp_path):
    # DVC runs only stages whose declared params changed: a typo of `seed` would be
    # ignored by `dvc repro` without a word. make runs this check before DVC.
    raw = compose()
    raw["sed"] = 1
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = preflight(params)
    assert proc.returncode == 2 and "sed: unknown key" in proc.stderr, proc.stderr
    params.write_text(yaml.safe_dump(compose()))
    assert preflight(params).returncode == 0


@pytest.mark.slow
def test_regenerating_params_never_discards_a_hand_edit_in_silence(tmp_path):
    def regenerate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pipeline.recipe", "params", "-o", str(out), *extra],
            cwd=REPO_ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = tmp_path / "params.yaml"
    assert regenerate().returncode == 0
    generated = out.read_text()
    assert regenerate().returncode == 0 and out.read_text() == generated  # as generated: rewritten freely
    out.write_text(generated.replace("\nseed: 0\n", "\nseed: 0\nsed: 1\n").replace("lr: 0.003", "lr: 0.1"))
    proc = regenerate()
    assert proc.returncode == 2
    assert "differs from conf/ at: stage.pretrain.schedule.lr, sed" in proc.stderr, proc.stderr
    assert "sed: 1" in out.read_text()  # kept
    assert regenerate("--force").returncode == 0 and out.read_text() == generated
    out.write_text(generated + "  broken: [\n")
    proc = regenerate()
    assert proc.returncode == 2 and "does not parse as YAML" in proc.stderr, proc.stderr
