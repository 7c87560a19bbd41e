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

from pipeline.scaling.law import COEFFICIENTS, LawInputs, ScalingLaw, design_matrix, log_loss_and_jacobian

HUBER_DELTA = 1e-3
# Bounds per coefficient (COEFFICIENTS order): exponents of a power law in N or D stay
# in [0, 2.5]; δ and σ may come out negative (experts or a shared expert that hurt).
BOUNDS = (
    (-20.0, 30.0),  # log_a
    (-20.0, 30.0),  # log_g
    (0.0, 3.0),  # gamma
    (-2.0, 3.0),  # delta
    (-3.0, 3.0),  # sigma
    (0.0, 2.5),  # alpha
    (-20.0, 40.0),  # log_b
    (0.0, 2.5),  # beta
    (-5.0, 3.0),  # log_c
)
# The default grid of starting points: 3 x 3 x 3 x 3 x 2 = 162 starts.
START_GRID = {
    "alpha": (0.1, 0.3, 0.6),
    "beta": (0.1, 0.3, 0.6),
    "log_a": (2.0, 6.0, 10.0),
    "log_b": (2.0, 6.0, 10.0),
    "log_c": (0.0, 1.0),
}
START_DEFAULTS = {"log_g": None, "gamma": 0.5, "delta": 0.3, "sigma": 0.0}  # log_g starts at log_a


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


@dataclass
class ErrorStats:
    """Relative loss errors ``|L_pred / L - 1|`` over a set of points."""

    count: int
    rms: float
    max: float

    @classmethod
    def of(cls, rel_errors: np.ndarray) -> ErrorStats:
        if rel_errors.size == 0:
            return cls(0, math.nan, math.nan)
        return cls(int(rel_errors.size), float(np.sqrt(np.mean(rel_errors**2))), float(np.max(np.abs(rel_errors))))


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
    predictions: dict[str, float] = field(default_factory=dict)  # point name -> predicted loss

    @property
    def band(self) -> float:
        return 3.0 * self.fit.rms

    def to_dict(self) -> dict:
        return {
            "form": "L = c + (a + g G^-gamma) Ehat^-delta exp(-sigma S) N^-alpha + b D^-beta",
            "formula": self.law.formula(),
            "coefficients": self.law.coefficients,
            "fit_error": vars(self.fit),
            "held_out_error": vars(self.held_out),
            "prediction_band": self.band,
            "held_out_within_band": None if self.held_out.count == 0 else bool(self.held_out.max <= self.band),
            "huber_delta": HUBER_DELTA,
            "objective": self.objective,
            "starts": self.starts,
            "predictions": self.predictions,
        }


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Elementwise Huber loss: r²/2 inside |r| <= δ, δ(|r| - δ/2) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def starting_points(grid: dict[str, tuple[float, ...]] = START_GRID) -> list[np.ndarray]:
    """The Cartesian grid of starting θ (COEFFICIENTS order)."""
    keys = list(grid)
    starts = []
    for values in itertools.product(*(grid[k] for k in keys)):
        chosen = {**START_DEFAULTS, **dict(zip(keys, values))}
        chosen["log_g"] = chosen["log_a"] if chosen["log_g"] is None else chosen["log_g"]
        starts.append(np.array([chosen[k] for k in COEFFICIENTS], dtype=np.float64))
    return starts


def check_identifiable(points: list[Observation]) -> None:
    """Raise ScalingFitError unless the fitted points can determine every coefficient:
    more points than coefficients; two or more values of N, of D and of Ê; three or
    more of G (the granularity term ``a + g G^-γ`` has three unknowns); and points with
    and without a shared expert (σ)."""
    fitted = [p for p in points if not p.held_out]
    need = len(COEFFICIENTS) + 1
    if len(fitted) < need:
        raise ScalingFitError(
            f"{len(fitted)} sweep point(s) to fit ({len(points) - len(fitted)} held out), but the law has "
            f"{len(COEFFICIENTS)} coefficients ({', '.join(COEFFICIENTS)}): at least {need} are needed; "
            f"run more of the sweep (make sweep) or hold fewer out"
        )
    spreads = (
        ("active parameter counts N", {p.inputs.n_active for p in fitted}, 2, "alpha"),
        ("token budgets D", {p.inputs.tokens for p in fitted}, 2, "beta"),
        ("expansions", {round(p.inputs.expansion, 6) for p in fitted}, 2, "delta"),
        ("granularities", {round(p.inputs.granularity, 6) for p in fitted}, 3, "a, g, gamma"),
        ("shared-expert settings", {p.inputs.shared for p in fitted}, 2, "sigma"),
    )
    for what, values, least, coefficient in spreads:
        if len(values) < least:
            shown = ", ".join(f"{v:g}" for v in sorted(values))
            raise ScalingFitError(
                f"the fitted points have {len(values)} distinct {what} ({shown}); {coefficient} needs {least} or "
                f"more: add architectures or sizes to the sweep"
            )


def _best_start(objective, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """L-BFGS-B from every start; the optimum with the lowest objective."""
    best_theta, best_value = None, math.inf
    for theta0 in starts:
        res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=BOUNDS, options={"maxiter": 5000})
        if np.isfinite(res.fun) and res.fun < best_value:
            best_theta, best_value = res.x, float(res.fun)
    if best_theta is None:  # pragma: no cover - every start diverged
        raise ScalingFitError("no starting point converged to a finite Huber loss")
    return best_theta, best_value


def fit_law(points: list[Observation], starts: list[np.ndarray] | None = None, delta: float = HUBER_DELTA) -> FitResult:
    """Fit the law to the points not held out; report fit and held-out errors.

    Raises ScalingFitError (see :func:`check_identifiable`) before any optimisation."""
    check_identifiable(points)
    for p in points:
        if not (math.isfinite(p.loss) and p.loss > 0):
            raise ScalingFitError(f"point {p.name}: loss must be finite and > 0, got {p.loss}")
    fitted = [p for p in points if not p.held_out]
    X = design_matrix([p.inputs for p in fitted])
    y = np.log([p.loss for p in fitted])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        pred, jac = log_loss_and_jacobian(theta, X)
        r = pred - y
        return float(np.sum(huber(r, delta))), np.clip(r, -delta, delta) @ jac  # ψ(r) = Huber'(r)

    starts = starting_points() if starts is None else starts
    # BLAS threads on [P, 9] products only contend (20x slower on 2 busy cores).
    with threadpool_limits(limits=1):
        best_theta, best_value = _best_start(objective, starts)
    law = ScalingLaw(tuple(float(t) for t in best_theta))
    predicted = law.predict([p.inputs for p in points])
    rel = predicted / np.array([p.loss for p in points]) - 1.0
    held = np.array([p.held_out for p in points])
    return FitResult(
        law=law,
        fit=ErrorStats.of(rel[~held]),
        held_out=ErrorStats.of(rel[held]),
        objective=best_value,
        starts=len(starts),
        predictions={p.name: float(v) for p, v in zip(points, predicted)},
    )
