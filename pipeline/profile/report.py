"""The profile's human outputs: a markdown report with the comparison tables and a
plain verdict, and the plots (tok/s against length, expert load per layer)."""

from __future__ import annotations

import statistics
from pathlib import Path

LABELS = {
    "moe": "MoE (exported)",
    "dense_total": "dense, same total params (equal INT4 memory)",
    "dense_active": "dense, same active params (equal compute)",
}


def runner_table(runner: dict) -> list[str]:
    """The MoE program timed by ExecuTorch's own TextLLMRunner (its Stats), per length."""
    if not runner:
        return []

    def fmt(value) -> str:
        return "below its ms clock" if value is None else f"{value:.1f}"

    lines = [
        "",
        "The MoE program in ExecuTorch's own LLM runner (TextLLMRunner, its Stats; the prompt re-tokenized "
        "from text, greedy until its end token or the decode length; medians):",
        "",
        "| prompt | runner's prompt tokens | generated | TTFT ms | prefill tok/s | decode tok/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length, r in runner.items():
        runs = r["runs"]
        lines.append(
            f"| {length} | {statistics.median(x['num_prompt_tokens'] for x in runs):.0f} "
            f"| {statistics.median(x['num_generated_tokens'] for x in runs):.0f} | {fmt(r['ttft_ms'])} "
            f"| {fmt(r['prefill_tok_s'])} | {fmt(r['decode_tok_s'])} |"
        )
    return lines


def _label(name: str) -> str:
    return LABELS.get(name, name)


def verdict(speedups: dict[str, dict[str, float]], baseline: str) -> str:
    """One sentence: does the MoE beat ``baseline`` at prefill and decode, at the longest
    prompt, and by how much. (TTFT is the prefill time here, so its speed-up equals
    prefill's by definition and is not counted twice.)"""
    longest = max(speedups["decode"], key=int)
    parts = []
    for phase, what in (("prefill", "prefill"), ("decode", "decode"), ("ttft", "time to first token")):
        x = speedups[phase][longest]
        parts.append(f"{what} {x:.2f}x ({'faster' if x > 1 else 'slower'})")
    wins = sum(speedups[p][longest] > 1 for p in ("prefill", "decode"))
    head = {2: "beats", 0: "does not beat"}.get(wins, "partly beats")
    return f"The MoE {head} the {_label(baseline)} at a {longest}-token prompt: " + ", ".join(parts) + "."


def expert_load_sentence(e: dict, what: str) -> str:
    """The expert-load summary next to what uniform routing of as many tokens would show
    (a few hundred tokens leave even a uniform router visibly uneven)."""
    return (
        f"Expert load ({what}, {e['decode_steps']} steps): {e['experts_touched_fraction']:.0%} of (layer, expert) "
        f"pairs got a token; the busiest expert carried {e['max_over_mean_load']:.2f}x the mean load, where "
        f"uniform random routing of as many tokens gives {e['uniform_max_over_mean_load']:.2f}x."
    )


def markdown(profile: dict) -> str:
    """The report: machine, programs, per-length medians [p25-p75], speed-ups, verdicts."""
    m = profile["machine"]
    bw = profile["bandwidth"]
    lines = [
        "# On-device profile: the MoE against its dense twins",
        "",
        f"{m['cpu']} ({m['machine']}), {m['threads']} of {m['cores']} cores; ISA {', '.join(m['isa']) or 'n/a'}; "
        f"torch {m['versions']['torch']}, executorch {m['versions']['executorch']}. "
        f"Read bandwidth {bw['gb_s']:.1f} GB/s. Medians of {profile['runs']} runs per cell after "
        f"{profile['warmup']} warm-up, interleaved, each run on a different held-out prompt; "
        "TTFT, prefill and decode tok/s as ExecuTorch's LLM runner defines them (docs in "
        "pipeline/profile/stats.py). Decode feeds the held-out continuation (teacher forcing).",
        "",
    ]
    if profile.get("note"):
        lines += [profile["note"], ""]
    longest = str(max(profile["prompt_lengths"]))
    lines += [
        "| program | params total | params active | .pte MiB | peak RSS MiB (+ over the process before loading) "
        f"| bytes read / decode token at a {longest}-token prompt (weights + KV cache) | decode bound tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in profile["programs"].items():
        lines.append(
            f"| {_label(name)} | {p['params_total'] / 1e6:.2f}M | {p['params_active'] / 1e6:.2f}M "
            f"| {p['pte_bytes'] / 2**20:.2f} | {p['peak_rss_mib']:.0f} (+{p['peak_rss_increment_mib']:.0f}) "
            f"| {p['decode_read_bytes'][longest]['total'] / 2**20:.2f} MiB | {p['decode_bound_tok_s'][longest]:.0f} |"
        )
    lines += ["", "| program | prompt / context | TTFT ms | prefill tok/s | decode tok/s | decode / bound |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for name, by_length in profile["summary"].items():
        for length, cell in by_length.items():
            fmt = {k: f"{v['median']:.1f} [{v['p25']:.1f}-{v['p75']:.1f}]" for k, v in cell.items()}
            fraction = profile["programs"][name]["decode_fraction_of_bound"][length]
            lines.append(
                f"| {_label(name)} | {length} | {fmt['ttft_ms']} | {fmt['prefill_tok_s']} | {fmt['decode_tok_s']} "
                f"| {fraction:.2f} |"
            )
    lines += runner_table(profile.get("runner", {}))
    if not profile["speedups"]:
        lines += ["", "No dense baseline is configured (stage.profile.baselines is empty): no speed-up to report."]
    for baseline, s in profile["speedups"].items():
        lines += ["", f"Speed-up of the MoE over the {_label(baseline)} (paired runs, > 1: MoE faster):", ""]
        lines += ["| prompt / context | prefill | decode | TTFT |", "|---:|---:|---:|---:|"]
        for length in s["decode"]:
            lines.append(
                f"| {length} | {s['prefill'][length]:.2f}x | {s['decode'][length]:.2f}x | {s['ttft'][length]:.2f}x |"
            )
        lines += ["", f"**{verdict(s, baseline)}**"]
    if profile.get("expert_load"):
        lines += ["", expert_load_sentence(profile["expert_load"], "eager replay of the longest-prompt runs' decode")]
    return "\n".join(lines) + "\n"


def plot_throughput(profile: dict, path: Path) -> None:
    """Prefill tok/s against prompt length and decode tok/s against context, one line per
    program, with the interquartile range as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "prefill_tok_s", "prefill"), (axes[1], "decode_tok_s", "decode")):
        for name, by_length in profile["summary"].items():
            xs = [int(n) for n in by_length]
            mid = [by_length[n][metric]["median"] for n in by_length]
            lo = [mid[i] - by_length[n][metric]["p25"] for i, n in enumerate(by_length)]
            hi = [by_length[n][metric]["p75"] - mid[i] for i, n in enumerate(by_length)]
            ax.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, label=_label(name))
        ax.set_xlabel("prompt tokens" if title == "prefill" else "context (tokens cached)")
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{title} ({profile['machine']['threads']} threads)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(counts_LE: list[list[int]], path: Path) -> None:
    """Tokens per expert during decode, one row per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(counts_LE)))
    image = ax.imshow(counts_LE, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title("decode tokens routed to each expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
