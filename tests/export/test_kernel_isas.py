"""The project's C++ kernels built for the instruction sets this CPU would not take.

``-march=native`` compiles only the path of the machine that builds (here AVX2's integer
decode, with AVX-512 for the vector code). A phone's Arm core or an older x86 takes the
portable path (dequantize, then FP32 dot products; ``x86-64``), and an AVX2-only CPU the
integer path without AVX-512 (``x86-64-v3``). Each build runs the kernels' own tests
(tests/export/test_moe_kernel.py, tests/export/test_table_kernel.py) in a fresh process: one process
can register a kernel library once.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # two library builds and two pytest processes


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA levels")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_the_kernels_built_for_another_isa_equal_their_references(march, tmp_path):
    env = {**os.environ, "MOBILEMOE_NATIVE_MARCH": march, "MOBILEMOE_NATIVE_CACHE": str(tmp_path)}
    tests = [str(ROOT / "tests" / "export" / name) for name in ("test_moe_kernel.py", "test_table_kernel.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, "-k", "not missing_compiler"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    # The library was built for that ISA, in the scratch cache, not taken from the usual one.
    assert list(tmp_path.glob("*/libmobilemoe_ops.so")), list(tmp_path.iterdir())
    assert " passed" in run.stdout and "failed" not in run.stdout
