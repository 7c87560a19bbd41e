"""Fitting the law of :mod:`pipeline.scaling.law` to a sweep's final validation losses.

Practice of Hoffmann et al. 2022 (approach 3): minimise the Huber loss (δ = 1e-3) of
the residuals ``log L_pred - log L_measured`` with L-BFGS(-B) from a grid of starting
points and keep the best. Points marked ``held_out`` (a sweep's largest runs) are left
out of the fit and only predicted: the held-out error is an out-of-sample error, an
extrapolation in N when a size is held out at every budget. Errors are relative errors
of the loss, ``|L_pred / L - 1|``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from pipeline.scaling.law import COL_S, JOINT, S_MEANS, LawForm, LawInputs, ScalingLaw, design_matrix

HUBER_DELTA = 1e-3
# The default grid of starting points: 3 x 3 x 3 x 3 x 2 = 162 starts (coefficients
# every form has; the others start at the form's start_defaults).
START_GRID = {
    "alpha": (0.1, 0.3, 0.6),
    "beta": (0.1, 0.3, 0.6),
    "log_a": (2.0, 6.0, 10.0),
    "log_b": (2.0, 6.0, 10.0),
    "log_c": (0.0, 1.0),
}


class ScalingFitError(ValueError):
    """The points cannot determine the law (too few, or no spread in N or D)."""


@dataclass(frozen=True)
class Observation:
    """One finished sweep point: its law inputs and measured validation loss (nats)."""

    name: str  # e.g. "m-e16k4-600000"
    family: str  # the architecture name, e.g. "e16k4" or "dense"
    inputs: LawInputs
    loss: float
    held_out: bool = False
    # Seconds the run spent in training steps (its MLflow perf/train_seconds); None when
    # unknown or when the run was resumed (its clock restarted). For the equal-time tables.
    seconds: float | None = None
    size: str = ""  # the sweep's size name, e.g. "m": leave-one-size-out folds (select.py)
    # Its noise (SD of log loss) over the quietest fitted point's: the fit divides its
    # residual by this (pipeline/scaling/noise.py sets it from seed replicates; 1: unweighted).
    noise: float = 1.0


@dataclass
class ErrorStats:
    """Relative loss errors ``L_pred / L - 1`` over a set of points: the RMS and the
    largest magnitude, and the signed mean (negative: the law predicts too low a loss on
    average, a bias the RMS alone does not show)."""

    count: int
    rms: float
    max: float
    mean: float = math.nan

    @classmethod
    def of(cls, rel_errors: np.ndarray) -> ErrorStats:
        if rel_errors.size == 0:
            return cls(0, math.nan, math.nan)
        return cls(
            int(rel_errors.size),
            float(np.sqrt(np.mean(rel_errors**2))),
            float(np.max(np.abs(rel_errors))),
            float(np.mean(rel_errors)),
        )


@dataclass
class FitResult:
    """The fitted law and how well it fits and extrapolates.

    ``band``: the error the fit reports for a prediction, 3 x the RMS relative error of
    the fitted points (3 sigma if residuals were Gaussian); ``held_out`` errors are to be
    read against it."""

    law: ScalingLaw
    fit: ErrorStats
    held_out: ErrorStats
    objective: float  # the Huber loss at the optimum
    starts: int
    starts_converged: int  # starts whose L-BFGS-B run met its own stopping rule (not maxiter)
    predictions: dict[str, float] = field(default_factory=dict)  # point name -> predicted loss

    @property
    def band(self) -> float:
        return 3.0 * self.fit.rms

    def to_dict(self) -> dict:
        return {
            "form": self.law.form.form,
            "form_name": self.law.form.name,
            "S": S_MEANS,  # a fit.json without it is from when S was 0/1 (forms.law_from_fit refuses it)
            "formula": self.law.formula(),
            "coefficients": self.law.coefficients,
            "fit_error": vars(self.fit),
            "held_out_error": vars(self.held_out),
            "prediction_band": self.band,
            "held_out_within_band": None if self.held_out.count == 0 else bool(self.held_out.max <= self.band),
            "huber_delta": HUBER_DELTA,
            "objective": self.objective,
            "starts": self.starts,
            "starts_converged": self.starts_converged,
            "predictions": self.predictions,
        }


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss: r²/2 inside |r| <= δ, δ(|r| - δ/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def starting_points(grid: dict[str, tuple[float, ...]] = START_GRID, form: LawForm = JOINT) -> list[np.ndarray]:
    """The Cartesian grid of starting θ (``form.coefficients`` order)."""
    keys = list(grid)
    starts = []
    for values in itertools.product(*(grid[k] for k in keys)):
        chosen = {**form.start_defaults, **dict(zip(keys, values))}
        chosen = {k: chosen["log_a"] if v is None else v for k, v in chosen.items()}
        starts.append(np.array([chosen[k] for k in form.coefficients], dtype=np.float64))
    return starts


def check_identifiable(points: list[Observation], form: LawForm = JOINT) -> None:
    """Raise ScalingFitError unless the fitted points can determine every coefficient of
    ``form``: more points than coefficients; two or more values of N and of D; two or
    more shared-expert shares S, e.g. none and some (σ); and the spread in Ê, G and S the form names in
    ``needs`` (the joint form's ``a + g G^-γ`` has three unknowns: three granularities;
    a quadratic in ln Ê: three expansions; in S: three shared-expert shares)."""
    fitted = [p for p in points if not p.held_out]
    names = form.coefficients
    need = len(names) + 1
    if len(fitted) < need:
        raise ScalingFitError(
            f"{len(fitted)} sweep point(s) to fit ({len(points) - len(fitted)} held out), but the {form.name} law "
            f"has {len(names)} coefficients ({', '.join(names)}): at least {need} are needed; "
            f"run more of the sweep (make sweep) or hold fewer out"
        )
    X = design_matrix([p.inputs for p in fitted])
    spreads = [
        ("active parameter counts N", {p.inputs.n_active for p in fitted}, 2, "alpha"),
        ("token budgets D", {p.inputs.tokens for p in fitted}, 2, "beta"),
        ("shared-expert settings", {p.inputs.shared for p in fitted}, 2, "sigma"),
    ]
    # Ê and G are columns of logs; S is the share itself
    spreads += [(what, set(np.round(X[:, col] if col == COL_S else np.exp(X[:, col]), 6)), least, coef)
                for col, least, what, coef in form.needs]  # fmt: skip
    for what, values, least, coefficient in spreads:
        if len(values) < least:
            shown = ", ".join(f"{v:g}" for v in sorted(values))
            raise ScalingFitError(
                f"the fitted points have {len(values)} distinct {what} ({shown}); {coefficient} needs {least} or "
                f"more: add architectures or sizes to the sweep"
            )


def huber_objective(
    form: LawForm, X: np.ndarray, y: np.ndarray, delta: float = HUBER_DELTA, noise_P: np.ndarray | None = None
):
    """The fit's objective at θ and its gradient: ``Σ Huber_δ(r / s) / δ²`` over the
    points, ``r = log L_pred(θ, X) - y`` (``y``: the measured log losses; ``X``: their
    design matrix, :func:`pipeline.scaling.law.design_matrix`; ``s``: ``noise_P``, each
    point's noise relative to the quietest's, :mod:`pipeline.scaling.noise`, default 1).

    Dividing by ``s`` is weighted least squares' rule inside the Huber loss: a residual
    beyond δ (nearly all of them at δ = 1e-3) costs ``|r| / s``, so a point 16x noisier
    counts 1/16 as much; inside δ it costs ``r² / s²``.

    Divided by δ² so that it is not of order δ² (1e-6) but of order (|r| / δ) per point
    (about 15 per point of a sweep fitted to 1.5%): L-BFGS-B stops when a step gains less
    than ``ftol x max(|f|, 1)`` (scipy's ftol 2.2e-9), an absolute threshold for an
    objective below 1. Unscaled, the fit stopped up to 0.3% above its optimum on the
    sweep, and 150% above it on a synthetic sweep, at a point the rounding of the
    machine's BLAS chose: the law differed between CPU kinds (an AMD Zen 5 fitted γ 0.33
    where an Intel Xeon recovered the true 0.6). The optimum is the same;
    :func:`fit_law` reports the Huber loss itself (times δ²).
    """
    scale = 1.0 / delta**2
    s_P = np.ones(len(y)) if noise_P is None else np.asarray(noise_P, dtype=np.float64)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, jac = form.log_loss_and_jacobian(theta, X)
        z = (pred - y) / s_P
        # d/dθ Huber(z) = ψ(z) · (dr/dθ) / s, ψ = Huber' = clip(z, ±δ)
        return scale * float(np.sum(huber(z, delta))), scale * ((np.clip(z, -delta, delta) / s_P) @ jac)

    return objective


def minimize_from(objective, theta0: np.ndarray, bounds) -> tuple[np.ndarray, float, bool]:
    """L-BFGS-B on :func:`huber_objective` from ``theta0``: (θ at the optimum, the
    objective there in :func:`huber_objective`'s units, whether L-BFGS-B met its own
    stopping rule rather than its iteration limit)."""
    res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": 5000})
    return res.x, float(res.fun), bool(res.success)


def best_start(objective, starts: list[np.ndarray], bounds) -> tuple[np.ndarray, float, int]:
    """L-BFGS-B from every start: the optimum with the lowest objective, its objective,
    and how many starts converged."""
    best_theta, best_value, converged = None, math.inf, 0
    for theta0 in starts:
        theta, value, ok = minimize_from(objective, theta0, bounds)
        converged += ok
        if np.isfinite(value) and value < best_value:
            best_theta, best_value = theta, value
    if best_theta is None:  # pragma: no cover - every start diverged
        raise ScalingFitError("no starting point converged to a finite Huber loss")
    return best_theta, best_value, converged


def fit_law(
    points: list[Observation],
    starts: list[np.ndarray] | None = None,
    delta: float = HUBER_DELTA,
    form: LawForm = JOINT,
) -> FitResult:
    """Fit the law ``form`` to the points not held out, each residual divided by the
    point's ``noise``; report fit and held-out errors (unweighted).

    Raises ScalingFitError (see :func:`check_identifiable`) before any optimisation."""
    check_identifiable(points, form)
    for p in points:
        if not (math.isfinite(p.loss) and p.loss > 0):
            raise ScalingFitError(f"point {p.name}: loss must be finite and > 0, got {p.loss}")
        if not (math.isfinite(p.noise) and p.noise > 0):
            raise ScalingFitError(f"point {p.name}: noise must be finite and > 0, got {p.noise}")
    fitted = [p for p in points if not p.held_out]
    X = design_matrix([p.inputs for p in fitted])
    y = np.log([p.loss for p in fitted])
    noise_P = np.array([p.noise for p in fitted])

    starts = starting_points(form=form) if starts is None else starts
    # BLAS threads on [P, C] products only contend (20x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        objective = huber_objective(form, X, y, delta, noise_P)
        best_theta, best_value, converged = best_start(objective, starts, form.bounds)
    law = ScalingLaw(tuple(float(t) for t in best_theta), form)
    predicted = law.predict([p.inputs for p in points])
    rel = predicted / np.array([p.loss for p in points]) - 1.0
    held = np.array([p.held_out for p in points])
    return FitResult(
        law=law,
        fit=ErrorStats.of(rel[~held]),
        held_out=ErrorStats.of(rel[held]),
        objective=best_value * delta**2,  # the Huber loss itself (huber_objective divides by δ²)
        starts=len(starts),
        starts_converged=converged,
        predictions={p.name: float(v) for p, v in zip(points, predicted)},
    )
