"""Export benchmarks: lowering time and memory of a model shape, and the sparsity proof.

python bench/bench_export.py lower --model mobilemoe_s --layers 1
    random-weight model of that shape (full width; ``--layers`` keeps the first N),
    PTQ to 8da4w, export + XNNPACK lowering: seconds, peak RSS, the operator table
    and INT4 bytes per expert. Full depth costs about N times one layer.

python bench/bench_export.py sparsity
    one MoE layer lowered at several (experts, top-k); decode (1 token) and 32-token
    prefill latency in the ExecuTorch runtime, median of repeats, side by side in one
    run, for both MoE forms (fused kernel, per-expert XNNPACK). Sparse: time follows
    top-k, not the expert count; the cost of an idle expert is printed per form.

python bench/bench_export.py kernel --model mobilemoe_s
    the fused MoE kernel alone at a layer's shape: decode and prefill time, decode
    against the bytes it must read at this machine's read bandwidth (same run).

python bench/bench_export.py head --model mobilemoe_s
    the tied head at the model's vocabulary: the project's table kernel (the table stored
    once) against XNNPACK's INT4 GEMM (a second copy), side by side in one run: program
    bytes, decode (1 row) and prefill-head latency, decode against the read bound.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.export.lower import (  # noqa: E402
    INT4_GEMM_OP,
    MOE_KERNEL_OP,
    expert_weight_table,
    export_program,
    lower_to_pte,
)
from pipeline.export.program import ExportableLM  # noqa: E402
from pipeline.profile.programs import random_int4  # noqa: E402
from pipeline.recipe import compose, validate  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class RssSampler:
    """The peak resident set size of this process while the block runs (sampled every 0.1 s)."""

    def __enter__(self):
        self.peak, self._done = psutil.Process().memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._done.wait(0.1):
            self.peak = max(self.peak, process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def lower_cmd(args) -> None:
    cfg = validate(compose([f"model={args.model}"])).model
    cfg = replace(cfg, n_layers=args.layers or cfg.n_layers)
    started = time.perf_counter()
    model = random_int4(cfg, 32, seed=0)[0]
    built = time.perf_counter() - started
    program = ExportableLM(model, args.max_context, moe=args.moe)
    started = time.perf_counter()
    exported = export_program(program)
    exported_s = time.perf_counter() - started
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    with RssSampler() as lowering_rss:
        lowered = lower_to_pte(
            exported, {"max_context": args.max_context, "vocab_size": cfg.vocab_size, "bos_id": 0, "eos_id": 1}
        )
    lower_s = time.perf_counter() - started
    report = {
        "model": args.model,
        "layers": cfg.n_layers,
        "moe": args.moe,
        "seconds": {"build_and_quantize": built, "export": exported_s, "lower": lower_s},
        "peak_rss_gib": _peak_rss_gib(),
        # RSS when lowering starts (weights, exported program) and its peak while lowering
        "lowering_rss_gib": {"start": rss_before / 2**30, "peak": lowering_rss.peak / 2**30},
        "pte_bytes": len(lowered.buffer),
        "operators": {k: lowered.operators[k] for k in ("delegate_calls", "portable_compute")},
        "delegated_int4_gemms": lowered.operators["delegated"].get(INT4_GEMM_OP, 0),
        "moe_kernels": lowered.operators["portable"].get(MOE_KERNEL_OP, 0),
        "graph_nodes": sum(lowered.operators["portable"].values()) + lowered.operators["delegate_calls"],
        "experts": expert_weight_table(program)[:1],
    }
    print(json.dumps(report, indent=2))


def _layer_cfg(experts: int, top_k: int):
    from pipeline.model import ModelConfig, MoEConfig

    moe = MoEConfig(num_experts=experts, top_k=top_k, expert_ffn_dim=256, num_shared_experts=1, shared_ffn_dim=256)
    return ModelConfig(
        name="bench", vocab_size=512, d_model=512, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=64, moe=moe
    )


def sparsity_cmd(args) -> None:
    from pipeline.export.kernels import open_program

    # (32, 32): every expert active, what a compute-every-expert program would cost.
    # Both MoE forms (program.py: fused kernel, per-expert XNNPACK), all programs loaded
    # first and timed in interleaved rounds in a new random order each round, so that a slow
    # stretch of this shared machine, or the cache a previous program left, hits every
    # program alike.
    shapes = [(moe, e, k) for moe in ("fused", "xnnpack") for e, k in ((8, 1), (8, 4), (32, 1), (32, 4), (32, 32))]
    methods, keep = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for moe, experts, top_k in shapes:
            program = ExportableLM(random_int4(_layer_cfg(experts, top_k), 32, seed=0)[0], 64, moe=moe)
            lowered = lower_to_pte(
                export_program(program), {"max_context": 64, "vocab_size": 512, "bos_id": 0, "eos_id": 1}
            )
            path = Path(tmp) / f"{moe}_{experts}_{top_k}.pte"
            lowered.write(path)
            loaded = open_program(path)
            keep.append(loaded)  # a method reads its program's memory
            methods[(moe, experts, top_k)] = loaded.load_method("forward")
        gen = torch.Generator().manual_seed(0)
        samples = {(key, name): [] for key in methods for name in ("decode_us", "prefill32_us")}
        order = list(methods)
        for r in range(args.repeats + 3):
            random.Random(r).shuffle(order)
            for key in order:
                method = methods[key]
                for name, length in (("decode_us", 1), ("prefill32_us", 32)):
                    tokens = torch.randint(0, 512, (1, length), generator=gen)
                    started = time.perf_counter()
                    method.execute([tokens, torch.tensor([0])])
                    if r >= 3:  # warm-up
                        samples[(key, name)].append((time.perf_counter() - started) * 1e6)
    rows = []
    for moe, experts, top_k in shapes:
        timings = {
            name: statistics.median(samples[((moe, experts, top_k), name)]) for name in ("decode_us", "prefill32_us")
        }
        rows.append({"moe": moe, "experts": experts, "top_k": top_k, **timings})
        print(json.dumps(rows[-1]), flush=True)
    for moe in ("fused", "xnnpack"):
        mine = {(r["experts"], r["top_k"]): r for r in rows if r["moe"] == moe}
        base = mine[(8, 1)]
        for (experts, top_k), row in mine.items():
            ratio = {k: row[k] / base[k] for k in ("decode_us", "prefill32_us")}
            print(
                f"{moe:>7} E={experts:>2} K={top_k}: decode x{ratio['decode_us']:.2f}, "
                f"prefill x{ratio['prefill32_us']:.2f} (vs its E=8 K=1)"
            )
        # 24 more experts at the same top-k, none of them routed during decode at K=1..4.
        idle = [(mine[(32, k)]["decode_us"] - mine[(8, k)]["decode_us"]) / 24 for k in (1, 4)]
        print(f"{moe:>7}: decode cost per idle expert {idle[0]:.2f} us (K=1), {idle[1]:.2f} us (K=4)")


def kernel_cmd(args) -> None:
    """The routed experts of one MoE layer of ``--model``'s shape, decode (1 token) and
    ``--prefill``-token prefill through the fused kernel, against the bytes it must read
    and this machine's read bandwidth measured in the same run."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import Dim, export

    from pipeline.export import native
    from pipeline.export.moe_op import moe_experts_int4, pack_int4
    from pipeline.profile.system import read_bandwidth_gb_s

    moe = validate(compose([f"model={args.model}"])).model.moe
    E, K, D, F = (
        moe.num_experts,
        moe.top_k,
        validate(compose([f"model={args.model}"])).model.d_model,
        moe.expert_ffn_dim,
    )
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer(
                "w13", torch.stack([pack_int4(torch.randint(-8, 8, (2 * F, D)), 32) for _ in range(E)])
            )
            self.register_buffer("w2", torch.stack([pack_int4(torch.randint(-8, 8, (D, F)), 32) for _ in range(E)]))
            self.register_buffer("w13_scale", torch.rand(E, 2 * F, D // 32) * 0.01)
            self.register_buffer("w2_scale", torch.rand(E, D, F // 32) * 0.01)

        def forward(self, x_TD, experts_TK, gates_TK):
            return moe_experts_int4(x_TD, experts_TK, gates_TK, self.w13, self.w13_scale, self.w2, self.w2_scale)

    class Experts(torch.nn.Module):
        """``--layers`` layers' routed experts in a row: their weights exceed the last-level
        cache, as a whole model's do, so decode reads them from DRAM."""

        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(args.layers))

        def forward(self, x_TD, experts_TK, gates_TK):
            for layer in self.layers:
                x_TD = x_TD + layer(x_TD, experts_TK, gates_TK)
            return x_TD

    tokens = Dim("tokens", min=1, max=max(args.prefill, 2))
    example = (torch.randn(2, D), torch.zeros(2, K, dtype=torch.long), torch.rand(2, K))
    ep = export(Experts(), example, dynamic_shapes=({0: tokens}, {0: tokens}, {0: tokens}))
    manager = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    native.load()
    from executorch.runtime import Runtime

    from pipeline.profile.system import set_threads

    set_threads(args.threads, "--threads")  # the kernel's pool and the bandwidth measurement alike
    program = Runtime.get().load_program(manager.buffer)
    method = program.load_method("forward")
    per_expert = 3 * F * D // 2 + 3 * F * D // 32 * 4  # INT4 values + FP32 scales per 32
    rows = {}
    for name, T in (("decode", 1), ("prefill", args.prefill)):
        samples = []
        for r in range(args.repeats + 3):
            x = torch.randn(T, D, generator=gen)
            experts = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
            started = time.perf_counter()
            method.execute([x, experts, torch.rand(T, K, generator=gen)])
            if r >= 3:
                samples.append(time.perf_counter() - started)
        rows[name] = statistics.median(samples)
    bandwidth = read_bandwidth_gb_s(512, args.threads)["gb_s"]
    read = args.layers * K * per_expert
    bound_us = read / (bandwidth * 1e9) * 1e6
    macs = args.layers * args.prefill * K * 3 * F * D
    print(
        json.dumps(
            {
                "model": args.model,
                "experts": E,
                "top_k": K,
                "layers": args.layers,
                "bytes_per_expert": per_expert,
                "decode_us": rows["decode"] * 1e6,
                "decode_bound_us": bound_us,
                "decode_fraction_of_bound": bound_us / (rows["decode"] * 1e6),
                "read_bandwidth_gb_s": bandwidth,
                f"prefill{args.prefill}_us": rows["prefill"] * 1e6,
                "prefill_gmac_s": macs / rows["prefill"] / 1e9,
            },
            indent=2,
        )
    )


def _median_us(method, make_inputs, repeats: int) -> float:
    samples = []
    for r in range(repeats + 3):
        inputs = make_inputs()
        started = time.perf_counter()
        method.execute(inputs)
        if r >= 3:
            samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1e6


def head_cmd(args) -> None:
    """The tied head of ``--model`` (random INT4 table, groups of 32) in both forms."""
    from executorch.exir import EdgeCompileConfig, to_edge, to_edge_transform_and_lower
    from executorch.runtime import Runtime
    from torch.export import Dim, export

    from pipeline.export import native
    from pipeline.export.program import Int4Linear, Int4TiedTable
    from pipeline.export.xnnpack_shim import sparse_partitioner
    from pipeline.profile.system import read_bandwidth_gb_s, set_threads
    from pipeline.quant.convert import QuantizedWeight

    cfg = validate(compose([f"model={args.model}"])).model
    V, D = cfg.vocab_size, cfg.d_model
    gen = torch.Generator().manual_seed(0)
    weight = QuantizedWeight(
        torch.randint(-8, 8, (V, D), generator=gen, dtype=torch.int8),
        torch.rand(V, D // 32, generator=gen) * 0.01,
        4,
        32,
    )
    table = Int4TiedTable(weight)

    class Head(torch.nn.Module):
        def __init__(self, head) -> None:
            super().__init__()
            self.inner = head

        def forward(self, x_SD):
            return self.inner(x_SD)

    rows = Dim("rows", min=1, max=max(args.prefill, 2))
    example, dynamic = (torch.randn(2, D),), ({0: rows},)
    config = EdgeCompileConfig(_check_ir_validity=False)
    kernel_buf = (
        to_edge(export(Head(table.head), example, dynamic_shapes=dynamic), compile_config=config).to_executorch().buffer
    )
    xnn_ep = export(Head(Int4Linear(weight)), example, dynamic_shapes=dynamic)
    xnn_buf = (
        to_edge_transform_and_lower(xnn_ep, partitioner=[sparse_partitioner()], compile_config=config)
        .to_executorch()
        .buffer
    )
    native.load()
    set_threads(args.threads, "--threads")
    programs = {name: Runtime.get().load_program(buf) for name, buf in (("kernel", kernel_buf), ("xnnpack", xnn_buf))}
    methods = {name: p.load_method("forward") for name, p in programs.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in methods}
    for _ in range(args.rounds):  # interleaved: both forms see the same machine state
        for name, method in methods.items():
            times[name]["decode"].append(_median_us(method, lambda: [torch.randn(1, D, generator=gen)], args.repeats))
            times[name]["prefill"].append(_median_us(method, lambda: [torch.randn(args.prefill, D, generator=gen)], 3))
    bandwidth = read_bandwidth_gb_s(512, args.threads)["gb_s"]
    table_bytes = V * D // 2 + V * D // 32 * 4
    bound_us = table_bytes / (bandwidth * 1e9) * 1e6
    result = {
        "model": args.model,
        "vocab": V,
        "d_model": D,
        "table_bytes": table_bytes,
        "read_bandwidth_gb_s": bandwidth,
    }
    for name in methods:
        decode, prefill = statistics.median(times[name]["decode"]), statistics.median(times[name]["prefill"])
        result[name] = {
            "pte_bytes": len(kernel_buf if name == "kernel" else xnn_buf),
            "decode_us": decode,
            "decode_fraction_of_bound": bound_us / decode,
            f"prefill{args.prefill}_us": prefill,
        }
    result["kernel_over_xnnpack"] = {
        k: result["kernel"][k] / result["xnnpack"][k] for k in ("pte_bytes", "decode_us", f"prefill{args.prefill}_us")
    }
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    lower = sub.add_parser("lower")
    lower.add_argument("--model", default="tiny")
    lower.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    lower.add_argument("--max-context", type=int, default=256)
    lower.add_argument("--moe", default="fused", choices=("fused", "xnnpack"), help="routed experts' form")
    sparsity = sub.add_parser("sparsity")
    sparsity.add_argument("--repeats", type=int, default=30)
    kernel = sub.add_parser("kernel")
    kernel.add_argument("--model", default="mobilemoe_s")
    kernel.add_argument("--prefill", type=int, default=128)
    kernel.add_argument("--layers", type=int, default=8, help="MoE layers in a row (weights beyond the L3)")
    kernel.add_argument("--repeats", type=int, default=50)
    kernel.add_argument("--threads", type=int, default=2, help="threads of the kernel and of the bandwidth measurement")
    head = sub.add_parser("head")
    head.add_argument("--model", default="mobilemoe_s")
    head.add_argument(
        "--prefill", type=int, default=64, help="rows through the head (a program returning every position)"
    )
    head.add_argument("--rounds", type=int, default=5)
    head.add_argument("--repeats", type=int, default=20)
    head.add_argument("--threads", type=int, default=2, help="threads of the kernels and of the bandwidth measurement")
    args = parser.parse_args()
    {"lower": lower_cmd, "sparsity": sparsity_cmd, "kernel": kernel_cmd, "head": head_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
