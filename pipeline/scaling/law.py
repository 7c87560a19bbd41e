"""The joint MoE scaling law: validation loss from active parameters, tokens and the
shape of the feed-forward slot.

    L(N, D, Ê, G, S) = c + (a + g · G^-γ) · Ê^-δ · exp(-σ S) · N^-α + b · D^-β

- N: active parameters a token multiplies (``accounting.matmul_params_active``: half
  the FLOPs per token without attention, the paper's compute budget is 2 N).
- D: training tokens.
- Ê: expansion, total / active FFN width (``accounting.ffn_shape``; dense: 1).
- G: granularity, active FFN width / one routed expert's width (dense: 1).
- S: the shared expert's share of the active FFN width (0 without one; MobileMoE-S's
  1536 of 4 x 384 + 1536 is 1/2). A share, not a yes/no: the planner and the paper
  choose between shares, and one factor for any shared expert, fitted at one share,
  says nothing about another.

Why this form. The parameter term is Krajewski et al. 2024's ``(g / G^γ + a) / N^α``
(fine-grained MoE: granularity acts on the parameter term, with diminishing returns),
multiplied by Ludziejewski et al. 2025's expert factor ``Ê^δ`` (more experts at the same
active parameters lower the parameter term; under a memory budget they cost N, which
is what makes moderate sparsity the sweet spot), and by ``exp(-σ S)`` for the shared
expert, which neither published form has a term for. Ludziejewski et al.'s ``ln Ê``
interactions in the exponents and the expert factor on the data term are left out:
they need sizes spread over orders of magnitude to be identified, and a small sweep
spans one. The dense model is the special case Ê = G = 1, S = 0 (Hoffmann et al. 2022).

Fitting is in log space (:mod:`pipeline.scaling.fit`): ``log L = LSE(T_N, T_D, log c)``
with ``T_N = log(a + g G^-γ) - δ log Ê - σ S - α log N`` and ``T_D = log b - β log D``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp

from pipeline.model.accounting import ffn_shape, matmul_params_active
from pipeline.model.config import ModelConfig

# What S is, written into fit.json: coefficients fitted when S was 0/1 (any shared expert)
# mean something else and are not read as a share's.
S_MEANS = "the shared expert's share of the active FFN width"

# The coefficient vector θ, in this order. a, g, b, c enter as logs (positive).
COEFFICIENTS = ("log_a", "log_g", "gamma", "delta", "sigma", "alpha", "log_b", "beta", "log_c")


@dataclass(frozen=True)
class LawInputs:
    """One point's inputs to the law (see the module doc)."""

    n_active: float  # N
    tokens: float  # D
    expansion: float  # Ê
    granularity: float  # G
    shared: float  # S: the shared expert's share of the active FFN width, in [0, 1)

    def __post_init__(self) -> None:
        if not (self.n_active > 0 and self.tokens > 0):
            raise ValueError(f"N and D must be > 0, got N={self.n_active}, D={self.tokens}")
        if self.expansion < 1 or self.granularity < 1:
            raise ValueError(f"expansion and granularity must be >= 1, got {self.expansion}, {self.granularity}")
        # a bool True (the 0/1 S of fits before the share) reads as 1 and is refused here
        if isinstance(self.shared, bool) or not 0 <= self.shared < 1:
            raise ValueError(f"S is the shared expert's share of the active FFN width, in [0, 1), got {self.shared!r}")


def law_inputs(cfg: ModelConfig, tokens: float) -> LawInputs:
    """The law's inputs for model ``cfg`` trained on ``tokens`` tokens (the model
    package's accounting, no second formula)."""
    shape = ffn_shape(cfg)
    share = shape_of(cfg)["shared_share"]
    return LawInputs(float(matmul_params_active(cfg)), float(tokens), shape.expansion, shape.granularity, share)


def shape_of(cfg: ModelConfig) -> dict[str, float]:
    """What the sweep's span is recorded in (``fit.json``'s ``shape_range``) for model
    ``cfg``: ``n_layers`` and ``d_model``, which the law does not see, and ``shared_share``,
    the shared expert's part of the active FFN width (0 without one), the law's S, which
    it sees only at the shares the sweep ran."""
    shared = cfg.moe.num_shared_experts * cfg.moe.shared_ffn_dim if cfg.moe else 0
    return {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "shared_share": shared / ffn_shape(cfg).active_width}


def design_matrix(points: list[LawInputs]) -> np.ndarray:
    """``[P, 5]`` float64 columns: log N, log D, log Ê, log G, S."""
    return np.array(
        [
            [np.log(p.n_active), np.log(p.tokens), np.log(p.expansion), np.log(p.granularity), float(p.shared)]
            for p in points
        ],
        dtype=np.float64,
    ).reshape(len(points), 5)


def log_loss(theta: np.ndarray, X_P5: np.ndarray) -> np.ndarray:
    """Predicted ``log L`` per point, ``[P]``, for coefficients ``theta`` (COEFFICIENTS
    order) and a design matrix from :func:`design_matrix`."""
    log_a, log_g, gamma, delta, sigma, alpha, log_b, beta, log_c = theta
    log_N, log_D, log_E, log_G, S = X_P5.T
    slot = np.logaddexp(log_a, log_g - gamma * log_G)  # log(a + g G^-γ)
    t_N = slot - delta * log_E - sigma * S - alpha * log_N
    t_D = log_b - beta * log_D
    return logsumexp(np.stack([t_N, t_D, np.full_like(t_N, log_c)]), axis=0)


def log_loss_and_jacobian(theta: np.ndarray, X_P5: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`log_loss` ``[P]`` and its derivatives by θ, ``[P, 9]`` (analytic: the
    fit's L-BFGS needs exact gradients to converge in few steps)."""
    log_a, log_g, gamma, delta, sigma, alpha, log_b, beta, log_c = theta
    log_N, log_D, log_E, log_G, S = X_P5.T
    g_term = log_g - gamma * log_G
    slot = np.logaddexp(log_a, g_term)
    share_a = np.exp(log_a - slot)  # ∂slot/∂log_a; 1 - share_a = ∂slot/∂log_g
    t_N = slot - delta * log_E - sigma * S - alpha * log_N
    t_D = log_b - beta * log_D
    terms_3P = np.stack([t_N, t_D, np.full_like(t_N, log_c)])
    out = logsumexp(terms_3P, axis=0)
    w_N, w_D, w_c = np.exp(terms_3P - out)  # softmax: ∂ log L / ∂ term
    jac = np.stack(
        [
            w_N * share_a,
            w_N * (1 - share_a),
            -w_N * (1 - share_a) * log_G,
            -w_N * log_E,
            -w_N * S,
            -w_N * log_N,
            w_D,
            -w_D * log_D,
            w_c,
        ],
        axis=1,
    )
    return out, jac


def formula(theta: np.ndarray) -> str:
    """The joint law with its fitted numbers, for reports."""
    k, e = dict(zip(COEFFICIENTS, (float(t) for t in theta))), np.exp
    return (
        f"L = {e(k['log_c']):.4g} + ({e(k['log_a']):.4g} + {e(k['log_g']):.4g}·G^{-k['gamma']:.3g})"
        f" · Ê^{-k['delta']:.3g} · exp({-k['sigma']:.3g}·S) · N^{-k['alpha']:.3g}"
        f" + {e(k['log_b']):.4g} · D^{-k['beta']:.3g}"
    )


@dataclass(frozen=True)
class LawForm:
    """One functional form of the law: its coefficients (θ order), their bounds, the
    values the fit starts unlisted coefficients at, what the points must spread over
    to determine it, and its maths. :data:`JOINT` is the form above; the candidates
    chosen between by leave-one-size-out error are in :mod:`pipeline.scaling.forms`."""

    name: str
    form: str  # the formula in words, for fit.json and reports
    coefficients: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    # start of each coefficient outside the fit's start grid; None: the value of log_a
    start_defaults: dict[str, float | None]
    # least distinct values of (column of design_matrix, what) the fitted points need
    needs: tuple[tuple[int, int, str, str], ...]  # (column, least, what, coefficients)
    log_loss: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (θ, X [P, 5]) -> log L [P]
    log_loss_and_jacobian: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # and [P, C]
    formula: Callable[[np.ndarray], str]

    def __post_init__(self) -> None:
        if len(self.bounds) != len(self.coefficients):
            raise ValueError(f"form {self.name}: {len(self.coefficients)} coefficients, {len(self.bounds)} bounds")


# Columns of design_matrix, for LawForm.needs.
COL_N, COL_D, COL_E, COL_G, COL_S = range(5)

JOINT = LawForm(
    name="joint",
    form="L = c + (a + g G^-gamma) Ehat^-delta exp(-sigma S) N^-alpha + b D^-beta",
    coefficients=COEFFICIENTS,
    bounds=(
        (-20.0, 30.0),  # log_a
        (-20.0, 30.0),  # log_g
        (0.0, 3.0),  # gamma
        (-2.0, 3.0),  # delta: experts may hurt
        (-3.0, 3.0),  # sigma: so may a shared expert
        (0.0, 2.5),  # alpha
        (-20.0, 40.0),  # log_b
        (0.0, 2.5),  # beta
        (-5.0, 3.0),  # log_c
    ),
    start_defaults={"log_g": None, "gamma": 0.5, "delta": 0.3, "sigma": 0.0},
    # the granularity term a + g G^-γ has three unknowns: three granularities
    needs=((COL_E, 2, "expansions", "delta"), (COL_G, 3, "granularities", "a, g, gamma")),
    log_loss=log_loss,
    log_loss_and_jacobian=log_loss_and_jacobian,
    formula=formula,
)


@dataclass(frozen=True)
class ScalingLaw:
    """Fitted coefficients ``theta`` of a law ``form``; ``predict`` gives the loss
    (nats/token)."""

    theta: tuple[float, ...]
    form: LawForm = JOINT

    def __post_init__(self) -> None:
        names = self.form.coefficients
        if len(self.theta) != len(names):
            raise ValueError(f"the {self.form.name} law has {len(names)} coefficients {names}, got {len(self.theta)}")

    @property
    def coefficients(self) -> dict[str, float]:
        return dict(zip(self.form.coefficients, (float(t) for t in self.theta)))

    def predict(self, points: list[LawInputs]) -> np.ndarray:
        """Predicted validation loss of each point, ``[P]``."""
        return np.exp(self.form.log_loss(np.asarray(self.theta), design_matrix(points)))

    def predict_one(self, point: LawInputs) -> float:
        return float(self.predict([point])[0])

    def formula(self) -> str:
        """The law with its fitted numbers, for reports."""
        return self.form.formula(np.asarray(self.theta))
