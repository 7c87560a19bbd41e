"""Figures of the fit and the plan (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

from pipeline.scaling.fit import FitResult, Observation
from pipeline.scaling.planner import Candidate


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_x(ax) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade, in plain numbers (the default
    labels every minor tick on short spans, and they overlap)."""
    import math

    from matplotlib.ticker import FuncFormatter

    def label(x: float, _pos) -> str:
        lead = round(x / 10 ** math.floor(math.log10(x))) if x > 0 else 0
        return f"{x:g}" if lead in (1, 2, 5) else ""

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(FuncFormatter(label))


def predicted_vs_measured(points: list[Observation], result: FitResult, path: Path) -> None:
    """Scatter of predicted against measured loss; held-out points marked; the y = x
    line and the fit's prediction band around it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    measured = [p.loss for p in points]
    lo, hi = min(measured) * 0.97, max(measured) * 1.03
    ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="y = x")
    ax.fill_between([lo, hi], [lo * (1 - result.band), hi * (1 - result.band)],
                    [lo * (1 + result.band), hi * (1 + result.band)], color="grey", alpha=0.2,
                    label=f"±{result.band:.1%} (3 × fit RMS)")  # fmt: skip
    for held, marker, label in ((False, "o", "fitted"), (True, "*", "held out (largest runs)")):
        chosen = [p for p in points if p.held_out == held]
        if chosen:
            ax.scatter([p.loss for p in chosen], [result.predictions[p.name] for p in chosen], marker=marker,
                       s=60 if held else 25, label=label)  # fmt: skip
    ax.set(xlabel="measured validation loss (nats/token)", ylabel="predicted loss", xlim=(lo, hi), ylim=(lo, hi))
    ax.set_title("Scaling law: predicted vs measured")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_vs_params(points: list[Observation], result: FitResult, path: Path) -> None:
    """Measured loss (markers) and the law (lines) against active parameters, one line
    per architecture family, one panel per token budget."""
    plt = _pyplot()
    budgets = sorted({p.inputs.tokens for p in points})
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 4.2), sharey=True, squeeze=False)
    families = sorted({p.family for p in points})
    colours = plt.get_cmap("tab10")
    for ax, tokens in zip(axes[0], budgets):
        for i, family in enumerate(families):
            chosen = sorted((p for p in points if p.family == family and p.inputs.tokens == tokens),
                            key=lambda p: p.inputs.n_active)  # fmt: skip
            if not chosen:
                continue
            n = [p.inputs.n_active for p in chosen]
            ax.plot(n, [result.predictions[p.name] for p in chosen], color=colours(i % 10), lw=1)
            for held in (False, True):
                shown = [p for p in chosen if p.held_out == held]
                if shown:
                    ax.scatter([p.inputs.n_active for p in shown], [p.loss for p in shown], color=colours(i % 10),
                               s=40 if held else 18, marker="*" if held else "o",
                               label=None if held else family)  # fmt: skip
        _log_x(ax)
        ax.set(xlabel="active parameters N (multiplied per token)", title=f"D = {tokens:,.0f} tokens")
    axes[0][0].set_ylabel("validation loss (nats/token)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle("Loss vs active parameters per architecture (dots: measured, stars: held out; lines: law)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier(
    frontier: list[Candidate], references: list[Candidate], chosen: Candidate, cost: str, path: Path, budget=None
) -> None:
    """The Pareto frontier of predicted loss against ``cost`` (``int4_bytes`` or
    ``flops_per_token``), the reference models and the chosen architecture on it."""
    plt = _pyplot()
    scale, label = (1e9, "INT4 weight memory (GB)") if cost == "int4_bytes" else (1e9, "decode GFLOPs per token")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.step([getattr(c, cost) / scale for c in frontier], [c.loss for c in frontier], where="post",
            label="planner frontier (search space)")  # fmt: skip
    for ref in references:
        ax.scatter(getattr(ref, cost) / scale, ref.loss, marker="s", s=30)
        ax.annotate(ref.model.name, (getattr(ref, cost) / scale, ref.loss), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.scatter(getattr(chosen, cost) / scale, chosen.loss, marker="*", s=120, color="red", label="chosen", zorder=3)
    if budget is not None:
        ax.axvline(budget / scale, color="red", ls="--", lw=1, label="budget")
    _log_x(ax)
    ax.set(xlabel=label, ylabel="predicted loss (nats/token)", title="Predicted loss frontier")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
