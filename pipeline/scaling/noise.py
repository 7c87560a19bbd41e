"""How noisy each fitted point is, measured from the sweep's own seed replicates.

A sweep's points are not equally noisy. On moe_grid three seeds of a cell differ by an
SD of log loss of about 3% at the two smaller token budgets but about 0.2% for the
routed cells at the largest (docs/scaling.md). A fit that weighs them alike lets the
noisiest points pull the law as hard as the quietest, and the quietest sit where plans
are made. So the fit divides each residual by its point's noise (:func:`pipeline.scaling.fit.huber_objective`),
weighted least squares' rule (Aitken 1935) inside the Huber loss.

The noise is estimated per *group* of points, never per point: three seeds give an SD
that is itself uncertain by about half. The groups are set by ``scaling.noise_groups``:
``tokens`` (the token budget), ``routed`` (an MoE or a dense model: at the largest
budget the dense cells' seeds spread 10x wider than the routed cells'), both, or none
(one group: every point weighs alike, the unweighted fit). Each group's SD pools the
sample variances (ddof 1) of its replicated cells by their degrees of freedom:
``s² = Σ (n_c - 1) s_c² / Σ (n_c - 1)``. Only fitted points count: a held-out point
lends the fit neither its loss nor its noise. A fitted point whose group has no
replicated cell has no noise estimate, and one whose group has fewer than
:data:`MIN_DOF` degrees of freedom an untrustworthy one: either is an error, named
before any fit.

A point's weight is its group's SD over the smallest group SD (``Observation.noise``):
the quietest points are fitted exactly as the unweighted fit fits them. The same weight
scales the residual a predictive interval draws for a point (:mod:`pipeline.scaling.bootstrap`):
a point of a group the seeds never measured (a held-out budget, a plan at another
budget) takes the noisiest group's weight, so that its interval is never narrower
than the noise the sweep has seen (:func:`scale_of`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pipeline.scaling.analysis import replicate_of
from pipeline.scaling.fit import Observation, ScalingFitError
from pipeline.scaling.law import LawInputs

GROUP_KEYS = ("tokens", "routed")
# The fewest degrees of freedom a group's SD is trusted with. A sample SD with k degrees
# of freedom is within a factor [0.35, 1.7] of the true SD 95% of the time at k = 4
# (chi-square quantiles; [0.03, 2.2] at k = 1), and the weights are ratios of these SDs
# (the ratio of two 4-dof SDs: within [0.32, 3.1], by the F distribution).
MIN_DOF = 4
# A plan or a loop names its budget (600000 tokens); a sweep's runs see the next whole
# step's tokens (600064 on moe_grid, 1024 tokens a step; 120832 for 120000, 0.7% over).
# A target's budget within this relative distance of a group's is that group's budget.
BUDGET_TOLERANCE = 0.02


def is_routed(x: LawInputs) -> bool:
    """An MoE (expansion or granularity above 1) rather than a dense model."""
    return x.expansion > 1 or x.granularity > 1


def group_of(x: LawInputs, by: tuple[str, ...]) -> tuple:
    """The noise group of a point with law inputs ``x``: its values of the keys ``by``."""
    values = {"tokens": x.tokens, "routed": is_routed(x)}
    return tuple(values[k] for k in by)


def label(by: tuple[str, ...], key: tuple) -> str:
    """A group's name for tables and errors, e.g. ``tokens 600064, routed``."""
    if not by:
        return "all points"
    parts = {"tokens": lambda v: f"tokens {v:.0f}", "routed": lambda v: "routed" if v else "dense"}
    return ", ".join(parts[k](v) for k, v in zip(by, key))


@dataclass
class NoiseModel:
    """Per noise group: the replicated cells, the degrees of freedom and the pooled SD of
    log loss (a relative SD of the loss)."""

    by: tuple[str, ...]
    groups: dict[tuple, tuple[int, int, float]]  # key -> (replicated cells, degrees of freedom, SD)

    def to_dict(self) -> dict:
        return {
            "by": list(self.by),
            "groups": [
                {"group": label(self.by, k), "key": dict(zip(self.by, k)), "cells": c, "dof": d, "sd_log_loss": sd}
                for k, (c, d, sd) in sorted(self.groups.items())
            ],  # fmt: skip
        }


def estimate(points: list[Observation], by: tuple[str, ...]) -> NoiseModel:
    """The :class:`NoiseModel` of the fitted points' seed replicates (a point and its
    ``-seed<n>`` runs, :func:`pipeline.scaling.analysis.replicate_of`), grouped by ``by``
    (keys of :data:`GROUP_KEYS`). ValueError for an unknown or repeated key. The losses
    must be finite and > 0 (:func:`weigh` checks them)."""
    unknown = [k for k in by if k not in GROUP_KEYS]
    if unknown:
        raise ValueError(f"noise group key(s) {unknown}: the keys are {', '.join(GROUP_KEYS)}")
    if len(set(by)) != len(by):
        raise ValueError(f"noise group keys {list(by)} name a key twice")
    cells: dict[str, list[Observation]] = {}
    for p in points:
        if not p.held_out:
            cells.setdefault(replicate_of(p.name), []).append(p)
    pooled: dict[tuple, list[tuple[int, float]]] = {}
    for runs in cells.values():
        if len(runs) >= 2:
            logs = [math.log(r.loss) for r in runs]
            mean = sum(logs) / len(logs)
            pooled.setdefault(group_of(runs[0].inputs, by), []).append(
                (len(logs) - 1, sum((v - mean) ** 2 for v in logs))
            )
    groups = {}
    for key, parts in pooled.items():
        dof = sum(d for d, _ in parts)
        groups[key] = (len(parts), dof, math.sqrt(sum(ss for _, ss in parts) / dof))
    return NoiseModel(tuple(by), groups)


def weigh(points: list[Observation], by: tuple[str, ...]) -> tuple[list[Observation], NoiseModel | None]:
    """``points`` with ``noise`` set to their group's SD over the smallest group's SD
    (held-out points too: where their group has no estimate, the noisiest group's), and
    the model. With no keys every point keeps noise 1 and the model is None: nothing to
    estimate. Raises ScalingFitError naming the fitted points' groups without a
    replicated cell or with fewer than :data:`MIN_DOF` degrees of freedom, or a group
    whose seeds agree exactly (an SD of 0 cannot weigh), a loss that is not finite and
    > 0, and points none of which is fitted."""
    if not by:
        return [replace(p, noise=1.0) for p in points], None
    bad = [f"{p.name} ({p.loss})" for p in points if not (math.isfinite(p.loss) and p.loss > 0)]
    if bad:
        raise ScalingFitError(f"loss must be finite and > 0: {', '.join(bad)}")
    fitted = [p for p in points if not p.held_out]
    if not fitted:
        raise ScalingFitError("no fitted point to weigh: every point is held out")
    model = estimate(points, by)
    missing = sorted({group_of(p.inputs, by) for p in fitted} - set(model.groups))
    if missing:
        shown = "; ".join(label(by, k) for k in missing)
        raise ScalingFitError(
            f"scaling.noise_groups {list(by)}: no seed replicates among the fitted points of the group(s) {shown}, "
            "so their noise is unknown: run seeds of one or more of their cells (make sweep ... seed=1,2) or "
            "group more coarsely (scaling.noise_groups=[] weighs every point alike)"
        )
    fitted_groups = {group_of(p.inputs, by) for p in fitted}
    thin = [f"{label(by, k)} ({model.groups[k][1]})" for k in sorted(fitted_groups) if model.groups[k][1] < MIN_DOF]
    if thin:
        raise ScalingFitError(
            f"scaling.noise_groups {list(by)}: the seed replicates of the group(s) {'; '.join(thin)} have fewer than "
            f"{MIN_DOF} degrees of freedom (seeds - 1, summed over cells), too few to weigh by: run more seeds of "
            "their cells or group more coarsely"
        )
    zero = [label(by, k) for k, (_, _, sd) in model.groups.items() if not sd > 0]
    if zero:
        raise ScalingFitError(
            f"the seed replicates of {'; '.join(zero)} agree exactly: an SD of 0 cannot weigh a point"
        )
    saved = model.to_dict()  # one matching rule for the fit's points and for any later target
    return [replace(p, noise=scale_of(saved, p.inputs)[0]) for p in points], model


def scale_of(noise_weights: dict | None, x: LawInputs) -> tuple[float, str]:
    """The noise weight of a point with law inputs ``x`` under a fit's noise model
    (``fit.json``'s ``noise_weights``, :meth:`NoiseModel.to_dict`; None for an
    unweighted fit): its group's SD over the quietest group's, and the group's label.

    A target is of a group when it is routed alike and its token budget differs from
    the group's by at most :data:`BUDGET_TOLERANCE` of the group's (the nearest such
    group). ValueError for a ``noise_weights`` without group keys. A group without
    seeds in the fit (another token budget) takes the noisiest group's weight, labelled
    as such: the noise there is unmeasured, and an interval drawn at the quietest
    group's noise would claim a precision nobody measured."""
    if not noise_weights:
        return 1.0, label((), ())
    by = tuple(noise_weights["by"])
    groups = noise_weights["groups"]
    if any("key" not in g for g in groups):
        raise ValueError(
            "fit.json's noise_weights name no group keys (written before they did): rerun make scaling-fit"
        )
    quietest = min(g["sd_log_loss"] for g in groups)
    want = dict(zip(by, group_of(x, by)))

    def distance(g: dict) -> float:  # the budgets' relative difference; inf: another group
        key = g["key"]
        if any(key[k] != want[k] for k in by if k != "tokens"):
            return math.inf
        return abs(want["tokens"] / key["tokens"] - 1.0) if "tokens" in by else 0.0

    near = min(groups, key=distance)
    if distance(near) <= BUDGET_TOLERANCE:
        return near["sd_log_loss"] / quietest, near["group"]
    noisiest = max(g["sd_log_loss"] for g in groups)
    return noisiest / quietest, f"{label(by, group_of(x, by))} (no seeds there: the noisiest group's weight)"
