"""Compile the project's C++ kernels into shared libraries, cached by what they depend on.

Two libraries use it: the export's ExecuTorch kernels (:mod:`pipeline.export.native`) and
the MoE training kernel (:mod:`pipeline.model.kernels`). Each is built once per source,
header, compiler, flag set, library version and CPU kind (``-march=native``: a library is
built on the machine kind that runs it, never copied between kinds) into
``$MOBILEMOE_NATIVE_CACHE`` (default ``~/.cache/mobilemoe/native``). ``make setup`` builds
both; a process that finds one missing builds it under a file lock.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


class NativeBuildError(RuntimeError):
    """A kernel library could not be built; the message names the compiler or the error."""


def march() -> str:
    """The target ISA: this machine's (``native``) unless ``MOBILEMOE_NATIVE_MARCH`` names
    another (``x86-64`` builds the portable path, ``x86-64-v3`` AVX2 without AVX-512:
    how the tests run the paths this CPU would not take)."""
    return "-march=" + os.environ.get("MOBILEMOE_NATIVE_MARCH", "native")


def cpu_kind() -> str:
    """What -march=native depends on: the CPU's feature lines (x86 ``flags``; Arm
    ``Features`` and ``CPU part``) on Linux, else the platform string."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    features = sorted({line for line in lines if line.split(":")[0].strip() in ("flags", "Features", "CPU part")})
    return "\n".join(features) or platform.platform() + platform.processor()


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""  # no compiler: build() names it


def library_path(name: str, files: Sequence[Path], flags: Sequence[str], versions: str, cxx: str | None = None) -> Path:
    """Where library ``name`` built from ``files`` (sources and headers) with ``flags``
    against ``versions`` (the libraries it links, as text) lives for this compiler and CPU."""
    cxx = cxx or compiler()
    key = hashlib.sha256()
    parts = [f.read_bytes() for f in files]
    parts += [cxx, _compiler_version(cxx), " ".join((*flags, march())), versions, cpu_kind()]
    for part in parts:
        key.update(part if isinstance(part, bytes) else part.encode())
    cache = Path(os.environ.get("MOBILEMOE_NATIVE_CACHE", Path.home() / ".cache" / "mobilemoe" / "native"))
    return cache / key.hexdigest()[:16] / name


def build(
    out: Path, sources: Sequence[Path], flags: Sequence[str], link: Sequence[str], what: str, cxx: str | None = None
) -> Path:
    """Compile ``sources`` into ``out`` (a path from :func:`library_path`) unless it is there.

    ``flags`` go before the sources, ``link`` after them; ``what`` names the library in
    errors. Raises NativeBuildError naming the compiler when there is none, or with the
    compiler's own message when it fails. Concurrent builds take a file lock."""
    from filelock import FileLock

    cxx = cxx or compiler()
    if out.is_file():
        return out
    if shutil.which(cxx) is None:
        raise NativeBuildError(f"no C++ compiler {cxx!r} on PATH: {what} is C++ (install g++ or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if out.is_file():
            return out
        tmp = out.with_suffix(".tmp.so")
        cmd = [cxx, *flags, march(), *map(str, sources), *link, "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeBuildError(f"building {out.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
        tmp.replace(out)
    return out
