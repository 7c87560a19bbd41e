"""Profile benchmarks: the exported MoE and its dense twins timed side by side, and an
operator-level ETDump breakdown that says where the time of a decode step goes.

python bench/bench_profile.py side-by-side [--programs moe=PATH dense_total=PATH ...]
    interleaved repetitions (the programs take turns on the same held-out prompts), the
    medians and the MoE's paired speed-ups; defaults: the profile stage's programs.

python bench/bench_profile.py etdump [--programs ...] [--prompt 64] [--decode 32]
    each program run with ExecuTorch's event tracer: per decode step, the time in the
    whole method, in XNNPACK delegate calls (and their INT4 GEMMs, attention matmuls and
    other XNNPACK ops), in portable operators (top ones by name), and the call counts.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.export.artifacts import held_out_prompts  # noqa: E402
from pipeline.profile.programs import load_program  # noqa: E402
from pipeline.profile.session import profile_interleaved, speedups, summarize  # noqa: E402
from pipeline.profile.system import set_threads  # noqa: E402

DEFAULTS = {
    "moe": "outputs/export/model.pte",
    "dense_total": "outputs/profile/programs/dense_total.pte",
    "dense_active": "outputs/profile/programs/dense_active.pte",
}


def _programs(items: list[str] | None) -> dict[str, Path]:
    pairs = dict(item.split("=", 1) for item in items) if items else DEFAULTS
    missing = [f"{k}={v}" for k, v in pairs.items() if not Path(v).is_file()]
    if missing:
        raise SystemExit(f"missing programs: {missing} (make profile builds the defaults)")
    return {k: Path(v) for k, v in pairs.items()}


def side_by_side(args) -> None:
    set_threads(args.threads, "--threads")
    programs = {name: load_program(path) for name, path in _programs(args.programs).items()}
    windows = held_out_prompts(Path(args.mixture), args.repeats + 1, max(args.lengths) + args.decode)
    samples = profile_interleaved(
        {k: p.logits for k, p in programs.items()}, windows, args.lengths, args.decode, warmup=1
    )
    summary = summarize(samples)
    print(f"{'program':<14}{'length':>8}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}")
    for name, by_length in summary.items():
        for n, cell in by_length.items():
            print(
                f"{name:<14}{n:>8}{cell['ttft_ms']['median']:>10.2f}{cell['prefill_tok_s']['median']:>15.0f}"
                f"{cell['decode_tok_s']['median']:>14.1f}"
            )
    first = next(iter(programs))
    for other in list(programs)[1:]:
        s = speedups(samples, first, other)
        for n in s["decode"]:
            print(
                f"{first}/{other} @ {n}: prefill x{s['prefill'][n]:.2f}, decode x{s['decode'][n]:.2f}, "
                f"TTFT x{s['ttft'][n]:.2f}"
            )


def _category(name: str) -> str:
    if "QB4W" in name or "QC4W" in name:
        return "xnnpack: INT4 GEMM"
    if "Batch Matrix Multiply" in name:
        return "xnnpack: attention matmul"
    return "xnnpack: other ops"


def etdump_breakdown(path: Path, prompt: list[int], continuation: list[int], runs: int) -> dict:
    """Per-decode-step milliseconds by event, over ``runs`` generations after one warm-up."""
    import executorch.kernels.quantized  # noqa: F401
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    module = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    calls_per_generation = 1 + len(continuation)
    for _ in range(runs + 1):
        module.run_method("forward", (torch.tensor([prompt]), torch.tensor([0])))
        for i, token in enumerate(continuation):
            module.run_method("forward", (torch.tensor([[token]]), torch.tensor([len(prompt) + i])))
    with tempfile.TemporaryDirectory() as tmp:
        etdump = Path(tmp) / "run.etdp"
        module.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        inspector = Inspector(etdump_path=str(etdump))
    # Execution k of the method is raw[k]; keep the decode calls of the measured generations.
    decode_calls = [g * calls_per_generation + 1 + i for g in range(1, runs + 1) for i in range(len(continuation))]
    steps = len(decode_calls)
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            raw = event.perf_data.raw if event.perf_data else []
            if len(raw) < (runs + 1) * calls_per_generation:
                continue
            ms = sum(raw[k] for k in decode_calls) / steps
            if event.name == "Method::execute":
                totals["method total"] += ms
            elif event.name == "DELEGATE_CALL":
                totals["delegate calls"] += ms
                counts["delegate calls"] += 1
            elif event.name == "OPERATOR_CALL":
                totals["portable operators"] += ms
                counts["portable operators"] += 1
            elif event.name.startswith("native_call_"):
                op = event.name.removeprefix("native_call_").split(".")[0]
                totals[f"portable: {op}"] += ms
                counts[f"portable: {op}"] += 1
            elif event.delegate_backend_name or not event.name.startswith(("Method", "Program")):
                totals[_category(event.name)] += ms
                counts[_category(event.name)] += 1
    return {"ms_per_step": dict(totals), "calls_per_step": dict(counts)}


def etdump(args) -> None:
    set_threads(args.threads, "--threads")
    programs = _programs(args.programs)
    window = held_out_prompts(Path(args.mixture), 1, args.prompt + args.decode)[0]
    prompt, continuation = window[: args.prompt], window[args.prompt :]
    tables = {name: etdump_breakdown(path, prompt, continuation, args.runs) for name, path in programs.items()}
    keys = ["method total", "delegate calls", "xnnpack: INT4 GEMM", "xnnpack: attention matmul", "xnnpack: other ops"]
    keys.append("portable operators")
    portable = collections.Counter()
    for t in tables.values():
        portable.update({k: v for k, v in t["ms_per_step"].items() if k.startswith("portable: ")})
    keys += [k for k, _ in portable.most_common(args.top)]
    print(f"decode step at context {args.prompt}..{args.prompt + args.decode}: ms per step (calls per step)")
    print(f"{'event':<34}" + "".join(f"{name:>22}" for name in tables))
    for key in keys:
        cells = []
        for t in tables.values():
            ms, calls = t["ms_per_step"].get(key, 0.0), t["calls_per_step"].get(key)
            cells.append(f"{ms:>14.3f}" + (f" ({calls:>4})" if calls else " " * 7))
        print(f"{key:<34}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("side-by-side", "etdump"):
        p = sub.add_parser(name)
        p.add_argument("--programs", nargs="+", help="NAME=PATH ... (the first is the MoE)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--mixture", default="data/mix/pretrain")
        p.add_argument("--decode", type=int, default=32)
    sub.choices["side-by-side"].add_argument("--lengths", type=int, nargs="+", default=[16, 64, 192])
    sub.choices["side-by-side"].add_argument("--repeats", type=int, default=15)
    sub.choices["etdump"].add_argument("--prompt", type=int, default=64)
    sub.choices["etdump"].add_argument("--runs", type=int, default=3)
    sub.choices["etdump"].add_argument("--top", type=int, default=8, help="portable operators listed")
    args = parser.parse_args()
    {"side-by-side": side_by_side, "etdump": etdump}[args.cmd](args)


if __name__ == "__main__":
    main()
