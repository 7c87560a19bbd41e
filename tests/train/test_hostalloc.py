"""The training loop's host allocator policy (pipeline/train/hostalloc.py), observed through
glibc's own accounting (mallinfo2): each case in a child process, since the policy is
process-wide and would otherwise change the test worker's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.train import hostalloc

pytestmark = pytest.mark.skipif(hostalloc._glibc() is None, reason="mallopt is glibc's")

# Allocates and frees a 48 MiB tensor twice under the named policy; prints what glibc's
# counters said: bytes in mmapped blocks while it was held, and the heap's size after.
CHILD = """
import ctypes, ctypes.util, json, sys
import torch
from pipeline.train import hostalloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
{"keep": hostalloc.keep_freed_blocks, "system": hostalloc.system_policy}[sys.argv[1]]()
seen = []
for _ in range(2):
    before = libc.mallinfo2()
    x = torch.empty(12 << 20)  # 48 MiB of FP32: above glibc's largest dynamic mmap threshold
    x.fill_(1.0)
    held = libc.mallinfo2()
    del x
    after = libc.mallinfo2()
    seen.append({"mmapped": held.hblkhd - before.hblkhd, "heap_after_free": after.arena})
print(json.dumps(seen))
"""


def _child(policy: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, policy], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_blocks_come_from_the_heap_and_stay_there_for_the_next_step():
    mib48 = 48 << 20
    system = _child("system")
    # glibc's own policy: every 48 MiB block is a fresh mapping, returned when freed.
    assert all(step["mmapped"] >= mib48 for step in system), system
    kept = _child("keep")
    # Kept: no mapping; the freed block stays in the heap, which the second step reuses.
    assert all(step["mmapped"] == 0 for step in kept), kept
    assert all(step["heap_after_free"] >= mib48 for step in kept), kept


class _Refusing:
    """A C library whose mallopt refuses every value (glibc's documented 0)."""

    @staticmethod
    def mallopt(param: int, value: int) -> int:  # noqa: ARG004
        return 0


def test_a_refused_value_is_an_error_and_another_libc_is_left_alone(monkeypatch):
    monkeypatch.setattr(hostalloc, "_glibc", lambda: _Refusing())
    with pytest.raises(OSError, match="refused mallopt"):
        hostalloc.keep_freed_blocks()
    monkeypatch.setattr(hostalloc, "_glibc", lambda: None)  # musl, macOS: nothing changed, said so
    assert hostalloc.keep_freed_blocks() is False and hostalloc.system_policy() is False
