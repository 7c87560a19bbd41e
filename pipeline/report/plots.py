"""The report's plots (matplotlib, Agg backend): loss curves of the training stages and
the expert load of each stage's final checkpoint. A stage that has not run gets a panel
that says so, so a figure's layout does not depend on which stages ran."""

from __future__ import annotations

from pathlib import Path

from pipeline.report.collect import TrainingRun
from pipeline.report.fmt import pct

MISSING = "missing\n(stage has not run)"
DPI = 110


def _pyplot():
    """pyplot on the Agg backend (no display needed). matplotlib is imported here, on the
    first plot, not with the module: the recipe's config imports this package, and
    matplotlib would add about 0.15 s to every config validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _missing_panel(ax, title: str, text: str = MISSING) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_loss_curves(training: dict[str, TrainingRun | None], path: Path) -> None:
    """Train and val loss against step, one panel per training stage (in ``training``'s
    order, two per row), written as a PNG to ``path``."""
    plt = _pyplot()
    n = max(len(training), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False, layout="constrained")
    for ax, (stage, run) in zip(axes.flat, training.items()):
        if run is None:
            _missing_panel(ax, stage)
            continue
        if not run.train_curve and not run.val_curve:
            _missing_panel(ax, stage, "no loss.csv")
            continue
        if run.train_curve:
            ax.plot(*zip(*run.train_curve), label="train", color="tab:blue", lw=1.2)
        if run.val_curve:
            ax.plot(*zip(*run.val_curve), label="val", color="tab:orange", marker="o", ms=3.5, lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / target token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(training) :]:
        ax.set_visible(False)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def shares_LE(counts_LE: list[list[float]]) -> list[list[float]]:
    """Each layer's tokens per expert as a share of that layer's routed tokens."""
    return [[c / (sum(row) or 1.0) for c in row] for row in counts_LE]


def plot_expert_load(loads: dict[str, list[list[float]] | None], path: Path) -> None:
    """One heatmap per stage (layers x experts, share of the layer's routed tokens) on a
    shared colour scale, written as a PNG to ``path``. ``None`` marks a stage without a
    final checkpoint (or without a recorded load)."""
    plt = _pyplot()
    from matplotlib import ticker
    from matplotlib.colors import TwoSlopeNorm

    n = max(len(loads), 1)
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    shares = {k: shares_LE(v) for k, v in loads.items() if v}
    uniform = 1 / max((len(s[0]) for s in shares.values()), default=2)
    vmax = max([max(map(max, s)) for s in shares.values()] + [1.5 * uniform])
    # Diverging around the uniform share: blue for under-used experts, red for busy ones.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=vmax)
    height = max((len(s) for s in shares.values()), default=4)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.2 * cols, (1.2 + 0.35 * height) * rows + 0.4), squeeze=False, layout="constrained"
    )
    image = None
    for ax, stage in zip(axes.flat, loads):
        if stage not in shares:
            _missing_panel(ax, stage, MISSING if loads[stage] is None else "no expert load recorded")
            continue
        s = shares[stage]
        image = ax.imshow(s, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(f"{stage} (uniform: {pct(1 / len(s[0]))} per expert)", fontsize=10)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(s)))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(loads) :]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        bar.set_label("share of the layer's routed tokens")
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
