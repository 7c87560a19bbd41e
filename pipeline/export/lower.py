"""torch.export of the exportable model (.pt2) and its lowering to ExecuTorch (.pte).

The .pte has one method, ``forward(tokens_1S, input_pos_1) -> logits_1SV`` (or
``logits_11V``, the last position's), with S dynamic in [1, max_len], and constant
methods a runner reads: ``max_context``, ``vocab_size``, ``bos_id``, ``eos_id``. XNNPACK takes the 8da4w GEMMs (in the
``xnnpack`` MoE form the experts' too, through :mod:`pipeline.export.xnnpack_shim`);
the ``fused`` form's routed experts run the project's kernel, the KV cache update and
SDPA ExecuTorch's LLM custom ops, routing and gathers portable kernels. What a runtime
needs beyond the portable kernels is written beside the program
(:mod:`pipeline.export.kernels`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim, ExportedProgram

from pipeline.export.kernels import requirements, write_program
from pipeline.export.program import ExportableLM, FusedExperts, Int4Linear, SparseMoE

# The dequantization of an INT4 weight that XNNPACK fuses into each 8da4w GEMM: one per
# Int4Linear of the program, so counting it counts the INT4 GEMMs that were delegated.
INT4_GEMM_OP = "quantized_decomposed.dequantize_per_channel_group.default"
# ... and the per-token INT8 activation it consumes (8da4w): one per GEMM as well.
INT8_ACTIVATION_OP = "quantized_decomposed.dequantize_per_token.default"


# The project's kernels (pipeline/export/native) in the ``fused`` form: the routed
# experts of one MoE layer (pipeline/export/moe_op.py), and a tied vocabulary table's
# lookup and head (pipeline/export/table_ops.py).
MOE_KERNEL_OP = "mobilemoe.moe_experts_int4.default"
EMBEDDING_KERNEL_OP = "mobilemoe.embedding_int4.default"
HEAD_KERNEL_OP = "mobilemoe.linear_int4.default"


def _table_in_kernels(cfg, moe: str) -> bool:
    return moe == "fused" and cfg.tie_embeddings


def expected_int4_gemms(cfg, moe: str = "fused") -> int:
    """XNNPACK INT4 GEMMs a program of model config ``cfg`` has when every weight is INT4:
    per layer, attention's two (wq|wk|wv stacked, wo) and the FFN's two per SwiGLU (w1|w3
    stacked, w2) for the shared expert, for each routed expert in the ``xnnpack`` form
    (the ``fused`` form runs them in :data:`MOE_KERNEL_OP`), or for the dense FFN; plus
    the head, unless it is a tied table in the ``fused`` form (:data:`HEAD_KERNEL_OP`)."""
    per_layer = 2
    if cfg.moe is not None:
        per_layer += (2 * cfg.moe.num_experts if moe == "xnnpack" else 0) + (2 if cfg.moe.num_shared_experts else 0)
    else:
        per_layer += 2
    return cfg.n_layers * per_layer + (0 if _table_in_kernels(cfg, moe) else 1)


def expected_project_kernels(cfg, moe: str = "fused") -> dict[str, int]:
    """Nodes of the project's kernels: in the ``fused`` form one :data:`MOE_KERNEL_OP` per
    MoE layer, and with tied embeddings one lookup and one head; in the ``xnnpack`` form none."""
    table = int(_table_in_kernels(cfg, moe))
    return {
        MOE_KERNEL_OP: cfg.n_layers if cfg.moe is not None and moe == "fused" else 0,
        EMBEDDING_KERNEL_OP: table,
        HEAD_KERNEL_OP: table,
    }


def example_inputs(program: ExportableLM, length: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    length = min(length, program.max_len)
    return torch.zeros(1, length, dtype=torch.long), torch.zeros(1, dtype=torch.long)


def export_program(program: ExportableLM) -> ExportedProgram:
    """``torch.export`` with a dynamic prompt length in [1, max_len]."""
    program.eval()
    dynamic = ({1: Dim("seq", min=1, max=program.max_len)}, None)
    with torch.no_grad():
        exported = torch.export.export(program, example_inputs(program), dynamic_shapes=dynamic, strict=False)
    program.reset_cache()
    return exported


def save_pt2(exported: ExportedProgram, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(exported, str(path))


@dataclass
class Lowered:
    buffer: bytes
    operators: dict  # the operator table (see operator_table)
    kernels: dict  # what a runtime needs (pipeline.export.kernels.requirements)

    def write(self, pte: Path) -> None:
        """The program and, beside it, its kernel requirements (``.kernels.json``)."""
        write_program(self.buffer, self.kernels, pte)


def llm_runner_metadata(metadata: dict[str, int]) -> dict:
    """The constant methods ExecuTorch's LLM runner (``TextLLMRunner``, what a phone app
    links) reads from a program, from the recipe's own ``max_context``, ``vocab_size``,
    ``bos_id`` and ``eos_id``: without ``get_max_seq_len`` it refuses the program. The
    program takes any prompt length up to its cache (dynamic shape) and keeps its KV cache
    inside, attended by ExecuTorch's fused SDPA op (``llama::custom_sdpa``)."""
    return {
        "get_max_seq_len": metadata["max_context"],
        "get_max_context_len": metadata["max_context"],
        "get_vocab_size": metadata["vocab_size"],
        "get_bos_id": metadata["bos_id"],
        "get_eos_ids": [metadata["eos_id"]],
        "use_kv_cache": True,
        "enable_dynamic_shape": True,
        "use_sdpa_with_kv_cache": True,
    }


def lower_to_pte(exported: ExportedProgram, metadata: dict[str, int]) -> Lowered:
    """XNNPACK lowering + ExecuTorch program bytes; ``metadata`` (max_context,
    vocab_size, bos_id, eos_id) become constant methods, under their own names and
    under the LLM runner's (:func:`llm_runner_metadata`)."""
    import executorch.kernels.quantized  # noqa: F401 - out variants of the quantized_decomposed ops
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401 - llama:: ops (KV cache, SDPA)

    from pipeline.export.xnnpack_shim import sparse_partitioner

    edge = to_edge_transform_and_lower(
        exported,
        partitioner=[sparse_partitioner()],
        # The edge dtype validator re-runs the graph and cannot evaluate the experts'
        # data-dependent split sizes (it asks for a concrete int); the program is checked
        # by running it instead (pipeline/export/checks.py).
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods={**metadata, **llm_runner_metadata(metadata)},
    )
    table = operator_table(edge.exported_program())
    manager = edge.to_executorch()
    return Lowered(manager.buffer, table, requirements(manager))


def operator_table(lowered: ExportedProgram) -> dict:
    """What runs where in a lowered program: delegate calls, the operators inside the
    XNNPACK delegates, and the operators left to portable kernels.

    ``portable_compute`` lists portable operators that do arithmetic on weights
    (a matmul or a dequantize); a sparse INT4 program has none. (The INT4 embedding
    lookup, ``embedding_4bit``, dequantizes only the looked-up rows in a portable kernel:
    not counted, on purpose.)"""
    delegated: Counter[str] = Counter()
    portable: Counter[str] = Counter()
    delegates = 0
    for node in lowered.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name == "executorch_call_delegate":
            delegates += 1
            submodule = getattr(lowered.graph_module, node.args[0].target)
            for inner in submodule.original_module.graph.nodes:
                if inner.op == "call_function":
                    delegated[_op_name(inner.target)] += 1
        elif name not in ("getitem", "sym_size.int", "_assert_scalar.default", "le", "ge"):
            portable[name] += 1
    weight_ops = {"mm", "linear", "bmm", "addmm", "matmul", "dequantize_per_channel_group", "convolution", "embedding"}
    return {
        "delegate_calls": delegates,
        "delegated": dict(sorted(delegated.items())),
        "portable": dict(sorted(portable.items())),
        "portable_compute": sorted(k for k in portable if _base_name(k) in weight_ops),
    }


def _base_name(op: str) -> str:
    """ "aten.mm.default" -> "mm" (namespace and overload dropped)."""
    parts = op.split(".")
    return parts[1] if len(parts) >= 3 else parts[0]


def _op_name(target) -> str:
    name = getattr(target, "__name__", str(target))
    return name.split("::")[-1] if "::" in name else name


def expert_weight_table(program: ExportableLM) -> list[dict]:
    """Per MoE layer: experts, their INT4 weight bytes each (values packed 4-bit + FP32
    scales), and the bytes one token reads (top-k experts + shared)."""
    rows = []
    for i, layer in enumerate(program.layers):
        if not isinstance(layer.ffn, SparseMoE):
            continue
        moe = layer.ffn
        routed = moe.routed
        if isinstance(routed, FusedExperts):
            per_expert = [
                sum(int(t[e].numel()) * t.element_size() for t in routed.buffers()) for e in range(moe.cfg.num_experts)
            ]
        else:
            per_expert = [_int4_bytes(e.w13) + _int4_bytes(e.w2) for e in routed.experts]
        shared = _int4_bytes(moe.shared.w13) + _int4_bytes(moe.shared.w2) if moe.shared is not None else 0
        rows.append(
            {
                "layer": i,
                "experts": len(per_expert),
                "bytes_per_expert": per_expert[0],
                "all_experts_equal": len(set(per_expert)) == 1,
                "shared_bytes": shared,
                "router_bytes": moe.router_ED.numel() * 4,
                "bytes_read_per_token": moe.cfg.top_k * per_expert[0] + shared + moe.router_ED.numel() * 4,
                "bytes_all_experts": sum(per_expert) + shared + moe.router_ED.numel() * 4,
            }
        )
    return rows


def _int4_bytes(linear: Int4Linear) -> int:
    return linear.values_OI.numel() // 2 + linear.scale_OG.numel() * 4
