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
from pathlib import Path

from pipeline.cbuild import NativeBuildError, compiler
from pipeline.cbuild import build as build_library
from pipeline.cbuild import library_path as cached_path

__all__ = ["NativeBuildError", "build", "library_path", "load"]

_HERE = Path(__file__).parent
SOURCES = (_HERE / "moe_int4.cpp", _HERE / "table_int4.cpp")
HEADERS = (_HERE / "int4.h",)
LIBRARY_NAME = "libmobilemoe_ops.so"
FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-DET_USE_THREADPOOL", "-DC10_USING_CUSTOM_GENERATED_MACROS")

_loaded: Path | None = None


def _executorch_dirs() -> tuple[Path, Path]:
    import executorch

    root = Path(next(iter(executorch.__path__)))
    return root / "include", root / "lib"


def library_path(cxx: str | None = None) -> Path:
    """Where the library for these sources, compiler, flags, ExecuTorch and CPU kind lives."""
    from importlib.metadata import version

    return cached_path(LIBRARY_NAME, SOURCES + HEADERS, FLAGS, "executorch " + version("executorch"), cxx)


def build(cxx: str | None = None) -> Path:
    """Compile the kernel library unless it is already built; return its path (errors:
    :class:`NativeBuildError`, see :func:`pipeline.cbuild.build`)."""
    cxx = cxx or compiler()
    out = library_path(cxx)
    if out.is_file():
        return out
    include, lib = _executorch_dirs()
    flags = (*FLAGS, f"-I{include}", f"-I{include}/executorch/runtime/core/portable_type/c10")
    link = (f"-L{lib}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{lib}")
    return build_library(out, SOURCES, flags, link, "the export's MoE kernel (built against ExecuTorch)", cxx)


def load() -> Path:
    """Build if needed, then register the kernels in ExecuTorch's runtime (once per process)."""
    global _loaded
    if _loaded is None:
        from executorch.extension.pybindings import portable_lib  # noqa: F401 - loads the runtime it registers into

        path = build()
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        _loaded = path
    return _loaded
