"""The parts that make a stage run on a cluster, each checked without one (fast).

The two-node run itself is tests/test_cluster.py; here: what is refused before anything
starts, the run storage (staging and fetching through pyarrow filesystems), a stage
task's inputs and outputs as they cross to another node, the data check every rank
makes before step 0, the capacity arithmetic of the start-up timeout's message, the
artifact URL datasets are logged under on a tracking server, and the rendezvous store
that listens on loopback only.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import tarfile
from dataclasses import replace
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from support import free_port

from pipeline.configbase import ConfigError
from pipeline.hashing import sha256_file, sha256_json
from pipeline.runner import remote
from pipeline.runner.cluster import _room, check_cluster_config, missing_text
from pipeline.runner.storage import COMPLETE, RunStorage, fetch, run_storage
from pipeline.runner.train_job import InputMismatchError, local_inputs, stage_inputs, verify_mixture
from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.runs import artifact_url
from pipeline.train.config import RayConfig
from pipeline.train.loop import WorkerJob

CLUSTER = "10.1.2.3:6379"


# ---------------------------------------------------------------- refused up front


@pytest.mark.parametrize("tracking_uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns"])
def test_a_cluster_refuses_a_tracking_store_only_this_machine_sees(tracking_uri):
    ray = RayConfig(address=CLUSTER, storage_path="/mnt/shared/runs")
    with pytest.raises(ConfigError, match=r"tracking\.uri: .*mlflow server"):
        check_cluster_config(ray, TrackingConfig(uri=tracking_uri))


def test_a_cluster_refuses_a_relative_storage_path(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"ray\.storage_path: 'checkpoints' is a relative path"):
        check_cluster_config(RayConfig(address=CLUSTER), TrackingConfig(uri="http://10.1.2.3:5000"))


def test_ray_address_in_the_environment_counts_as_a_cluster(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", CLUSTER)
    with pytest.raises(ConfigError, match="tracking.uri"):
        check_cluster_config(RayConfig(storage_path="s3://bucket/runs"), TrackingConfig(uri="sqlite:///x.db"))


def test_a_cluster_accepts_shared_storage_and_a_server_and_embedded_ray_accepts_anything(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    check_cluster_config(RayConfig(address=CLUSTER, storage_path="gs://b/runs"), TrackingConfig(uri="http://h:5000"))
    check_cluster_config(RayConfig(address=CLUSTER, storage_path="/nfs/runs"), TrackingConfig(enabled=False))
    check_cluster_config(RayConfig(), TrackingConfig(uri="sqlite:///mlflow.db"))


@pytest.mark.parametrize(("key", "value"), [("max_failures", -2), ("max_failures", 1.5), ("start_timeout_s", 0)])
def test_failure_policy_values_are_validated(key, value):
    with pytest.raises(ConfigError, match=key):
        RayConfig(**{key: value})


def test_the_cluster_preset_asks_for_its_storage(monkeypatch):
    from pipeline.recipe import compose, validate

    with pytest.raises(ConfigError, match=r"ray\.storage_path: is not set"):
        validate(compose(["ray=cluster"]))
    recipe = validate(compose(["ray=cluster", "ray.storage_path=s3://bucket/runs"]))
    assert recipe.ray.address == "auto" and recipe.ray.storage_path == "s3://bucket/runs"


def test_storage_uris_are_never_rewritten_and_relative_paths_lie_under_the_repository(tmp_path):
    assert run_storage("s3://bucket/runs", on_cluster=True, repo_root=tmp_path).uri == "s3://bucket/runs"
    assert run_storage("/nfs/runs", on_cluster=True, repo_root=tmp_path).uri == "/nfs/runs"
    assert run_storage("ckpt", on_cluster=False, repo_root=tmp_path).uri == str(tmp_path / "ckpt")


# ---------------------------------------------------------------- run storage


def _folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "a.bin").write_bytes(b"\x00\x01alpha")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("beta")
    return root


def _contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_staging_and_fetching_through_a_file_uri_round_trips(tmp_path):
    source = _folder(tmp_path / "src")
    storage = RunStorage((tmp_path / "shared").as_uri())
    uri = storage.stage(source, "mixture-abc")
    assert uri == f"{storage.uri}/staged/mixture-abc"
    copy = fetch(uri, cache=tmp_path / "cache")
    assert copy == tmp_path / "cache" / "mixture-abc"
    assert {k: v for k, v in _contents(copy).items() if k != COMPLETE} == _contents(source)
    # A second fetch on the node is served from its cache.
    (copy / "a.bin").write_bytes(b"node-local")
    assert (fetch(uri, cache=tmp_path / "cache") / "a.bin").read_bytes() == b"node-local"


def test_a_complete_staged_copy_is_reused_and_a_partial_one_replaced(tmp_path):
    source = _folder(tmp_path / "src")
    storage = RunStorage(str(tmp_path / "shared"))
    staged = tmp_path / "shared" / "staged"
    storage.stage(source, "k1")
    (staged / "k1" / "a.bin").write_bytes(b"left as it is")
    storage.stage(source, "k1")
    assert (staged / "k1" / "a.bin").read_bytes() == b"left as it is"  # content-addressed: not copied again
    # An interrupted copy (no marker, a stray file) is replaced by a full one.
    (staged / "k2").mkdir()
    (staged / "k2" / "stray").write_text("half")
    storage.stage(source, "k2")
    assert not (staged / "k2" / "stray").exists()
    assert (staged / "k2" / "sub" / "b.txt").read_text() == "beta"


def test_fetching_an_incomplete_staged_copy_is_refused(tmp_path):
    (tmp_path / "shared" / "staged" / "k").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        fetch((tmp_path / "shared" / "staged" / "k").as_uri(), cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "k").exists()


def test_deleting_a_run_goes_through_the_storage_filesystem(tmp_path):
    storage = RunStorage((tmp_path / "shared").as_uri())
    (tmp_path / "shared" / "run-1" / "checkpoint_0").mkdir(parents=True)
    assert storage.exists("run-1")
    storage.delete("run-1")
    storage.delete("run-never")  # nothing to delete: fine
    assert not (tmp_path / "shared" / "run-1").exists()


# ---------------------------------------------------------------- a stage task on another node


def _task(tokenizer: Path, mixture: Path, out: Path, scale: int) -> int:
    """Stands for a stage's task: reads an In and a member of another, writes an Out."""
    names = sorted(p.name for p in mixture.iterdir())
    (out / "result.txt").write_text(f"{tokenizer.read_text()}|{','.join(names)}|{scale}")
    (out / "nested").mkdir()
    (out / "nested" / "x.bin").write_bytes(b"\x07" * scale)
    return scale * 2


def test_a_task_on_another_node_gets_its_inputs_and_its_outputs_land_in_the_driver_folder(tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("TOKENIZER")
    mixture = _folder(tmp_path / "mixture")
    (mixture / "not-sent.bin").write_bytes(b"big")
    out = tmp_path / "driver" / "mix"
    out.mkdir(parents=True)
    (out / "result.txt").write_text("stale")
    (out / "kept.txt").write_text("kept")
    (out / "nested").mkdir()
    (out / "nested" / "stale.bin").write_bytes(b"from an earlier run")
    args = [remote.In(tokenizer), remote.In(mixture, only=("a.bin", "sub/b.txt")), remote.Out(out)]
    shipped = [remote._ship(v) for v in args]
    assert all(isinstance(v, remote._Packed) for v in shipped)  # no driver path crosses
    assert str(tmp_path) not in repr([v.name for v in shipped])
    result, packed = remote._on_node(_task, shipped, {"scale": 3})
    assert result == 6
    remote._land(packed[0], out)
    assert (out / "result.txt").read_text() == "TOKENIZER|a.bin,sub|3"
    assert _contents(out / "nested") == {"x.bin": b"\x07\x07\x07"}  # replaced, not merged
    assert (out / "kept.txt").read_text() == "kept"


def test_a_returned_tar_cannot_write_outside_its_folder(tmp_path):
    buffer = BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, BytesIO(b"bad"))
    (tmp_path / "land").mkdir()
    with pytest.raises(tarfile.OutsideDestinationError):
        remote._unpack(buffer.getvalue(), tmp_path / "land")
    assert not (tmp_path / "escaped.txt").exists()


# ---------------------------------------------------------------- every rank checks its data


@pytest.fixture
def job(micro_data, tmp_path) -> WorkerJob:
    mixture = tmp_path / "mix"
    shutil.copytree(micro_data / "pretrain", mixture)
    init = _folder(tmp_path / "init")
    (init / "model.safetensors").write_bytes(b"weights")
    manifest = json.loads((mixture / "manifest.json").read_text())
    meta = {"data_manifest_sha256": sha256_json(manifest), "init_sha256": sha256_file(init / "model.safetensors")}
    return WorkerJob("pretrain", {}, {}, 0, str(mixture), str(init), extra_meta=meta)


def test_a_rank_reading_the_validated_data_passes_the_check(job, tmp_path):
    assert local_inputs(job, staged=False) == job
    staged = stage_inputs(job, RunStorage(str(tmp_path / "shared")))
    assert staged.mixture_dir.startswith(str(tmp_path / "shared" / "staged" / "mixture-"))
    fetched = local_inputs(staged, staged=True)
    assert _contents(Path(fetched.mixture_dir)).keys() - {COMPLETE} == _contents(Path(job.mixture_dir)).keys()
    shutil.rmtree(Path(fetched.mixture_dir))  # the node cache is /tmp: leave it as found
    shutil.rmtree(Path(fetched.init_checkpoint))


def test_a_rank_reading_a_changed_data_file_stops_naming_it(job):
    manifest = json.loads((Path(job.mixture_dir) / "manifest.json").read_text())
    name = sorted(manifest["files"])[0]
    target = Path(job.mixture_dir) / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: same size, same manifest, other tokens
    target.write_bytes(bytes(data))
    with pytest.raises(InputMismatchError, match=name):
        verify_mixture(Path(job.mixture_dir), job.extra_meta["data_manifest_sha256"])


def test_a_rank_reading_another_mixture_stops(job):
    other = replace(job, extra_meta={**job.extra_meta, "data_manifest_sha256": "0" * 64})
    with pytest.raises(InputMismatchError, match="another mixture"):
        local_inputs(other, staged=False)


def test_a_rank_reading_another_starting_checkpoint_stops(job):
    (Path(job.init_checkpoint) / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(InputMismatchError, match="model.safetensors"):
        local_inputs(job, staged=False)


# ---------------------------------------------------------------- capacity, named


def _node(ip: str, cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    return {"Alive": alive, "NodeManagerAddress": ip, "Resources": {"CPU": cpu, "GPU": gpu, "memory": 1e9}}


def test_room_counts_whole_workers_per_alive_node():
    nodes = [_node("10.0.0.1", 5), _node("10.0.0.2", 3.5, gpu=1), _node("10.0.0.3", 64, alive=False)]
    assert _room(nodes, RayConfig(cpus_per_worker=1)) == 5 + 3
    assert _room(nodes, RayConfig(cpus_per_worker=2)) == 2 + 1  # no worker straddles two nodes
    assert _room(nodes, RayConfig(cpus_per_worker=1, use_gpu=True)) == 0 + 1


def test_the_missing_resources_are_named():
    nodes = [_node("10.0.0.1", 5), _node("10.0.0.9", 8, alive=False)]
    text = missing_text(RayConfig(num_workers=4, cpus_per_worker=2), nodes)
    assert "4 workers x 2 CPU" in text
    assert "can hold 2" in text
    assert "1 alive node(s): 10.0.0.1 (CPU 5, GPU 0)" in text


# ---------------------------------------------------------------- tracking server URLs


def test_proxied_artifacts_are_logged_by_their_download_url():
    server = "http://127.0.0.1:5123"
    assert (
        artifact_url(server, "mlflow-artifacts:/7/abc/artifacts/datasets/mix.json")
        == "http://127.0.0.1:5123/api/2.0/mlflow-artifacts/artifacts/7/abc/artifacts/datasets/mix.json"
    )
    assert (
        artifact_url(server, "mlflow-artifacts://10.0.0.5:9000/7/abc/artifacts/d.json")
        == "http://10.0.0.5:9000/api/2.0/mlflow-artifacts/artifacts/7/abc/artifacts/d.json"
    )
    assert artifact_url(server, "s3://bucket/7/abc/artifacts/d.json") == "s3://bucket/7/abc/artifacts/d.json"


# ---------------------------------------------------------------- rendezvous on loopback


def _listening(port: int) -> list[str]:
    import psutil

    return [
        c.laddr.ip
        for c in psutil.Process().net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


def test_rank_zero_store_listens_on_the_master_address_only(monkeypatch):
    import torch.distributed as dist

    from pipeline.runner.rendezvous import bind_store_to_master_addr

    port = free_port()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    bind_store_to_master_addr()
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=60))
    try:
        ips = _listening(port)
        assert ips, f"nothing listens on the rendezvous port {port}"
        assert all(ipaddress.ip_address(ip).is_loopback for ip in ips), ips
        tensor = __import__("torch").ones(2)
        dist.all_reduce(tensor)  # the group works through the bound store
        assert tensor.tolist() == [1.0, 1.0]
    finally:
        dist.destroy_process_group()
