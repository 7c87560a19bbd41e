"""conf/ composition, params.yaml sync, and bad input stopping stages before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.configbase import ConfigError
from pipeline.recipe import REPO_ROOT, compose, load_params, validate

ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def test_params_yaml_is_conf_composed():
    assert load_params(REPO_ROOT / "params.yaml") == compose(), \
        "params.yaml drifted from conf/: run `make params`"


@pytest.mark.parametrize("model", sorted(p.stem for p in (REPO_ROOT / "conf" / "model").glob("*.yaml")))
def test_every_model_composes_and_validates(model):
    recipe = validate(compose([f"model={model}"]))
    assert recipe.model.name == model


def test_micro_experiment_composes():
    recipe = validate(compose(["experiment=micro"]))
    assert recipe.stage.pretrain.steps < 20 and recipe.data.pretrain.total_tokens < 100_000


@pytest.mark.parametrize("overrides, key", [
    (["model.moe.top_k=32"], "model.moe.top_k"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["stage.sft.seq_len=4096"], "stage.sft.seq_len"),
    (["data.pretrain.sources.0.weight=-1"], "data.pretrain.sources[0].weight"),
    (["+model.bogus=1"], "model.bogus"),
    (["+stage.pretrain.schedule.gamma=1"], "stage.pretrain.schedule.gamma"),
])
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


def run_stage(stage: str, *args: str, cwd: Path = REPO_ROOT, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_stage_cli_rejects_unknown_key_in_params_file(tmp_path):
    raw = compose()
    raw["model"]["hidden_size"] = 3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = run_stage("pretrain", "--params", str(params))
    assert proc.returncode != 0
    assert "model.hidden_size: unknown key" in proc.stderr
    assert "Ray" not in proc.stderr + proc.stdout  # stopped before Ray started


def test_stage_cli_rejects_hydra_override_of_unknown_key():
    proc = run_stage("pretrain", "model.moe.topk=2")
    assert proc.returncode != 0
    assert "topk" in proc.stderr


def test_missing_upstream_output_stops_before_ray_and_keeps_outputs(tmp_path):
    out = tmp_path / "pretrain_out"
    (out / "model").mkdir(parents=True)
    sentinel = out / "model" / "keep.txt"
    sentinel.write_text("earlier output")
    proc = run_stage("pretrain", f"stage.pretrain.mixture={tmp_path / 'nowhere'}",
                     f"stage.pretrain.out_dir={out}", "tracking.enabled=false")
    assert proc.returncode != 0
    assert f"missing upstream output {tmp_path / 'nowhere' / 'manifest.json'}" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert sentinel.read_text() == "earlier output"


def test_missing_init_checkpoint_is_named(tmp_path, micro_data):
    proc = run_stage("midtrain", f"stage.midtrain.init_checkpoint={tmp_path / 'no_model'}",
                     f"stage.midtrain.mixture={micro_data / 'midtrain'}", f"model.vocab_size=512",
                     f"stage.midtrain.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
                     "tracking.enabled=false")
    assert proc.returncode != 0
    assert f"no complete checkpoint under {tmp_path / 'no_model'} (stage.midtrain.init_checkpoint" in proc.stderr, \
        proc.stderr[-2000:]


def test_sequence_longer_than_the_split_is_caught_before_ray(micro_data):
    proc = run_stage("sft", "stage.sft.init_checkpoint=null", f"stage.sft.mixture={micro_data / 'sft'}",
                     f"stage.sft.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}", "model.vocab_size=512",
                     "model.max_seq_len=100000", "stage.sft.seq_len=90000", "tracking.enabled=false")
    assert proc.returncode != 0
    assert "fewer than one window of stage.sft.seq_len+1=90001" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_empty_source_stops_mix_before_ray_and_keeps_outputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')  # rows, but no text
    out_dir = tmp_path / "mix"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("earlier mixture")
    source = ("{name: mine, kind: hf, weight: 1.0, domain: web, "
              f"options: {{path: json, data_files: '{empty}', licence: CC0}}}}")
    proc = run_stage("mix", f"data.out_dir={out_dir}", "tracking.enabled=false",
                     f"data.midtrain.sources=[{source}]")
    assert proc.returncode != 0
    assert "data.midtrain.sources[0] ('mine', kind hf) yielded no documents" in proc.stderr, proc.stderr[-2000:]
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout
    assert (out_dir / "keep.txt").read_text() == "earlier mixture"
