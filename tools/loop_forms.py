"""``python -m tools.loop_forms [--points outputs/scaling/points.csv] [--loops closed_loop ...]``:
how every candidate law form predicts the closed loops' runs.

The fit chooses its law by leave-one-size-out error over the sweep's points; the closed
loops (``make closed-loop [LOOP=...]``) are runs of architectures the planner chose with
that law, so they test the forms where the planner goes, which no sweep point does.
Each form is refitted to the saved points as ``make scaling-fit`` fits it (the sizes in
``--hold-out`` held out at the largest budget, the full grid of starting points) and
predicts every seed of every loop from the law inputs its ``<loop>.json`` recorded.
Errors are relative, ``predicted / measured - 1``, as the fit reports them: negative
means the law promised a lower loss than the run reached.

A planner that picks the argmin of a law's predictions picks where that law is most
optimistic, so the chosen form's error on its own choices can be larger than on points
nobody chose (docs/scaling.md, "The loop closed").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from pipeline.scaling import forms
from pipeline.scaling.artifacts import read_points
from pipeline.scaling.bootstrap import resample_indices
from pipeline.scaling.closed_loop import saved_runs
from pipeline.scaling.fit import ErrorStats, Observation, fit_law
from pipeline.scaling.law import LawInputs


@dataclass(frozen=True)
class LoopRun:
    """One seed of a closed loop: the loop's name, the run, its law inputs and loss."""

    loop: str
    point: str
    inputs: LawInputs
    measured: float


def read_loop(path: Path) -> list[LoopRun]:
    """The runs of one ``closed_loop`` result (``<loop>.json``): its seed replicates, or
    its single run. Raises ValueError naming the file when it lacks the inputs or runs."""
    try:
        runs = saved_runs(json.loads(path.read_text()))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return [LoopRun(path.stem, r.name, r.inputs, float(r.loss)) for r in runs]


def form_errors(
    points: list[Observation], runs: list[LoopRun], form_names: Sequence[str], starts_for=None
) -> list[dict]:
    """Per form: its fitted formula, its held-out error on ``points`` and its relative
    errors on ``runs`` (mean, RMS, max |.| over all runs, and the mean per loop).
    ``starts_for(form)``: the fits' starting points (default: the full grid)."""
    rows = []
    for name in form_names:
        form = forms.get(name)
        fitted = fit_law(points, starts=None if starts_for is None else starts_for(form), form=form)
        rel = np.array([fitted.law.predict_one(r.inputs) / r.measured - 1.0 for r in runs])
        loops = list(dict.fromkeys(r.loop for r in runs))
        on_loops = ErrorStats.of(rel)
        rows.append(
            {
                "form": name,
                "formula": fitted.law.formula(),
                "held_out_rms": fitted.held_out.rms,
                "held_out_max": fitted.held_out.max,
                "loops_mean": float(rel.mean()),
                "loops_rms": on_loops.rms,
                "loops_max": on_loops.max,
                "per_loop_mean": {
                    loop: float(np.mean([e for r, e in zip(runs, rel) if r.loop == loop])) for loop in loops
                },
            }
        )
    return rows


def global_refits(
    points: list[Observation], runs: list[LoopRun], form_name: str, count: int, seed: int = 0, starts_for=None
) -> dict[str, np.ndarray]:
    """``count`` bootstrap resamples of the fitted points, each refitted from the whole
    grid of starting points (``starts_for(form)``, default the full grid), not from the
    fit's optimum as :func:`pipeline.scaling.bootstrap.bootstrap` refits: what the
    coefficients do when a resample may land in another optimum. Returns per refit the
    irreducible loss ``c`` (nats), the N exponent ``alpha`` and the mean relative error on
    ``runs`` (arrays of ``count``)."""
    form = forms.get(form_name)
    fitted = [p for p in points if not p.held_out]
    starts = None if starts_for is None else starts_for(form)
    out = {"c": [], "alpha": [], "loops_mean": []}
    for idx in resample_indices(fitted, np.random.default_rng(seed), count, form):
        law = fit_law([fitted[i] for i in idx], starts=starts, form=form).law
        out["c"].append(float(np.exp(law.coefficients["log_c"])))
        out["alpha"].append(law.coefficients["alpha"])
        out["loops_mean"].append(float(np.mean([law.predict_one(r.inputs) / r.measured - 1.0 for r in runs])))
    return {k: np.array(v) for k, v in out.items()}


def held_out_points(
    path: Path,
    sizes: Sequence[str] | None = None,
    budgets: str | None = None,
    noise_groups: Sequence[str] | None = None,
) -> list[Observation]:
    """The points of a ``points.csv`` with the fit's hold-out applied: ``sizes`` at the
    largest budget (or at ``budgets="all"``), and the fit's noise weights
    (:func:`pipeline.scaling.noise.weigh` by ``noise_groups``; ``[]``: every point alike);
    conf/scaling.yaml's where None (the table's own marks are not read back), so that a
    tool fits as ``make scaling-fit`` does. ScalingFitError (a ValueError) for a bad
    table or size, or a noise group the table has no replicates for."""
    from pipeline.scaling.noise import weigh
    from pipeline.stages.scaling import hold_out

    scaling = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "scaling.yaml").read_text())["scaling"]
    sizes = scaling["hold_out_sizes"] if sizes is None else sizes
    groups = scaling.get("noise_groups", []) if noise_groups is None else noise_groups
    points = hold_out(read_points(path), list(sizes), budgets or scaling["hold_out_budgets"])
    return weigh(points, tuple(groups))[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=Path, default=Path("outputs/scaling/points.csv"))
    parser.add_argument("--dir", type=Path, default=Path("outputs/scaling"), help="where <loop>.json lie")
    parser.add_argument(
        "--loops", nargs="+", default=["closed_loop", "closed_loop_in_range", "closed_loop_shared_in_range"]
    )
    parser.add_argument("--hold-out", nargs="*", default=None, help="sizes held out (default: conf/scaling.yaml's)")
    parser.add_argument("--hold-out-budgets", choices=("largest", "all"), default=None,
                        help="at the largest budget or at all (default: conf/scaling.yaml's)")  # fmt: skip
    parser.add_argument("--noise-groups", nargs="*", default=None,
                        help="the fit's noise weights (default: conf/scaling.yaml's; none: all alike)")  # fmt: skip
    parser.add_argument("--forms", nargs="+", default=list(forms.FORMS))
    parser.add_argument("--global-refits", type=int, default=0, metavar="N",
                        help="also N bootstrap refits of each form from the whole start grid (4 s each)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        [forms.get(name) for name in args.forms]  # an unknown form is named before any fit
        points = held_out_points(args.points, args.hold_out, args.hold_out_budgets, args.noise_groups)
        runs = [run for loop in args.loops for run in read_loop(args.dir / f"{loop}.json")]
    except (OSError, ValueError, KeyError) as err:
        print(f"loop_forms: {err}", file=sys.stderr)
        return 2
    rows = form_errors(points, runs, args.forms)
    print(f"{len(runs)} runs of {', '.join(args.loops)}; errors predicted / measured - 1 (negative: the law too low)")
    print(f"{'form':<22} {'held-out RMS':>12} {'max':>7} | {'loops mean':>10} {'RMS':>7} {'max':>7} | mean of "
          + ", ".join(args.loops))  # fmt: skip
    for r in rows:
        per = " ".join(f"{v:+.2%}" for v in r["per_loop_mean"].values())
        print(f"{r['form']:<22} {r['held_out_rms']:12.2%} {r['held_out_max']:7.2%} | {r['loops_mean']:+10.2%} "
              f"{r['loops_rms']:7.2%} {r['loops_max']:7.2%} | {per}")  # fmt: skip
    for r in rows:  # which optimum each fit found: with other points held out it can be another basin
        print(f"{r['form']}: {r['formula']}")
    if args.global_refits:
        print(f"{args.global_refits} bootstrap refits from the whole start grid: 2.5/50/97.5 percentiles")
        for name in args.forms:
            spread = global_refits(points, runs, name, args.global_refits)
            q = {k: np.percentile(v, [2.5, 50, 97.5]) for k, v in spread.items()}
            print(f"{name}: floor c {q['c'][0]:.3g}/{q['c'][1]:.3g}/{q['c'][2]:.3g}, alpha {q['alpha'][0]:.3g}/"
                  f"{q['alpha'][1]:.3g}/{q['alpha'][2]:.3g}, loops mean error {q['loops_mean'][0]:+.2%}/"
                  f"{q['loops_mean'][1]:+.2%}/{q['loops_mean'][2]:+.2%}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
