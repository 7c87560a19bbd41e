"""The project's own ExecuTorch kernels (C++), built against the installed ExecuTorch.

``moe_int4.cpp`` holds ``mobilemoe::moe_experts_int4.out`` (see
:mod:`pipeline.export.moe_op` for the operator and its eager reference), and
``table_int4.cpp`` ``mobilemoe::embedding_int4.out`` and ``mobilemoe::linear_int4.out``
(the tied table stored once, :mod:`pipeline.export.table_ops`); ``int4.h`` holds their
shared INT4 x INT8 arithmetic. They are compiled
with the ExecuTorch headers and libraries that ship in the wheel, once per source,
compiler flags, ExecuTorch version and CPU kind (``-march=native``: the library is built
on the machine that runs it, so it is not copied between machine kinds), into
``$MOBILEMOE_NATIVE_CACHE`` (default ``~/.cache/mobilemoe/native``). ``make setup``
builds it; :func:`load` builds it when missing and registers its kernels in ExecuTorch's
runtime (the Python runtime and the LLM runner's binding share that registry).

A C++ app compiles the ``.cpp`` files into its kernel libraries beside ExecuTorch's
(it needs ``ET_USE_THREADPOOL`` and ``C10_USING_CUSTOM_GENERATED_MACROS``, as ExecuTorch's
own CMake targets do).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

_HERE = Path(__file__).parent
SOURCES = (_HERE / "moe_int4.cpp", _HERE / "table_int4.cpp")
HEADERS = (_HERE / "int4.h",)
LIBRARY_NAME = "libmobilemoe_ops.so"
FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-DET_USE_THREADPOOL", "-DC10_USING_CUSTOM_GENERATED_MACROS")


def _march() -> str:
    """The target ISA: this machine's (``native``) unless ``MOBILEMOE_NATIVE_MARCH`` names
    another (``x86-64`` builds the portable path, ``x86-64-v3`` AVX2 without AVX-512:
    how the tests run the paths this CPU would not take)."""
    return "-march=" + os.environ.get("MOBILEMOE_NATIVE_MARCH", "native")


_loaded: Path | None = None


class NativeBuildError(RuntimeError):
    """The kernel library could not be built; the message names the compiler or the error."""


def _executorch_dirs() -> tuple[Path, Path]:
    import executorch

    root = Path(next(iter(executorch.__path__)))
    return root / "include", root / "lib"


def _cpu_kind() -> str:
    """What -march=native depends on: the CPU's feature lines (x86 ``flags``; Arm
    ``Features`` and ``CPU part``) on Linux, else the platform string."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    features = sorted({line for line in lines if line.split(":")[0].strip() in ("flags", "Features", "CPU part")})
    return "\n".join(features) or platform.platform() + platform.processor()


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""  # no compiler: build() names it


def library_path(compiler: str | None = None) -> Path:
    """Where the library for these sources, compiler, flags, ExecuTorch and CPU kind lives."""
    from importlib.metadata import version

    compiler = compiler or os.environ.get("CXX", "c++")
    key = hashlib.sha256()
    parts = [f.read_bytes() for f in SOURCES + HEADERS]
    parts += [compiler, _compiler_version(compiler), " ".join((*FLAGS, _march())), version("executorch"), _cpu_kind()]
    for part in parts:
        key.update(part if isinstance(part, bytes) else part.encode())
    cache = Path(os.environ.get("MOBILEMOE_NATIVE_CACHE", Path.home() / ".cache" / "mobilemoe" / "native"))
    return cache / key.hexdigest()[:16] / LIBRARY_NAME


def build(compiler: str | None = None) -> Path:
    """Compile the kernel library unless it is already built; return its path.

    Raises NativeBuildError naming the compiler when there is none, or with the
    compiler's own message when it fails. Concurrent builds take a file lock."""
    from filelock import FileLock

    compiler = compiler or os.environ.get("CXX", "c++")
    out = library_path(compiler)
    if out.is_file():
        return out
    if shutil.which(compiler) is None:
        raise NativeBuildError(
            f"no C++ compiler {compiler!r} on PATH: the export's MoE kernel is C++ built against ExecuTorch "
            "(install g++ or set CXX)"
        )
    include, lib = _executorch_dirs()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        tmp = out.with_suffix(".tmp.so")
        cmd = [compiler, *FLAGS, _march(), f"-I{include}", f"-I{include}/executorch/runtime/core/portable_type/c10",
               *map(str, SOURCES), f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}",
               "-o", str(tmp)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"building {LIBRARY_NAME} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        tmp.replace(out)
    return out


def load() -> Path:
    """Build if needed, then register the kernels in ExecuTorch's runtime (once per process)."""
    global _loaded
    if _loaded is None:
        from executorch.extension.pybindings import portable_lib  # noqa: F401 - loads the runtime it registers into

        path = build()
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        _loaded = path
    return _loaded
