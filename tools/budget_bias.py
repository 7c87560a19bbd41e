"""``python -m tools.budget_bias [--fit outputs/scaling/fit.json] [--draws 8] [--fold largest-budget|held-out]``:
how far a law that is exactly right misses the largest token budget, fitted without it.

``make scaling-fit`` reports each form's "largest budget from the smaller" error
(:func:`pipeline.scaling.select.leave_largest_budget_out`): fitted to the points below
the sweep's largest budget, the law predicts the fitted points at it. A negative mean
there can be the form's fault (a data term of the wrong shape) or the design's: two
budgets leave the floor and the data term to trade against each other, and noise moves
them. This tool asks what the design alone does. It takes the chosen law (``fit.json``)
as the truth and draws the sweep's fitted points from it (their law inputs, the runs the
fit holds out dropped as it drops them), each loss times ``exp(e)`` with
``e ~ N(0, sd)``: ``sd`` is the run-to-run noise the seed replicates measured
(``fit.json``'s ``seed_noise.pooled_sd_log_loss``), else the fit's RMS relative error
(which also holds the form's own misfit), or ``--sd``. It fits the same form to the
draws below the largest budget from the full grid of starts, as the fit does, and reports
the error at the largest budget per draw and over all draws. Where the measured points'
own error is of the size and sign of the draws', the miss is what this sweep's budgets
allow any fit, the right law included. ``--fold held-out`` asks the same of the fit's
own held-out runs (the largest size at the largest budget): the draws keep them, held
out, and each is fitted as ``make scaling-fit`` fits the measured points. About 8 s a
draw on 2 cores for the 10-coefficient ``interior`` form.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.scaling import forms
from pipeline.scaling.fit import ErrorStats, Observation, fit_law
from pipeline.scaling.select import leave_largest_budget_out
from tools.loop_forms import held_out_points


def noise_sd(fit: dict) -> float:
    """The noise of a run's log loss: the seed replicates' pooled SD when ``fit.json``
    has one, else the fit's RMS relative error (an upper bound: it holds the misfit too).
    KeyError, naming both, when the fit has neither. The pooled SD is one number for
    every point: on moe_grid the dense cell's 2.1% dominates it where the MoE cells
    measured 0.16-0.18%, so pass ``--sd`` to ask about the MoE points' noise alone."""
    pooled = (fit.get("seed_noise") or {}).get("pooled_sd_log_loss")
    if pooled is not None:
        return float(pooled)
    rms = (fit.get("fit_error") or {}).get("rms")
    if rms is None:
        raise KeyError("the fit has neither seed_noise.pooled_sd_log_loss nor fit_error.rms: pass --sd")
    return float(rms)


def simulated(
    points: list[Observation], fit: dict, sd: float, rng: np.random.Generator, keep_held_out: bool = False
) -> list[Observation]:
    """The fitted points (the held-out ones too with ``keep_held_out``, still marked held
    out) with losses drawn from the law in ``fit`` (``fit.json``'s content): the law's
    prediction times ``exp(N(0, sd))``."""
    law = forms.law_from_fit(fit)
    kept = [p for p in points if keep_held_out or not p.held_out]
    truth = law.predict([p.inputs for p in kept])
    noise = np.exp(rng.normal(0.0, sd, len(kept)))
    return [replace(p, loss=float(t * n)) for p, t, n in zip(kept, truth, noise)]


def _held_out_error(points: list[Observation], form, starts) -> ErrorStats:
    return fit_law(points, starts=starts, form=form).held_out


FOLDS = {"largest-budget": leave_largest_budget_out, "held-out": _held_out_error}
WHAT = {
    "largest-budget": "error at the largest budget, fitted to the smaller ones",
    "held-out": "error at the fit's held-out runs, fitted to the others",
}


def null_errors(
    points: list[Observation], fit: dict, sd: float, draws: int, seed: int = 0, starts=None, fold="largest-budget"
):
    """The ``fold``'s error of the fit's own form on ``draws`` simulated sweeps
    (:func:`simulated`): one ErrorStats per draw, and the measured points' own.
    ``largest-budget``: :func:`leave_largest_budget_out`; ``held-out``: the fit's own
    held-out points, fitted to the rest as the fit does (drawn too, with their noise)."""
    form = forms.form_of(fit)
    error = FOLDS[fold]
    rng = np.random.default_rng(seed)
    keep = fold == "held-out"
    runs = [error(simulated(points, fit, sd, rng, keep_held_out=keep), form, starts) for _ in range(draws)]
    return runs, error(points, form, starts)


def summary(runs: list[ErrorStats], measured: ErrorStats) -> list[str]:
    """The printed lines: each draw's error at the largest budget, the draws' means
    (their mean, SD, range) and the measured points' own, and where the measured mean
    lies among the draws' (how many draws are below it)."""
    lines = [f"  draw {i}: mean {r.mean:+.2%}, RMS {r.rms:.2%}, max {r.max:.2%} ({r.count} points)"
             for i, r in enumerate(runs)]  # fmt: skip
    means = np.array([r.mean for r in runs])
    spread = f", SD {means.std(ddof=1):.2%}" if len(runs) > 1 else ""
    lines.append(f"draws: mean of the means {means.mean():+.2%}{spread}, range [{means.min():+.2%}, "
                 f"{means.max():+.2%}]")  # fmt: skip
    below = int(np.sum(means < measured.mean))
    lines.append(f"measured points: mean {measured.mean:+.2%}, RMS {measured.rms:.2%}, max {measured.max:.2%}; "
                 f"{below} of {len(runs)} draws' means below it")  # fmt: skip
    return lines


def _check_hold_out(points: list[Observation], fit: dict) -> None:
    """ValueError when the hold-out applied here is not the fit's (its held-out count)."""
    held = sum(p.held_out for p in points)
    if "held_out_points" in fit and held != fit["held_out_points"]:
        raise ValueError(
            f"the fit held out {fit['held_out_points']} points, this hold-out {held}: pass the fit's sizes (--hold-out)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=Path, default=Path("outputs/scaling/fit.json"))
    parser.add_argument("--points", type=Path, default=Path("outputs/scaling/points.csv"))
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--sd", type=float, default=None, help="noise SD of log loss (default: the seeds' pooled SD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hold-out", nargs="*", default=None, help="sizes held out (default: conf/scaling.yaml's)")
    parser.add_argument("--noise-groups", nargs="*", default=None,
                        help="the fit's noise weights (default: conf/scaling.yaml's; none: all alike)")  # fmt: skip
    parser.add_argument("--fold", choices=tuple(FOLDS), default="largest-budget",
                        help="the largest budget fitted without it, or the fit's held-out runs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.draws < 1:
        parser.error(f"--draws must be >= 1, got {args.draws}")
    try:
        fit = json.loads(args.fit.read_text())
        forms.law_from_fit(fit)  # the form and its coefficients, before any fit
        points = held_out_points(args.points, args.hold_out, noise_groups=args.noise_groups)
        _check_hold_out(points, fit)
        sd = args.sd if args.sd is not None else noise_sd(fit)
        if not (math.isfinite(sd) and sd >= 0):
            raise ValueError(f"the noise SD must be finite and >= 0, got {sd}")
        # ScalingFitError (a ValueError): too few budgets, or a fold that cannot determine the form
        runs, measured = null_errors(points, fit, sd, args.draws, args.seed, fold=args.fold)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"budget_bias: {args.fit}, {args.points}: {err}", file=sys.stderr)
        return 2
    print(f"law `{fit.get('form_name', 'joint')}` as the truth, noise SD {sd:.2%} of the loss, {args.draws} draws; "
          f"{WHAT[args.fold]} (predicted / measured - 1):")  # fmt: skip
    print("\n".join(summary(runs, measured)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
