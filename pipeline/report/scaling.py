"""The report's scaling section: the law the sweep fitted, how well it predicts runs it
did not see, what the sweep measured, the plan made with it and the planned model's
run held against its prediction.

Read from the scaling tools' published files (``make scaling-fit``, ``make plan``,
``make closed-loop``: ``outputs/scaling/``), which the sweep's MLflow runs produced
beside the recipe; the report's DVC stage depends on them, so a new fit re-renders it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.report.collect import ReportInputError, read_json
from pipeline.report.fmt import DASH, pct, signed

# fit.json's intervals.residual_unit when each interval draws its noise at its own group's
# SD: pipeline.scaling.bootstrap.RESIDUAL_UNIT (the layers keep the report and the
# scaling package apart; tests/report pins the two equal)
OWN_NOISE_UNIT = "the quietest noise group's SD"

FIT, CLOSED_LOOP, FIGURE = "fit.json", "closed_loop.json", "predicted_vs_measured.png"
# The closed loop's other runs (make closed-loop LOOP=<name>), each file with its line's
# title: the planner's choice with its search held to the sweep's shapes, so a miss can be
# told from an extrapolation in shape, the choice planned with scaling.plan.within_sweep
# off, and the choice of the law before S was the shared expert's share, all held against
# the current law.
CONTROLS = (
    ("closed_loop_in_range.json",
     "Closed loop, control planned within the sweep's depths and widths (by the law before S was the share)"),
    ("closed_loop_shared_in_range.json", "Closed loop, control planned within the sweep's depths, widths and "
     "shared-expert shares (by the law before S was the share)"),
    ("loop_extrapolated_l6_e12k4s4.json", "Closed loop, the law's choice planned beyond the sweep's shapes"),
    ("loop_earlier_l6_e3k1s1.json", "Closed loop, the earlier law's choice (S a yes/no)"),
)  # fmt: skip


@dataclass
class ScalingSummary:
    """What the report shows of the scaling law; ``plan`` and ``closed_loop`` are None
    when that step has not been run. ``figure``: the fit's predicted-vs-measured plot;
    ``controls``: the closed loop's other runs that exist, as (title, result)."""

    fit: dict[str, Any]
    plan_name: str
    plan: dict[str, Any] | None
    closed_loop: dict[str, Any] | None
    figure: Path | None
    controls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def read_scaling(scaling_dir: Path, plan_name: str) -> ScalingSummary | None:
    """The scaling files under ``scaling_dir`` (``plan/<plan_name>/plan.json`` for the
    plan); None when there is no ``fit.json`` (no fit: the section is missing).
    Raises ReportInputError naming a file that is not valid JSON or lacks a field the
    section shows."""
    fit = read_json(scaling_dir / FIT)
    if fit is None:
        return None
    for key in ("formula", "fit_error", "held_out_error", "prediction_band", "comparisons"):
        if key not in fit:
            raise ReportInputError(f"{scaling_dir / FIT}: no {key!r}: not a fit written by make scaling-fit")
    plan_path = scaling_dir / "plan" / plan_name / "plan.json"
    plan = read_json(plan_path)
    if plan is not None and "chosen" not in plan:
        raise ReportInputError(f"{plan_path}: no 'chosen': not a plan written by make plan")
    closed = _closed_loop(scaling_dir / CLOSED_LOOP)
    controls = [(title, c) for name, title in CONTROLS if (c := _closed_loop(scaling_dir / name)) is not None]
    figure = scaling_dir / FIGURE
    return ScalingSummary(fit, plan_name, plan, closed, figure if figure.is_file() else None, controls)


def _closed_loop(path: Path) -> dict[str, Any] | None:
    closed = read_json(path)
    if closed is not None and not {"measured", "predicted", "interval", "inside"} <= set(closed):
        raise ReportInputError(f"{path}: not a closed-loop result of make closed-loop")
    return closed


def _errors(stats: dict | None) -> str:
    """RMS / max, and the signed mean in brackets where the fit recorded one."""
    if not stats:
        return DASH
    mean = stats.get("mean")
    shown = "" if mean is None or not math.isfinite(mean) else f" ({'+' if mean >= 0 else ''}{pct(mean)})"
    return f"{pct(stats['rms'])} / {pct(stats['max'])}{shown}"


def scaling_lines(s: ScalingSummary) -> list[str]:
    """The section's sentences (markdown; numbers only, from the files)."""
    fit, held = s.fit, s.fit["held_out_error"]
    lines = [
        f"Law (form `{fit.get('form_name', 'joint')}`, sweep `{fit.get('sweep', '?')}`): `{fit['formula']}`.",
        f"Fit error over {fit['fit_error']['count']} runs: RMS {pct(fit['fit_error']['rms'])}, max "
        f"{pct(fit['fit_error']['max'])}. Held out ({held['count']} of the largest runs, never fitted): RMS "
        f"{pct(held['rms'])}, max {pct(held['max'])} against the band ±{pct(fit['prediction_band'])}; "
        f"{fit.get('held_out_inside_interval', DASH)} of {held['count']} inside their 95% bootstrap intervals.",
    ]
    noise = (fit.get("seed_noise") or {}).get("pooled_sd_log_loss")
    if noise is not None:
        cells = len(fit["seed_noise"]["cells"])
        lines.append(f"Run-to-run noise (seed replicates of {cells} points): SD {pct(noise)} of the loss.")
    weights = fit.get("noise_weights")
    if weights:  # fits made before the noise weights have none
        sds = [g["sd_log_loss"] for g in weights["groups"]]
        lines.append(
            f"The fit weighs each run by its noise, from the seeds of the fitted runs per {' and '.join(weights['by'])}"
            f": {len(sds)} groups, SD of the loss {pct(min(sds))} to {pct(max(sds))}"
            + (
                "; each interval draws its run-to-run noise at its own group's SD."
                if (fit.get("intervals") or {}).get("residual_unit") == OWN_NOISE_UNIT  # before: drawn alike
                else "."
            )
        )
    if s.plan is not None:
        chosen, sure = s.plan["chosen"], s.plan.get("uncertainty") or {}
        line = f"Plan `{s.plan_name}`: `{chosen['name']}`, predicted loss {chosen['pred_loss']:.3f}"
        if sure.get("interval"):
            low, high = sure["interval"]
            apart = [r["name"] for r in sure.get("rows", []) if not r["told_apart"]]
            line += f", 95% interval [{low:.3f}, {high:.3f}]; cannot be told apart from {len(apart)} of the next "
            line += f"{len(sure.get('rows', []))}" + (f" ({', '.join(f'`{a}`' for a in apart)})" if apart else "")
        sel = sure.get("selection")
        if sel:  # plans made before the optimizer's curse was measured have none
            line += (
                f"; the optimizer's curse, by the refits: {signed(100 * sel['optimism_mean'])}%, corrected "
                f"prediction {sel['corrected_pred_loss']:.3f}"
            )
        lines.append(line + "." + _other_law(s.plan, s.fit))
    if s.closed_loop is not None:
        lines.append(_loop_line("Closed loop", s.closed_loop, s.fit))
    lines += [_loop_line(title, c, s.fit) for title, c in s.controls]
    return lines


def _loop_line(title: str, c: dict, fit: dict) -> str:
    """One closed loop's sentence: the run(s) against the law's prediction and interval."""
    low, high = c["interval"]
    verdict = "inside" if c["inside"] else f"outside, {pct(abs(c['miss']))} of the loss beyond the nearer bound"
    reps = c.get("replicates") or []
    measured = f"measured {c['measured']:.3f}" + (
        f" (mean of {len(reps)} seeds, SD {pct(c['sd'])}; {c['inside_count']} of {len(reps)} runs inside the "
        "interval of one run)"
        if reps
        else ""
    )
    return (
        f"{title}: `{c['point']}` trained at the sweep's largest budget {measured} "
        f"against {c['predicted']:.3f} predicted ({c['measured'] / c['predicted'] - 1:+.1%}), "
        f"interval [{low:.3f}, {high:.3f}]: {verdict}." + _other_law(c, fit)
    )


def _other_law(record: dict, fit: dict) -> str:
    """A warning when a plan or closed-loop result was made with another law than the fit
    shown (its ``law.formula``; results written before they recorded it say nothing)."""
    law = record.get("law") or {}
    if law.get("formula") in (None, fit["formula"]):
        return ""
    return f" (Made with an earlier fit, form `{law.get('form_name', '?')}`: rerun it with this law.)"


def forms_rows(s: ScalingSummary) -> list[list[str]]:
    """Rows of the candidate laws: form, coefficients, fit / leave-one-size-out / largest
    budget from the smaller / held-out errors (RMS / max, and the signed mean where the
    fit recorded one); the chosen form in bold."""
    chosen = s.fit.get("form_name", "joint")
    return [
        [
            f"**{r['form']}**" if r["form"] == chosen else r["form"],
            str(r["coefficients"]),
            _errors(r["fit_error"]),
            _errors(r["cv_error"]),
            _errors(r.get("largest_budget_error")),
            _errors(r["held_out_error"]),
        ]  # fmt: skip
        for r in s.fit.get("form_selection", [])
    ]


def comparison_rows(s: ScalingSummary) -> list[list[str]]:
    """Rows of the paired comparisons at equal tokens and at equal training seconds:
    label, mean loss(b) - loss(a) (nats) and the cells where a is better."""
    at_seconds = {c["label"]: c for c in s.fit.get("comparisons_at_equal_seconds", [])}

    def cell(c: dict | None) -> str:
        if not c or c["mean_delta"] is None:
            return DASH
        return f"{signed(c['mean_delta'])} ({c['a_better']}/{c['cells']})"

    return [[c["label"], cell(c), cell(at_seconds.get(c["label"]))] for c in s.fit["comparisons"]]
