"""What a runtime must have to run a program, written beside it (``<name>.kernels.json``).

An ExecuTorch runtime has the portable kernels (``aten`` operators, prim ops). This
project's programs also call operators from three other kernel libraries, and XNNPACK:

- ``quantized_decomposed::*`` (the INT4 embedding lookup, per-token INT8 quantization of
  the INT8 KV cache): ExecuTorch's quantized kernels, CMake target ``quantized_ops_lib``,
  registered in Python by importing ``executorch.kernels.quantized``;
- ``llama::*`` (``update_cache``, ``custom_sdpa``, ``custom_quantized_sdpa``): ExecuTorch's
  LLM custom ops, CMake target ``custom_ops``, registered in Python by importing
  ``executorch.extension.llm.custom_ops.custom_ops``;
- ``mobilemoe::*`` (``moe_experts_int4``, the routed experts of a layer;
  ``embedding_int4`` and ``linear_int4``, a tied vocabulary table's lookup and head):
  this project's C++ kernels, ``pipeline/export/native/*.cpp``, registered in Python by
  importing ``pipeline.export.native.kernels`` (which builds them once when missing).

A bare runtime without them fails at ``load_method`` with ``Missing operator: ...``, one
operator at a time. :func:`open_program` reads the list, loads the Python side of each
library, and checks every operator and backend before loading: what is still missing is
named with its library in one :class:`MissingKernelsError`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class KernelLibrary:
    namespace: str  # the operator namespace the library serves
    name: str
    cmake_target: str  # what a C++ app links
    python_import: str  # the module whose import registers the kernels in ExecuTorch's Python runtime


LIBRARIES = {
    lib.namespace: lib
    for lib in (
        KernelLibrary(
            "quantized_decomposed", "ExecuTorch quantized kernels", "quantized_ops_lib", "executorch.kernels.quantized"
        ),
        KernelLibrary(
            "llama", "ExecuTorch LLM custom ops", "custom_ops", "executorch.extension.llm.custom_ops.custom_ops"
        ),
        KernelLibrary(
            "mobilemoe",
            "MobileMoE kernels (pipeline/export/native/*.cpp)",
            "moe_int4.cpp and table_int4.cpp (compile into the app's kernels)",
            "pipeline.export.native.kernels",
        ),
    )
}
# ExecuTorch's portable kernels (portable_ops_lib) and the runtime's own prim ops: in every runtime.
PORTABLE_NAMESPACES = ("aten", "dim_order_ops", "executorch_prim")


class MissingKernelsError(RuntimeError):
    """The runtime lacks a kernel library or backend the program needs; the message lists them."""


def requirements(manager) -> dict:
    """The backends and kernel libraries a program needs, from the operator table of
    ``manager`` (an ``ExecutorchProgramManager``): ``{"backends": [...],
    "kernel_libraries": [{namespace, name, cmake_target, python_import, operators}],
    "portable_operators": [...]}``, operators as ``namespace::name.overload``.
    Raises ValueError for an operator of a namespace no known library serves."""
    operators, backends = set(), set()
    for plan in manager.executorch_program.execution_plan:
        operators |= {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
        backends |= {delegate.id for delegate in plan.delegates}
    by_namespace: dict[str, list[str]] = {}
    for op in sorted(operators):
        by_namespace.setdefault(op.split("::")[0], []).append(op)
    unknown = sorted(set(by_namespace) - set(LIBRARIES) - set(PORTABLE_NAMESPACES))
    if unknown:
        raise ValueError(f"operators of namespace(s) {unknown} have no known kernel library: {by_namespace}")
    return {
        "backends": sorted(backends),
        "kernel_libraries": [
            {**asdict(LIBRARIES[ns]), "operators": ops} for ns, ops in sorted(by_namespace.items()) if ns in LIBRARIES
        ],
        "portable_operators": [op for ns in PORTABLE_NAMESPACES for op in by_namespace.get(ns, [])],
    }


def requirements_path(pte: Path) -> Path:
    return Path(pte).with_suffix(".kernels.json")


def write_program(buffer: bytes, kernels: dict, pte: Path) -> None:
    """Write the program and, beside it, what a runtime needs to run it."""
    pte = Path(pte)
    pte.write_bytes(buffer)
    requirements_path(pte).write_text(json.dumps(kernels, indent=2) + "\n")


def beside(pte: Path | str) -> tuple[str, ...]:
    """The files that go with a program wherever it is copied (``remote.In(pte, beside=...)``)."""
    return (requirements_path(Path(pte)).name,)


def read_requirements(pte: Path) -> dict:
    """The list beside ``pte``; MissingKernelsError naming the file when it is missing,
    not JSON, lacks a key, or names a kernel library this project does not know."""
    path = requirements_path(pte)
    if not path.is_file():
        raise MissingKernelsError(
            f"{path}: missing; the list of kernel libraries {Path(pte).name} needs is written beside it by the export"
        )
    try:
        kernels = json.loads(path.read_text())
        libraries = kernels["kernel_libraries"]
        unknown = sorted({lib["namespace"] for lib in libraries} - set(LIBRARIES))
        kernels["backends"], kernels["portable_operators"]  # noqa: B018 - the keys must be there
    except (ValueError, KeyError, TypeError) as err:
        raise MissingKernelsError(f"{path}: not a kernel list ({type(err).__name__}: {err})") from None
    if unknown:
        raise MissingKernelsError(f"{path}: kernel libraries of unknown namespace(s) {unknown}")
    return kernels


def check_runtime(kernels: dict, pte: Path | str = "the program") -> None:
    """Raise MissingKernelsError naming every backend, library and operator of
    ``kernels`` that ExecuTorch's Python runtime has not registered."""
    from executorch.extension.pybindings import portable_lib

    registered = set(portable_lib._get_operator_names())
    lines = [
        f"{lib['name']} (link {lib['cmake_target']}; in Python import {lib['python_import']}): {missing}"
        for lib in kernels["kernel_libraries"]
        if (missing := [op for op in lib["operators"] if op not in registered])
    ]
    if missing := [op for op in kernels["portable_operators"] if op not in registered]:
        lines.append(f"ExecuTorch portable kernels (link portable_ops_lib): {missing}")
    absent = sorted(set(kernels["backends"]) - set(portable_lib._get_registered_backend_names()))
    if absent:
        lines.append(f"backend(s) {absent}")
    if lines:
        raise MissingKernelsError(f"{pte} needs what this runtime lacks: " + "; ".join(lines))


def load_kernels(pte: Path) -> None:
    """Register the kernel libraries listed beside ``pte`` in ExecuTorch's Python runtime
    (which the LLM runner's binding shares) and check that nothing is missing."""
    kernels = read_requirements(pte)
    for lib in kernels["kernel_libraries"]:  # what this project knows, not what the file says
        importlib.import_module(LIBRARIES[lib["namespace"]].python_import)
    check_runtime(kernels, pte)


def open_program(pte: Path):
    """:func:`load_kernels`, then the loaded ExecuTorch ``Program``."""
    from executorch.runtime import Runtime

    load_kernels(pte)
    return Runtime.get().load_program(str(pte))
