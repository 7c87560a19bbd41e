"""The parts that make a stage run on a cluster, each checked without one (fast).

The two-node run itself is tests/e2e/test_cluster.py; here: what is refused before anything
starts, the run storage (staging and fetching through pyarrow filesystems), a stage
task's inputs and outputs as they cross to another node, the data check every rank
makes before step 0, the capacity arithmetic of the start-up timeout's message, the
artifact URL datasets are logged under on a tracking server, and the rendezvous store
that listens on loopback only.
"""

from __future__ import annotations

import importlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
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
from pipeline.runner.storage import COMPLETE, RunStorage, fetch, is_uri, join_uri, run_storage
from pipeline.runner.train_job import InputMismatchError, local_inputs, stage_inputs, verify_mixture
from pipeline.tracking.config import TrackingConfig
from pipeline.tracking.logger import artifact_url
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
    check_cluster_config(RayConfig(address=CLUSTER, storage_path="/nfs/runs"), TrackingConfig(uri="databricks"))
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
    assert uri.startswith(f"{storage.uri}/staged/mixture-abc/")
    copy = fetch(uri, cache=tmp_path / "cache")
    assert copy.parent == tmp_path / "cache" / "mixture-abc"
    assert {k: v for k, v in _contents(copy).items() if k != COMPLETE} == _contents(source)
    # A second fetch on the node is served from its cache.
    (copy / "a.bin").write_bytes(b"node-local")
    assert (fetch(uri, cache=tmp_path / "cache") / "a.bin").read_bytes() == b"node-local"


def test_a_complete_staged_copy_is_reused_and_an_unfinished_one_never_used(tmp_path):
    source = _folder(tmp_path / "src")
    storage = RunStorage(str(tmp_path / "shared"))
    # A copy a crash left without its marker (or one another driver is still writing).
    unfinished = tmp_path / "shared" / "staged" / "k1" / "0000-unfinished"
    unfinished.mkdir(parents=True)
    (unfinished / "a.bin").write_text("half")
    first = storage.stage(source, "k1")
    assert unfinished.is_dir()  # not ours to delete
    assert not first.endswith("0000-unfinished")
    (Path(first) / "a.bin").write_bytes(b"left as it is")
    assert storage.stage(source, "k1") == first  # content-addressed: not copied again
    assert (Path(first) / "a.bin").read_bytes() == b"left as it is"


def test_drivers_staging_the_same_input_at_once_each_get_a_complete_copy(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    source = tmp_path / "src"
    source.mkdir()
    for i in range(200):
        (source / f"shard{i:03d}.bin").write_bytes(bytes([i % 256]) * 512)
    storage = RunStorage((tmp_path / "shared").as_uri())
    with ThreadPoolExecutor(4) as pool:
        uris = list(pool.map(lambda _: storage.stage(source, "mixture-same"), range(4)))
    for uri in uris:
        copy = fetch(uri, cache=tmp_path / "cache")
        assert {k: v for k, v in _contents(copy).items() if k != COMPLETE} == _contents(source), uri


def test_fetching_an_incomplete_staged_copy_is_refused(tmp_path):
    (tmp_path / "shared" / "staged" / "k" / "c1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        fetch((tmp_path / "shared" / "staged" / "k" / "c1").as_uri(), cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "k" / "c1").exists()


def test_uris_keep_their_query_and_any_scheme_counts():
    assert join_uri("s3://b/runs?endpoint_override=minio:9000&scheme=http", "staged", "k") == (
        "s3://b/runs/staged/k?endpoint_override=minio:9000&scheme=http"
    )
    assert join_uri("/nfs/runs/", "x") == "/nfs/runs/x"
    assert is_uri("file:/mnt/runs") and is_uri("gs://b") and not is_uri("/mnt/runs") and not is_uri("runs")
    storage = RunStorage("s3://b/runs?region=eu-west-1")
    assert storage.child("run-1") == "s3://b/runs/run-1?region=eu-west-1"


def test_deleting_a_run_goes_through_the_storage_filesystem(tmp_path):
    storage = RunStorage((tmp_path / "shared").as_uri())
    (tmp_path / "shared" / "run-1" / "checkpoint_0").mkdir(parents=True)
    assert storage.exists("run-1")
    storage.delete("run-1")
    storage.delete("run-never")  # nothing to delete: fine
    assert not (tmp_path / "shared" / "run-1").exists()


# ---------------------------------------------------------------- a stage task on another node


def _task(tokenizer: Path, mixture: Path, out: Path, files: dict, log: Path, scale: int) -> int:
    """Stands for a stage's task: reads Ins (members of one, one inside a dict), writes
    two Outs (one positional, one by keyword)."""
    (log / "bench.txt").write_text(files["conf/bench.jsonl"].read_text())
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
    bench = tmp_path / "elsewhere" / "bench.jsonl"
    bench.parent.mkdir()
    bench.write_text("BENCH")
    out, log = tmp_path / "driver" / "mix", tmp_path / "driver" / "log"
    out.mkdir(parents=True)
    (out / "result.txt").write_text("stale")
    (out / "kept.txt").write_text("kept")
    (out / "nested").mkdir()
    (out / "nested" / "stale.bin").write_bytes(b"from an earlier run")
    args = [remote.In(tokenizer), remote.In(mixture, only=("a.bin", "sub/b.txt")), remote.Out(out)]
    kwargs = {"files": {"conf/bench.jsonl": remote.In(bench)}, "log": remote.Out(log), "scale": 3}
    shipped_args, shipped_kwargs = remote._ship(args), remote._ship(kwargs)
    assert str(tmp_path) not in repr((shipped_args, shipped_kwargs)).replace(repr(b"TOKENIZER"), "")
    result, packed = remote._on_node(_task, shipped_args, shipped_kwargs)
    assert result == 6
    assert set(packed) == {2, "log"}  # each Out's tar under its argument
    for key, path in ((2, out), ("log", log)):
        remote._land(packed[key], path)
    assert (out / "result.txt").read_text() == "TOKENIZER|a.bin,sub|3"
    assert _contents(out / "nested") == {"x.bin": b"\x07\x07\x07"}  # replaced, not merged
    assert (out / "kept.txt").read_text() == "kept"
    assert _contents(log) == {"bench.txt": b"BENCH"}


def _read_pair(program: Path) -> str:
    return program.read_text() + "|" + program.with_suffix(".kernels.json").read_text()


def test_a_file_travels_with_the_files_beside_it_and_only_those(tmp_path):
    program = tmp_path / "export" / "model.pte"
    program.parent.mkdir()
    program.write_text("PROGRAM")
    program.with_suffix(".kernels.json").write_text("KERNELS")
    (program.parent / "model.pt2").write_text("not sent")
    shipped = remote._ship([remote.In(program, beside=("model.kernels.json",))])
    assert b"not sent" not in shipped[0].data
    result, _ = remote._on_node(_read_pair, shipped, {})
    assert result == "PROGRAM|KERNELS"
    with pytest.raises(ValueError, match="only a file has files beside it"):
        remote._ship([remote.In(program.parent, beside=("x",))])


def test_an_out_inside_a_container_is_refused(tmp_path):
    with pytest.raises(ValueError, match="inside a container"):
        remote._ship([[remote.Out(tmp_path)]])


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
    assert staged.init_checkpoint.startswith(str(tmp_path / "shared" / "staged" / "checkpoint-"))
    fetched = local_inputs(staged, staged=True, cache=tmp_path / "cache")
    assert _contents(Path(fetched.mixture_dir)) == {**_contents(Path(job.mixture_dir)), COMPLETE: b""}
    assert _contents(Path(fetched.init_checkpoint)) == {**_contents(Path(job.init_checkpoint)), COMPLETE: b""}


def test_a_changed_staged_copy_stops_the_rank_and_leaves_its_node_cache(job, tmp_path):
    staged = stage_inputs(job, RunStorage(str(tmp_path / "shared")))
    manifest = json.loads((Path(job.mixture_dir) / "manifest.json").read_text())
    name = sorted(manifest["files"])[-1]
    with (Path(staged.mixture_dir) / name).open("ab") as f:
        f.write(b"\x00")  # the shared copy changed after the driver validated it
    with pytest.raises(InputMismatchError, match=name):
        local_inputs(staged, staged=True, cache=tmp_path / "cache")
    assert not any((tmp_path / "cache").rglob(name))  # dropped: a retry fetches again


def test_the_checkpoint_is_staged_under_the_hash_of_all_its_files(job, tmp_path):
    storage = RunStorage(str(tmp_path / "shared"))
    first = stage_inputs(job, storage).init_checkpoint
    (Path(job.init_checkpoint) / "meta.json").write_text("{}")  # same weights, other metadata
    assert Path(stage_inputs(job, storage).init_checkpoint).parent != Path(first).parent


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

    # Undone after the test: the wrapper goes into torch's module for the process.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    monkeypatch.setattr(rendezvous, "_create_c10d_store", rendezvous._create_c10d_store)
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


def test_the_worker_setup_imports_no_torch_and_binds_the_store_when_torch_comes():
    """Most Ray workers (Ray Train's controller and helper actors) never use torch: the
    setup hook must not import it (1.8 s a worker), yet the first import of torch's
    rendezvous module, even as ``from ... import``, must see the bound factory."""
    script = """
import sys
from pipeline.runner.cluster import worker_setup
worker_setup()
worker_setup()  # twice, as a reused process might: one hook
assert "torch" not in sys.modules, "the setup hook imported torch"
from pipeline.runner.rendezvous import _AfterImport
assert sum(isinstance(f, _AfterImport) for f in sys.meta_path) == 1, sys.meta_path
from torch.distributed.rendezvous import _create_c10d_store
assert getattr(_create_c10d_store, "bound_to_master_addr", False), "imported unbound"
assert not any(isinstance(f, _AfterImport) for f in sys.meta_path), "the hook stayed"
loader = sys.modules["torch.distributed.rendezvous"].__loader__
assert "exec_module" not in vars(loader), "the loader kept the wrapper"
rdzv = sys.modules["torch.distributed.rendezvous"]  # (the attribute of that name is a function)
worker_setup()  # torch already loaded: bound at once, and never wrapped twice
assert rdzv._create_c10d_store is _create_c10d_store
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "MOBILEMOE_EMBEDDED_RAY"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_import_hook_patches_after_execution_and_again_after_a_failed_import(tmp_path, monkeypatch):
    from pipeline.runner.rendezvous import _AfterImport

    (tmp_path / "hookpkg").mkdir()
    (tmp_path / "hookpkg" / "__init__.py").write_text("")
    flag = tmp_path / "fail_once"
    flag.write_text("")
    (tmp_path / "hookpkg" / "mod.py").write_text(
        f"import pathlib\nflag = pathlib.Path({str(flag)!r})\nif flag.exists():\n"
        "    flag.unlink()\n    raise RuntimeError('first import fails')\nVALUE = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    calls = []

    def then() -> None:  # sees the executed module, before the import returns
        calls.append(sys.modules["hookpkg.mod"].VALUE)

    sys.meta_path.insert(0, _AfterImport("hookpkg.mod", then))
    try:
        with pytest.raises(RuntimeError, match="first import fails"):
            importlib.import_module("hookpkg.mod")
        assert calls == [] and any(isinstance(f, _AfterImport) for f in sys.meta_path)  # back for the retry
        from hookpkg.mod import VALUE  # noqa: F401 - the retry

        assert calls == [1] and not any(isinstance(f, _AfterImport) for f in sys.meta_path)
        assert "exec_module" not in vars(sys.modules["hookpkg.mod"].__loader__)
    finally:
        for name in ("hookpkg.mod", "hookpkg"):
            sys.modules.pop(name, None)


# ---------------------------------------------------------------- the mix task reads its node's sources


def test_a_mix_task_on_a_node_with_other_source_data_stops_before_building(tmp_path, monkeypatch):
    import platform

    from pipeline.data.base import DataError
    from pipeline.data.build import build_into, source_origins
    from pipeline.recipe import compose, validate

    data = validate(compose(["experiment=micro"])).data
    mixtures = {name: getattr(data, name) for name in ("pretrain", "midtrain", "sft")}
    checked = source_origins(mixtures)  # on the machine that checked the inputs
    fortunes = next(k for k in checked if "kind fortunes" in k and k.startswith("data.pretrain"))
    assert len(checked[fortunes]["fortune/fortunes"]) == 64
    monkeypatch.setattr(platform, "python_version", lambda: "3.11.99")  # this node's interpreter
    elsewhere = {**checked, fortunes: {**checked[fortunes], "fortune/fortunes": "0" * 64}}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DataError) as err:
        build_into(out, *mixtures.values(), 4096, origins=elsewhere)
    assert "data.pretrain.sources[2] ('python_docs', kind python_docs): python is 3.11.99 here" in str(err.value)
    assert f"{fortunes}: fortune/fortunes is {checked[fortunes]['fortune/fortunes']} here, {'0' * 64} there" in str(
        err.value
    )
    assert not any(out.iterdir())
