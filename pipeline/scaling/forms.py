"""Candidate forms of the law, chosen between by leave-one-size-out error (:mod:`pipeline.scaling.select`).

Besides the joint form of :mod:`pipeline.scaling.law`, the candidates are log-linear
in their coefficients inside each term:

    L = c + exp(t_N) + exp(t_D),   t_N = Σ θ_k f_k(N, Ê, G, S),   t_D = Σ θ_k f_k(D, Ê)

- ``power``: ``t_N = log a - α ln N - δ ln Ê - γ ln G - σ S``, ``t_D = log b - β ln D``:
  monotone power laws in Ê and G (no saturation in G: the joint form's ``a + g G^-γ``
  is replaced by ``G^-γ``).
- ``interior``: ``power`` plus ``+ δ₂ (ln Ê)² + γ₂ (ln G)² + σ₂ S²`` in t_N. With
  δ₂ > 0 the loss has an interior optimum in expansion at ``ln Ê* = δ / (2 δ₂)``
  (likewise in G, and in the shared share at ``S* = σ / (2 σ₂)``): the sweep's finding
  that expansion 4 beats both 2 and 8 is a shape the monotone forms cannot hold, and so
  is a shared expert that helps at a quarter of the width and not at a half.
- ``interaction``: Ludziejewski et al. 2025 (Joint MoE scaling laws, eq. 5): the
  exponents of N and D move with ln Ê, ``N^-(α + ι ln Ê)`` and ``D^-(β + ζ ln Ê)``, and
  the data term has its own expert factor ``Ê^-ω``. The logs of N and D in the
  interactions are centred at 1e6 (``ln N - ln 1e6``): the same family of laws, with δ
  and ω read at N, D = 1e6, and a fit that is not ill-conditioned by ln N ≈ 14 times ln Ê.
- ``interior_interaction``: both.
- ``interior_coupled``: ``interior`` with its two terms added as Kaplan et al. 2020
  (eq. 1.5) couple N and D, ``L = c + (exp(t_N)^(1/q) + exp(t_D)^(1/q))^q``: q = 1 is the
  plain sum; q > 1 raises the loss where neither term dominates, i.e. a larger model
  needs more data before its parameter term shows (the sweep's largest runs came in
  above every additive form's prediction). q enters as ``log_q``.

Coefficients are named so that a positive value lowers the loss as its variable grows
(δ₂, γ₂ and σ₂: a positive value is a convex bowl, an interior optimum).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import logsumexp

from pipeline.scaling.law import COL_D, COL_E, COL_G, COL_N, COL_S, JOINT, S_MEANS, LawForm, ScalingLaw

LOG_REF = math.log(1e6)  # the centre of ln N and ln D in the interaction features

# coefficient -> (term, feature of X [P, 5] -> [P], bounds, start)
_FEATURES = {
    "log_a": ("N", lambda X: np.ones(len(X)), (-20.0, 30.0), None),
    "alpha": ("N", lambda X: -X[:, COL_N], (0.0, 2.5), None),
    "delta": ("N", lambda X: -X[:, COL_E], (-2.0, 3.0), 0.1),
    "gamma": ("N", lambda X: -X[:, COL_G], (-2.0, 3.0), 0.05),
    "sigma": ("N", lambda X: -X[:, COL_S], (-3.0, 3.0), 0.0),
    # >= 0: a bowl (an interior optimum, or none in range), never a cap whose loss keeps
    # falling beyond the sweep's range, where a plan extrapolates
    "delta2": ("N", lambda X: X[:, COL_E] ** 2, (0.0, 2.0), 0.0),
    "gamma2": ("N", lambda X: X[:, COL_G] ** 2, (0.0, 2.0), 0.0),
    # S is in [0, 1): S² <= 1, so the bound is wider than ln Ê's and ln G's
    "sigma2": ("N", lambda X: X[:, COL_S] ** 2, (0.0, 8.0), 0.0),
    "iota": ("N", lambda X: -X[:, COL_E] * (X[:, COL_N] - LOG_REF), (-1.0, 1.0), 0.0),
    "log_b": ("D", lambda X: np.ones(len(X)), (-20.0, 40.0), None),
    "beta": ("D", lambda X: -X[:, COL_D], (0.0, 2.5), None),
    "omega": ("D", lambda X: -X[:, COL_E], (-2.0, 3.0), 0.0),
    "zeta": ("D", lambda X: -X[:, COL_E] * (X[:, COL_D] - LOG_REF), (-1.0, 1.0), 0.0),
    "log_c": ("c", None, (-5.0, 3.0), None),
    "log_q": ("q", None, (-1.5, 1.5), 0.0),  # the coupling exponent q = e^log_q in [0.22, 4.5]
}
# coefficient -> (sign, feature in the formula with numbers, the term in words for fit.json)
_SHOWN = {
    "delta2": ("+", "(ln Ê)²", "delta2 (ln Ehat)^2"),
    "gamma2": ("+", "(ln G)²", "gamma2 (ln G)^2"),
    "sigma2": ("+", "S²", "sigma2 S^2"),
    "iota": ("-", "ln Ê·(ln N - ln 1e6)", "iota ln Ehat (ln N - ln 1e6)"),
    "omega": ("-", "ln Ê", "omega ln Ehat"),
    "zeta": ("-", "ln Ê·(ln D - ln 1e6)", "zeta ln Ehat (ln D - ln 1e6)"),
}


def _log_linear(
    name: str, extra_n: tuple[str, ...], extra_d: tuple[str, ...], needs_e: int, needs_g: int, coupled: bool = False
) -> LawForm:
    """A log-linear candidate: power's coefficients plus ``extra_n`` in t_N, ``extra_d`` in
    t_D; ``coupled``: the two terms summed as ``(e^(t_N/q) + e^(t_D/q))^q`` (coefficient log_q)."""
    names = ("log_a", "alpha", "delta", "gamma", "sigma", *extra_n, "log_b", "beta", *extra_d, "log_c")
    names += ("log_q",) if coupled else ()
    in_n = [k for k in names if _FEATURES[k][0] == "N"]
    in_d = [k for k in names if _FEATURES[k][0] == "D"]

    def terms(theta: np.ndarray, X: np.ndarray):
        """t_N, t_D [P] (log of each term), log c, q, and the features [P, k] of each."""
        coef = dict(zip(names, theta))
        phi_N = np.stack([_FEATURES[k][1](X) for k in in_n], axis=1)  # [P, |in_n|]
        phi_D = np.stack([_FEATURES[k][1](X) for k in in_d], axis=1)
        t_N = phi_N @ np.array([coef[k] for k in in_n])
        t_D = phi_D @ np.array([coef[k] for k in in_d])
        return t_N, t_D, coef["log_c"], math.exp(coef["log_q"]) if coupled else 1.0, phi_N, phi_D

    def log_loss_and_jacobian(theta: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t_N, t_D, log_c, q, phi_N, phi_D = terms(np.asarray(theta), X)
        if coupled:
            # u = log of the N and D terms together: q · LSE(t_N / q, t_D / q)
            s = np.logaddexp(t_N / q, t_D / q)
            u = q * s
            out = np.logaddexp(u, log_c)
            w_u, w_c = np.exp(u - out), np.exp(log_c - out)  # ∂ log L / ∂ u, ∂ log L / ∂ log c
            a_N = np.exp(t_N / q - s)  # ∂u/∂t_N; ∂u/∂t_D = 1 - a_N
            w_N, w_D = w_u * a_N, w_u * (1 - a_N)
            # ∂u/∂q = s - (a_N t_N + a_D t_D) / q, and ∂q/∂log_q = q
            extra = {"log_q": w_u * (q * s - (a_N * t_N + (1 - a_N) * t_D))}
        else:
            terms_3P = np.stack([t_N, t_D, np.full(len(X), log_c)])
            out = logsumexp(terms_3P, axis=0)
            w_N, w_D, w_c = np.exp(terms_3P - out)  # softmax: ∂ log L / ∂ term
            extra = {}
        columns = {**{k: w_N * phi_N[:, i] for i, k in enumerate(in_n)},
                   **{k: w_D * phi_D[:, i] for i, k in enumerate(in_d)}, "log_c": w_c, **extra}  # fmt: skip
        return out, np.stack([columns[k] for k in names], axis=1)

    def log_loss(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        return log_loss_and_jacobian(theta, X)[0]

    def formula(theta: np.ndarray) -> str:
        k = dict(zip(names, (float(t) for t in theta)))

        def term(sign: str, value: float, what: str) -> str:  # " - 0.3·ln N"; a negative value flips the sign
            flip = (sign == "-") != (value < 0)
            return f" {'-' if flip else '+'} {abs(value):.3g}·{what}"

        n_terms = [("-", k["alpha"], "ln N"), ("-", k["delta"], "ln Ê"), ("-", k["gamma"], "ln G"),
                   ("-", k["sigma"], "S"), *((_SHOWN[x][0], k[x], _SHOWN[x][1]) for x in extra_n)]  # fmt: skip
        d_terms = [("-", k["beta"], "ln D"), *((_SHOWN[x][0], k[x], _SHOWN[x][1]) for x in extra_d)]
        n_text = f"exp({k['log_a']:.4g}{''.join(term(*t) for t in n_terms)})"
        d_text = f"exp({k['log_b']:.4g}{''.join(term(*t) for t in d_terms)})"
        if coupled:
            q = math.exp(k["log_q"])
            return f"L = {math.exp(k['log_c']):.4g} + ({n_text}^(1/{q:.3g}) + {d_text}^(1/{q:.3g}))^{q:.3g}"
        return f"L = {math.exp(k['log_c']):.4g} + {n_text} + {d_text}"

    words_n = "".join(f" {_SHOWN[x][0]} {_SHOWN[x][2]}" for x in extra_n)
    words_d = "".join(f" {_SHOWN[x][0]} {_SHOWN[x][2]}" for x in extra_d)
    needs = [(COL_E, needs_e, "expansions", "delta" + (", delta2" if needs_e > 2 else ""))]
    needs.append((COL_G, needs_g, "granularities", "gamma" + (", gamma2" if needs_g > 2 else "")))
    if "sigma2" in extra_n:  # a quadratic in S: three shares (none, and two widths of shared expert)
        needs.append((COL_S, 3, "shared-expert shares", "sigma, sigma2"))
    t_n = f"exp(log a - alpha ln N - delta ln Ehat - gamma ln G - sigma S{words_n})"
    t_d = f"exp(log b - beta ln D{words_d})"
    return LawForm(
        name=name,
        form=f"L = c + ({t_n}^(1/q) + {t_d}^(1/q))^q" if coupled else f"L = c + {t_n} + {t_d}",
        coefficients=names,
        bounds=tuple(_FEATURES[k][2] for k in names),
        start_defaults={k: _FEATURES[k][3] for k in names if _FEATURES[k][3] is not None},
        needs=tuple(needs),
        log_loss=log_loss,
        log_loss_and_jacobian=log_loss_and_jacobian,
        formula=formula,
    )


POWER = _log_linear("power", (), (), needs_e=2, needs_g=2)
INTERIOR = _log_linear("interior", ("delta2", "gamma2", "sigma2"), (), needs_e=3, needs_g=3)
INTERACTION = _log_linear("interaction", ("iota",), ("omega", "zeta"), needs_e=2, needs_g=2)
INTERIOR_INTERACTION = _log_linear(
    "interior_interaction", ("delta2", "gamma2", "sigma2", "iota"), ("omega", "zeta"), 3, 3
)
INTERIOR_COUPLED = _log_linear(
    "interior_coupled", ("delta2", "gamma2", "sigma2"), (), needs_e=3, needs_g=3, coupled=True
)
FORMS = {f.name: f for f in (JOINT, POWER, INTERIOR, INTERACTION, INTERIOR_INTERACTION, INTERIOR_COUPLED)}


def get(name: str) -> LawForm:
    """The form called ``name``; KeyError listing the forms otherwise."""
    if name not in FORMS:
        raise KeyError(f"no law form {name!r}; the forms are {', '.join(FORMS)}")
    return FORMS[name]


def form_of(summary: dict) -> LawForm:
    """The form of the law a ``fit.json`` holds (``form_name``; ``joint`` in a fit
    written before forms were chosen); KeyError for a name no form has."""
    return get(summary.get("form_name", JOINT.name))


def law_from_fit(summary: dict) -> ScalingLaw:
    """The law a ``fit.json`` holds: its form (:func:`form_of`) and coefficients.
    KeyError/TypeError/ValueError when the summary lacks them; ValueError for a fit
    written when S was 0/1 (no ``S`` key): its σ is per shared expert, not per share."""
    if summary.get("S") != S_MEANS:
        raise ValueError(
            f"the fit's S is {summary.get('S', '0 or 1 (written before S became a share)')!r}, not {S_MEANS!r}: "
            "refit it (make scaling-fit)"
        )
    form = form_of(summary)
    coefficients = summary["coefficients"]
    return ScalingLaw(tuple(float(coefficients[k]) for k in form.coefficients), form)
