"""The stage runner: every bad input, resource or service problem stops a stage before
Ray starts or a tracking run opens, names the config key, and costs no earlier output.

Most cases call the runner in-process (the checks run before any work, so nothing is
started); the command-line shape (one line, exit code 2) is checked through a stage
script. Cases that need Ray are in test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import VOCAB
from support import free_port, ray_never_starts, snapshot, started  # noqa: F401 - the fixture applies here

from pipeline.configbase import ConfigError
from pipeline.hashing import sha256_file
from pipeline.recipe import REPO_ROOT, compose
from pipeline.runner.errors import ResourceError, StageInputError, StageLockedError
from pipeline.runner.run import run_stage
from pipeline.stages.mix import MIX
from pipeline.stages.train import MIDTRAIN, PRETRAIN, SFT

ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO_ROOT),
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def micro(micro_data: Path, stage: str, *overrides: str) -> dict:
    return compose(
        [
            f"model.vocab_size={VOCAB}",
            f"stage.{stage}.mixture={micro_data / ('sft' if stage == 'sft' else 'pretrain')}",
            f"stage.{stage}.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
            f"stage.{stage}.seq_len=32",
            "tracking.enabled=false",
            *overrides,
        ]
    )


@pytest.fixture
def earlier_output(tmp_path):
    """An output directory holding an earlier result that a failed run must not touch."""
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "keep.txt").write_text("earlier output")
    (out / "metrics.json").write_text('{"val_loss": 1.0}')
    return out


def run(stage, raw, tmp_path):
    return run_stage(stage, raw, state_dir=tmp_path / "state")


def test_missing_mixture_is_named_and_earlier_outputs_survive(micro_data, tmp_path, earlier_output):
    before = snapshot(earlier_output)
    raw = micro(
        micro_data,
        "pretrain",
        f"stage.pretrain.mixture={tmp_path / 'nowhere'}",
        f"stage.pretrain.out_dir={earlier_output}",
    )
    with pytest.raises(StageInputError, match=r"^stage.pretrain.mixture: missing upstream output .*nowhere/manifest"):
        run(PRETRAIN, raw, tmp_path)
    assert snapshot(earlier_output) == before


def test_missing_init_checkpoint_is_named(micro_data, tmp_path):
    raw = micro(micro_data, "midtrain", f"stage.midtrain.init_checkpoint={tmp_path / 'no_model'}")
    missing = r"^stage.midtrain.init_checkpoint: no checkpoint at .*no_model \(has the upstream stage run\?\)"
    with pytest.raises(StageInputError, match=missing):
        run(MIDTRAIN, raw, tmp_path)


def test_sequence_longer_than_the_split_is_named(micro_data):
    raw = micro(
        micro_data, "sft", "stage.sft.init_checkpoint=null", "model.max_seq_len=100000", "stage.sft.seq_len=90000"
    )
    with pytest.raises(StageInputError, match=r"fewer than one window of seq_len\+1=90001"):
        run_stage(SFT, raw, state_dir=Path("/nonexistent"))  # stops before the lock is needed


def _copy_mixture(micro_data: Path, tmp_path: Path, edit) -> Path:
    """A copy of the micro pretrain mixture with ``edit(dir)`` applied and the manifest's
    hashes refreshed, so only the edit is wrong."""
    mixture = tmp_path / "mixture"
    shutil.copytree(micro_data / "pretrain", mixture)
    edit(mixture)
    manifest = json.loads((mixture / "manifest.json").read_text())
    for name, info in manifest["files"].items():
        info["sha256"] = sha256_file(mixture / name)
    (mixture / "manifest.json").write_text(json.dumps(manifest))
    return mixture


def test_a_split_without_target_tokens_is_refused(micro_data, tmp_path):
    def no_targets(mixture: Path) -> None:
        mask = np.load(mixture / "train_loss_mask.npy")
        np.save(mixture / "train_loss_mask.npy", np.zeros_like(mask))

    raw = micro(micro_data, "pretrain", f"stage.pretrain.mixture={_copy_mixture(micro_data, tmp_path, no_targets)}")
    with pytest.raises(StageInputError, match=r"^stage.pretrain.mixture: the train split .* has no target tokens"):
        run(PRETRAIN, raw, tmp_path)


def test_a_damaged_mixture_file_is_named(micro_data, tmp_path):
    mixture = _copy_mixture(micro_data, tmp_path, lambda m: None)
    tokens = np.load(mixture / "val_tokens.npy")
    tokens[0] += 1  # same size, other content
    np.save(mixture / "val_tokens.npy", tokens)
    raw = micro(micro_data, "pretrain", f"stage.pretrain.mixture={mixture}")
    with pytest.raises(StageInputError, match=r"val_tokens.npy does not match the sha256 in its manifest"):
        run(PRETRAIN, raw, tmp_path)


def _checkpoint_for(raw: dict, root: Path, **model_overrides) -> Path:
    """A checkpoint whose meta claims ``raw``'s model but whose tensors come from a
    model built with ``model_overrides``."""
    from dataclasses import asdict

    from pipeline.configbase import from_dict
    from pipeline.model import ModelConfig, Transformer
    from pipeline.train.checkpoint import save_checkpoint

    ours = from_dict(ModelConfig, raw["model"], "model")
    built = from_dict(ModelConfig, {**raw["model"], **model_overrides}, "model")
    return save_checkpoint(root, 1, Transformer(built).state_dict(), None, {"model": asdict(ours)})


def test_an_init_checkpoint_that_does_not_fit_the_model_is_named_from_its_header(micro_data, tmp_path):
    raw = micro(micro_data, "midtrain", f"stage.midtrain.init_checkpoint={tmp_path / 'ckpt'}")
    _checkpoint_for(raw, tmp_path / "ckpt", head_dim=16)
    with pytest.raises(StageInputError) as err:
        run(MIDTRAIN, raw, tmp_path)
    message = str(err.value)
    assert message.startswith("stage.midtrain.init_checkpoint:") and "does not fit the model" in message
    assert "layers.0.attn.wq.weight: checkpoint (64, 128) F32 vs model (128, 128) F32" in message, message


def test_a_corrupt_init_checkpoint_is_named(micro_data, tmp_path):
    raw = micro(micro_data, "midtrain", f"stage.midtrain.init_checkpoint={tmp_path / 'ckpt'}")
    step = _checkpoint_for(raw, tmp_path / "ckpt")
    data = bytearray((step / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (step / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(StageInputError, match=r"model.safetensors does not match the sha256 .*corrupt"):
        run(MIDTRAIN, raw, tmp_path)


def test_an_empty_source_stops_mix_and_keeps_the_earlier_mixture(tmp_path, earlier_output):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')  # rows, but no text
    before = snapshot(earlier_output)
    raw = compose([f"data.out_dir={earlier_output}", "tracking.enabled=false"])
    raw["data"]["midtrain"]["sources"] = [
        {
            "name": "mine",
            "kind": "hf",
            "weight": 1.0,
            "domain": "web",
            "options": {"path": "json", "data_files": str(empty), "licence": "CC0"},
        }
    ]
    with pytest.raises(StageInputError, match=r"data.midtrain.sources\[0\] \('mine', kind hf\) yielded no documents"):
        run(MIX, raw, tmp_path)
    assert snapshot(earlier_output) == before


def test_more_workers_than_the_machine_has_cpus_is_refused_with_the_numbers(micro_data, tmp_path):
    raw = micro(micro_data, "pretrain", "ray.num_workers=64", "ray.cpus_per_worker=2")
    with pytest.raises(ResourceError) as err:
        run(PRETRAIN, raw, tmp_path)
    assert "needs 128 CPUs" in str(err.value) and "ray.num_workers=64" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_where_there_is_none_is_refused_before_ray_starts(micro_data, tmp_path):
    raw = micro(micro_data, "pretrain", "ray.use_gpu=true")
    with pytest.raises(ResourceError) as err:
        run(PRETRAIN, raw, tmp_path)
    assert "needs 1 GPUs" in str(err.value) and "set ray.use_gpu=false" in str(err.value), str(err.value)


def test_compile_without_the_compilers_torch_needs_is_named_before_ray_starts(micro_data, tmp_path, monkeypatch):
    """On CPU inductor's own compiler search (its $CXX or g++) runs with an empty PATH;
    on CUDA, Triton's C compiler."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    raw = micro(micro_data, "pretrain", "stage.pretrain.compile=true")
    with pytest.raises(StageInputError, match=r"^stage.pretrain.compile: torch.compile on CPU needs a C\+\+ compiler"):
        run(PRETRAIN, raw, tmp_path)
    from pipeline.runner.inputs import CompilerInput

    with pytest.raises(
        StageInputError, match=r"^stage.sft.compile: torch.compile on CUDA \(Triton\) needs a C compiler"
    ):
        CompilerInput("stage.sft.compile", gpu=True).check()


def test_a_second_run_into_the_same_outputs_stops_naming_the_holder(micro_data, tmp_path):
    raw = micro(micro_data, "pretrain", f"stage.pretrain.out_dir={tmp_path / 'out'}")
    code = (
        "import sys, time, pathlib\n"
        "from pipeline.runner.lock import stage_lock\n"
        "with stage_lock(pathlib.Path(sys.argv[1]), 'pretrain', sys.argv[2]):\n"
        "    print('holding', flush=True)\n"
        "    time.sleep(600)\n"
    )
    args = [sys.executable, "-c", code, str(tmp_path / "state" / "locks"), f"outputs {(tmp_path / 'out').resolve()}"]
    with started(args, env=ENV, cwd=REPO_ROOT, stdout=subprocess.PIPE) as holder:
        assert holder.stdout.readline().strip() == b"holding"
        with pytest.raises(StageLockedError) as err:
            run(PRETRAIN, raw, tmp_path)
        assert f"pid {holder.pid}" in str(err.value) and "already running" in str(err.value)
    # The OS released the lock with its holder: no stale lock blocks the next run.
    from pipeline.runner.lock import stage_lock

    with stage_lock(tmp_path / "state" / "locks", "pretrain", f"outputs {(tmp_path / 'out').resolve()}"):
        pass


def test_a_second_run_of_the_same_work_into_other_outputs_stops_too(micro_data, tmp_path):
    # A sweep point writes into its own directory but, with the same config, its work
    # has the same fingerprint as a by-hand run: both would train in one Ray run folder.
    from pipeline.recipe import validate
    from pipeline.runner.lock import stage_lock
    from pipeline.runner.spec import StageContext

    raw = micro(micro_data, "pretrain")
    recipe = validate(raw)
    inputs = {item.key: item.check() for item in PRETRAIN.inputs(recipe)}
    key = PRETRAIN.resume(StageContext("pretrain", recipe, raw, tmp_path / "by_hand", inputs)).key
    with stage_lock(tmp_path / "state" / "locks", "pretrain", f"run {key}"):
        with pytest.raises(StageLockedError, match=rf"already running \(run {key};"):
            run_stage(PRETRAIN, raw, sweep_dir=tmp_path / "sweep_point_0", state_dir=tmp_path / "state")


def stage_cli(stage: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # The timeout only catches a hang: MLflow's own client retried a closed port for minutes.
    return subprocess.run(
        [sys.executable, "-m", "pipeline.stages", stage, *args],
        cwd=REPO_ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_names_an_unknown_key_in_one_line_before_ray(tmp_path):
    raw = compose()
    raw["model"]["hidden_size"] = 3
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    proc = stage_cli("pretrain", "--params", str(params))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "stage pretrain: ConfigError: model.hidden_size: unknown key "
        "(known keys: d_model, ffn_dim, global_every, head_dim, init_std, "
        "max_seq_len, moe, n_heads, n_kv_heads, n_layers, name, norm_eps, "
        "qk_norm, rope_theta, sliding_window, tie_embeddings, vocab_size)"
    ]


def test_cli_rejects_a_hydra_override_of_an_unknown_key():
    proc = stage_cli("pretrain", "model.moe.topk=2")
    assert proc.returncode != 0 and "topk" in proc.stderr


def test_an_unreachable_tracking_server_stops_the_stage_before_ray(micro_data, tmp_path):
    port = free_port()
    env = {**ENV, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    proc = stage_cli(
        "pretrain",
        f"model.vocab_size={VOCAB}",
        f"stage.pretrain.mixture={micro_data / 'pretrain'}",
        f"stage.pretrain.tokenizer={micro_data / 'tokenizer' / 'tokenizer.json'}",
        "stage.pretrain.seq_len=32",
        f"stage.pretrain.out_dir={tmp_path / 'out'}",
        env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"tracking store http://127.0.0.1:{port} (MLFLOW_TRACKING_URI) is unreachable" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    import ray.train

    from pipeline.runner.train_job import resume_point
    from pipeline.train.checkpoint import save_checkpoint

    run_dir = tmp_path / "pretrain-0123"
    for i, step in enumerate((3, 6, 9)):  # Ray names its checkpoints by time: oldest first
        save_checkpoint(
            run_dir / f"checkpoint_2026-11-29_10-00-0{i}.000000",
            step,
            {"w": torch.full((4,), step)},
            None,
            {"tokens_seen": step},
        )
    newest = run_dir / "checkpoint_2026-11-29_10-00-02.000000"
    middle = run_dir / "checkpoint_2026-11-29_10-00-01.000000"
    said: list[str] = []
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0x01
    (newest / "model.safetensors").write_bytes(bytes(data))
    ckpt = resume_point(ray.train.Checkpoint.from_directory(str(newest)), say=said.append)
    assert ckpt.step == 6 and torch.equal(ckpt.model_state["w"], torch.full((4,), 6))
    assert "unusable" in said[0] and str(newest) in said[0] and "falling back" in said[1] and "step 6" in said[1]
    (middle / "meta.json").unlink()  # now the middle one is incomplete too
    assert resume_point(ray.train.Checkpoint.from_directory(str(newest)), say=said.append).step == 3
    # Nothing intact at all: start over (rather than fail every rerun), and say so.
    (run_dir / "checkpoint_2026-11-29_10-00-00.000000" / "model.safetensors").unlink()
    assert resume_point(ray.train.Checkpoint.from_directory(str(newest)), say=said.append) is None
    assert "starting over" in said[-1]
    assert resume_point(None) is None


def test_checks_happen_in_the_documented_order(micro_data, tmp_path):
    # A config error wins over a missing input, which wins over a resource problem:
    # the cheapest, most specific message first.
    raw = micro(micro_data, "pretrain", f"stage.pretrain.mixture={tmp_path / 'nowhere'}", "ray.num_workers=64")
    raw["stage"]["pretrain"]["batch_size"] = True
    with pytest.raises(ConfigError, match=r"^stage.pretrain.batch_size"):
        run(PRETRAIN, raw, tmp_path)
    raw["stage"]["pretrain"]["batch_size"] = 4
    with pytest.raises(StageInputError):
        run(PRETRAIN, raw, tmp_path)


def _toy_stage(tmp_path, produce=("result.txt",), log=None):
    """A stage without Ray: it writes ``produce`` into its scratch directory."""
    from pipeline.runner.spec import Stage, StageResult

    def work(ctx):
        for name in produce:
            (ctx.scratch / name).write_text(f"new {name}")
        return StageResult({"value": 1.5}, log=log)

    return Stage(
        name="toy",
        out_dir=lambda recipe: str(tmp_path / "out"),
        inputs=lambda recipe: [],
        params=lambda raw: {"seed": raw["seed"]},
        work=work,
        outputs=("result.txt",),
        resources=lambda recipe: {"CPU": 1},
    )


def test_nothing_is_published_unless_every_declared_output_exists(tmp_path, earlier_output):
    from pipeline.runner.errors import StageError

    stage = _toy_stage(tmp_path, produce=("other.txt",))
    before = snapshot(earlier_output)
    raw = compose(["tracking.enabled=false"])
    with pytest.raises(StageError, match=r"did not produce result.txt .*nothing was published"):
        run_stage(stage, raw, sweep_dir=earlier_output.parent / "sweep", state_dir=tmp_path / "state")
    assert snapshot(earlier_output) == before


def test_a_failure_to_log_published_outputs_does_not_fail_the_stage(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PARENT_ENV

    monkeypatch.delenv(PARENT_ENV, raising=False)

    def log(run, out_dir):
        run.log_artifact(out_dir / "result.txt")
        raise RuntimeError("exporting the model failed")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    stale = tmp_path / ".out.publish-deadbeef"  # left by a killed run
    stale.mkdir()
    metrics = run_stage(_toy_stage(tmp_path, log=log), compose([f"tracking.uri={uri}"]), state_dir=tmp_path / "state")
    assert metrics == {"value": 1.5}
    assert (tmp_path / "out" / "result.txt").read_text() == "new result.txt"
    assert not stale.exists()
    [run] = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("mobilemoe").experiment_id], "tags.stage = 'toy'"
    )
    assert run.info.status == "FINISHED" and run.data.metrics["final/value"] == 1.5
    err = capsys.readouterr().err
    assert "tracking was incomplete" in err and "exporting the model failed" in err


def test_the_run_fingerprint_does_not_depend_on_where_the_files_are(micro_data, tmp_path):
    from dataclasses import replace

    from pipeline.runner.train_job import run_name
    from pipeline.train.config import RayConfig
    from pipeline.train.loop import WorkerJob

    job = WorkerJob(
        stage="pretrain",
        model={"d": 1},
        train={"lr": 1},
        seed=0,
        mixture_dir="/a/mix",
        init_checkpoint="/a/ckpt/step_3",
        extra_meta={"data_manifest_sha256": "x"},
    )
    moved = replace(job, mixture_dir="/elsewhere/mix", init_checkpoint="/elsewhere/ckpt/step_3")
    assert run_name(job, RayConfig()) == run_name(moved, RayConfig())
    assert run_name(job, RayConfig()) != run_name(replace(job, extra_meta={"data_manifest_sha256": "y"}), RayConfig())
    assert run_name(job, RayConfig()) != run_name(job, RayConfig(num_workers=2, cpus_per_worker=1))
