"""Scale-out: stages on a two-node Ray cluster whose second node cannot see the repository.

Everything runs on 127.0.0.1 and is stopped by PID: a Ray head (1 CPU), a second node
(1 CPU) started in its own mount namespace where the repository and the editable
install are hidden (only the venv's packages remain, as on a node built from
``requirements.lock``), an S3 API (moto's server, IAM authentication on) as the run
storage (``ray.storage_path``: staged inputs, Ray Train's checkpoints), whose
credentials every node and the driver read from their environment, and an ``mlflow
server``. The driver runs the stages in a
git copy of the repository on the micro preset, as a user would on the cluster's login
node.

What is shown: the mix stage's task, forced onto the second node, leaves its outputs in
the driver's ``data/mix`` and MLflow records exactly those; pretraining with two workers,
one per node, survives the loss of the second node's raylet (the failure policy restarts
the workers on a replacement node and they resume from the last checkpoint) and
publishes the same result as an uninterrupted two-worker run on one machine; a job the
cluster has no room for fails naming what is missing; nothing listens beyond loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support import (
    PrivateRayDir,
    crash_session,
    mlflow_server,
    registered_checkpoints,
    s3_server,
    started,
    stop_session,
    wait_for,
)

from pipeline.hashing import sha256_file, sha256_json
from tools.drill import env_for, scratch_copy
from tools.scratch import REPO_ROOT

pytestmark = pytest.mark.slow

# Ray's session files (support.PrivateRayDir).
RAY_DIR = PrivateRayDir("ray-cl-")
VENV = Path(sys.prefix)

# The second node: bind the venv aside, cover the repositories with empty tmpfs mounts
# (the editable install then points at nothing), put the venv back at its own path.
NODE_SCRIPT = """set -e
mkdir -p "$KEEP" && mount --bind "$VENV" "$KEEP"
for d in $HIDE; do mount -t tmpfs tmpfs "$d"; done
mkdir -p "$VENV" && mount --bind "$KEEP" "$VENV"
cd /
exec "$VENV/bin/python" "$TOOL" --join "$ADDRESS" --cpus 1 "$@"
"""

# Holds the head's only CPU, so that a 1-CPU task can run on the second node alone.
HOLDER = """import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
@ray.remote(num_cpus=1)
class Holder:
    pass
h = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(sys.argv[2], soft=False)).remote()
ray.get(h.__ray_ready__.remote())
print("held", flush=True)
sys.stdin.read()
"""

# Long enough that the second node is lost mid-run, with checkpoints to resume from.
PRETRAIN = [
    "stage.pretrain.schedule.total_steps=24",
    "stage.pretrain.checkpoint_every=4",
    "ray.num_workers=2",
    "ray.cpus_per_worker=1",
]


@pytest.fixture(scope="module", autouse=True)
def _private_ray_dir():
    yield
    RAY_DIR.remove()


class Cluster:
    """The processes of the test cluster; every one is stopped with its session."""

    def __init__(self, root: Path, env: dict, hide: list[Path]):
        self.root, self.env, self.hide = root, env, hide
        self.tool = root / "local_cluster.py"  # outside the hidden repositories
        shutil.copy(REPO_ROOT / "tools" / "local_cluster.py", self.tool)
        self.procs: list[subprocess.Popen] = []
        python = str(VENV / "bin" / "python")
        self.head = self._start(
            "head", [python, str(self.tool), "--nodes", "1", "--cpus", "1", "--fast-failure-detection"]
        )
        self.address = self.head["address"]
        self.nodes = 0
        self.node = self.add_node()

    def _start(self, name: str, args: list[str], env: dict | None = None) -> dict:
        """Start ``args`` (which take ``--info FILE`` last) in a session of its own; wait
        for the info file it writes once its node is up."""
        info = self.root / f"{name}.json"
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [*args, "--info", str(info)],
            env=env or self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        wait_for(info.is_file, f"Ray {name} to start (log: {self.root / name}.log)", timeout=120, alive=proc)
        return {**json.loads(info.read_text()), "proc": proc}

    def add_node(self) -> dict:
        """A 1-CPU node in its own mount namespace, where the repositories are not visible."""
        self.nodes += 1
        name = f"node{self.nodes}"
        env = {k: v for k, v in self.env.items() if k != "PYTHONPATH"}
        env.update(KEEP=str(self.root / f"{name}-venv"), VENV=str(VENV), HIDE=" ".join(map(str, self.hide)))
        script = NODE_SCRIPT.replace("$TOOL", str(self.tool)).replace("$ADDRESS", self.address)
        # sh -c SCRIPT NAME ARGS: "$@" carries the --info FILE that _start appends
        return self._start(name, ["unshare", "-m", "sh", "-c", script, name], env=env)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                stop_session(proc)


def _session_pids(procs: list[subprocess.Popen]) -> set[int]:
    import psutil

    sessions = {os.getsid(p.pid) for p in procs if p.poll() is None}
    pids = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions:
                pids.add(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _beyond_loopback(pids: set[int]) -> list[tuple[int, str, int]]:
    """Listening sockets of ``pids`` bound to anything but loopback."""
    import ipaddress

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback

    return [(pid, ip, port) for pid, ip, port in _listeners(pids) if not loopback(ip)]


def _listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    import psutil

    return [
        (c.pid, c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The driver's repository copy, the shared storage, the tracking server and the cluster."""
    root = tmp_path_factory.mktemp("cluster")
    repo = root / "repo"
    # Token authentication on, as the README's cluster commands set it: every node and
    # the driver hold the cluster's token (here in the environment, RAY_AUTH_TOKEN).
    env = {
        **env_for(repo, RAY_DIR.path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    scratch_copy(repo, env, "micro")
    with (
        s3_server(VENV / "bin" / "moto_server", "recipe-runs", env=env) as s3,
        mlflow_server(VENV / "bin" / "mlflow", f"sqlite:///{root / 'mlflow.db'}", env=env, cwd=root) as url,
    ):
        env = {**env, **s3["env"]}  # the credentials, as each node's and the driver's environment holds them
        cluster = Cluster(root, {**env, "PYTHONPATH": ""}, hide=[REPO_ROOT, repo])
        try:
            env = {**env, "MLFLOW_TRACKING_URI": url}
            yield {"repo": repo, "root": root, "s3": s3, "env": env, "url": url, "cluster": cluster}
        finally:
            cluster.stop()


def _runs(setup: dict):
    """The run storage's filesystem (as the test's own S3 client) and its root path."""
    from pyarrow.fs import S3FileSystem

    s3 = setup["s3"]
    fs = S3FileSystem(
        access_key=s3["env"]["AWS_ACCESS_KEY_ID"],
        secret_key=s3["env"]["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        endpoint_override=s3["endpoint"],
        scheme="http",
    )
    return fs, f"{s3['bucket']}/runs"


def _listing(fs, path: str) -> list:
    from pyarrow.fs import FileSelector

    return fs.get_file_info(FileSelector(path, allow_not_found=True))


def _stage(setup: dict, stage: str, *overrides: str, cluster: bool = True) -> list[str]:
    args = [str(VENV / "bin" / "python"), "-m", "pipeline.stages", stage, *overrides]
    if cluster:
        # Quoted for Hydra: the URI's query (the S3 endpoint) holds '=' and '&'.
        args += [f"ray.address={setup['cluster'].address}", f"ray.storage_path='{setup['s3']['uri']('runs')}'"]
    return args


def _run(setup: dict, args: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=setup["repo"], env=env or setup["env"], capture_output=True, text=True, timeout=timeout
    )


def test_the_second_node_cannot_import_the_pipeline_on_its_own(setup):
    """The premise: without the code Ray ships, the second node has no `pipeline`."""
    probe = (
        "import sys, ray\n"
        "ray.init(address=sys.argv[1], log_to_driver=False)\n"
        "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as At\n"
        "@ray.remote(num_cpus=0)\n"
        "def probe():\n"
        "    import importlib.util, os\n"
        "    return importlib.util.find_spec('pipeline') is not None, os.path.exists(sys.argv[2])\n"
        "print(ray.get(probe.options(scheduling_strategy=At(sys.argv[3], soft=False)).remote()))\n"
    )
    c = setup["cluster"]
    out = _run(
        setup,
        [str(VENV / "bin" / "python"), "-c", probe, c.address, str(REPO_ROOT / "pipeline"), c.node["node_id"]],
        env={**setup["env"], "PYTHONPATH": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(False, False)"


def test_a_driver_without_the_clusters_token_is_refused(setup):
    c = setup["cluster"]
    env = {k: v for k, v in setup["env"].items() if k != "RAY_AUTH_TOKEN"}
    out = _run(
        setup,
        [str(VENV / "bin" / "python"), "-c", "import ray, sys; ray.init(address=sys.argv[1])", c.address],
        env=env,
    )
    assert out.returncode != 0 and "AuthenticationError" in out.stderr, out.stderr[-3000:]


@pytest.fixture(scope="module")
def mixed(setup) -> dict:
    """The mix stage run on the cluster while the head's only CPU is held: its task can
    run on the second node alone. Returns the stage's process and the listeners seen."""
    c = setup["cluster"]
    holder_args = [str(VENV / "bin" / "python"), "-c", HOLDER, c.address, c.head["node_id"]]
    with started(
        holder_args, cwd=setup["root"], env=c.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout.readline().strip() == "held"
        pids = _session_pids([*c.procs, holder])
        seen = {"listeners": _listeners(pids), "beyond_loopback": _beyond_loopback(pids)}
        mix = _run(setup, _stage(setup, "mix"))
        holder.stdin.close()
    assert mix.returncode == 0, mix.stdout[-2000:] + mix.stderr[-5000:]
    return {"proc": mix, **seen}


def test_mix_outputs_land_in_the_drivers_data_mix(setup, mixed):
    assert mixed["listeners"], "no listener found: the loopback check would pass on nothing"
    assert not mixed["beyond_loopback"], mixed["listeners"]
    data = setup["repo"] / "data" / "mix"
    manifests = {}
    for name in ("pretrain", "midtrain", "sft"):
        manifest = json.loads((data / name / "manifest.json").read_text())
        for file, info in manifest["files"].items():
            assert sha256_file(data / name / file) == info["sha256"]
        manifests[name] = manifest
    assert (data / "tokenizer" / "tokenizer.json").is_file()
    # What MLflow records is what landed here: each mixture's digest, and a dataset
    # source (an mlflow-artifacts: location, served over HTTP) that reads back the same.
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.keys import MAX_DATASET_DIGEST

    client = MlflowClient(setup["url"])
    exp = client.get_experiment_by_name("mobilemoe")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'mix'")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    for name, manifest in manifests.items():
        dataset = inputs[f"{name}-mixture"]
        assert dataset.digest == sha256_json(manifest)[:MAX_DATASET_DIGEST]
        source = json.loads(dataset.source)["url"]
        with urllib.request.urlopen(source, timeout=30) as r:
            assert json.loads(r.read()) == manifest


def test_pretrain_on_two_nodes_survives_a_lost_node_and_equals_one_machine(setup, mixed):
    repo, c = setup["repo"], setup["cluster"]
    # The reference, on one machine (the embedded Ray), runs beside the two-node run: the
    # runs name different outputs, so they are different work, and neither's result
    # depends on timing.
    local_args = _stage(
        setup,
        "pretrain",
        *PRETRAIN,
        "stage.pretrain.out_dir=outputs/one_machine",
        "tracking.enabled=false",
        cluster=False,
    )
    fs, runs = _runs(setup)
    args = _stage(setup, "pretrain", *PRETRAIN, "stage.pretrain.out_dir=outputs/two_nodes")
    local_log, log = (setup["root"] / "one_machine.log").open("w"), (setup["root"] / "pretrain.log").open("w")
    with (
        started(local_args, cwd=repo, env=setup["env"], stdout=local_log, stderr=subprocess.STDOUT) as local,
        started(args, cwd=repo, env=setup["env"], stdout=log, stderr=subprocess.STDOUT) as driver,
    ):

        def registered() -> list[str]:
            found = [i.path for i in _listing(fs, runs) if i.base_name.startswith("pretrain-")]
            if not found:
                return []
            try:
                with fs.open_input_stream(f"{found[0]}/checkpoint_manager_snapshot.json") as snapshot:
                    return registered_checkpoints(snapshot.read().decode())
            except OSError:  # not written yet
                return []

        wait_for(registered, "the two-node run to register a checkpoint", timeout=300, interval=0.1, alive=driver)
        raylet = c.node["pids"]["raylet"][0]
        os.kill(raylet, 9)  # the second node is lost: its raylet, and with it its worker
        crash_session(c.node["proc"])
        c.node = c.add_node()  # a replacement node joins (what an autoscaler would do)
        pids = _session_pids([*c.procs, driver])
        assert not _beyond_loopback(pids), _listeners(pids)
        assert driver.wait(timeout=600) == 0, (setup["root"] / "pretrain.log").read_text()[-5000:]
        assert local.wait(timeout=600) == 0, (setup["root"] / "one_machine.log").read_text()[-5000:]
    one, two = repo / "outputs" / "one_machine", repo / "outputs" / "two_nodes"
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    assert (two / "loss.csv").read_text() == (one / "loss.csv").read_text()
    execution = json.loads((two / "execution.json").read_text())
    assert execution["resumes"] == 1 and execution["resumed_at_steps"][0] % 4 == 0, execution
    assert json.loads((one / "execution.json").read_text())["resumes"] == 0
    names = [i.base_name for i in _listing(fs, runs)]
    assert not [n for n in names if n.startswith("pretrain-")], "the finished run's storage is removed"
    # The ranks read their inputs from copies staged in the object store (the second
    # node cannot see the driver's disk): the mixture, complete.
    (mixture,) = [i for i in _listing(fs, f"{runs}/staged") if i.base_name.startswith("mixture-")]
    (copy,) = _listing(fs, mixture.path)
    assert fs.get_file_info(f"{copy.path}/.complete").is_file and fs.get_file_info(f"{copy.path}/manifest.json").is_file


def test_a_job_the_cluster_cannot_hold_fails_naming_what_is_missing(setup, mixed):
    out = _run(
        setup,
        _stage(
            setup,
            "pretrain",
            "ray.num_workers=3",
            "ray.cpus_per_worker=1",
            "ray.start_timeout_s=1",
            "stage.pretrain.out_dir=outputs/too_big",
        ),
    )
    assert out.returncode != 0
    assert "found no placement within ray.start_timeout_s=1 s" in out.stderr, out.stderr[-3000:]
    assert "needs 3 workers x 1 CPU" in out.stderr and "can hold 2" in out.stderr, out.stderr[-3000:]
    assert not (setup["repo"] / "outputs" / "too_big").exists()
