"""Where the host's large tensors come from: glibc malloc's large-block policy.

A training step on CPU frees and allocates the same large buffers every step: the
gradients (``zero_grad(set_to_none=True)`` drops them, the next backward makes them
anew), the MoE's per-slot activations, the optimizer's temporaries. glibc serves a block
above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap`` and returns it
with ``munmap`` when freed, so every step faults those pages in again and the kernel
zeroes them: the MobileMoE-S layer (3 x 60 x 384 x 768 FP32 expert weights, 212 MB of
gradients a step) ran its forward+backward in 0.85x the time with freed blocks kept
(``bench/bench_model.py --compare-policies 5``, 2-core Xeon; docs/moe-kernel.md). Allocators built for
this (jemalloc, tcmalloc) keep freed blocks; ``keep_freed_blocks`` asks glibc to do the
same through ``mallopt(3)``: blocks up to 1 GiB come from the heap and freed memory at
its top is kept for the next step. The cost is that the process keeps its peak resident
size, which a training worker reaches every step anyway.

Only glibc has ``mallopt``; elsewhere (musl, macOS) nothing is changed and
``keep_freed_blocks`` says so by returning False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt(3) parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # blocks up to this size from the heap; this much free memory kept at its top
# glibc's own steady state for a process that frees large blocks: its dynamic mmap
# threshold rises to the largest freed mmapped block, at most 32 MiB (DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit), and the trim threshold follows at twice that.
SYSTEM_MMAP_BYTES = 32 << 20
SYSTEM_TRIM_BYTES = 64 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    # gnu_get_libc_version exists only in glibc: musl also exports no mallopt that works.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def _set(mmap_bytes: int, trim_bytes: int) -> bool:
    libc = _glibc()
    if libc is None:
        return False
    # mallopt(3): 0 for a value the library refuses (glibc 2.36 accepts any; others may not).
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_bytes) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_bytes) == 1
    if not ok:
        raise OSError(f"glibc refused mallopt(M_MMAP_THRESHOLD={mmap_bytes}, M_TRIM_THRESHOLD={trim_bytes})")
    return True


def keep_freed_blocks() -> bool:
    """Serve blocks up to ``KEEP_BYTES`` from the heap and keep freed memory for reuse
    (this process, from now on). Returns False where the C library is not glibc (nothing
    changed). Raises OSError if glibc refuses the values."""
    return _set(KEEP_BYTES, KEEP_BYTES)


def system_policy() -> bool:
    """glibc's steady-state policy for large blocks (mmap above 32 MiB, trim above 64 MiB):
    what a benchmark compares ``keep_freed_blocks`` against. Returns False off glibc."""
    return _set(SYSTEM_MMAP_BYTES, SYSTEM_TRIM_BYTES)
