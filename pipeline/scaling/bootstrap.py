"""How sure the fit is: bootstrap intervals for every coefficient and every prediction.

Case resampling (Efron & Tibshirani 1993, ch. 6 and 9): draw the fitted points with
replacement, refit (L-BFGS-B from the full fit's optimum, the same Huber objective,
each drawn point with its own noise weight),
and read the spread of the refits. A coefficient's interval is the percentile interval
of its refitted values. A *prediction* interval is for the loss a new run would
measure, not only for the law's mean: each replicate's predicted log loss plus one of
the full fit's residuals drawn at random (a predictive interval in the manner of
Davison & Hinkley 1997, section 6.3.3), so the run-to-run noise the fit sees is part of
the interval as well as the uncertainty of the coefficients.

The residuals are those of a weighted fit (:mod:`pipeline.scaling.noise`): each is
divided by its point's noise weight (studentized: all in units of the quietest
group's noise), centred (the Huber fit need not make their mean 0) and inflated by
sqrt(n / (n - p)): in-sample residuals of a fit with p coefficients to n points
understate the noise by about that factor, which matters for a thin sweep. A point's
draw multiplies the drawn residual by its own weight: a point of a quiet group gets
an interval as narrow as its group's noise, a noisy one as wide as its own; a point
whose group the seeds never measured takes the noisiest group's weight
(:func:`pipeline.scaling.noise.scale_of`). With every weight 1 (an unweighted fit)
this is the plain draw of the residuals, bit for bit. The group SDs are taken as
exact, though each rests on 4-12 degrees of freedom (:data:`pipeline.scaling.noise.MIN_DOF`):
the weights' own uncertainty is not in the intervals (on moe_grid the quietest group's
studentized residuals spread about 10% wider than the pool, so its intervals are about
that much too narrow). The intervals hold the run-to-run
noise and the coefficients' uncertainty, not an error of the form itself: a law
whose shape misses an architecture the sweep never ran (:mod:`pipeline.scaling.closed_loop`)
misses it by more than its interval.

The refits' coefficients and the residuals are kept (``fit.json``), so the planner and
the closed loop draw intervals for architectures the sweep never ran
(:func:`predictive_draws`, at :func:`target_scale`).

A replicate that draws too few distinct values of N, D, Ê, G or S to determine the law
(:func:`pipeline.scaling.fit.check_identifiable`) is drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.scaling.fit import (
    HUBER_DELTA,
    FitResult,
    Observation,
    ScalingFitError,
    check_identifiable,
    huber_objective,
    minimize_from,
)
from pipeline.scaling.law import LawForm, LawInputs, design_matrix
from pipeline.scaling.noise import scale_of

RESIDUAL_UNIT = "the quietest noise group's SD"


@dataclass
class Intervals:
    """Percentile intervals at ``level`` from ``replicates`` bootstrap refits."""

    replicates: int
    level: float
    coefficients: dict[str, tuple[float, float]]
    # per point name: the interval a fresh measurement of that point's loss should fall in
    predictions: dict[str, tuple[float, float]]
    thetas: list[list[float]]  # each refit's coefficients (the form's order)
    residuals: list[float]  # the full fit's log-loss residuals over their noise weights, centred and inflated
    refits_converged: int = 0  # refits whose L-BFGS-B run met its own stopping rule (not maxiter)

    def contains(self, name: str, loss: float) -> bool:
        low, high = self.predictions[name]
        return low <= loss <= high

    def to_dict(self) -> dict:
        return {
            "replicates": self.replicates,
            "level": self.level,
            "coefficients": {k: list(v) for k, v in self.coefficients.items()},
            "predictions": {k: list(v) for k, v in self.predictions.items()},
            "thetas": self.thetas,
            "residuals": self.residuals,
            # what a residual is in: a reader multiplies it by the target's noise weight
            # (a fit.json without this key drew every residual alike: weight 1)
            "residual_unit": RESIDUAL_UNIT,
            "refits_converged": self.refits_converged,
        }


def bootstrap(
    points: list[Observation],
    result: FitResult,
    replicates: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[Intervals, np.ndarray]:
    """Bootstrap ``result`` (the fit of ``points``' non-held-out points).

    Returns the intervals over every point (held out too, each drawn at its own
    ``Observation.noise``) and the predictive draws of log loss, shape (replicates,
    len(points)). Raises ScalingFitError if no identifiable resample is found in 50 draws."""
    fitted = [p for p in points if not p.held_out]
    X_fit = design_matrix([p.inputs for p in fitted])
    y_fit = np.log([p.loss for p in fitted])
    noise_F = np.array([p.noise for p in fitted])  # a drawn point keeps its weight (fit.huber_objective)
    form = result.law.form
    theta0 = np.array(result.law.theta, dtype=np.float64)
    raw_F = y_fit - form.log_loss(theta0, X_fit)
    n, p = len(fitted), len(form.coefficients)  # check_identifiable: n > p
    studentized_F = raw_F / noise_F
    residuals_F = (studentized_F - studentized_F.mean()) * np.sqrt(n / (n - p))
    rng = np.random.default_rng(seed)
    indices = resample_indices(fitted, rng, replicates, form)
    with threadpool_limits(limits=1):
        refits = [_refit(form, theta0, X_fit[idx], y_fit[idx], noise_F[idx]) for idx in indices]
    thetas_RC = np.array([theta for theta, _ in refits])
    draws_RP = predictive_draws(
        form, thetas_RC, residuals_F, [p.inputs for p in points], rng, [p.noise for p in points]
    )
    tail = (1.0 - level) / 2.0 * 100.0
    lo_C, hi_C = np.percentile(thetas_RC, [tail, 100.0 - tail], axis=0)
    lo_P, hi_P = np.exp(np.percentile(draws_RP, [tail, 100.0 - tail], axis=0))
    intervals = Intervals(
        replicates=replicates,
        level=level,
        coefficients={name: (float(lo_C[i]), float(hi_C[i])) for i, name in enumerate(form.coefficients)},
        predictions={p.name: (float(lo_P[i]), float(hi_P[i])) for i, p in enumerate(points)},
        thetas=thetas_RC.tolist(),
        residuals=residuals_F.tolist(),
        refits_converged=sum(ok for _, ok in refits),
    )
    return intervals, draws_RP


def predictive_draws(
    form: LawForm,
    thetas_RC: np.ndarray,
    residuals: np.ndarray,
    inputs: list[LawInputs],
    rng: np.random.Generator,
    scale: list[float] | None = None,
) -> np.ndarray:
    """Draws of a fresh measurement's log loss, (R, len(inputs)): refit r's prediction
    (coefficients of ``form``) plus a residual drawn from ``residuals``, independently
    per input, times that input's noise weight (``scale``, (len(inputs),); default 1)."""
    X = design_matrix(inputs)
    residuals = np.asarray(residuals, dtype=np.float64)
    scale_P = np.ones(len(inputs)) if scale is None else np.asarray(scale, dtype=np.float64)
    if scale_P.shape != (len(inputs),) or not np.all(scale_P > 0):
        raise ValueError(f"predictive_draws: scale must be {len(inputs)} positive weights, got {scale_P.tolist()}")
    drawn_RP = rng.choice(residuals, size=(len(thetas_RC), len(inputs)))
    return np.array([form.log_loss(theta, X) for theta in np.asarray(thetas_RC)]) + drawn_RP * scale_P


def target_scale(fit: dict, x: LawInputs) -> tuple[float, str]:
    """The noise weight a predictive interval for law inputs ``x`` draws its residual at,
    and its noise group's label, from ``fit.json``'s content: 1 and "all points" for a
    fit whose residuals were drawn alike (no ``residual_unit``: written before the
    weighted intervals, or an unweighted fit), else :func:`pipeline.scaling.noise.scale_of`."""
    if fit.get("intervals", {}).get("residual_unit") != RESIDUAL_UNIT:
        return scale_of(None, x)
    return scale_of(fit.get("noise_weights"), x)


def interval(draws_R: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of loss from draws of log loss."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.exp(np.percentile(draws_R, [tail, 100.0 - tail]))
    return float(low), float(high)


def resample_indices(
    fitted: list[Observation], rng: np.random.Generator, count: int, form: LawForm
) -> list[np.ndarray]:
    """``count`` index draws with replacement, each able to determine the law ``form``."""
    out = []
    while len(out) < count:
        for _ in range(50):
            idx = rng.integers(0, len(fitted), size=len(fitted))
            try:
                check_identifiable([fitted[i] for i in idx], form)
            except ScalingFitError:
                continue
            out.append(idx)
            break
        else:
            raise ScalingFitError("bootstrap: 50 resamples in a row could not determine the law; the sweep is too thin")
    return out


def _refit(
    form: LawForm, theta0: np.ndarray, X: np.ndarray, y: np.ndarray, noise: np.ndarray, delta: float = HUBER_DELTA
) -> tuple[np.ndarray, bool]:
    theta, _, converged = minimize_from(huber_objective(form, X, y, delta, noise), theta0, form.bounds)
    return theta, converged
