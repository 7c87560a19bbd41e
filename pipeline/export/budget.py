"""Will the lowering fit? Its peak memory, estimated from the config before any work.

Lowering (``to_edge_transform_and_lower`` + ``to_executorch``) holds the program's
weights several times over: the exportable module's buffers, the edge program's
constants, XNNPACK's serialized copies and the final buffer. Its peak is therefore
about a multiple of the program's weight bytes, plus a per-graph-node term (every pass
re-traces the graph) and a fixed base. The coefficients are measured
(``python bench/bench_export.py lower``, RSS sampled every 0.1 s while lowering; the
numbers are in docs/export.md) and rounded up: the estimate is a bound to refuse on,
not a prediction to plan with.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.model.accounting import param_counts
from pipeline.model.config import ModelConfig

GIB = 2**30
BASE_BYTES = 0.5 * GIB  # the interpreter, torch, ExecuTorch, the exporter's state
WEIGHT_COPIES = 3.5  # program weight bytes held at the peak (S measured 3.0: 4.45 GiB for 1.47)
BYTES_PER_NODE = 0.5 * 2**20  # per graph node: fake-tensor traces of each pass
# Graph nodes, measured: attention and norms per layer, per routed expert in the
# per-expert (xnnpack) form, and the fused form's whole MoE.
NODES_PER_LAYER = 45
NODES_PER_EXPERT = 38


def program_weight_bytes(cfg: ModelConfig, max_context: int, group: int = 32) -> int:
    """Bytes of the program's constants and cache: INT4 values in int8 storage (the
    XNNPACK form keeps one byte per value until it packs) with FP32 scales per group,
    FP32 routers and norms, the FP32 KV cache of ``max_context`` positions, and the tied
    table's second copy in the head."""
    counts = param_counts(cfg)
    quantized = counts.total - counts.router - counts.norms
    weights = quantized * (1 + 4 / group) + (counts.router + counts.norms) * 4
    tied = counts.embedding * (1 + 4 / group) if cfg.tie_embeddings else 0
    cache = cfg.n_layers * 2 * max_context * cfg.n_kv_heads * cfg.head_dim * 4
    return int(weights + tied + cache)


def graph_nodes(cfg: ModelConfig, moe: str) -> int:
    """The lowered graph's nodes, about: per layer, plus per routed expert in the xnnpack form."""
    per_expert = NODES_PER_EXPERT * cfg.moe.num_experts if cfg.moe is not None and moe == "xnnpack" else 0
    return cfg.n_layers * (NODES_PER_LAYER + per_expert)


def lowering_peak_bytes(cfg: ModelConfig, moe: str, max_context: int) -> int:
    """Estimated peak resident bytes of exporting and lowering ``cfg`` (a bound)."""
    nodes = graph_nodes(cfg, moe)
    return int(BASE_BYTES + WEIGHT_COPIES * program_weight_bytes(cfg, max_context) + BYTES_PER_NODE * nodes)


def available_bytes() -> int:
    """Memory this process may still use: the machine's available memory, or less under
    a cgroup limit (limit minus the working set: usage less the inactive file cache, which
    the kernel reclaims before it kills, as container runtimes count it)."""
    import psutil

    available = psutil.virtual_memory().available
    for limit_path, usage_path, stat_path, inactive_key in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
            "/sys/fs/cgroup/memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        try:
            limit = Path(limit_path).read_text().strip()
            if limit == "max":
                continue
            usage = int(Path(usage_path).read_text())
            stats = dict(line.split() for line in Path(stat_path).read_text().splitlines() if line.count(" ") == 1)
            working_set = usage - int(stats.get(inactive_key, 0))
            available = min(available, int(limit) - max(working_set, 0))
        except (OSError, ValueError):
            continue
    return available
