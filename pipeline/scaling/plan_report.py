"""The planner's report: the chosen architecture, the best within budget, the best per
expansion, the reference models against the frontier, the frontiers themselves, as
``plan.md``, ``plan.json`` and two frontier plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tabulate import tabulate

from pipeline.model.config import ModelConfig
from pipeline.scaling import plots
from pipeline.scaling.bootstrap import interval, predictive_draws, target_scale
from pipeline.scaling.forms import form_of, law_from_fit
from pipeline.scaling.law import ScalingLaw, design_matrix, shape_of
from pipeline.scaling.planner import Budget, Candidate, Plan, PlanError, frontier_loss_at


def load_law(path: Path) -> tuple[ScalingLaw, dict]:
    """The fitted law and the fit's summary from ``fit.json`` (``make scaling-fit``);
    PlanError naming the file when it is absent or not a fit."""
    if not path.is_file():
        raise PlanError(f"--fit {path}: no fitted law there; run `make scaling-fit` first")
    try:
        summary = json.loads(path.read_text())
        return law_from_fit(summary), summary
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise PlanError(f"--fit {path}: not a fit written by make scaling-fit ({type(err).__name__}: {err})") from None


def _table(candidates: list[Candidate]) -> str:
    rows = [c.row() for c in candidates]
    return tabulate(rows, headers="keys", tablefmt="github") if rows else "(none)"


def reference_rows(result: Plan, refs: list[Candidate]) -> list[dict]:
    """Each reference's counts and predicted loss, and the frontier's best predicted
    loss at no more INT4 memory (and no more FLOPs) than it uses."""
    rows = []
    for ref in refs:
        at_memory = frontier_loss_at(result.frontier_memory, "int4_bytes", ref.int4_bytes)
        at_flops = frontier_loss_at(result.frontier_flops, "flops_per_token", ref.flops_per_token)
        rows.append(
            {
                **{k: v for k, v in ref.row().items() if k not in ("decode_read_GB",)},
                "frontier_loss_same_memory": None if at_memory is None else round(at_memory, 4),
                "gap_memory": None if at_memory is None else round(ref.loss - at_memory, 4),
                "frontier_loss_same_flops": None if at_flops is None else round(at_flops, 4),
                "gap_flops": None if at_flops is None else round(ref.loss - at_flops, 4),
            }
        )
    return rows


def by_expansion(feasible: list[Candidate]) -> list[dict]:
    """The best candidate within budget per expansion (the sparsity sweet spot)."""
    best: dict[float, Candidate] = {}
    for c in feasible:
        key = round(c.inputs.expansion, 2)
        if key not in best or c.loss < best[key].loss:
            best[key] = c
    return [best[k].row() for k in sorted(best)]


# A candidate counts as told apart from the chosen one when the chosen one is predicted
# lower in at least this share of the bootstrap refits (a one-sided 97.5% level).
TOLD_APART = 0.975


def selection_optimism(feasible: list[Candidate], log_loss_RF: np.ndarray) -> dict:
    """The optimizer's curse of a plan (Smith & Winkler 2006), by the bootstrap's bias
    estimate (Efron & Tibshirani 1993, ch. 10): in the bootstrap's world the fitted law
    is the truth and each refit r picks its own best candidate ``c_r``; how much lower
    the refit predicts ``c_r`` than the law does, ``exp(log_loss_RF[r, c_r]) / L(c_r) - 1``,
    is the optimism of picking the minimum of noisy predictions. ``feasible``: every
    candidate within budget, the plan's choice first; ``log_loss_RF`` [refits,
    candidates]: each refit's log loss of each. Returns ``optimism_mean`` and
    ``optimism_sd`` (relative; negative: a choice predicted too low); ``fixed_choice_mean``,
    the same for the plan's choice held fixed (the refits' bias at that one candidate,
    with no choosing: where the refits scatter between optima, as at the paper's sizes,
    this is most of the optimism); ``choosing_mean``, the difference (what choosing adds);
    the share of the refits that pick the plan's own choice; and ``corrected_pred_loss``:
    the choice's predicted loss / (1 + optimism_mean), the bootstrap's bias correction of
    the prediction the plan reports."""
    pick_R = log_loss_RF.argmin(axis=1)
    law_F = np.log([c.loss for c in feasible])
    optimism_R = np.exp(log_loss_RF[np.arange(len(pick_R)), pick_R] - law_F[pick_R]) - 1.0
    fixed_R = np.exp(log_loss_RF[:, 0] - law_F[0]) - 1.0
    mean = float(optimism_R.mean())
    return {
        "optimism_mean": mean,
        "optimism_sd": float(optimism_R.std()),
        "fixed_choice_mean": float(fixed_R.mean()),
        "choosing_mean": mean - float(fixed_R.mean()),
        "refits_picking_chosen": float(np.mean(pick_R == 0)),
        "corrected_pred_loss": feasible[0].loss / (1.0 + mean),
    }


def uncertainty(result: Plan, fit: dict, seed: int = 0) -> dict | None:
    """The chosen model's predictive interval and, for each of the best candidates, the
    share of bootstrap refits of the law that predict it a lower loss than the chosen
    one (paired: the same refit for both); None for a fit.json without refits.

    Returns ``{"interval": [low, high], "level", "noise_weight", "noise_group" (the
    residual's scale: :func:`pipeline.scaling.bootstrap.target_scale`), "rows": [{name, pred_loss,
    share_lower_than_chosen, told_apart}], "selection": ...}``. Told apart: the chosen
    one is strictly lower in at least :data:`TOLD_APART` of the refits. ``selection``:
    :func:`selection_optimism` over every feasible candidate."""
    boot = fit.get("intervals") or {}
    if "thetas" not in boot:
        return None
    thetas_RC = np.array(boot["thetas"])
    best = result.best
    form = form_of(fit)
    X_FC = design_matrix([c.inputs for c in result.feasible])
    log_loss_RF = np.array([form.log_loss(theta, X_FC) for theta in thetas_RC])
    mean_RB = log_loss_RF[:, : len(best)]  # feasible is sorted: best is its head
    weight, group = target_scale(fit, best[0].inputs)
    draws_R = predictive_draws(
        form, thetas_RC, np.array(boot["residuals"]), [best[0].inputs], np.random.default_rng(seed), [weight]
    )
    low, high = interval(draws_R[:, 0], boot["level"])
    rows = []
    for i, c in enumerate(best[1:], start=1):
        lower = float(np.mean(mean_RB[:, i] < mean_RB[:, 0]))
        # Strictly: a candidate with the chosen one's law inputs (tied and untied
        # embeddings count the same N) is never told apart.
        chosen_lower = float(np.mean(mean_RB[:, 0] < mean_RB[:, i]))
        rows.append(
            {
                "name": c.model.name,
                "pred_loss": round(c.loss, 4),
                "share_lower_than_chosen": round(lower, 3),
                "told_apart": chosen_lower >= TOLD_APART,
            }
        )
    return {
        "interval": [low, high],
        "level": boot["level"],
        "noise_weight": weight,
        "noise_group": group,
        "rows": rows,
        "selection": selection_optimism(result.feasible, log_loss_RF),
    }


def uncertainty_text(result: Plan, sure: dict | None) -> str:
    if sure is None:
        return "No bootstrap refits in the fit (an older fit.json): run `make scaling-fit` for intervals."
    low, high = sure["interval"]
    apart = [r["name"] for r in sure["rows"] if not r["told_apart"]]
    verdict = (
        f"cannot be told apart from {len(apart)} of the next {len(sure['rows'])}: {', '.join(apart)} (the law's "
        f"refits do not agree on which is lower in at least {TOLD_APART:.1%} of them)"
        if apart
        else f"is predicted lower than each of the next {len(sure['rows'])} in at least {TOLD_APART:.1%} of the refits"
    )
    sel = sure["selection"]
    curse = (
        f"The optimizer's curse, by the refits: each refit's own choice is predicted {sel['optimism_mean']:+.2%} "
        f"(SD {sel['optimism_sd']:.2%}) against this law's prediction for it, where {result.chosen.model.name} "
        f"held fixed is predicted {sel['fixed_choice_mean']:+.2%}, so choosing adds {sel['choosing_mean']:+.2%}; "
        f"{sel['refits_picking_chosen']:.0%} of the refits pick {result.chosen.model.name}. Corrected for both, "
        f"the choice's predicted loss is {sel['corrected_pred_loss']:.4f}."
    )
    return (
        f"{result.chosen.model.name}: predicted loss {result.chosen.loss:.4f}, {sure['level']:.0%} interval for a "
        f"measured run [{low:.4f}, {high:.4f}] (its residual drawn at noise weight {sure['noise_weight']:.3g}, "
        f"{sure['noise_group']}); it {verdict}.\n\n{curse}\n\n"
        + tabulate(sure["rows"], headers="keys", tablefmt="github")
    )


def plan_header(result: Plan, budget: Budget, fit: dict, tokens: float, context: int) -> str:
    """Two lines: the budget and the law, then the chosen model's predicted loss and costs."""
    chosen = result.chosen
    return (
        f"Budget: {budget.describe()} (context {context}); law fitted on sweep {fit.get('sweep', '?')}: "
        f"{fit['formula']}\n"
        f"Predicted loss at {tokens:.3g} tokens: {chosen.loss:.4f}; INT4 {chosen.int4_bytes / 1e9:.3f} GB; "
        f"{chosen.flops_per_token / 1e9:.3f} GFLOPs/token (decode); {chosen.inputs.n_active / 1e6:.1f}M active."
    )


def write_plan(
    out: Path,
    name: str,
    result: Plan,
    refs: list[Candidate],
    budget: Budget,
    header: str,
    fit: dict,
    tokens: float,
    config_path: Path,
) -> str:
    """Write ``plan.md``, ``plan.json`` and the frontier plots into ``out``; return the
    report's text without the frontier tables (what the command prints)."""
    chosen = result.chosen
    sweet = by_expansion(result.feasible)
    n_max, d_max = _sweep_max(fit, "n_active"), _sweep_max(fit, "tokens")
    e_max, g_max = _sweep_max(fit, "expansion"), _sweep_max(fit, "granularity")
    x = chosen.inputs
    # NaN (a fit.json without the range) compares False: not flagged for the shape
    beyond = x.n_active > n_max or tokens > d_max or x.expansion > e_max or x.granularity > g_max
    extrapolation = (
        f"The sweep's points reach N = {n_max:.3g}, D = {d_max:.3g}, Ê = {e_max:.3g}, G = {g_max:.3g}; the chosen "
        f"model is at N = {x.n_active:.3g}, D = {tokens:.3g}, Ê = {x.expansion:.3g}, G = {x.granularity:.3g}"
        + (": the losses are extrapolations, read them as a ranking." if beyond else ".")
    )
    shape = beyond_sweep_shapes(fit, chosen.model)
    if shape:
        extrapolation += (
            f" The law has no term for depth or width and reads the shared expert's share only where the "
            f"sweep ran it, and the chosen model has {shape}: its loss is an extrapolation in shape that N "
            f"and S do not show."
        )
    sure = uncertainty(result, fit)
    sections = [
        f"# Plan {name}",
        header.replace("\n", "  \n"),
        f"{result.enumerated} architectures enumerated, {len(result.feasible) + result.outside} within budget"
        + (
            f"; {result.outside} of them left out, outside what the law was fitted on "
            f"(scaling.plan.within_sweep: expansion and granularity up to the sweep's largest, depth, width "
            f"and shared share within its fitted models')."
            if result.outside
            else "."
        ),
        "## Best within budget\n\n" + _table(result.best),
        "## How sure (bootstrap refits of the law)\n\n" + uncertainty_text(result, sure),
        "## Best within budget per expansion (total / active FFN width)\n\n"
        + tabulate(sweet, headers="keys", tablefmt="github"),
        "## Reference models against the frontier (gap > 0: the frontier predicts a lower loss)\n\n"
        + tabulate(reference_rows(result, refs), headers="keys", tablefmt="github"),
        extrapolation,
    ]
    frontiers = [
        "## Frontier: predicted loss vs INT4 memory\n\n" + _table(result.frontier_memory),
        "## Frontier: predicted loss vs decode FLOPs per token\n\n" + _table(result.frontier_flops),
    ]
    (out / "plan.md").write_text("\n\n".join([*sections, *frontiers]) + "\n")
    record = {
        "budget": asdict(budget),
        "chosen": chosen.row(),
        "uncertainty": sure,
        "best": [c.row() for c in result.best],
        "by_expansion": sweet,
        "references": reference_rows(result, refs),
        "frontier_memory": [c.row() for c in result.frontier_memory],
        "frontier_flops": [c.row() for c in result.frontier_flops],
        "config": str(config_path),
        # the law this plan was made with: a report beside a newer fit says so
        "law": {"form_name": form_of(fit).name, "formula": fit.get("formula")},
    }
    (out / "plan.json").write_text(json.dumps(record, indent=2))
    plots.frontier(result.frontier_memory, refs, chosen, "int4_bytes", out / "frontier_memory.png", budget.memory_bytes)
    plots.frontier(result.frontier_flops, refs, chosen, "flops_per_token", out / "frontier_flops.png",
                   budget.flops_per_token)  # fmt: skip
    return "\n\n".join(sections)


def beyond_sweep_shapes(fit: dict, model: ModelConfig) -> str:
    """What of ``model``'s depth, width and shared-expert share (:func:`shape_of`) lies
    outside the fitted points' span (``fit.json``'s ``shape_range``, ``[lo, hi]`` each),
    in words; "" when all lie inside or the fit does not record the span."""
    shape, span = shape_of(model), fit.get("shape_range", {})
    said = []
    for key, value_as, span_as in (
        ("n_layers", "{:g} layers", "{:g}-{:g} layers"),
        ("d_model", "width {:g}", "widths {:g}-{:g}"),
        ("shared_share", "a shared expert {:.0%} of the active FFN width", "{:.0%}-{:.0%}"),
    ):
        if key in span and not span[key][0] <= shape[key] <= span[key][1]:
            said.append(f"{value_as.format(shape[key])} where the sweep's fitted models have "
                        f"{span_as.format(*span[key])}")  # fmt: skip
    return ", and ".join(said)


def outside_sweep(fit: dict) -> Callable[[Candidate], str]:
    """The planner's ``admit`` for ``scaling.plan.within_sweep``: why a candidate lies
    outside what the law was fitted on ("" when inside): expansion or granularity above
    the sweep's largest (``fit.json``'s ``range``), or depth, width or shared share outside
    the fitted models' span (:func:`beyond_sweep_shapes`). N and D are not held: predicting
    them is what the law is for. PlanError when the fit records no ``range`` or
    ``shape_range`` (a fit.json from before they were kept)."""
    if not {"expansion", "granularity"} <= set(fit.get("range") or {}) or not fit.get("shape_range"):
        raise PlanError(
            "scaling.plan.within_sweep: the fit records no range or shape_range of its points; rerun make scaling-fit"
        )
    limits = {"expansion": ("Ê", _sweep_max(fit, "expansion")), "granularity": ("G", _sweep_max(fit, "granularity"))}

    def reason(c: Candidate) -> str:
        said = [
            f"{symbol} = {getattr(c.inputs, key):.3g} above the sweep's largest {top:.3g}"
            for key, (symbol, top) in limits.items()
            if getattr(c.inputs, key) > top * (1 + 1e-9)  # the same accounting: equal at the sweep's own
        ]
        shape = beyond_sweep_shapes(fit, c.model)
        return ", and ".join(said + ([shape] if shape else []))

    return reason


def _sweep_max(fit: dict, key: str) -> float:
    return float(fit.get("range", {}).get(key, float("nan")))
