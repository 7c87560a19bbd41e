"""``make profile-paper``: the paper's shapes side by side, MobileMoE-S against the dense
MobileLLM-Pro, at INT4 with random weights, in the ExecuTorch runtime on this CPU.

``--layers 1 0`` lowers each model at 1 layer and at its full depth (0) and reports the
full-depth programs as measured (S lowers in about 3 minutes and 5 GiB with the fused
MoE kernel). Otherwise each model is lowered at its full
width with ``--layers`` layers (1 and 2 by default), the programs of both models are
timed side by side (interleaved runs on the same held-out prompts), and TTFT and the
per-token decode time are extrapolated linearly to the full depth
(:mod:`pipeline.profile.depth`). Width is never shrunk: it decides the shape of every
GEMM and the bytes each layer reads. With two depths the line cannot be checked;
``--layers 1 2 3`` measures its residual.

Routing: a random router is unbalanced on real text (a few experts win most tokens,
max/mean load 3-6), which would make prefill look cheaper (fewer, larger expert GEMMs).
Before quantizing, each router's expert bias is trained the way pre-training trains it,
with the recipe's auxiliary-loss-free sign updates on batches of the training split
(weights untouched), so tokens spread like a trained, balanced router's. The expert load
of the profiled decode steps is measured by eager replay and reported.

Writes ``--out`` (default outputs/profile_paper): programs/, profile.json, report.md,
plots/throughput.png. ``python -m tools.profile_paper --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch

from pipeline.data.mixing import load_split
from pipeline.export.artifacts import held_out_prompts
from pipeline.model.accounting import decode_read_bytes, int4_weight_bytes, param_counts
from pipeline.profile.artifacts import decode_positions
from pipeline.profile.depth import extrapolate, fit_line
from pipeline.profile.programs import load_program, lower_model, random_int4
from pipeline.profile.report import expert_load_sentence, plot_expert_load
from pipeline.profile.routing import decode_expert_load, load_summary
from pipeline.profile.session import profile_interleaved, speedups, summarize
from pipeline.profile.system import machine, read_bandwidth_gb_s, set_threads
from pipeline.recipe import compose, repo_path, validate

PAPER = {"prefill": (1.8, 3.8), "decode": (2.2, 3.4)}  # MobileMoE-S vs MobileLLM-Pro on phones


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="mobilemoe_s")
    p.add_argument("--dense", default="mobilellm_pro")
    p.add_argument(
        "--layers", type=int, nargs="+", default=[1, 2], help="depths profiled (two or more; 0: the model's full depth)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--mixture", default="data/mix/pretrain", help="held-out prompts (val split); make mix")
    p.add_argument("--balance-batches", type=int, default=60, help="router-bias updates before quantizing")
    p.add_argument("--balance-rate", type=float, default=0.01)
    p.add_argument("--out", default="outputs/profile_paper")
    args = p.parse_args(argv)
    if len(set(args.layers)) < 2 or min(args.layers) < 0:
        p.error(f"--layers: two or more distinct depths are needed to extrapolate, got {args.layers}")
    return args


def main(argv=None) -> None:
    args = _args(argv)
    out = repo_path(args.out)
    mixture = repo_path(args.mixture)
    if not (mixture / "manifest.json").is_file():
        raise SystemExit(f"--mixture: {mixture} has no manifest.json; build the mixtures first (make mix)")
    cfgs = {name: validate(compose([f"model={name}"])).model for name in (args.moe, args.dense)}
    families = {"moe": cfgs[args.moe], "dense": cfgs[args.dense]}
    for cfg in families.values():  # 0 stands for the full depth: distinct only once resolved
        if len(set(_depths(args.layers, cfg))) < 2:
            raise SystemExit(
                f"--layers {args.layers}: two or more distinct depths are needed for {cfg.name} "
                f"({cfg.n_layers} layers), got {_depths(args.layers, cfg)}"
            )
    longest = max(args.prompt_lengths) + args.decode_tokens
    max_context = longest

    set_threads(args.threads, "--threads")
    windows = held_out_prompts(mixture, args.warmup + args.repeats, longest)
    bandwidth = read_bandwidth_gb_s(512, args.threads)
    (out / "programs").mkdir(parents=True, exist_ok=True)

    # Bias-update batches of rows from random places in the training split: each batch
    # mixes domains, as a shuffled pre-training batch does.
    train, _ = load_split(mixture, "train")
    rng = np.random.default_rng(0)
    batches = [
        torch.from_numpy(np.stack([train[s : s + 128] for s in rng.integers(0, len(train) - 128, 8)]).astype("int64"))
        for _ in range(args.balance_batches)
    ]
    programs, entries, eager = {}, {}, None
    for family, cfg in families.items():
        for n in _depths(args.layers, cfg):
            name = f"{family}@{n}"
            started = time.perf_counter()
            model, balance = random_int4(replace(cfg, n_layers=n), args.group_size, n, batches, args.balance_rate)
            path = out / "programs" / f"{family}_{n}layers.pte"
            lower_model(model, max_context, last_logits_only=True, bos_id=0, eos_id=1).write(path)
            programs[name] = load_program(path)
            entries[name] = {
                "layers": n,
                "pte_bytes": path.stat().st_size,
                "build_and_lower_s": time.perf_counter() - started,
                "balance_max_over_mean": balance,  # per bias-update batch (MoE only)
            }
            e = entries[name]
            print(f"{name}: built and lowered in {e['build_and_lower_s']:.0f} s, {e['pte_bytes'] / 2**20:.1f} MiB")
            if family == "moe" and n == max(_depths(args.layers, cfg)):
                eager = model
            del model

    samples = profile_interleaved(
        {k: p.logits for k, p in programs.items()}, windows, args.prompt_lengths, args.decode_tokens, args.warmup
    )
    summary = summarize(samples)
    full = {}
    for family, cfg in families.items():
        full[family] = {}
        for length in map(str, args.prompt_lengths):
            by_depth = {
                n: {m: summary[f"{family}@{n}"][length][m]["median"] for m in ("ttft_ms", "decode_tok_s")}
                for n in _depths(args.layers, cfg)
            }
            full[family][length] = extrapolate(by_depth, int(length), cfg.n_layers)
        depths = _depths(args.layers, cfg)
        a, b = fit_line([float(n) for n in depths], [entries[f"{family}@{n}"]["pte_bytes"] for n in depths])
        # The ideal step's bytes at each length: the prompt and half the decoded tokens
        # cached (windowed layers at most their window), FP32 cache (the default).
        read = {
            str(n): decode_read_bytes(cfg, decode_positions(n, args.decode_tokens), args.group_size, kv_dtype_bytes=4)
            for n in args.prompt_lengths
        }
        bound = {n: bandwidth["gb_s"] * 1e9 / r["total"] for n, r in read.items()}
        counts = param_counts(cfg)
        full[family]["model"] = {
            "config": cfg.name,
            "layers": cfg.n_layers,
            "params_total": counts.total,
            "params_active": counts.active,
            "int4_weight_bytes": int4_weight_bytes(cfg, args.group_size),
            "pte_bytes_extrapolated": a + b * cfg.n_layers,
            "decode_read_bytes": read,
            "decode_bound_tok_s": bound,
        }
    ratios = {
        phase: {
            length: (
                full["moe"][length][key] / full["dense"][length][key]
                if phase != "ttft"
                else full["dense"][length]["ttft_ms"] / full["moe"][length]["ttft_ms"]
            )
            for length in map(str, args.prompt_lengths)
        }
        for phase, key in (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s"), ("ttft", "ttft_ms"))
    }
    # Pairs at the same --layers entry (0: each model at its own full depth, measured).
    measured_pairs = {
        n: speedups(samples, f"moe@{m}", f"dense@{d}")
        for n, m, d in zip(args.layers, _depths(args.layers, families["moe"]), _depths(args.layers, families["dense"]))
    }
    counts_LE = decode_expert_load(
        eager,
        [(w[: max(args.prompt_lengths)], w[max(args.prompt_lengths) : longest]) for w in windows[args.warmup :]],
        max_context,
    )
    profile = {
        "machine": machine(args.threads),
        "bandwidth": bandwidth,
        "args": vars(args),
        "programs": entries,
        "summary": summary,
        "full_depth": full,
        "speedup_full_depth": ratios,
        "speedup_measured_depth": measured_pairs,
        "expert_load": {"counts": counts_LE.tolist(), **load_summary(counts_LE, families["moe"].moe.top_k)},
        "paper": PAPER,
    }
    (out / "plots").mkdir(exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile, indent=2, sort_keys=True))
    (out / "report.md").write_text(report(profile))
    plot_expert_load(counts_LE.tolist(), out / "plots" / "expert_load.png")
    print(report(profile))


def _depths(layers: list[int], cfg) -> list[int]:
    """--layers for one model: 0 stands for its full depth."""
    return [n or cfg.n_layers for n in layers]


def residual(x: dict, layers: list[int]) -> str:
    """The fit's largest relative residual, or n/a: a line through two depths fits exactly,
    and a full-depth program (0 in --layers) is measured, not fitted."""
    if 0 in layers:
        return "measured"
    return "n/a (2 depths)" if len(set(layers)) < 3 else f"{x['fit_max_relative_residual']:.1%}"


def report(p: dict) -> str:
    """The paper comparison as markdown: measured depths, full-depth extrapolation, verdict."""
    a = p["args"]
    m, full = p["machine"], p["full_depth"]
    moe_depth = max(n for n in (int(name.split("@")[1]) for name in p["programs"] if name.startswith("moe@")))
    balance = p["programs"][f"moe@{moe_depth}"]["balance_max_over_mean"] or [float("nan")]
    measured_full = 0 in a["layers"]
    lines = [
        f"# {a['moe']} against {a['dense']}: INT4 (8da4w) ExecuTorch programs, random weights",
        "",
        f"{m['cpu']}, {m['threads']} threads; read bandwidth {p['bandwidth']['gb_s']:.1f} GB/s. Full width, "
        f"{', '.join(str(n) if n else 'full' for n in a['layers'])} layers lowered and timed side by side "
        f"(medians of {a['repeats']} interleaved runs on held-out prompts), "
        + (
            "the full-depth programs measured as they are. "
            if measured_full
            else "extrapolated linearly to the full depth (pipeline/profile/depth.py). "
        )
        + "Last-position logits (the runner's form).",
        "",
        "| model | layers | params total | params active | INT4 weights GB | decode reads MiB/token at the "
        "longest prompt (weights + KV cache) | decode bound tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    top = str(max(a["prompt_lengths"]))
    for family in ("moe", "dense"):
        x = full[family]["model"]
        lines.append(
            f"| {x['config']} | {x['layers']} | {x['params_total'] / 1e9:.2f}B | {x['params_active'] / 1e9:.3f}B "
            f"| {x['int4_weight_bytes'] / 1e9:.2f} | {x['decode_read_bytes'][top]['total'] / 2**20:.0f} "
            f"| {x['decode_bound_tok_s'][top]:.1f} |"
        )
    lines += ["", "Measured (per depth, medians):", ""]
    lines += ["| program | prompt / context | TTFT ms | prefill tok/s | decode tok/s |", "|---|---:|---:|---:|---:|"]
    for name, by_length in p["summary"].items():
        for length, cell in by_length.items():
            lines.append(
                f"| {name} | {length} | {cell['ttft_ms']['median']:.1f} | {cell['prefill_tok_s']['median']:.1f} "
                f"| {cell['decode_tok_s']['median']:.2f} |"
            )
    lines += [
        "",
        "Full depth (measured: programs of the full depth):" if measured_full else "Full depth (extrapolated):",
        "",
    ]
    lines += [
        "| model | prompt / context | TTFT s | prefill tok/s | decode tok/s | decode / bound | fit residual |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family in ("moe", "dense"):
        for length in map(str, a["prompt_lengths"]):
            bound = full[family]["model"]["decode_bound_tok_s"][length]
            x = full[family][length]
            lines.append(
                f"| {full[family]['model']['config']} | {length} | {x['ttft_ms'] / 1e3:.2f} | {x['prefill_tok_s']:.1f} "
                f"| {x['decode_tok_s']:.2f} | {x['decode_tok_s'] / bound:.2f} | {residual(x, a['layers'])} |"
            )
    r = p["speedup_full_depth"]
    lines += ["", "Speed-up of the MoE at full depth (> 1: MoE faster) against the paper's phones:", ""]
    lines += ["| prompt / context | prefill | decode | TTFT |", "|---:|---:|---:|---:|"]
    for length in map(str, a["prompt_lengths"]):
        lines.append(
            f"| {length} | {r['prefill'][length]:.2f}x | {r['decode'][length]:.2f}x | {r['ttft'][length]:.2f}x |"
        )
    longest = str(max(a["prompt_lengths"]))
    pre, dec = r["prefill"][longest], r["decode"][longest]
    lo_p, hi_p = p["paper"]["prefill"]
    lo_d, hi_d = p["paper"]["decode"]
    lines += [
        "",
        f"**At {longest} tokens the MoE is {pre:.2f}x the dense model's prefill speed (paper: {lo_p}-{hi_p}x) and "
        f"{dec:.2f}x its decode speed (paper: {lo_d}-{hi_d}x): it "
        + ("beats" if pre > 1 and dec > 1 else "does not beat")
        + " the dense model on this CPU.**",
        "",
        f"Routing: the random router's expert bias was balanced with the recipe's auxiliary-loss-free updates "
        f"({a['balance_batches']} batches at rate {a['balance_rate']}; max/mean load {balance[0]:.2f} -> "
        f"{balance[-1]:.2f} on the training batches). "
        + expert_load_sentence(p["expert_load"], f"eager replay of the longest-prompt decode, {moe_depth} layers"),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
