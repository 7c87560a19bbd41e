"""What a sweep says, measured: MoE against its dense twins, and the paper's findings.

The paper's first claim, answered from the points themselves (not the law): at equal
active compute (the ``dense`` twin has the MoE's active FFN width) and equal tokens,
how much lower is each MoE's validation loss? And its qualitative findings, each as
paired differences over every (size, tokens) cell where both architectures ran:
finer granularity at the same expansion, a shared expert, and more sparsity.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from pipeline.scaling.fit import Observation


def _cells(points: list[Observation]) -> dict[tuple[str, float], dict[str, Observation]]:
    """``{(size, tokens): {family: point}}``; ``size`` is the name's first field."""
    cells: dict[tuple[str, float], dict[str, Observation]] = {}
    for p in points:
        cells.setdefault((p.name.split("-")[0], p.inputs.tokens), {})[p.family] = p
    return cells


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
