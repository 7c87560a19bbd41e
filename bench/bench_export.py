"""Export benchmarks: lowering time and memory of a model shape, and the sparsity proof.

python bench/bench_export.py lower --model mobilemoe_s --layers 1
    random-weight model of that shape (full width; ``--layers`` keeps the first N),
    PTQ to 8da4w, export + XNNPACK lowering: seconds, peak RSS, the operator table
    and INT4 bytes per expert. Full depth costs about N times one layer.

python bench/bench_export.py sparsity
    one MoE layer lowered at several (experts, top-k); decode (1 token) and 32-token
    prefill latency in the ExecuTorch runtime, median of repeats, side by side in one
    run. Sparse: time follows top-k, not the expert count.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.export.lower import expert_weight_table, export_program, lower_to_pte  # noqa: E402
from pipeline.export.program import ExportableLM  # noqa: E402
from pipeline.profile.programs import random_int4  # noqa: E402
from pipeline.recipe import compose, validate  # noqa: E402


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def lower_cmd(args) -> None:
    cfg = validate(compose([f"model={args.model}"])).model
    cfg = replace(cfg, n_layers=args.layers or cfg.n_layers)
    started = time.perf_counter()
    model = random_int4(cfg, 32, seed=0)[0]
    built = time.perf_counter() - started
    program = ExportableLM(model, args.max_context)
    started = time.perf_counter()
    exported = export_program(program)
    exported_s = time.perf_counter() - started
    started = time.perf_counter()
    lowered = lower_to_pte(
        exported, {"max_context": args.max_context, "vocab_size": cfg.vocab_size, "bos_id": 0, "eos_id": 1}
    )
    lower_s = time.perf_counter() - started
    report = {
        "model": args.model,
        "layers": cfg.n_layers,
        "seconds": {"build_and_quantize": built, "export": exported_s, "lower": lower_s},
        "peak_rss_gib": _peak_rss_gib(),
        "pte_bytes": len(lowered.buffer),
        "operators": {k: lowered.operators[k] for k in ("delegate_calls", "portable_compute")},
        "delegated_int4_gemms": lowered.operators["delegated"].get(
            "quantized_decomposed.dequantize_per_channel_group.default", 0
        ),
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

    rows = []
    # (32, 32): every expert active, what a compute-every-expert program would cost.
    for experts, top_k in ((8, 1), (8, 4), (32, 1), (32, 4), (32, 32)):
        program = ExportableLM(random_int4(_layer_cfg(experts, top_k), 32, seed=0)[0], 64)
        lowered = lower_to_pte(
            export_program(program), {"max_context": 64, "vocab_size": 512, "bos_id": 0, "eos_id": 1}
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.pte"
            lowered.write(path)
            method = open_program(path).load_method("forward")
            gen = torch.Generator().manual_seed(0)
            timings = {}
            for name, length in (("decode_us", 1), ("prefill32_us", 32)):
                samples = []
                for r in range(args.repeats + 3):
                    tokens = torch.randint(0, 512, (1, length), generator=gen)
                    started = time.perf_counter()
                    method.execute([tokens, torch.tensor([0])])
                    if r >= 3:  # warm-up
                        samples.append((time.perf_counter() - started) * 1e6)
                timings[name] = statistics.median(samples)
        rows.append({"experts": experts, "top_k": top_k, **timings})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        ratio = {k: row[k] / base[k] for k in ("decode_us", "prefill32_us")}
        label = f"E={row['experts']:>2} K={row['top_k']}"
        print(f"{label}: decode x{ratio['decode_us']:.2f}, prefill x{ratio['prefill32_us']:.2f} (vs E=8 K=1)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    lower = sub.add_parser("lower")
    lower.add_argument("--model", default="tiny")
    lower.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    lower.add_argument("--max-context", type=int, default=256)
    sparsity = sub.add_parser("sparsity")
    sparsity.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    {"lower": lower_cmd, "sparsity": sparsity_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
