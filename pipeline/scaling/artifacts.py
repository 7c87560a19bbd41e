"""The fit's published outputs: ``fit.json``, ``points.csv``, ``comparison.md`` and
the figures, written from the sweep's observations (the ``scaling_fit`` stage's work)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
from tabulate import tabulate

from pipeline.scaling import analysis, forms, plots
from pipeline.scaling.bootstrap import Intervals, bootstrap
from pipeline.scaling.fit import ErrorStats, FitResult, Observation, ScalingFitError
from pipeline.scaling.law import LawInputs
from pipeline.scaling.noise import NoiseModel, label, weigh
from pipeline.scaling.select import FormScore, choose_form

FIGURES = ("predicted_vs_measured.png", "loss_vs_params.png")
OUTPUTS = ("fit.json", "points.csv", "comparison.md", *FIGURES)


def write_fit(
    points: list[Observation],
    pairs: list[tuple[str, str, str]],
    out: Path,
    dense: str = "dense",
    sweep: str = "",
    replicates: int = 200,
    form_names: list[str] = ("joint",),
    starts_for=None,
    shapes: dict[tuple[str, str], dict[str, float]] | None = None,
    noise_groups: list[str] = (),
) -> dict:
    """Choose the law among ``form_names`` (:func:`pipeline.scaling.select.choose_form`;
    ``starts_for``: its fits' starting points), bootstrap it (``replicates`` refits),
    write :data:`OUTPUTS` into ``out`` and return the fit's summary (``fit.json``'s
    content). ``shapes``: per (size, architecture) of the sweep, what the law does not see
    of its model (:func:`pipeline.scaling.law.shape_of`); their span over the fitted points
    is the summary's ``shape_range`` (the law has no term for depth or width, and its S
    term is fitted at the sweep's shared shares only: a plan outside it is an
    extrapolation that N and S do not show;
    left out when a point's model is not in ``shapes``). Raises ScalingFitError before
    writing when the points cannot determine the law. ``noise_groups``: the keys the fit's
    noise weights are estimated per (:func:`pipeline.scaling.noise.weigh`; none: every
    point weighs alike)."""
    points, noise_model = weigh(points, tuple(noise_groups))
    result, scores = choose_form(points, [forms.get(n) for n in form_names], starts_for)
    intervals, _ = bootstrap(points, result, replicates=replicates)
    held = [p for p in points if p.held_out]
    inside = sum(intervals.contains(p.name, p.loss) for p in held)
    # the noise floor the held-out errors are read against: the held-out runs' own seeds
    # (the fitted points' seeds, at noisier budgets, make the weights: noise_weights)
    noise = analysis.seed_noise([p for p in points if p.held_out])
    held_means = _held_out_seed_means(points, result)
    summary = {
        **result.to_dict(),
        "intervals": intervals.to_dict(),
        "held_out_inside_interval": inside,
        "form_selection": [s.to_dict() for s in scores],
        "seed_noise": noise.to_dict(),
        # the fit's noise weights: per group of fitted points, their seeds' pooled SD
        "noise_weights": None if noise_model is None else noise_model.to_dict(),
        # the held-out points with a point's seeds averaged: replicates are not independent points
        "held_out_error_seed_means": vars(held_means),
        "sweep": sweep,
        "points": len(points),
        "held_out_points": sum(p.held_out for p in points),
        # how far the points reach: a prediction beyond is an extrapolation
        "range": {
            k: max(getattr(p.inputs, k) for p in points) for k in ("n_active", "tokens", "expansion", "granularity")
        },  # fmt: skip
    }
    fitted = [p for p in points if not p.held_out]
    if shapes is not None and fitted and all((p.size, p.family) in shapes for p in fitted):
        spans = [shapes[p.size, p.family] for p in fitted]
        summary["shape_range"] = {k: [min(s[k] for s in spans), max(s[k] for s in spans)] for k in spans[0]}
    (out / "fit.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    with (out / "points.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(POINT_COLUMNS)
        for p in sorted(points, key=lambda p: p.name):
            x = p.inputs
            writer.writerow([p.name, p.family, p.size, int(x.n_active), int(x.tokens), f"{x.expansion:.10g}",
                             f"{x.granularity:.10g}", f"{x.shared:.10g}", int(p.held_out), repr(p.loss),
                             f"{result.predictions[p.name]:.6f}",
                             *(f"{v:.6f}" for v in intervals.predictions[p.name]),
                             "" if p.seconds is None else f"{p.seconds:.2f}"])  # fmt: skip
    header, rows = analysis.vs_dense_table(points, dense)
    found = analysis.findings(points, pairs)
    seconds_header, seconds_rows = analysis.vs_dense_seconds_table(points, dense)
    found_seconds = analysis.findings_at_seconds(points, pairs)
    lines = [
        "# What the sweep measured",
        "",
        f"Law (form `{result.law.form.name}`): `{result.law.formula()}`",
        "",
        "## Which law",
        "",
        "Each candidate form fitted to the same points; chosen by the lowest leave-one-size-out error (each size "
        "predicted by a fit to the other sizes' points, the held-out runs left out of all of it; each error divided "
        "by its point's noise weight, as the fit divides its residual: the choosing score), never by fit "
        "error. The held-out runs' errors are shown for every form but take no part in the choice. \"Largest "
        'budget from the smaller": each form fitted to the points below the largest token budget, predicting '
        "the fitted points at it (shown, not used to choose); errors are predicted / measured - 1, so a negative "
        "mean is a law that promises too low a loss where it extrapolates in tokens.",
        "",
        _forms_table(scores, result.law.form.name),
        "",
        "## Noise weights",
        "",
        _weights_text(noise_model),
        "",
        "## Seed replicates: the noise floor",
        "",
        _noise_text(noise, result, held_means),
        "",
        f"Fit error (relative, {result.fit.count} points): RMS {result.fit.rms:.2%}, max {result.fit.max:.2%}. "
        f"Held out ({result.held_out.count} of the largest runs): RMS {result.held_out.rms:.2%}, max "
        f"{result.held_out.max:.2%}, against the fit's band ±{result.band:.2%} (3 × the fit's RMS); "
        f"{inside} of {len(held)} inside their {intervals.level:.0%} bootstrap prediction intervals "
        f"({intervals.replicates} refits of resampled points; the interval holds a fresh measurement's noise too, "
        f"drawn at the point's own noise weight, the noisiest group's where its budget has no seeds). "
        f"L-BFGS-B converged from {result.starts_converged} of {result.starts} starting points and in "
        f"{intervals.refits_converged} of {intervals.replicates} refits.",
        "",
        _coefficient_table(result, intervals),
        "",
        f"## Each architecture minus the `{dense}` twin at the same size and tokens, nats/token",
        "",
        f"`{dense}` has the reference MoE's active FFN width: the same compute per token as every MoE whose "
        "top-k plus shared units equal its granularity. Negative: a lower validation loss than the dense model.",
        "",
        tabulate(rows, headers=header, tablefmt="github", missingval="–"),
        "",
        "## Paired differences",
        "",
        "loss(b) − loss(a) in each (size, tokens) cell where both ran: positive means a is better.",
        "",
        _paired_table(found),
        "",
        "## At equal training seconds",
        "",
        "The same questions with each run's own training time (its `perf/train_seconds` in MLflow: seconds in "
        "training steps, validation excluded; resumed runs left out). A family's loss at a time is interpolated "
        "between its two runs of that size whose seconds bracket it (log loss linear in log seconds); `–` where "
        "its runs do not reach that time. The seconds are this sweep's machine's, under whatever else ran "
        f"beside it: {_seconds_coverage(points)}.",
        "",
        f"### Each architecture minus `{dense}`, at the `{dense}` run's seconds",
        "",
        tabulate(seconds_rows, headers=seconds_header, tablefmt="github", missingval="–"),
        "",
        "### Paired differences at equal seconds",
        "",
        "loss(b) − loss of a at b's training seconds: positive means a, given the same time, is better.",
        "",
        _paired_table(found_seconds),
        "",
    ]
    (out / "comparison.md").write_text("\n".join(lines))
    plots.predicted_vs_measured(points, result, out / "predicted_vs_measured.png")
    plots.loss_vs_params(points, result, out / "loss_vs_params.png")
    summary["comparisons"] = [_comparison_json(c) for c in found]
    summary["comparisons_at_equal_seconds"] = [_comparison_json(c) for c in found_seconds]
    (out / "fit.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


# The loss is written in full (the shortest repr that reads back to the same float): a refit
# from this table alone (scaling.points_csv, no MLflow store) must see the losses the fit saw,
# or the poorly pinned floor moves (6 decimals moved it by 0.003 nats on moe_grid).
POINT_COLUMNS = ["name", "family", "size", "n_active", "tokens", "expansion", "granularity", "shared_share", "held_out",
                 "loss", "predicted", "interval_low", "interval_high", "train_seconds"]  # fmt: skip


POINT_NAME = re.compile(r"[^-]+-[^-]+-\d+(-seed\d+)?")


def read_points(path: Path) -> list[Observation]:
    """The measured points of a ``points.csv`` written by :func:`write_fit` (name,
    family, size, law inputs, loss, training seconds; its predictions and held-out marks
    are the old fit's and are not read). A table without a ``size`` column (written
    before replicates existed) takes it from the name. Raises ScalingFitError naming the
    file and row for a missing file or column, a name that is not a sweep point's
    (``<size>-<arch>-<tokens>[-seed<n>]``), or a value that is not a number."""
    if not path.is_file():
        raise ScalingFitError(f"{path}: no points table there (a points.csv written by make scaling-fit)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("name", "family", "n_active", "tokens", "expansion", "granularity", "shared_share",
                               "loss", "train_seconds") if c not in (reader.fieldnames or [])]  # fmt: skip
        if missing == ["shared_share"] and "shared" in (reader.fieldnames or []):
            raise ScalingFitError(
                f"{path}: a table from when the law's S was 0/1 (column shared), not the shared expert's share "
                "(shared_share): refit from the sweep's runs (make scaling-fit)"
            )
        if missing:
            raise ScalingFitError(f"{path}: not a points table of make scaling-fit: no column(s) {', '.join(missing)}")
        points = []
        for row_no, row in enumerate(reader, start=2):
            try:
                if not POINT_NAME.fullmatch(row["name"] or ""):
                    raise ValueError(f"{row['name']!r} is not a sweep point's name (<size>-<arch>-<tokens>[-seed<n>])")
                inputs = LawInputs(float(row["n_active"]), float(row["tokens"]), float(row["expansion"]),
                                   float(row["granularity"]), float(row["shared_share"]))  # fmt: skip
                seconds = float(row["train_seconds"]) if row["train_seconds"] else None
                size = row.get("size") or row["name"].split("-")[0]
                points.append(Observation(row["name"], row["family"], inputs, float(row["loss"]), seconds=seconds,
                                          size=size))  # fmt: skip
            except (ValueError, TypeError) as err:  # TypeError: a short row's missing cells are None
                raise ScalingFitError(f"{path}, row {row_no}: {err}") from None
    if not points:
        raise ScalingFitError(f"{path}: the points table has no rows")
    return points


def _held_out_seed_means(points: list[Observation], result: FitResult) -> ErrorStats:
    """Relative errors of the held-out points with each point's seeds averaged (the
    replicates of a point share its law inputs, so one prediction)."""
    groups: dict[str, list[Observation]] = {}
    for p in points:
        if p.held_out:
            groups.setdefault(analysis.replicate_of(p.name), []).append(p)
    errors = [result.predictions[r[0].name] / (sum(x.loss for x in r) / len(r)) - 1 for r in groups.values()]
    return ErrorStats.of(np.array(errors))


def _noise_text(noise: analysis.SeedNoise, result: FitResult, held_means: ErrorStats) -> str:
    if not noise.cells:
        return "No point was run with more than one seed (`make seeds`): the run-to-run noise is not measured."
    rows = [[name, n, f"{sd:.2%}"] for name, (n, sd) in noise.cells.items()]
    table = tabulate(rows, headers=["point", "seeds", "SD of the loss (relative)"], tablefmt="github")
    return (
        f"{table}\n\nPooled run-to-run SD {noise.pooled:.2%} of the loss: a law that were exactly right would "
        f"still miss a single run by about ±{2 * noise.pooled:.2%} (2 SD), and the held-out RMS could not go much "
        f"below {noise.pooled:.2%}. Measured: held-out RMS {result.held_out.rms:.2%}, max {result.held_out.max:.2%} "
        f"over {result.held_out.count} runs; with each point's seeds averaged, RMS {held_means.rms:.2%}, max "
        f"{held_means.max:.2%} over {held_means.count} points. A replicate is a point of its own: fitted, or held "
        "out with the point it replicates; the tables below use the mean of a point's seeds."
    )


def _weights_text(model: NoiseModel | None) -> str:
    if model is None:
        return "Every point weighs alike (`scaling.noise_groups=[]`)."
    quietest = min(sd for _, _, sd in model.groups.values())
    rows = [
        [label(model.by, k), c, d, f"{sd:.2%}", f"{sd / quietest:.3g}"]
        for k, (c, d, sd) in sorted(model.groups.items())
    ]
    table = tabulate(rows, headers=["group", "replicated cells", "degrees of freedom", "SD of log loss",
                                    "noise weight (residual divided by)"], tablefmt="github")  # fmt: skip
    return (
        f"The fit divides each point's log-loss residual by its group's noise (groups by {', '.join(model.by)}), "
        "pooled over the seed replicates among the fitted points (held-out runs lend neither loss nor noise), and "
        "the leave-one-size-out score that chooses the form divides each error the same way; each prediction "
        "interval draws its residual times its point's weight (studentized residuals, in units of the quietest "
        "group's SD):\n\n" + table
    )


def _forms_table(scores: list[FormScore], chosen: str) -> str:
    def pct(stats, signed: bool = False) -> str:
        if stats is None:
            return "–"
        shown = signed and math.isfinite(stats.mean)  # an empty set has no mean
        return f"{stats.rms:.2%} / {stats.max:.2%}" + (f" ({stats.mean:+.2%})" if shown else "")

    rows = [[f"**{s.form}**" if s.form == chosen else s.form, s.coefficients, pct(s.fit), pct(s.cross_validated),
             "–" if s.cv_score is None else f"{s.cv_score:.2%}", pct(s.largest_budget, signed=True),
             pct(s.held_out, signed=True), "; ".join(n for n in (s.unscored, s.largest_budget_note) if n)]
            for s in scores]  # fmt: skip
    headers = ["form", "coefficients", "fit RMS / max", "leave-one-size-out RMS / max",
               "choosing score (leave-one-size-out, noise-weighted RMS)",
               "largest budget from the smaller RMS / max (mean)", "held out RMS / max (mean)", "note"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="github")


def _paired_table(found: list[analysis.Comparison]) -> str:
    return tabulate(
        [[c.label, c.a, c.b, f"{c.mean:+.4f}" if c.deltas else "–", f"{c.wins}/{len(c.deltas)}"] for c in found],
        headers=["comparison", "a", "b", "mean loss(b) − loss(a)", "cells where a is better"],
        tablefmt="github",
    )


def _seconds_coverage(points: list[Observation]) -> str:
    timed = sum(p.seconds is not None for p in points)
    return f"{timed} of {len(points)} runs have their training seconds"


def _comparison_json(c: analysis.Comparison) -> dict:
    mean = c.mean if c.deltas else None  # no cell to compare: null, not NaN (strict JSON)
    return {"label": c.label, "a": c.a, "b": c.b, "mean_delta": mean, "a_better": c.wins, "cells": len(c.deltas)}


def _coefficient_table(result: FitResult, intervals: Intervals) -> str:
    level = f"{intervals.level:.0%} interval"
    rows = [[name, f"{value:.4g}", f"[{intervals.coefficients[name][0]:.4g}, {intervals.coefficients[name][1]:.4g}]"]
            for name, value in result.law.coefficients.items()]  # fmt: skip
    return tabulate(rows, headers=["coefficient", "fitted", level], tablefmt="github")
