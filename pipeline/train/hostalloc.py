"""Where the host's large tensors come from: glibc malloc's large-block policy.

A training step on CPU frees and allocates the same large buffers every step: the
gradients (``zero_grad(set_to_none=True)`` drops them, the next backward makes them
anew), the MoE's per-slot activations, the optimizer's temporaries. glibc serves a block
above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so every step faults those pages in again and the kernel
zeroes them: the MobileMoE-S layer (3 x 60 x 384 x 768 FP32 expert weights, 212 MB of
gradients a step) ran its forward+backward in 0.85x the time with freed blocks kept
(``bench/bench_model.py --compare-policies 5``, 2-core Xeon; docs/moe-kernel.md).
Allocators built for this (jemalloc, tcmalloc) keep freed blocks; ``keep_freed_blocks``
asks glibc to do the same through ``mallopt(3)``: blocks up to 1 GiB come from the heap
and up to 1 GiB of freed memory at its top is kept. The cost: the process holds at least
its peak resident size, more where freed blocks fragment.

Threads: glibc gives a thread other than the main one an arena of its own, built from
heaps of at most 64 MiB, so there a larger block is mapped whatever the threshold. Ray
Train runs the training loop on such a thread: its worker processes must start with
``PROCESS_ENV`` (one arena for the process; read by glibc at process start, so a later
``mallopt`` cannot do it). The training stages pass it to Ray (pipeline/stages/train.py,
qat.py); ``keep_freed_blocks`` warns when it runs off the main thread without it.

Only glibc has these knobs; elsewhere (musl, macOS) nothing changes and
``keep_freed_blocks`` says so.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading

log = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to this size from the heap; this much free memory kept at its top. glibc
# before 2.35 refuses an mmap threshold above 32 MiB (HEAP_MAX_SIZE / 2): then the
# policy is not applied, with a warning.
KEEP_BYTES = 1 << 30
# The environment of a process whose training loop runs off its main thread (Ray Train).
PROCESS_ENV = {"MALLOC_ARENA_MAX": "1"}


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's glibc, or None when the C library is another (musl, macOS)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):  # the name is unknown off glibc
        version = ""
    if not version.startswith("glibc"):
        return None
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_blocks() -> bool:
    """Serve blocks up to ``KEEP_BYTES`` from the heap and keep freed memory for reuse
    (this process, from now on). Returns whether the policy is in force: False, with a
    warning naming why, off glibc or where glibc refuses a value (a speed setting must
    not stop a training). Warns when called off the main thread of a process started
    without ``PROCESS_ENV`` (blocks above 64 MiB made on that thread stay mapped)."""
    libc = _glibc()
    if libc is None:
        log.warning("host allocator: the C library is not glibc; its own large-block policy stays")
        return False
    # mallopt(3): 1 when taken, 0 when refused (glibc < 2.35 refuses thresholds > 32 MiB).
    for name, param in (("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD), ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD)):
        if libc.mallopt(param, KEEP_BYTES) != 1:
            log.warning(
                "host allocator: %s refused mallopt(%s, %d); large blocks stay mapped afresh every step",
                os.confstr("CS_GNU_LIBC_VERSION"),
                name,
                KEEP_BYTES,
            )
            return False
    if threading.current_thread() is not threading.main_thread() and not _one_arena():
        log.warning(
            "host allocator: this thread has an arena of its own (64 MiB heaps): blocks above 64 MiB made here "
            "stay mapped afresh; start the process with %s",
            " ".join(f"{k}={v}" for k, v in PROCESS_ENV.items()),
        )
    return True


def _one_arena() -> bool:
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    return os.environ.get("MALLOC_ARENA_MAX") == "1" or "glibc.malloc.arena_max=1" in tunables
