"""What a sweep says, measured: MoE against its dense twins, and the paper's findings.

The paper's first claim, answered from the points themselves (not the law): at equal
active compute (the ``dense`` twin has the MoE's active FFN width) and equal tokens,
how much lower is each MoE's validation loss? And its qualitative findings, each as
paired differences over every (size, tokens) cell where both architectures ran:
finer granularity at the same expansion, a shared expert, and more sparsity.

The same questions at equal training seconds: an MoE step costs more wall-clock than
its dense twin's on the same hardware, so at the dense run's seconds the MoE has seen
fewer tokens. A family's loss at a given time is read off its own runs of that size:
``log loss`` interpolated linearly in ``log seconds`` between the two runs whose
training seconds bracket it (a power law in time between neighbouring budgets, the
law's own form in D); outside the family's measured range there is no value
(interpolation only, never extrapolation).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, replace

from pipeline.scaling.fit import Observation


def _cells(points: list[Observation]) -> dict[tuple[str, float], dict[str, Observation]]:
    """``{(size, tokens): {family: point}}``; ``size`` is the name's first field. Seed
    replicates of a point are one point: the mean of their losses, and the training
    seconds of the grid's own run (seed 0; None without it): replicates are often run
    later, beside other work or on another machine, and the equal-time tables compare
    seconds of one sweep on one machine."""
    runs: dict[tuple[str, float, str], list[Observation]] = {}
    for p in points:
        runs.setdefault((p.name.split("-")[0], p.inputs.tokens, p.family), []).append(p)
    cells: dict[tuple[str, float], dict[str, Observation]] = {}
    for (size, tokens, family), reps in runs.items():
        grid_run = next((r for r in reps if replicate_of(r.name) == r.name), None)
        merged = replace(reps[0], loss=statistics.fmean(r.loss for r in reps),
                         seconds=None if grid_run is None else grid_run.seconds)  # fmt: skip
        cells.setdefault((size, tokens), {})[family] = merged
    return cells


def replicate_of(name: str) -> str:
    """The point a run replicates: its name without the ``-seed<n>`` suffix."""
    return re.sub(r"-seed\d+$", "", name)


@dataclass
class SeedNoise:
    """Run-to-run noise of the loss from seed replicates: per cell, the sample SD of
    ``log L`` over its seeds (ddof 1: a relative SD of the loss); pooled over cells as
    the root mean of the variances (equal seeds per cell weigh equally)."""

    cells: dict[str, tuple[int, float]]  # point -> (seeds, SD of log loss)
    pooled: float  # nan without a replicated cell

    def to_dict(self) -> dict:
        return {"cells": {k: {"seeds": n, "sd_log_loss": sd} for k, (n, sd) in self.cells.items()},
                "pooled_sd_log_loss": None if math.isnan(self.pooled) else self.pooled}  # fmt: skip


def seed_noise(points: list[Observation]) -> SeedNoise:
    """:class:`SeedNoise` of the cells with two or more seeds."""
    groups: dict[str, list[float]] = {}
    for p in points:
        groups.setdefault(replicate_of(p.name), []).append(math.log(p.loss))
    cells = {k: (len(v), statistics.stdev(v)) for k, v in sorted(groups.items()) if len(v) >= 2}
    pooled = math.sqrt(statistics.fmean(sd**2 for _, sd in cells.values())) if cells else math.nan
    return SeedNoise(cells, pooled)


@dataclass(frozen=True)
class Comparison:
    """``better`` minus ``worse`` loss differences (nats), paired per (size, tokens)."""

    label: str
    a: str
    b: str
    deltas: tuple[float, ...]  # loss(b) - loss(a): positive when a is better

    @property
    def mean(self) -> float:
        return statistics.fmean(self.deltas) if self.deltas else float("nan")

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.deltas)


def paired(points: list[Observation], a: str, b: str, label: str) -> Comparison:
    """loss(b) - loss(a) in every cell where both families ran."""
    deltas = tuple(cell[b].loss - cell[a].loss for _, cell in sorted(_cells(points).items()) if a in cell and b in cell)
    return Comparison(label, a, b, deltas)


def vs_dense_table(points: list[Observation], dense: str = "dense") -> tuple[list[str], list[list]]:
    """Header and rows: per (size, tokens), the dense twin's loss and every other
    family's loss minus it (negative: lower loss than the dense model at equal active
    compute and tokens)."""
    families = sorted({p.family for p in points} - {dense})
    header = ["size", "tokens", f"{dense} loss", *[f"{f} - {dense}" for f in families]]
    rows = []
    for (size, tokens), cell in sorted(_cells(points).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if dense not in cell:
            continue
        base = cell[dense].loss
        rows.append(
            [size, int(tokens), round(base, 4)]
            + [round(cell[f].loss - base, 4) if f in cell else None for f in families]
        )
    return header, rows


def findings(points: list[Observation], pairs: list[tuple[str, str, str]]) -> list[Comparison]:
    """The paired comparisons ``(a, b, label)`` that both families of the sweep have."""
    names = {p.family for p in points}
    return [paired(points, a, b, label) for a, b, label in pairs if a in names and b in names]


def loss_at_seconds(points: list[Observation], family: str, size: str, seconds: float) -> float | None:
    """``family``'s validation loss at ``seconds`` of training at ``size``, interpolated
    (see the module doc) between its two runs that bracket it; None outside its range
    or where its runs have no seconds. Units: nats/token; seconds of training steps."""
    runs = sorted(
        (cell[family].seconds, cell[family].loss)
        for (cell_size, _), cell in _cells(points).items()  # seed replicates merged
        if cell_size == size and family in cell and cell[family].seconds is not None and cell[family].seconds > 0
    )
    for (t0, l0), (t1, l1) in zip(runs, runs[1:]):
        if t0 <= seconds <= t1 and t1 > t0:
            w = (math.log(seconds) - math.log(t0)) / (math.log(t1) - math.log(t0))
            return math.exp((1 - w) * math.log(l0) + w * math.log(l1))
    if runs and any(t == seconds for t, _ in runs):
        return next(loss for t, loss in runs if t == seconds)
    return None


def paired_at_seconds(points: list[Observation], a: str, b: str, label: str) -> Comparison:
    """loss(b) - loss_a(b's training seconds), in every cell where b ran with known
    seconds and a's runs of that size bracket them: positive when a, given the same
    wall-clock, reaches a lower loss."""
    deltas = []
    for (size, _), cell in sorted(_cells(points).items()):
        if b in cell and cell[b].seconds:
            at = loss_at_seconds(points, a, size, cell[b].seconds)
            if at is not None:
                deltas.append(cell[b].loss - at)
    return Comparison(label, a, b, tuple(deltas))


def vs_dense_seconds_table(points: list[Observation], dense: str = "dense") -> tuple[list[str], list[list]]:
    """Header and rows: per (size, tokens) of the dense twin, its training seconds and
    loss, and every other family's loss at the same seconds minus it (None where that
    family's runs do not bracket the time)."""
    families = sorted({p.family for p in points} - {dense})
    header = ["size", "dense tokens", "seconds", f"{dense} loss", *[f"{f} - {dense}" for f in families]]
    rows = []
    for (size, tokens), cell in sorted(_cells(points).items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if dense not in cell or not cell[dense].seconds:
            continue
        base, seconds = cell[dense].loss, cell[dense].seconds
        deltas = [loss_at_seconds(points, f, size, seconds) for f in families]
        rows.append(
            [size, int(tokens), round(seconds, 1), round(base, 4)]
            + [round(d - base, 4) if d is not None else None for d in deltas]
        )
    return header, rows


def findings_at_seconds(points: list[Observation], pairs: list[tuple[str, str, str]]) -> list[Comparison]:
    """:func:`findings` at equal training seconds."""
    names = {p.family for p in points}
    return [paired_at_seconds(points, a, b, label) for a, b, label in pairs if a in names and b in names]
