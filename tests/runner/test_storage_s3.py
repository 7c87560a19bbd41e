"""The run storage on a real S3 API: moto's server on 127.0.0.1 with IAM authentication,
stopped by PID. Staging and fetching go through pyarrow's S3 filesystem (the one Ray
Train uses); a wrong bucket, a refused key and missing credentials are named before Ray
starts. The two-node test (tests/e2e/test_cluster.py) checkpoints and resumes there."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import VOCAB
from support import ray_never_starts, s3_server  # noqa: F401 - the fixture applies here

from pipeline.recipe import compose
from pipeline.runner.errors import StageInputError
from pipeline.runner.run import run_stage
from pipeline.runner.storage import COMPLETE, RunStorage, fetch
from pipeline.stages.qat import QAT
from pipeline.stages.train import PRETRAIN
from pipeline.stages.train import STAGES as TRAINING

MOTO = Path(sys.prefix) / "bin" / "moto_server"


@pytest.fixture(scope="module")
def s3():
    with s3_server(MOTO, "recipe-runs") as server:
        yield server


@pytest.fixture
def aws_env(s3, monkeypatch):
    """The user's credentials in this process's environment, as on a driver."""
    for key, value in s3["env"].items():
        monkeypatch.setenv(key, value)
    return s3["env"]


def test_inputs_stage_fetch_and_runs_delete_through_s3(s3, aws_env, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"\x00\x01" * 1000)
    (source / "sub" / "b.txt").write_text("beside")
    storage = RunStorage(s3["uri"]("runs"))
    storage.check_writable()
    uri = storage.stage(source, "mixture-abc")
    assert uri.startswith("s3://recipe-runs/runs/staged/mixture-abc/") and uri.endswith("scheme=http")
    assert storage.stage(source, "mixture-abc") == uri  # content-addressed: found, not copied again
    copy = fetch(uri, cache=tmp_path / "cache")
    assert (copy / "a.bin").read_bytes() == b"\x00\x01" * 1000 and (copy / "sub" / "b.txt").read_text() == "beside"
    assert (copy / COMPLETE).is_file()
    # A Ray Train run folder, deleted once its result is published.
    fs, root = storage._fs("pretrain-0123")
    fs.create_dir(root)
    with fs.open_output_stream(f"{root}/checkpoint_0/model.safetensors") as out:
        out.write(b"weights")
    assert storage.exists("pretrain-0123")
    storage.delete("pretrain-0123")
    assert not storage.exists("pretrain-0123")


def _micro(micro_data: Path, storage: str, stage: str = "pretrain") -> dict:
    mixture = micro_data / ("sft" if stage == "qat" else "pretrain")
    overrides = [
        f"model.vocab_size={VOCAB}",
        f"stage.{stage}.mixture={mixture}",
        f"stage.{stage}.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
        f"stage.{stage}.seq_len=32",
        f"ray.storage_path='{storage}'",  # quoted: the URI's query holds '=' and '&'
        "tracking.enabled=false",
    ]
    if stage == "qat":
        overrides.append(f"stage.qat.text_mixture={micro_data / 'pretrain'}")
    return compose(overrides)


def test_a_wrong_bucket_is_named_before_ray_starts(s3, aws_env, micro_data, tmp_path):
    raw = _micro(micro_data, s3["uri"]("runs").replace("recipe-runs", "no-such-bucket"))
    with pytest.raises(StageInputError) as err:
        run_stage(PRETRAIN, raw, state_dir=tmp_path / "state")
    message = str(err.value)
    assert message.startswith("ray.storage_path: cannot write to s3://no-such-bucket/runs"), message
    assert "Bucket 'no-such-bucket' not found" in message and "AWS_ACCESS_KEY_ID" in message, message


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_a_refused_key_is_named_before_ray_starts(s3, aws_env, micro_data, tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "not-the-key")
    raw = _micro(micro_data, s3["uri"]("runs"))
    with pytest.raises(
        StageInputError, match=r"^ray.storage_path: cannot write to s3://recipe-runs/runs.*ACCESS_DENIED"
    ):
        run_stage(PRETRAIN, raw, state_dir=tmp_path / "state")


def test_credentials_in_the_uri_are_not_printed_and_a_bad_uri_is_named(s3, micro_data, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    # pyarrow takes credentials from the URI's user part.
    uri = s3["uri"]("runs").replace("s3://", "s3://AKIAEXAMPLE:hush@").replace("recipe-runs", "no-such-bucket")
    with pytest.raises(StageInputError) as err:
        run_stage(PRETRAIN, _micro(micro_data, uri), state_dir=tmp_path / "state")
    assert "hush" not in str(err.value) and "s3://***@no-such-bucket/runs" in str(err.value), str(err.value)
    with pytest.raises(StageInputError, match=r"^ray.storage_path: cannot write to .*Unexpected query parameter"):
        run_stage(PRETRAIN, _micro(micro_data, s3["uri"]("runs") + "&colour=blue"), state_dir=tmp_path / "state")
    # A secret key with "/" and "+", in a URI pyarrow cannot parse: its message quotes the
    # URI, and neither copy shows the secret.
    from pipeline.runner.inputs import StorageInput
    from pipeline.runner.storage import RunStorage

    with pytest.raises(StageInputError) as err:
        StorageInput("ray.storage_path", RunStorage("s4://AKIAEXAMPLE:hu/sh+x@recipe-runs/runs")).check()
    assert "hu/sh" not in str(err.value) and str(err.value).count("s4://***@recipe-runs/runs") == 2, str(err.value)


def test_every_training_stage_checks_a_uri_storage_and_leaves_a_path_to_ray(micro_data):
    from pipeline.recipe import validate

    for storage, expected in (("s3://bucket/runs", ["ray.storage_path"]), ("checkpoints", [])):
        recipe = validate(_micro(micro_data, storage))
        for stage in (*TRAINING, QAT):
            keys = [item.key for item in stage.inputs(recipe) if item.key.startswith("ray.")]
            assert keys == expected, (stage.name, storage)
