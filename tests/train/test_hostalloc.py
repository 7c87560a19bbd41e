"""The training loop's host allocator policy (pipeline/train/hostalloc.py), observed through
glibc's own counters (mallinfo2), each case in a fresh child process (the policy is
process-wide, and an arena's limits are read when the process starts); the last case
through a real Ray Train worker, where the loop runs on a thread of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import PrivateRayDir

from pipeline.runner import cluster
from pipeline.train import hostalloc

pytestmark = pytest.mark.skipif(hostalloc._glibc() is None, reason="mallopt is glibc's")

MIB = 1 << 20

# probe(keep, on_thread, mib) allocates and frees a plain malloc'd block, then a tensor
# twice, and returns what glibc's counters said: the free memory kept at the heap's top
# after the block was freed, and the bytes in mapped blocks while each tensor was held.
PROBE = """
import ctypes, threading
import torch
from pipeline.train import hostalloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)

def probe(keep, on_thread, mib):
    if keep:
        assert hostalloc.keep_freed_blocks()
    seen = {}
    def steps():
        # First (a fresh heap): a block that ends at the heap's top, then freed.
        block = libc.malloc(mib << 20)
        ctypes.memset(block, 1, mib << 20)
        libc.free(block)
        seen["kept_at_top"] = libc.mallinfo2().keepcost
        mapped = []
        for _ in range(2):
            before = libc.mallinfo2().hblkhd
            x = torch.empty(mib << 18)  # mib MiB of FP32
            x.fill_(1.0)
            mapped.append(libc.mallinfo2().hblkhd - before)
            del x
        seen["mapped"] = mapped
    if on_thread:
        t = threading.Thread(target=steps)
        t.start()
        t.join()
    else:
        steps()
    return seen
"""


def _child(keep: bool, on_thread: bool = False, mib: int = 48, env: dict | None = None) -> dict:
    code = PROBE + f"\nimport json; print(json.dumps(probe({keep}, {on_thread}, {mib})))"
    child_env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**child_env, **(env or {})}, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_blocks_come_from_the_heap_and_freed_memory_stays_at_its_top():
    system = _child(keep=False)
    # glibc's own policy (no mallopt): every 48 MiB block is a fresh mapping, and freed
    # memory at the heap's top is trimmed back to the kernel.
    assert all(m >= 48 * MIB for m in system["mapped"]), system
    assert system["kept_at_top"] < 48 * MIB, system
    kept = _child(keep=True)
    assert kept["mapped"] == [0, 0], kept  # from the heap (a threshold <= 48 MiB fails here)
    assert kept["kept_at_top"] >= 48 * MIB, kept  # not trimmed (a small trim threshold fails here)


def test_off_the_main_thread_only_one_arena_keeps_blocks_above_64_mib():
    # A thread's own arena is built from 64 MiB heaps: a 70 MiB block is mapped there
    # whatever the threshold (the S layer's expert gradients are 67.5 MiB each) ...
    alone = _child(keep=True, on_thread=True, mib=70)
    assert all(m >= 70 * MIB for m in alone["mapped"]), alone
    # ... unless the process started with one arena, as the training stages' Ray workers do.
    one_arena = _child(keep=True, on_thread=True, mib=70, env=hostalloc.PROCESS_ENV)
    assert one_arena["mapped"] == [0, 0], one_arena


class _Refusing:
    """A C library whose mallopt refuses every value (glibc before 2.35 refuses > 32 MiB)."""

    @staticmethod
    def mallopt(param: int, value: int) -> int:  # noqa: ARG004
        return 0


def test_a_refused_value_or_another_libc_warns_and_training_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(hostalloc, "_glibc", lambda: _Refusing())
    assert hostalloc.keep_freed_blocks() is False
    assert "refused mallopt" in caplog.text
    monkeypatch.setattr(hostalloc, "_glibc", lambda: None)  # musl, macOS: nothing changed, said so
    assert hostalloc.keep_freed_blocks() is False
    assert "not glibc" in caplog.text


RAY_JOB = """
import json, os, sys
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from pipeline.runner import cluster, train_job
from pipeline.train.config import RayConfig

def train(config):
    exec(config["probe"], globals())
    seen = probe(True, False, 70)  # on Ray Train's own training thread
    seen["poll_interval"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")  # cluster.EMBEDDED_WORKER_ENV
    store = sys.modules["torch.distributed.rendezvous"]._create_c10d_store  # the setup hook's, lazily
    seen["store_bound"] = getattr(store, "bound_to_master_addr", False)
    with open(config["out"], "w") as f:  # Ray Train keeps metrics only with a checkpoint
        json.dump(seen, f)

train_job.start_ray(RayConfig()) if sys.argv[1] == "training" else cluster.start(RayConfig())
TorchTrainer(
    train, train_loop_config={"probe": sys.argv[2], "out": sys.argv[3] + "/seen.json"},
    scaling_config=ScalingConfig(num_workers=1), run_config=RunConfig(storage_path=sys.argv[3], name="probe"),
).fit()
"""


def test_a_ray_train_worker_started_with_the_training_env_keeps_its_blocks(tmp_path):
    """Ray started as the training stages start it (train_job.start_ray): the worker
    process starts with PROCESS_ENV, and its training thread's 70 MiB blocks come from
    the heap."""
    ray_dir = PrivateRayDir("ray-alloc-")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MOBILEMOE_"))}
    env.update(RAY_TMPDIR=ray_dir.path, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(
        [sys.executable, "-c", RAY_JOB, "training", PROBE, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ray_dir.remove()
    assert out.returncode == 0, out.stderr[-4000:]
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["mapped"] == [0, 0], seen
    # The embedded Ray job's environment reaches Ray Train's processes (the worker here;
    # the controller, which reads the interval, gets the same job environment), and the
    # setup hook's lazy wrap of torch's store factory happened before the process group.
    assert seen["poll_interval"] == cluster.EMBEDDED_WORKER_ENV["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"], seen
    assert seen["store_bound"] is True, seen
