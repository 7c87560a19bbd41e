"""The MoE layer's CPU training kernel (C++, ``moe_train.cpp``), built against the installed
torch and registered as ``torch.ops.mobilemoe_train``.

:func:`routed_experts` is the routed half of the MoE layer, forward and backward, with
the gather, the SwiGLU, the gate and the combine fused around per-expert GEMMs; the eager
reference is the layer's ``grouped`` and ``loop`` dispatch (pipeline/model/moe.py).
Measured side by side (``make bench-model``): the tiny layer's forward+backward went from
1.6x to about 1.2x its dense-active twin's time, FP32, 2 threads. The library is built by
``make setup`` (``python -m pipeline.model.kernels``) and by the first process that needs
it (:mod:`pipeline.cbuild`: cached per source, compiler, torch version and CPU kind).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from pipeline.cbuild import build, compiler, library_path

SOURCES = (Path(__file__).parent / "moe_train.cpp",)
LIBRARY_NAME = "libmobilemoe_train.so"
FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fopenmp", "-w")

_loaded: Path | None = None


def _torch_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Include and link flags for torch's C++ API, from the installed wheel. ``-fopenmp``
    compiles ATen's parallel_for; the wheel's own libgomp (same soname) is the runtime."""
    # Resolved: a venv reached through a symlink is the same torch, so the same library.
    root = Path(torch.__file__).resolve().parent
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    include = (abi, f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}")
    lib = root / "lib"
    return include, (f"-L{lib}", "-ltorch_cpu", "-ltorch", "-lc10", f"-Wl,-rpath,{lib}")


def path(cxx: str | None = None) -> Path:
    return library_path(LIBRARY_NAME, SOURCES, (*FLAGS, *_torch_flags()[0]), "torch " + torch.__version__, cxx)


def load() -> Path:
    """Build the library if needed and register its operators (once per process).
    Raises :class:`pipeline.cbuild.NativeBuildError` naming the compiler or its error."""
    global _loaded
    if _loaded is None:
        cxx = compiler()
        include, link = _torch_flags()
        lib = build(path(cxx), SOURCES, (*FLAGS, *include), link, "the MoE training kernel", cxx)
        torch.ops.load_library(str(lib))
        _loaded = lib
    return _loaded


class _RoutedExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gates_TK, w1_EFD, w3_EFD, w2_EDF, order_N, offsets_E1):  # noqa: ANN001
        out_TD, h1_NF, h3_NF = torch.ops.mobilemoe_train.moe_forward(
            x_TD, gates_TK, w1_EFD, w3_EFD, w2_EDF, order_N, offsets_E1
        )
        ctx.save_for_backward(x_TD, gates_TK, w1_EFD, w3_EFD, w2_EDF, order_N, offsets_E1, h1_NF, h3_NF)
        return out_TD

    @staticmethod
    @once_differentiable  # the op's backward is not itself differentiable: say so, not zeros
    def backward(ctx, dout_TD):  # noqa: ANN001
        dx_TD, dgates_TK, dw1_EFD, dw3_EFD, dw2_EDF = torch.ops.mobilemoe_train.moe_backward(
            dout_TD, *ctx.saved_tensors
        )
        return dx_TD, dgates_TK, dw1_EFD, dw3_EFD, dw2_EDF, None, None


def sort_slots(experts_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable counting sort of the T*K routed slots by expert.

    Returns ``order_N`` (int64 flat slot ids ``t*K + k``, grouped by expert, in slot order
    within an expert: what ``torch.argsort(experts_TK.view(-1), stable=True)`` gives) and
    ``offsets_E1`` (int64, E+1 entries: expert e's slots are ``order_N[offsets[e]:offsets[e+1]]``).
    Raises RuntimeError for an expert id outside [0, num_experts)."""
    load()
    order_N, offsets_E1 = torch.ops.mobilemoe_train.sort_slots(experts_TK, num_experts)
    return order_N, offsets_E1


def routed_experts(
    x_TD: torch.Tensor,
    gates_TK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    order_N: torch.Tensor,
    offsets_E1: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_k gates[t,k] * W2_e (silu(W1_e x_t) * W3_e x_t)``, e the k-th expert
    of token t, for every token: (T, D), differentiable in ``x_TD``, ``gates_TK`` and the
    three (E, F, D) / (E, D, F) weights. ``order_N``/``offsets_E1`` from :func:`sort_slots`.
    CPU only, float32 or float64, all in one dtype; bad shapes, offsets or an order that is
    not a permutation are refused before any work (RuntimeError). Saves the two (T*K, F)
    hidden projections for the backward, as the eager path does. Not twice differentiable.
    Tools that count operators (e.g. ``FlopCounterMode``) do not see inside the op."""
    load()
    return _RoutedExperts.apply(x_TD, gates_TK, w1_EFD, w3_EFD, w2_EDF, order_N, offsets_E1)
