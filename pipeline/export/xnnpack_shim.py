"""The one place this project works around an XNNPACK partitioner limit (ExecuTorch 1.5.1).

Why: the partitioner refuses every node with an input whose shape holds an *unbacked*
symbol (a data-dependent size), because it cannot rule out an empty tensor at export
time. A sparse MoE is exactly that: the rows an expert gets depend on the router. Left
alone, every expert GEMM falls off the delegate and runs as portable FP32 kernels on
dequantized weights, which is the defect this export must not have.

What: partitioner configs that are the upstream ones except that an unbacked size is
accepted when it has a finite upper bound (the program's ``torch._check`` calls give
it one; memory planning needs it anyway). A tensor known to be empty is still refused.
The XNNPACK runtime runs a GEMM over zero rows as a no-op, reading no weights (checked
by tests/export/test_export.py, which runs such a program).

When to remove it: ``tests/export/test_export.py::test_shim_is_still_needed`` lowers an
expert GEMM with a data-dependent row count through the upstream partitioner and
expects it refused; when an upgrade makes upstream accept it, that test fails, and this
module should go.
"""

from __future__ import annotations

import math

import torch
from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
from executorch.backends.xnnpack.partition.config.xnnpack_config import XNNPartitionerConfig
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, statically_known_true

# The upstream method this shim overrides; a test checks that upstream still has it.
OVERRIDDEN = "_check_inputs_are_valid_dtypes"


def _bounded(value: torch.Tensor) -> bool:
    """Every unbacked symbol in ``value``'s shape has a finite upper bound."""
    symbols = free_unbacked_symbols(value)
    if not symbols:
        return True
    shape_env = next((s.node.shape_env for s in value.shape if isinstance(s, torch.SymInt)), None)
    if shape_env is None:  # unbacked only in strides or offset: nothing to bound it by
        return False
    return all(math.isfinite(float(shape_env.var_to_range[sym].upper)) for sym in symbols)


def _tensor_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    nodes = []
    for arg in node.args:
        items = arg if isinstance(arg, (list, tuple)) else [arg]
        nodes += [item for item in items if isinstance(item, torch.fx.Node)]
    return nodes


class _BoundedUnbackedMixin:
    def _check_inputs_are_valid_dtypes(self, node: torch.fx.Node, valid_dtypes) -> bool:
        reference = None
        for arg in _tensor_inputs(node):
            value = arg.meta.get("val")
            if value is None or isinstance(value, tuple):
                continue
            if not isinstance(value, torch.Tensor) or value.dtype not in valid_dtypes:
                return False
            if not _bounded(value) or statically_known_true(value.numel() == 0):
                return False
            reference = reference or value.dtype
            if value.dtype != reference:
                return False
        return True


def _bounded_config(config: type[XNNPartitionerConfig]) -> type[XNNPartitionerConfig]:
    return type(config.__name__, (_BoundedUnbackedMixin, config), {})


def sparse_partitioner() -> XnnpackPartitioner:
    """XNNPACK's partitioner with every upstream config, accepting bounded
    data-dependent row counts (see the module doc)."""
    return XnnpackPartitioner(configs=[_bounded_config(c) for c in ALL_PARTITIONER_CONFIGS])
