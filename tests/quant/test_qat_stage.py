"""The QAT stage's bad inputs: each stops before Ray with a message naming the key or
file, and leaves the stage's earlier outputs and the upstream SFT model untouched.
(The stage's run itself is in test_pipeline_e2e.py.)"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import VOCAB
from support import ray_never_starts, snapshot  # noqa: F401 - the fixture applies here too

from pipeline.configbase import ConfigError, from_dict
from pipeline.model import ModelConfig, Transformer
from pipeline.recipe import compose
from pipeline.runner.errors import StageInputError
from pipeline.runner.run import run_stage
from pipeline.stages.qat import QAT
from pipeline.train.checkpoint import save_checkpoint


def qat_raw(micro_data: Path, sft_model: Path, out: Path, *overrides: str) -> dict:
    return compose(
        [
            f"model.vocab_size={VOCAB}",
            f"stage.qat.mixture={micro_data / 'sft'}",
            f"stage.qat.text_mixture={micro_data / 'pretrain'}",
            f"stage.qat.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
            f"stage.qat.init_checkpoint={sft_model}",
            f"stage.qat.out_dir={out}",
            "stage.qat.seq_len=32",
            "tracking.enabled=false",
            *overrides,
        ]
    )


def _sft_model(raw: dict, root: Path, **model_overrides) -> Path:
    """An SFT-like checkpoint of ``raw``'s model (or of another one, with overrides)."""
    cfg = from_dict(ModelConfig, {**raw["model"], **model_overrides}, "model")
    return save_checkpoint(root, 3, Transformer(cfg).state_dict(), None, {"model": asdict(cfg)})


@pytest.fixture
def setting(micro_data, tmp_path):
    out = tmp_path / "out"
    (out / "quantized").mkdir(parents=True)
    (out / "quantized" / "model.safetensors").write_bytes(b"an earlier result")
    (out / "metrics.json").write_text('{"loss_qat_int4": 1.0}')
    sft = tmp_path / "sft_model"
    return micro_data, sft, out


def _expect(raw: dict, tmp_path: Path, error: type, pattern: str, watched: list[Path]) -> None:
    before = [snapshot(p) if p.exists() else None for p in watched]
    with pytest.raises(error, match=pattern):
        run_stage(QAT, raw, state_dir=tmp_path / "state")
    assert [snapshot(p) if p.exists() else None for p in watched] == before


def test_a_missing_sft_checkpoint_is_named(setting, tmp_path):
    micro_data, sft, out = setting
    raw = qat_raw(micro_data, sft, out)
    _expect(raw, tmp_path, StageInputError, r"^stage\.qat\.init_checkpoint: no checkpoint at ", [out])


def test_a_truncated_sft_checkpoint_is_named(setting, tmp_path):
    micro_data, sft, out = setting
    raw = qat_raw(micro_data, sft, out)
    step = _sft_model(raw, sft)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _expect(
        raw,
        tmp_path,
        StageInputError,
        r"^stage\.qat\.init_checkpoint: .*model\.safetensors is \d+ bytes, expected \d+ \(truncated",
        [out, sft],
    )


def test_a_checkpoint_of_another_architecture_is_named(setting, tmp_path):
    micro_data, sft, out = setting
    raw = qat_raw(micro_data, sft, out)
    _sft_model(raw, sft, n_layers=2)
    pattern = r"^stage\.qat\.init_checkpoint: model config differs from .* in model\.n_layers"
    _expect(raw, tmp_path, StageInputError, pattern, [out, sft])


def test_an_unknown_scheme_is_named(setting, tmp_path):
    micro_data, sft, out = setting
    raw = qat_raw(micro_data, sft, out, "stage.qat.scheme=int3")
    _sft_model(raw, sft)
    _expect(
        raw,
        tmp_path,
        ConfigError,
        r"^stage\.qat\.scheme: unknown scheme 'int3' \(known: 8da4w, 8da3w, 8da2w\)",
        [out, sft],
    )


def test_a_group_size_that_does_not_divide_a_weight_names_the_tensor(setting, tmp_path):
    micro_data, sft, out = setting
    raw = qat_raw(micro_data, sft, out, "stage.qat.group_size=48")
    _sft_model(raw, sft)
    pattern = r"^stage\.qat\.group_size: 48 does not divide the input dim 128 of embed\.weight"
    _expect(raw, tmp_path, ConfigError, pattern, [out, sft])
