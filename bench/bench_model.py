"""Forward+backward time of the MoE layer, side by side with its comparisons.

Prints, for each shape, the MoE layer as training runs it on CPU (the fused C++ kernel,
pipeline/model/kernels) and with torch's grouped GEMM, against (a) a dense SwiGLU with the
same *active* parameters per token, (b) the reference Python loop over experts and
(c) a bound on what better expert GEMMs could give: the grouped layer with every routed
slot sent through one expert's weights as one plain GEMM (wrong maths, timing only: the
router, the dispatch and the combine are unchanged), as ratios measured in one run with
interleaved repetitions (machines are noisy; only ratios mean anything). BF16 autocast
(the grouped GEMM; the fused kernel is FP32) is timed after them, in its own interleaved
phase with the FP32 layer and the BF16 dense twin. Everything runs under the training
loop's host allocator policy (pipeline/train/hostalloc.py: freed large blocks kept);
`--policy system` keeps glibc's own. The two policies cannot be compared within one
process (blocks the heap kept serve later allocations under either), so
`--compare-policies N` runs this benchmark in N pairs of child processes, alternating
the policies, and prints the medians. `--on-thread` times on a second thread, as Ray Train
runs the loop (there glibc keeps blocks above 64 MiB only in a process started with
`MALLOC_ARENA_MAX=1`: pipeline/train/hostalloc.py). `--tokens N` overrides every shape's token count.
Not a test: run `make bench-model`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from pipeline.model import MoE, MoEConfig
from pipeline.model.layers import SwiGLU
from pipeline.train import hostalloc

SHAPES = {
    # name: (d_model, MoEConfig kwargs, tokens)
    "tiny": (128, dict(num_experts=16, top_k=4, expert_ffn_dim=64, num_shared_experts=1, shared_ffn_dim=256), 4096),
    "mobilemoe_s_layer": (
        768,
        dict(num_experts=60, top_k=4, expert_ffn_dim=384, num_shared_experts=1, shared_ffn_dim=1536),
        1024,
    ),
}


class OneGemmBound(torch.nn.Module):
    """GroupedExperts' interface with all slots through expert 0 as one GEMM per
    projection: the time a perfectly efficient grouped GEMM would approach."""

    def __init__(self, experts: torch.nn.Module) -> None:
        super().__init__()
        self.inner = experts

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        w1_EFD, w3_EFD, w2_EDF = self.inner.expert_weights()
        h_NF = torch.nn.functional.silu(x_ND @ w1_EFD[0].T) * (x_ND @ w3_EFD[0].T)
        return h_NF @ w2_EDF[0].T


def fwd_bwd(module: torch.nn.Module, x: torch.Tensor, autocast: bool = False) -> None:
    # As the training loop's zero_grad(set_to_none=True): the backward's gradients are
    # new tensors, not added into the last call's.
    module.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(torch.ones_like(out) * 1e-3)  # materialised: grouped_mm's backward needs strides


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_shape(name: str, reps: int, tokens: int | None = None) -> dict[str, float]:
    d_model, moe_kwargs, default_tokens = SHAPES[name]
    tokens = tokens or default_tokens
    cfg = MoEConfig(score_func="sigmoid", route_scale=2.5, **moe_kwargs)
    torch.manual_seed(0)
    moe = MoE(d_model, cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.02)
    moe.dispatch = "fused"
    grouped = MoE(d_model, cfg)
    grouped.load_state_dict(moe.state_dict())
    grouped.dispatch = "grouped"
    reference = MoE(d_model, cfg)
    reference.load_state_dict(moe.state_dict())
    reference.dispatch = "loop"
    active_ffn = cfg.top_k * cfg.expert_ffn_dim + cfg.num_shared_experts * cfg.shared_ffn_dim
    dense = SwiGLU(d_model, active_ffn)
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    bound = MoE(d_model, cfg)
    bound.load_state_dict(moe.state_dict())
    bound.experts = OneGemmBound(bound.experts)
    bound.dispatch = "grouped"
    fp32 = {  # (module, BF16 autocast)
        "moe_fused": (moe, False),
        "moe_grouped": (grouped, False),
        "dense_same_active": (dense, False),
        "moe_reference_loop": (reference, False),
        "moe_one_gemm_bound": (bound, False),
    }
    # BF16 in a phase of its own: AMX/AVX-512 BF16 work can lower the core's clock for a
    # while, which interleaved with FP32 candidates would tax whichever runs next.
    bf16 = {"moe_bf16": (grouped, True), "dense_bf16": (dense, True), "moe_fp32": (moe, False)}
    times: dict[str, float] = {"tokens": tokens}
    for candidates in (fp32, bf16):
        for module, autocast in candidates.values():  # warm-up
            fwd_bwd(module, x, autocast)
        samples: dict[str, list[float]] = {k: [] for k in candidates}
        for _ in range(reps):  # interleave so drift hits every candidate alike
            for key, (module, autocast) in candidates.items():
                samples[key] += timed(lambda m=module, a=autocast: fwd_bwd(m, x, a), 1)
        times |= {k: statistics.median(v) for k, v in samples.items()}
    return times


def compare_policies(pairs: int, args: argparse.Namespace) -> None:
    """The fused layer and the dense twin under each allocator policy, each run a child
    process of its own, the policies alternating; prints the medians over the runs."""
    runs: dict[str, list[dict]] = {"keep": [], "system": []}
    for _ in range(pairs):
        for policy in runs:
            cmd = [sys.executable, __file__, "--policy", policy, "--reps", str(args.reps), "--json"]
            cmd += ["--shapes", *args.shapes] + (["--tokens", str(args.tokens)] if args.tokens else [])
            cmd += ["--on-thread"] if args.on_thread else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            runs[policy].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"allocator policies, {pairs} child process(es) each, alternating (medians):")
    for name in args.shapes:
        # Times from different processes are compared as medians; the MoE/dense ratio as
        # the median of each run's own (interleaved, side by side) ratio.
        med = {
            policy: {
                "fused": statistics.median(r[name]["moe_fused"] for r in rs),
                "dense": statistics.median(r[name]["dense_same_active"] for r in rs),
                "ratio": statistics.median(r[name]["moe_fused"] / r[name]["dense_same_active"] for r in rs),
            }
            for policy, rs in runs.items()
        }
        keep, system = med["keep"], med["system"]
        print(
            f"  {name}: fused {keep['fused'] * 1e3:.1f} ms kept / {system['fused'] * 1e3:.1f} ms glibc's own "
            f"= {keep['fused'] / system['fused']:.2f}x; dense {keep['dense'] / system['dense']:.2f}x; "
            f"fused / dense {keep['ratio']:.2f}x kept, {system['ratio']:.2f}x glibc's own"
        )


def on_thread(fn, *args):  # noqa: ANN001, ANN202
    """``fn(*args)`` on a new thread (glibc gives it an arena of its own; hostalloc.py)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn(*args)))
    worker.start()
    worker.join()
    if not out:
        raise SystemExit(f"{fn.__name__} failed on its thread (traceback above)")
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES))
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step for every shape")
    parser.add_argument("--policy", choices=("keep", "system"), default="keep", help="host allocator policy")
    parser.add_argument("--compare-policies", type=int, default=0, metavar="N", help="N child runs per policy")
    parser.add_argument("--json", action="store_true", help="print the times as one JSON line")
    parser.add_argument("--on-thread", action="store_true", help="time on a second thread, as Ray Train trains")
    args = parser.parse_args()
    if args.compare_policies:
        compare_policies(args.compare_policies, args)
        return
    if args.policy == "keep" and not hostalloc.keep_freed_blocks():
        print("(not glibc: the allocator policy is the C library's own)")

    def measure(name: str) -> dict[str, float]:
        return (
            on_thread(bench_shape, name, args.reps, args.tokens)
            if args.on_thread
            else bench_shape(name, args.reps, args.tokens)
        )

    if args.json:
        print(json.dumps({name: measure(name) for name in args.shapes}))
        return
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, reps {args.reps} (median), "
        f"host allocator: {'freed blocks kept' if args.policy == 'keep' else 'glibc default'}"
        f"{', on a second thread' if args.on_thread else ''}"
    )
    for name in args.shapes:
        t = measure(name)
        print(
            f"{name} ({t['tokens']} tokens): fused {t['moe_fused'] * 1e3:.1f} ms | "
            f"grouped {t['moe_grouped'] * 1e3:.1f} ms | "
            f"dense(same active) {t['dense_same_active'] * 1e3:.1f} ms | "
            f"reference loop {t['moe_reference_loop'] * 1e3:.1f} ms"
        )
        print(f"  fused / dense(same active)   = {t['moe_fused'] / t['dense_same_active']:.2f}x (target <= 1.2x)")
        print(f"  grouped / dense(same active) = {t['moe_grouped'] / t['dense_same_active']:.2f}x")
        print(f"  reference loop / grouped     = {t['moe_reference_loop'] / t['moe_grouped']:.2f}x")
        print(
            f"  one-GEMM bound / dense       = {t['moe_one_gemm_bound'] / t['dense_same_active']:.2f}x "
            "(router, dispatch and combine as they are; experts as one plain GEMM)"
        )
        print(
            f"  BF16 autocast: MoE {t['moe_bf16'] * 1e3:.1f} ms = {t['moe_bf16'] / t['moe_fp32']:.2f}x the FP32 "
            f"layer (target <= 1x on CPUs with BF16 units), {t['moe_bf16'] / t['dense_bf16']:.2f}x the BF16 dense twin"
        )


if __name__ == "__main__":
    main()
