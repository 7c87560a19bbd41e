"""``python -m tools.weighted_fit --sigma 120832=0.028 300032=0.037 600064=0.0017 [--dense-sigma 0.021]``:
the law fitted with each point weighted by a noise given by hand per budget (the probe
that led to the recipe's noise weights; ``make scaling-fit`` now estimates them from the
sweep's own seed replicates, pipeline/scaling/noise.py): how the law moves with the
noise level assumed.

Seed replicates say the points are not alike: on moe_grid the SD of log loss is about
2.8% at 120832 tokens and 3.7% at 300032 (three seeds of four m cells, docs/scaling.md),
but 0.16-0.18% for the MoE cells at the largest budget (2.1% for the dense twin). Here
each fitted point's log-loss residual is divided by its SD (``--sigma TOKENS=SD`` for
every budget; ``--dense-sigma`` for the dense families at the largest budget) over the
smallest SD among the fitted points, inside the same Huber loss (a point as noisy as the
quietest counts as before; one 16x noisier counts about 1/16 as much where its residual
is beyond the Huber threshold, as nearly all are, 1/256 inside it), fitted from the full
grid of starts as ``make scaling-fit`` fits. It prints, per form, the held-out runs'
errors (predicted / measured - 1) and those of their seed means beside the fit's own.

Caveat, and why this stayed a probe: the SD at the largest budget comes from the seed
replicates of the held-out m runs, so the held-out set lends the fit its noise level
(not its losses); and the SDs at the smaller budgets were measured on one machine kind
for one size. The recipe's fit takes the noise from the fitted points' replicates only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.scaling import forms
from pipeline.scaling.analysis import replicate_of
from pipeline.scaling.fit import ErrorStats, Observation, best_start, huber_objective, starting_points
from pipeline.scaling.law import LawForm, ScalingLaw, design_matrix
from tools.loop_forms import held_out_points

DENSE_FAMILIES = ("dense", "dense_total")


def budget_sigma(sigmas: dict[float, float], dense_largest: float | None = None) -> Callable[[Observation], float]:
    """A point's noise (SD of log loss) by its token budget; ``dense_largest`` for the
    dense families at the largest budget. KeyError naming a budget with no SD."""
    largest = max(sigmas)

    def sigma(p: Observation) -> float:
        if dense_largest is not None and p.inputs.tokens == largest and p.family in DENSE_FAMILIES:
            return dense_largest
        if p.inputs.tokens not in sigmas:
            raise KeyError(f"no --sigma for the budget {p.inputs.tokens:g} (point {p.name})")
        return sigmas[p.inputs.tokens]

    return sigma


def fit_weighted(points: list[Observation], form: LawForm, sigma, starts=None) -> dict:
    """Fit ``form`` to the points not held out, each weighted by ``sigma(point)``;
    returns the law and the held-out, held-out seed-mean (a point and its ``-seed<n>``
    replicates averaged) and fitted errors (ErrorStats; an empty set's are NaN).
    ValueError when no point is fitted."""
    fitted = [p for p in points if not p.held_out]
    held = [p for p in points if p.held_out]
    if not fitted:
        raise ValueError("no point to fit: every point is held out")
    s_P = np.array([sigma(p) for p in fitted])
    objective = huber_objective(
        form, design_matrix([p.inputs for p in fitted]), np.log([p.loss for p in fitted]), noise_P=s_P / s_P.min()
    )
    with threadpool_limits(limits=1):
        theta, _, _ = best_start(objective, starting_points(form=form) if starts is None else starts, form.bounds)
    law = ScalingLaw(tuple(float(t) for t in theta), form)

    def errors(pts: list[Observation], losses: Sequence[float]) -> ErrorStats:
        if not pts:
            return ErrorStats.of(np.array([]))
        return ErrorStats.of(law.predict([p.inputs for p in pts]) / np.array(losses) - 1.0)

    cells: dict[str, list[Observation]] = {}
    for p in held:  # a point and its -seed<n> replicates
        cells.setdefault(replicate_of(p.name), []).append(p)
    means = [ps[0] for ps in cells.values()], [float(np.mean([p.loss for p in ps])) for ps in cells.values()]
    return {
        "law": law,
        "held_out": errors(held, [p.loss for p in held]),
        "held_out_seed_means": errors(*means),
        "fit": errors(fitted, [p.loss for p in fitted]),
        "worst": sorted(
            ((p.name, float(law.predict_one(p.inputs) / p.loss - 1)) for p in held), key=lambda t: -abs(t[1])
        ),
    }


def _sigmas(items: Sequence[str]) -> dict[float, float]:
    out = {}
    for item in items:
        tokens, _, sd = item.partition("=")
        try:
            out[float(tokens)] = float(sd)
        except ValueError:
            raise ValueError(f"--sigma {item!r}: use TOKENS=SD, e.g. 120832=0.028") from None
        if not out[float(tokens)] > 0:
            raise ValueError(f"--sigma {item!r}: the SD must be > 0")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=Path, default=Path("outputs/scaling/points.csv"))
    parser.add_argument("--sigma", nargs="+", required=True, metavar="TOKENS=SD")
    parser.add_argument(
        "--dense-sigma", type=float, default=None, help="SD of the dense families at the largest budget"
    )
    parser.add_argument("--forms", nargs="+", default=["joint", "power", "interior", "interior_coupled"])
    args = parser.parse_args(argv)
    try:
        chosen = [forms.get(name) for name in args.forms]
        sigmas = _sigmas(args.sigma)
        if args.dense_sigma is not None and not args.dense_sigma > 0:
            raise ValueError(f"--dense-sigma must be > 0, got {args.dense_sigma}")
        points = held_out_points(args.points, noise_groups=[])  # its own weights: --sigma
        budgets = {p.inputs.tokens for p in points}
        unknown = [f"{t:g}" for t in sigmas if t not in budgets]
        if unknown:  # a typo would otherwise move the largest budget that --dense-sigma is for
            raise ValueError(f"--sigma for budget(s) {', '.join(unknown)} that no point has ({sorted(budgets)})")
        sigma = budget_sigma(sigmas, args.dense_sigma)
        [sigma(p) for p in points if not p.held_out]  # a budget without an SD is named before any fit
    except (OSError, ValueError, KeyError) as err:
        print(f"weighted_fit: {err}", file=sys.stderr)
        return 2
    print("form: held out RMS / max (mean) | their seed means, max | fitted RMS; the law; the worst held-out runs")
    for form in chosen:
        r = fit_weighted(points, form, sigma)
        h, m, f = r["held_out"], r["held_out_seed_means"], r["fit"]
        print(f"{form.name}: {h.rms:.2%} / {h.max:.2%} ({h.mean:+.2%}) | {m.max:.2%} | {f.rms:.2%}")
        print(f"  {r['law'].formula()}")
        print("  " + ", ".join(f"{name} {e:+.2%}" for name, e in r["worst"][:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
