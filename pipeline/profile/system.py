"""The machine a profile ran on: CPU, threads, memory bandwidth, peak resident memory.

Linux-only parts (``/proc``) say so when missing instead of reporting a made-up number.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path


class ThreadsError(ValueError):
    """More threads requested than the profiling machine has cores."""


def usable_cores() -> int:
    """CPUs this process may run on (affinity-aware: a container's limit counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(threads: int, key: str = "threads") -> None:
    """Size ExecuTorch's thread pool (XNNPACK's and the project's kernels') to ``threads``
    and torch's to one; raise ThreadsError, naming ``key``, when the machine has fewer
    cores (oversubscribed threads measure the scheduler, not the program).

    Torch only wraps the programs' inputs and outputs here, and its OpenMP workers
    spin-wait after each parallel op, on the cores ExecuTorch's pool needs next: with
    torch at 2 threads a 128k-row INT4 head took 4.4 ms per call on 2 cores, at 1 thread
    2.4 ms (Zen 4, ``bench/bench_export.py head``)."""
    cores = usable_cores()
    if threads > cores:
        raise ThreadsError(f"{key}: {threads} threads requested, but this machine has {cores} usable cores")
    import torch
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
    torch.set_num_threads(1)
    got = portable_lib._threadpool_get_thread_count()
    if got != threads:
        raise RuntimeError(f"ExecuTorch's thread pool has {got} threads after asking for {threads}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "neon", "asimddp")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return [f for f in wanted if f in flags]


def machine(threads: int) -> dict:
    """CPU model, cores, the threads used, ISA features that decide INT4/INT8 GEMM
    speed, and the versions of the libraries that ran the programs."""
    versions = {}
    for package in ("torch", "executorch", "torchao"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "cores": usable_cores(),
        "threads": threads,
        "isa": _cpu_flags(),
        "python": platform.python_version(),
        "versions": versions,
    }


def read_bandwidth_gb_s(size_mib: int, threads: int, repeats: int = 7) -> dict[str, float]:
    """Sustained read bandwidth in GB/s (1e9 bytes): the time to sum a ``size_mib`` FP32
    buffer (far larger than the last-level cache), median of ``repeats`` after one
    warm-up, on ``threads`` threads. A reduction reads each byte once and does one add
    per 4 bytes, so memory, not arithmetic, bounds it."""
    import torch

    before = torch.get_num_threads()  # set_threads leaves torch at one thread: restored after
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
        buf.sum()  # warm-up: pages touched, threads started
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            buf.sum()
            samples.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    seconds = statistics.median(samples)
    return {"gb_s": buf.numel() * 4 / seconds / 1e9, "bytes": buf.numel() * 4, "seconds": seconds}


class PeakMemory:
    """Peak resident memory of what runs inside the ``with`` block.

    Linux keeps a high-water mark of this process's resident set (``VmHWM``); writing
    ``5`` to ``/proc/self/clear_refs`` resets it to the current resident size. Entering
    resets it and records the resident size; on exit ``peak_mib`` is the new high-water
    mark and ``increment_mib`` how far above the entry size it went."""

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as err:
            raise RuntimeError(f"cannot reset the peak-RSS counter (/proc/self/clear_refs): {err}") from None
        self.base_mib = _status_mib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.peak_mib = _status_mib("VmHWM")
        self.increment_mib = self.peak_mib - self.base_mib


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")
