"""The loop closed: the law's prediction for an architecture it chose, against a run.

``make closed-loop`` trains the planner's choice at the tiny budget
(``conf/model/planned_tiny.yaml``, not a point of the sweep the law was fitted on) as a
one-point sweep (``conf/sweep/closed_loop.yaml``: the fitted sweep's stage settings, its
largest token budget), then ``python -m pipeline.stages closed_loop``
(pipeline/stages/closed_loop.py), which reads that point from MLflow and calls
:func:`compare`: the loss the fitted law predicts and its bootstrap predictive interval
(``fit.json``'s refits and residuals, :mod:`pipeline.scaling.bootstrap`) against the
measured loss: inside the interval or not, and by how much it misses. With seed
replicates of the run (``make closed-loop ARGS="seed=0,1,2"``), :func:`compare_replicates`
holds each run against that interval and reports their mean beside it.
"""

from __future__ import annotations

import statistics

import numpy as np

from pipeline.scaling.bootstrap import interval, predictive_draws, target_scale
from pipeline.scaling.fit import Observation
from pipeline.scaling.forms import law_from_fit


def compare(fit: dict, point: Observation, seed: int = 0) -> dict:
    """The law's prediction and predictive interval for ``point``, against its loss.

    ``fit`` is ``fit.json``'s content (coefficients and ``intervals`` with ``thetas``,
    ``residuals``, ``level``). The residual is drawn at the point's noise weight
    (``noise_weight``, ``noise_group``: :func:`pipeline.scaling.bootstrap.target_scale`).
    ``miss``: 0 inside the interval, else the measured loss's relative distance to the
    nearer bound (positive above, negative below). Raises KeyError naming what a
    fit.json without intervals lacks."""
    law = law_from_fit(fit)
    boot = fit["intervals"]
    weight, group = target_scale(fit, point.inputs)
    draws_R = predictive_draws(
        law.form,
        np.array(boot["thetas"]),
        np.array(boot["residuals"]),
        [point.inputs],
        np.random.default_rng(seed),
        [weight],
    )[:, 0]
    low, high = interval(draws_R, boot["level"])
    predicted = law.predict_one(point.inputs)
    inside = low <= point.loss <= high
    miss = 0.0 if inside else (point.loss / high - 1.0 if point.loss > high else point.loss / low - 1.0)
    return {
        "point": point.name,
        "inputs": vars(point.inputs),
        "measured": point.loss,
        "predicted": predicted,
        "relative_error": point.loss / predicted - 1.0,
        "interval": [low, high],
        "level": boot["level"],
        "noise_weight": weight,
        "noise_group": group,
        "inside": inside,
        "miss": miss,
        "train_seconds": point.seconds,
        "law": {"form_name": law.form.name, "formula": law.formula()},
    }


def compare_replicates(fit: dict, points: list[Observation], name: str, seed: int = 0) -> dict:
    """:func:`compare` for seed replicates of one architecture and budget (``points``,
    two or more, equal law inputs), named ``name``.

    The predictive interval is for one run (its residuals hold the run-to-run noise), so
    each replicate is held against it (``replicates``: point, measured, inside, miss), and
    ``inside_count`` says how many land inside. The top-level ``measured``, ``inside``
    and ``miss`` are the replicates' mean against the same interval: the mean of S runs
    is less noisy than the one run the interval is made for, so that check is lenient
    by the noise and the per-run counts are the test. ``sd``: the replicates' sample
    standard deviation relative to their mean. Raises ValueError for fewer than two
    points or points with different law inputs."""
    if len(points) < 2:
        raise ValueError(f"replicates of {name}: {len(points)} run(s); need at least 2")
    if any(p.inputs != points[0].inputs for p in points):
        raise ValueError(f"replicates of {name}: the runs differ in their law inputs (not seeds of one point)")
    runs = [compare(fit, p, seed) for p in points]
    losses = [p.loss for p in points]
    mean = statistics.fmean(losses)
    seconds = [p.seconds for p in points if p.seconds is not None]
    result = compare(fit, Observation(name, points[0].family, points[0].inputs, mean), seed)
    result.update(
        replicates=[{k: r[k] for k in ("point", "measured", "inside", "miss", "train_seconds")} for r in runs],
        inside_count=sum(r["inside"] for r in runs),
        sd=statistics.stdev(losses) / mean,
        train_seconds=statistics.fmean(seconds) if seconds else None,
    )
    return result


def saved_runs(result: dict) -> list[Observation]:
    """The runs a loop file (a :func:`compare` or :func:`compare_replicates` result) was
    made from, to hold them against another fit without the MLflow store that had them
    (a refit on another machine, from the sweep's points table). Each run's training
    seconds are its own where the file kept them, else None (files written before
    replicates kept theirs hold only the mean, ``result["train_seconds"]``). Raises
    ValueError naming a field the file lacks."""
    from pipeline.scaling.law import LawInputs

    if isinstance((result.get("inputs") or {}).get("shared"), bool):
        raise ValueError(
            "a loop file from when the law's S was 0/1 (inputs.shared true/false): set it to the shared "
            "expert's share of the active FFN width (0 without one) to hold its runs against this law"
        )
    try:
        inputs = LawInputs(**result["inputs"])
        parts = result["point"].split("-")  # a sweep's point: <size>-<arch>-<tokens>[-seed<n>]
        family = parts[1] if len(parts) >= 3 else ""  # the architecture; compare() does not read it
        runs = result.get("replicates") or [result]
        return [Observation(r["point"], family, inputs, r["measured"], seconds=r.get("train_seconds")) for r in runs]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
        raise ValueError(f"not a loop file (closed_loop's output): {type(err).__name__} {err}") from None


def report(result: dict, fit: dict) -> str:
    low, high = result["interval"]
    side = "above" if result["miss"] > 0 else "below"
    verdict = (
        "inside the interval"
        if result["inside"]
        else f"outside the interval, {abs(result['miss']):.2%} of the loss {side} it"
    )
    x = result["inputs"]
    return "\n".join(
        [
            "# The loop closed",
            "",
            f"Law fitted on sweep `{fit.get('sweep', '?')}`: `{fit['formula']}`.",
            "",
            f"Run `{result['point']}` (N = {x['n_active']:.4g} active, D = {x['tokens']:.4g} tokens, "
            f"Ê = {x['expansion']:.3g}, G = {x['granularity']:.3g}, S = {x['shared']:.3g}): "
            f"measured {result['measured']:.4f}, predicted {result['predicted']:.4f} "
            f"({result['relative_error']:+.2%}), {result['level']:.0%} predictive interval "
            f"[{low:.4f}, {high:.4f}]{_weight_text(result)}: {verdict}.",
            "",
            *_replicate_lines(result),
        ]
    )


def _weight_text(result: dict) -> str:
    """The residual's noise weight and group, where the result has one (a result
    written before the weighted intervals has none)."""
    if "noise_weight" not in result:
        return ""
    return f" (the residual drawn at noise weight {result['noise_weight']:.3g}, {result['noise_group']})"


def _replicate_lines(result: dict) -> list[str]:
    reps = result.get("replicates")
    if not reps:
        return []
    n = len(reps)
    lines = [
        f"Measured is the mean of {n} seed replicates (SD {result['sd']:.2%} of the loss), held against the "
        f"interval of one run; each run against it: {result['inside_count']} of {n} inside.",
        "",
        "| run | measured | against the interval |",
        "|---|---|---|",
    ]
    for r in reps:
        where = "inside" if r["inside"] else f"{abs(r['miss']):.2%} {'above' if r['miss'] > 0 else 'below'}"
        lines.append(f"| `{r['point']}` | {r['measured']:.4f} | {where} |")
    return [*lines, ""]
