"""Choosing the law's form by how well it predicts runs it was not fitted to.

Each candidate form (:mod:`pipeline.scaling.forms`) is scored by leave-one-size-out
cross-validation over the fitted points: for every model size of the sweep, fit the
form to the other sizes' points and predict that size's points; the score is the RMS
relative error of all those predictions (an error in N, the direction a plan
extrapolates in), each error divided by its point's noise weight as the fit divides its
residual (:mod:`pipeline.scaling.noise`; with every weight 1, the plain RMS): a form is
judged on the points that can tell forms apart, not on the noisiest. The form with the
lowest score is the law. Fit error never chooses:
a form with more coefficients always fits its own points at least as well.

The held-out points (the largest runs, ``scaling.hold_out_sizes``) take no part in the
choice: their error, reported for every form, stays an out-of-sample test of the law
chosen. Choosing by it would make the reported held-out error a selected minimum,
biased low.

Each fold's fit starts from the full grid, as the fit to all points does, and keeps
its own lowest objective; it never starts from the optimum of all points (that fit saw
the size the fold predicts). A fold fitted from a few starts lands in whichever local
optimum is nearest, and the scores then measure the starts, not the forms (seen on
moe_grid: a 16-start fold grid moved the ranking). Six forms x five fits x 162 starts
take minutes on 2 cores; ``make scaling-fit`` is run once per sweep.

A form that some fold's points cannot determine (:func:`pipeline.scaling.fit.check_identifiable`)
gets no score and cannot be chosen; it is listed with the reason.

Every form is also scored, for the record and not for the choice, by how it extrapolates
in tokens (:func:`leave_largest_budget_out`): fitted to the points below the sweep's
largest budget, it predicts the fitted points at that budget. The held-out runs and the
closed loops are trained at that budget, and a plan at the paper's budgets extrapolates
in D by orders of magnitude, so a bias there (its signed mean) is what a plan inherits.
It does not choose: it was added after the held-out and loop results were seen, and a
rule picked with the test in view would make the test a selected minimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.scaling.fit import ErrorStats, FitResult, Observation, ScalingFitError, fit_law, starting_points
from pipeline.scaling.law import LawForm


@dataclass
class FormScore:
    """One candidate form: its fit, its cross-validated and its held-out errors, and its
    error at the largest budget fitted without it (reported, not used to choose)."""

    form: str
    coefficients: int
    fit: ErrorStats | None
    cross_validated: ErrorStats | None  # leave-one-size-out over the fitted points
    held_out: ErrorStats | None
    folds: list[str]  # the sizes left out in turn
    unscored: str = ""  # why the form has no score, if it has none
    largest_budget: ErrorStats | None = None  # leave_largest_budget_out: reported, never chooses
    largest_budget_note: str = ""  # why it is missing, if it is
    # the choosing score: the RMS of the cross-validated errors over their points' noise
    # weights (equal to cross_validated.rms when every weight is 1)
    cv_score: float | None = None

    def to_dict(self) -> dict:
        named = (("fit_error", self.fit), ("cv_error", self.cross_validated), ("held_out_error", self.held_out),
                 ("largest_budget_error", self.largest_budget))  # fmt: skip
        stats = {k: None if v is None else vars(v) for k, v in named}
        return {"form": self.form, "coefficients": self.coefficients, **stats, "folds": self.folds,
                "unscored": self.unscored, "largest_budget_note": self.largest_budget_note,
                "cv_score": self.cv_score}  # fmt: skip


def leave_one_size_out(points: list[Observation], form: LawForm, starts: list[np.ndarray] | None = None) -> ErrorStats:
    """Relative errors of each fitted point's loss predicted by ``form`` fitted to the
    other sizes' points (held-out points are dropped first). Raises ScalingFitError
    when a point has no size, when there are fewer than two sizes, or when a fold
    cannot determine the form."""
    return ErrorStats.of(leave_one_size_out_errors(points, form, starts)[0])


def leave_one_size_out_errors(
    points: list[Observation], form: LawForm, starts: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`leave_one_size_out`'s relative errors, (P,), and the noise weights of their
    points, (P,) (``Observation.noise``; every fold's fit weighs its points by them). The
    weights were estimated once from all fitted points' seeds, the left-out size's too:
    a fold borrows that size's noise level, never its losses."""
    fitted = [p for p in points if not p.held_out]
    if any(not p.size for p in fitted):
        raise ScalingFitError("leave-one-size-out needs every point's size (Observation.size)")
    sizes = sorted({p.size for p in fitted})
    if len(sizes) < 2:
        raise ScalingFitError(f"leave-one-size-out needs two or more sizes, the fitted points have {sizes}")
    errors, noise = [], []
    for size in sizes:
        fold = [replace(p, held_out=p.size == size) for p in fitted]
        try:
            result = fit_law(fold, starts=starts, form=form)
        except ScalingFitError as err:
            raise ScalingFitError(f"without size {size!r}: {err}") from None
        errors += [result.predictions[p.name] / p.loss - 1.0 for p in fold if p.held_out]
        noise += [p.noise for p in fold if p.held_out]
    return np.array(errors), np.array(noise)


def leave_largest_budget_out(
    points: list[Observation], form: LawForm, starts: list[np.ndarray] | None = None
) -> ErrorStats:
    """Relative errors ``L_pred / L - 1`` of the fitted points at the largest token budget,
    predicted by ``form`` fitted to the fitted points at the smaller budgets (held-out
    points are dropped first): the law's extrapolation in D, with its sign (``mean``);
    also in N for a size whose points all lie at the largest budget (none on moe_grid).
    Raises ScalingFitError when the fitted points have fewer than three budgets (the fit
    would be left one, and no D term) or when the smaller budgets cannot determine the
    form (:func:`pipeline.scaling.fit.check_identifiable`, named in the message)."""
    fitted = [p for p in points if not p.held_out]
    budgets = sorted({p.inputs.tokens for p in fitted})
    if len(budgets) < 3:
        shown = ", ".join(f"{b:g}" for b in budgets)
        raise ScalingFitError(f"leaving the largest token budget out needs three or more budgets, the fitted points "
                              f"have {len(budgets)} ({shown})")  # fmt: skip
    fold = [replace(p, held_out=p.inputs.tokens == budgets[-1]) for p in fitted]
    try:
        result = fit_law(fold, starts=starts, form=form)
    except ScalingFitError as err:
        raise ScalingFitError(f"without the largest budget ({budgets[-1]:g} tokens): {err}") from None
    return result.held_out  # the fold's held-out points: the fitted ones at the largest budget


def choose_form(points: list[Observation], forms: list[LawForm], starts_for=None) -> tuple[FitResult, list[FormScore]]:
    """Fit every form, score each by :func:`leave_one_size_out` (``FormScore.cv_score``:
    its errors over their points' noise weights), and return the fit of
    the lowest-scoring form and every form's scores (in ``forms`` order). Each score also
    holds :func:`leave_largest_budget_out` (for the record: it does not choose; None,
    with the reason, where the points cannot make that fold).

    ``starts_for(form)``: every fit's starting points for a form (default: the full
    grid). With one form there is nothing to choose: it is fitted and not cross-validated.
    Raises ScalingFitError when no form can be scored and there are several, or when
    the single form cannot be fitted."""
    results: dict[str, FitResult] = {}
    scores = []
    for form in forms:
        starts = None if starts_for is None else starts_for(form)
        cv_score = None
        folds = sorted({p.size for p in points if not p.held_out})
        fold_starts = starting_points(form=form) if starts is None else starts
        try:
            results[form.name] = fit_law(points, starts=starts, form=form)
            if len(forms) == 1:
                cv, unscored = None, "the only form: not cross-validated"
            else:
                errors_P, noise_P = leave_one_size_out_errors(points, form, fold_starts)
                cv, unscored = ErrorStats.of(errors_P), ""
                cv_score = float(np.sqrt(np.mean((errors_P / noise_P) ** 2)))
        except ScalingFitError as err:
            if len(forms) == 1 and form.name not in results:
                raise
            cv, unscored = None, str(err)
        largest, note = None, ""  # a single form: nothing to compare, its `unscored` says so
        if len(forms) > 1:
            try:
                largest = leave_largest_budget_out(points, form, fold_starts)
            except ScalingFitError as err:
                note = str(err)
        fitted = results.get(form.name)
        scores.append(
            FormScore(
                form.name,
                len(form.coefficients),
                fitted and fitted.fit,
                cv,
                fitted and fitted.held_out,
                folds,
                unscored,
                largest,
                note,
                cv_score,
            )  # fmt: skip
        )
    scored = [s for s in scores if s.cv_score is not None and math.isfinite(s.cv_score)]
    if len(forms) == 1:
        return results[forms[0].name], scores
    if not scored:
        reasons = "; ".join(f"{s.form}: {s.unscored}" for s in scores)
        raise ScalingFitError(f"no candidate law form could be scored by leave-one-size-out: {reasons}")
    best = min(scored, key=lambda s: s.cv_score)
    return results[best.form], scores
