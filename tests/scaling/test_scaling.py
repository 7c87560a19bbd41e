"""The scaling law, its fit, the sweep grid and the planner (pipeline/scaling).

Formulas are pinned against naive re-implementations with non-default values; the fit
against synthetic data drawn from a known law with noise; the planner against an
exhaustive filter and the model built on the meta device.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.configbase import ConfigError, from_dict
from pipeline.model import ModelConfig, Transformer, param_counts
from pipeline.model.accounting import ffn_shape, flops_per_token, int4_weight_bytes, matmul_params_active
from pipeline.quant.config import QuantConfig, quantized_input_dims
from pipeline.scaling.fit import (
    Observation,
    ScalingFitError,
    fit_law,
    huber,
    starting_points,
)
from pipeline.scaling.grid import SweepConfig, point_model, steps_for_tokens
from pipeline.scaling.law import (
    COEFFICIENTS,
    S_MEANS,
    LawInputs,
    ScalingLaw,
    design_matrix,
    law_inputs,
    log_loss,
    log_loss_and_jacobian,
    shape_of,
)
from pipeline.scaling.planner import (
    Budget,
    PlanError,
    SearchSpace,
    enumerate_models,
    evaluate,
    pareto,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_rate,
    plan,
    within,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# A law with every coefficient away from its default start: a = 20, g = 40, γ = 0.6,
# δ = 0.25, σ = 0.08, α = 0.32, b = 300, β = 0.3, c = 1.7.
TRUE = ScalingLaw((math.log(20.0), math.log(40.0), 0.6, 0.25, 0.08, 0.32, math.log(300.0), 0.3, math.log(1.7)))


def model(name: str) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text()), name)


def naive_loss(N: float, D: float, E: float, G: float, S: bool) -> float:
    """The law written out by hand from its docstring (independent of law.py's LSE form)."""
    a, g, b, c = 20.0, 40.0, 300.0, 1.7
    gamma, delta, sigma, alpha, beta = 0.6, 0.25, 0.08, 0.32, 0.3
    return c + (a + g * G**-gamma) * E**-delta * math.exp(-sigma * S) * N**-alpha + b * D**-beta


def test_law_matches_the_formula_written_out():
    for N, D, E, G, S in [(3e5, 1e6, 1, 1, 0.0), (2.7e8, 6e12, 8, 8, 0.5), (1e6, 3e5, 4, 2, 0.25)]:
        assert TRUE.predict_one(LawInputs(N, D, E, G, S)) == pytest.approx(naive_loss(N, D, E, G, S), rel=1e-12)


def test_s_is_the_shared_expert_s_share_of_the_active_width_and_a_yes_no_is_refused():
    """MobileMoE-S's shared expert is 1536 of its 4 x 384 + 1536 active FFN units: S = 1/2;
    the tiny recipe model's 256 of 4 x 64 + 256 too; moe_grid's e15k3s1 has 1 of 4 units;
    a 0/1 S from before the share is refused."""
    paper_s = law_inputs(model("mobilemoe_s"), 1e9)
    assert paper_s.shared == 0.5 and paper_s.granularity == 8
    assert law_inputs(model("tiny"), 1e9).shared == 0.5 == shape_of(model("tiny"))["shared_share"]
    quarter = replace(model("tiny"), moe=replace(model("tiny").moe, num_experts=15, top_k=3, shared_ffn_dim=64))
    assert law_inputs(quarter, 1e9).shared == 0.25
    for bad in (True, False, 1.0, -0.1):
        with pytest.raises(ValueError, match="shared expert's share of the active FFN width"):
            LawInputs(1e6, 1e6, 4.0, 4.0, bad)


def test_jacobian_matches_finite_differences():
    X = design_matrix([LawInputs(3e5 * 3**i, 1e6 * 2**i, 1 + i, 2**i, 0.5 * (i % 2)) for i in range(6)])
    theta = np.array(TRUE.theta) + 0.05
    value, jac = log_loss_and_jacobian(theta, X)
    assert np.allclose(value, log_loss(theta, X))
    eps = 1e-6
    numeric = np.stack(
        [(log_loss(theta + e * eps, X) - log_loss(theta - e * eps, X)) / (2 * eps) for e in np.eye(9)], 1
    )
    assert np.allclose(jac, numeric, atol=1e-7)


def test_huber_by_hand():
    r = np.array([0.0, 5e-4, -1e-3, 3e-3, -0.01])
    # inside |r| <= 1e-3: r^2 / 2; outside: 1e-3 (|r| - 5e-4)
    assert huber(r, 1e-3) == pytest.approx([0.0, 1.25e-7, 5e-7, 2.5e-6, 9.5e-6])


def _synthetic(noise: float, seed: int = 0) -> list[Observation]:
    """A sweep drawn from TRUE with log-normal noise; the largest size at the largest
    budget is held out."""
    rng = np.random.default_rng(seed)
    points = []
    for N, D in itertools.product([3e5, 1e6, 3e6, 1e7, 3e7], [1e6, 3e6, 1e7]):
        for E, G, S in [(1, 1, 0), (4, 1, 0), (4, 2, 0), (4, 4, 0), (4, 4, 0.5), (2, 4, 0), (8, 4, 0), (4, 16, 0)]:
            x = LawInputs(N, D, E, G, float(S))
            loss = TRUE.predict_one(x) * math.exp(rng.normal(0, noise))
            points.append(Observation(f"{N:g}-{D:g}-{E}-{G}-{S}", f"e{E}g{G}s{S}", x, loss, N == 3e7 and D == 1e7))
    return points


def test_fit_recovers_known_coefficients_from_noisy_synthetic_data():
    result = fit_law(_synthetic(noise=0.001))
    got, want = result.law.coefficients, TRUE.coefficients
    # σ is read from the points at S = 1/2 alone: its error is twice that of the effect σ S
    for name, tol in {"alpha": 0.02, "beta": 0.02, "delta": 0.02, "sigma": 0.04, "gamma": 0.15, "log_c": 0.05,
                      "log_b": 0.2, "log_a": 0.3, "log_g": 0.3}.items():  # fmt: skip
        assert abs(got[name] - want[name]) <= tol, (name, got[name], want[name])
    assert result.fit.rms < 0.002
    assert set(result.law.coefficients) == set(COEFFICIENTS)
    # the objective in the Huber loss's own units (huber_objective divides by δ²)
    fitted = [p for p in _synthetic(noise=0.001) if not p.held_out]
    residuals = np.log(result.law.predict([p.inputs for p in fitted])) - np.log([p.loss for p in fitted])
    assert result.objective == pytest.approx(float(np.sum(huber(residuals))), rel=1e-9)
    assert result.starts_converged == result.starts == 162


def test_held_out_points_are_predicted_within_the_error_the_fit_reports():
    points = _synthetic(noise=0.003, seed=1)
    result = fit_law(points)
    assert result.held_out.count == 8
    assert result.held_out.max <= result.band, (result.held_out, result.band)
    summary = result.to_dict()
    assert summary["held_out_within_band"] is True and summary["prediction_band"] == pytest.approx(3 * result.fit.rms)


def test_bootstrap_prediction_intervals_cover_fresh_measurements_at_their_level():
    """95% predictive intervals of the held-out points must hold about 95% of fresh
    measurements (new noise draws around the true loss). Intervals of the law's mean
    alone (no residual added) cover about a quarter of them here: that bug fails this."""
    from pipeline.scaling.bootstrap import bootstrap

    noise = 0.02
    points = _synthetic(noise=noise, seed=4)
    result = fit_law(points)
    intervals, draws = bootstrap(points, result, replicates=120, seed=1)
    assert draws.shape == (120, len(points)) and intervals.level == 0.95
    assert intervals.refits_converged == 120 and intervals.to_dict()["refits_converged"] == 120
    rng = np.random.default_rng(9)
    held = [p for p in points if p.held_out]
    inside = [
        intervals.contains(p.name, TRUE.predict_one(p.inputs) * math.exp(rng.normal(0, noise)))
        for p in held
        for _ in range(100)
    ]
    assert 0.85 <= np.mean(inside) <= 1.0, np.mean(inside)
    widths = [math.log(hi / lo) for lo, hi in intervals.predictions.values()]
    assert 2 * 1.96 * noise * 0.7 < np.median(widths) < 2 * 1.96 * noise * 2.0  # about the noise's own width
    for name in ("alpha", "beta"):
        low, high = intervals.coefficients[name]
        assert low < result.law.coefficients[name] < high and high - low < 0.5, (name, low, high)


def _one_law_fit() -> dict:
    """A fit.json whose every bootstrap refit is TRUE, with residuals of -1%, 0, +1% (log):
    the 95% predictive interval is exp(log L_pred -/+ 0.01) exactly."""
    return {
        "coefficients": TRUE.coefficients,
        "S": S_MEANS,
        "formula": TRUE.formula(),
        "sweep": "synthetic",
        "intervals": {"thetas": [list(TRUE.theta)] * 400, "residuals": [-0.01, 0.0, 0.01], "level": 0.95},
    }


def test_the_closed_loop_compares_a_run_with_the_predicted_interval_by_hand():
    """Every refit equal to TRUE and residuals of -1%, 0, +1% (log): the predictive
    draws take three values, so the 95% interval is exp(log L_pred -/+ 0.01) exactly."""
    from pipeline.scaling.closed_loop import compare, report

    fit = _one_law_fit()
    x = LawInputs(2e6, 6e5, 2.0, 8.0, 0.25)
    predicted = TRUE.predict_one(x)
    inside = compare(fit, Observation("l6-e14k6s2-600000", "e14k6s2", x, predicted * 1.005, seconds=12.5))
    assert inside["predicted"] == pytest.approx(predicted, rel=1e-12)
    assert inside["interval"] == pytest.approx([predicted * math.exp(-0.01), predicted * math.exp(0.01)], rel=1e-12)
    assert inside["inside"] and inside["miss"] == 0.0 and inside["relative_error"] == pytest.approx(0.005)
    above = compare(fit, Observation("p", "f", x, predicted * 1.03))
    assert not above["inside"] and above["miss"] == pytest.approx(1.03 / math.exp(0.01) - 1, rel=1e-9)
    below = compare(fit, Observation("p", "f", x, predicted * 0.95))
    assert below["miss"] == pytest.approx(0.95 / math.exp(-0.01) - 1, rel=1e-9) and below["miss"] < 0
    assert "inside the interval" in report(inside, fit) and "above it" in report(above, fit)


def test_the_closed_loop_draws_its_run_s_residual_at_the_run_s_noise_weight():
    """A weighted fit's residuals are in units of the quietest group's noise: a run of a
    group with weight 2.5 gets exp(log L_pred -/+ 0.025), one of the quietest group
    -/+ 0.01, one at a budget the seeds never measured the noisiest group's weight,
    named as such; a fit.json from before the weighted intervals (no residual_unit)
    draws every residual alike (weight 1), as it was written."""
    from pipeline.scaling.bootstrap import RESIDUAL_UNIT
    from pipeline.scaling.closed_loop import compare, report

    fit = _one_law_fit()
    fit["noise_weights"] = {"by": ["tokens", "routed"], "groups": [
        {"group": "tokens 600064, routed", "key": {"tokens": 600064.0, "routed": True}, "sd_log_loss": 0.004},
        {"group": "tokens 600064, dense", "key": {"tokens": 600064.0, "routed": False}, "sd_log_loss": 0.01},
        {"group": "tokens 120832, routed", "key": {"tokens": 120832.0, "routed": True}, "sd_log_loss": 0.008},
    ]}  # fmt: skip
    # the runs saw 600064 tokens; a plan or loop at the nominal 600000 is of their group
    routed, dense = LawInputs(2e6, 6e5, 2.0, 8.0, 0.25), LawInputs(2e6, 6e5, 1.0, 1.0, 0.0)
    elsewhere = LawInputs(2e6, 3e6, 2.0, 8.0, 0.25)
    old = {n: compare(fit, Observation("p", "f", x, 5.0)) for n, x in (("r", routed), ("d", dense))}
    assert old["r"]["noise_weight"] == old["d"]["noise_weight"] == 1.0
    assert old["d"]["interval"][1] == pytest.approx(TRUE.predict_one(dense) * math.exp(0.01), rel=1e-12)
    fit["intervals"]["residual_unit"] = RESIDUAL_UNIT
    for x, weight, group in ((routed, 1.0, "tokens 600064, routed"), (dense, 2.5, "tokens 600064, dense"),
                             (elsewhere, 2.5, "tokens 3000000, routed (no seeds there")):  # fmt: skip
        got = compare(fit, Observation("p", "f", x, 5.0))
        predicted = TRUE.predict_one(x)
        assert got["noise_weight"] == pytest.approx(weight) and got["noise_group"].startswith(group)
        low, high = predicted * math.exp(-0.01 * weight), predicted * math.exp(0.01 * weight)
        assert got["interval"] == pytest.approx([low, high], rel=1e-12), (x, got["interval"])
    assert "(the residual drawn at noise weight 2.5, tokens 600064, dense)" in report(
        compare(fit, Observation("p", "f", dense, 5.0)), fit
    )


def test_seed_replicates_of_the_closed_loop_are_each_held_against_the_one_run_interval():
    """Three seeds at predicted x 1.005, x 1.03 and x 0.999 with the interval
    exp(log L_pred -/+ 0.01): two of three inside, the second 1.03/e^0.01 - 1 above; the
    mean (x 1.0113...) is held against the same interval, and its SD is the sample SD."""
    from pipeline.scaling.closed_loop import compare, compare_replicates, report, saved_runs
    from pipeline.stages.sweep import point_base

    fit = _one_law_fit()
    x = LawInputs(2e6, 6e5, 2.0, 8.0, 0.25)
    predicted = TRUE.predict_one(x)
    factors = (1.005, 1.03, 0.999)
    names = ("l6-e3k1s1-600000", "l6-e3k1s1-600000-seed1", "l6-e3k1s1-600000-seed2")
    assert {point_base(n) for n in names} == {"l6-e3k1s1-600000"}
    points = [
        Observation(n, "e3k1s1", x, predicted * f, seconds=10.0 + i) for i, (n, f) in enumerate(zip(names, factors))
    ]
    result = compare_replicates(fit, points, "l6-e3k1s1-600000")
    mean = predicted * sum(factors) / 3
    assert result["measured"] == pytest.approx(mean, rel=1e-12)
    assert [r["inside"] for r in result["replicates"]] == [True, False, True] and result["inside_count"] == 2
    assert result["replicates"][1]["miss"] == pytest.approx(1.03 / math.exp(0.01) - 1, rel=1e-9)
    assert not result["inside"] and result["miss"] == pytest.approx(mean / (predicted * math.exp(0.01)) - 1, rel=1e-9)
    sd = math.sqrt(sum((predicted * f - mean) ** 2 for f in factors) / 2) / mean
    assert result["sd"] == pytest.approx(sd, rel=1e-9) and result["train_seconds"] == pytest.approx(11.0)
    text = report(result, fit)
    assert "mean of 3 seed replicates" in text and "2 of 3 inside" in text and "| `l6-e3k1s1-600000-seed1` |" in text
    # the file's runs held against a refit without MLflow: the same runs, the same result
    assert saved_runs(json.loads(json.dumps(result))) == points
    moved = {**fit, "coefficients": {**fit["coefficients"], "log_c": fit["coefficients"]["log_c"] + 0.01}}
    assert compare_replicates(moved, saved_runs(result), "l6-e3k1s1-600000") == compare_replicates(
        moved, points, "l6-e3k1s1-600000"
    )
    one = compare(fit, points[1])
    assert saved_runs(one) == [points[1]]
    old_file = {
        **result,
        "replicates": [{k: v for k, v in r.items() if k != "train_seconds"} for r in result["replicates"]],
    }
    assert [p.seconds for p in saved_runs(old_file)] == [None] * 3  # it kept only their mean
    with pytest.raises(ValueError, match="not a loop file.*'inputs'"):
        saved_runs({"point": "x"})
    with pytest.raises(ValueError, match="differ in their law inputs"):
        compare_replicates(fit, [points[0], Observation("p", "f", LawInputs(3e6, 6e5, 2.0, 8.0, 0.25), 4.0)], "p")
    with pytest.raises(ValueError, match="need at least 2"):
        compare_replicates(fit, points[:1], "p")


def test_fewer_points_than_coefficients_is_refused_before_fitting():
    points = _synthetic(noise=0.0)[:9]
    with pytest.raises(ScalingFitError, match=r"9 sweep point\(s\) to fit .* 9 coefficients .* at least 10"):
        fit_law(points)
    one_budget = [p for p in _synthetic(noise=0.0) if p.inputs.tokens == 1e6]
    with pytest.raises(ScalingFitError, match=r"1 distinct token budgets D \(1e\+06\); beta needs 2"):
        fit_law(one_budget)
    two_granularities = [p for p in _synthetic(noise=0.0) if p.inputs.granularity in (1, 4)]
    with pytest.raises(ScalingFitError, match=r"2 distinct granularities \(1, 4\); a, g, gamma needs 3"):
        fit_law(two_granularities)
    unshared = [p for p in _synthetic(noise=0.0) if not p.inputs.shared]
    with pytest.raises(ScalingFitError, match=r"1 distinct shared-expert settings .* sigma needs 2"):
        fit_law(unshared)


def test_starting_grid_spans_the_declared_values():
    starts = starting_points()
    assert len(starts) == 162 and all(len(s) == len(COEFFICIENTS) for s in starts)
    alphas = {s[COEFFICIENTS.index("alpha")] for s in starts}
    assert alphas == {0.1, 0.3, 0.6}


# --------------------------------------------------------------------------- the sweep grid


def _grid(**point) -> SweepConfig:
    raw = yaml.safe_load((CONF / "sweep" / "moe_grid.yaml").read_text())["sweep"]
    return from_dict(SweepConfig, {**raw, **point}, "sweep")


def test_grid_archs_keep_the_active_width_and_set_the_expansion():
    sweep = _grid()
    base = model("tiny")
    expected = {"dense": (1, 1), "dense_total": (1, 1), "e4k1": (4, 1), "e8k2": (4, 2), "e16k4": (4, 4),
                "e15k3s1": (4, 4), "e8k4": (2, 4), "e32k4": (8, 4)}  # fmt: skip
    for size in sweep.sizes:
        dense = point_model(sweep, base, size.name, "dense")
        for arch, (expansion, granularity) in expected.items():
            cfg = point_model(sweep, base, size.name, arch)
            shape = ffn_shape(cfg)
            assert (shape.expansion, shape.granularity) == (expansion, granularity), arch
            if arch != "dense_total":  # every MoE has the dense twin's active FFN width
                assert shape.active_width == 4 * size.d_model == ffn_shape(dense).active_width
        moe, total = point_model(sweep, base, size.name, "e16k4"), point_model(sweep, base, size.name, "dense_total")
        # the total twin holds the MoE's FFN parameters (rounded down to whole INT4 groups)
        assert 0 <= ffn_shape(moe).total_width - total.ffn_dim < 32 + 1
    assert point_model(sweep, base, "xs", "e15k3s1").moe.shared_ffn_dim == 64


def test_grid_rejects_a_bad_arch_and_an_expert_width_off_the_alignment():
    with pytest.raises(ConfigError, match=r"sweep\.arch: 'e99' is not one of archs"):
        _grid(arch="e99")
    sweep = _grid()
    sweep.archs.append(replace(sweep.archs[2], name="g3", experts=12, top_k=3, granularity=3))
    with pytest.raises(ConfigError, match=r"archs\.g3\.granularity: .* 256 split 3 ways"):
        point_model(sweep, model("tiny"), "xs", "g3")
    assert steps_for_tokens(120000, 1024) == 118


# --------------------------------------------------------------------------- the planner


def test_budget_units_and_typos():
    assert parse_bytes("3GB") == 3_000_000_000
    assert parse_bytes("3GiB") == 3 * 2**30
    assert parse_bytes("700 MB") == 700_000_000
    assert parse_flops("1.5GFLOP") == 1.5e9 and parse_flops("2e9") == 2e9 and parse_flops("800 MFLOPs") == 8e8
    assert parse_bandwidth("60GB/s") == 60e9 and parse_rate("30 tok/s") == 30 == parse_rate("30")
    with pytest.raises(PlanError, match=r"memory budget '3GBB': not byte .*GBB"):
        parse_bytes("3GBB")
    with pytest.raises(PlanError, match=r"memory budget '3': give a size in bytes"):
        parse_bytes("3")
    with pytest.raises(PlanError, match=r"memory budget '3Gb': give a size in bytes"):  # a gilbert to pint
        parse_bytes("3Gb")
    with pytest.raises(PlanError, match=r"compute budget '2GG'"):
        parse_flops("2GG")
    with pytest.raises(PlanError, match=r"must be finite and > 0"):
        parse_bytes("0GB")
    for typo in ("3 radian", "inf GB", "0.5B"):  # dimensionless to pint, infinite, under a byte
        with pytest.raises(PlanError, match=f"memory budget '{typo}'"):
            parse_bytes(typo)


SMALL_SPACE = SearchSpace(
    n_layers=[2, 4, 8],
    d_model=[64, 128, 256],
    head_dim=32,
    n_kv_heads=2,
    expansion=[1, 2, 4, 8],
    granularity=[1, 2, 4],
    shared_fraction=[0.0, 0.5],
    vocab_size=[4096],
    tie_embeddings=[True, False],
)


@pytest.mark.parametrize("memory,flops", [("2MB", "4MFLOP"), ("6MB", None), (None, "2e7"), ("30MB", "50MFLOP")])
def test_planner_never_exceeds_the_budget_and_returns_the_best_within_it(memory, flops):
    base = model("tiny")
    budget = Budget(
        memory_bytes=parse_bytes(memory) if memory else None, flops_per_token=parse_flops(flops) if flops else None
    )
    result = plan(TRUE, budget, SMALL_SPACE, base, tokens=1e9, context=256)
    for c in result.feasible:
        # recounted from the config with the model package's accounting
        assert budget.memory_bytes is None or int4_weight_bytes(c.model) <= budget.memory_bytes
        assert budget.flops_per_token is None or flops_per_token(c.model, 256, "decode") <= budget.flops_per_token
    # exhaustive: nothing in the space within budget predicts a lower loss
    everything = evaluate(list(enumerate_models(SMALL_SPACE, base)), TRUE, 1e9, 256)
    assert result.chosen.loss == min(c.loss for c in everything if within(c, budget))
    assert len(result.feasible) == sum(within(c, budget) for c in everything)


def test_pareto_frontier_matches_a_naive_dominance_check():
    everything = evaluate(list(enumerate_models(SMALL_SPACE, model("tiny"))), TRUE, 1e9, 256)

    def dominated(c) -> bool:  # another is no worse on both and strictly better on one
        return any(
            o.int4_bytes <= c.int4_bytes and o.loss <= c.loss and (o.int4_bytes < c.int4_bytes or o.loss < c.loss)
            for o in everything
        )

    naive = {(c.int4_bytes, c.loss) for c in everything if not dominated(c)}
    assert {(c.int4_bytes, c.loss) for c in pareto(everything, "int4_bytes")} == naive
    assert len(naive) > 3


def test_enumeration_builds_each_shape_it_names_and_nothing_else():
    """A space small enough to count by hand: 2 layers x d_model 64 (2 heads of 32),
    FFN width 256; expansion 1 (dense), 2; granularity 1, 2; shared fraction 0, 0.5."""
    space = SearchSpace(
        n_layers=[2],
        d_model=[64],
        head_dim=32,
        n_kv_heads=2,
        expansion=[1, 2],
        granularity=[1, 2],
        shared_fraction=[0.0, 0.5],
        vocab_size=[4096],
        tie_embeddings=[True],
    )
    models = list(enumerate_models(space, model("tiny")))
    # dense; E2 G1 (2 experts of 256, top-1); E2 G2 (4 of 128, top-2); E2 G2 with one of the
    # two active units shared (3 routed of 128, top-1, shared 128). G1 with half a unit
    # shared does not exist.
    shapes = sorted(
        (m.moe.num_experts, m.moe.top_k, m.moe.expert_ffn_dim, m.moe.shared_ffn_dim) if m.moe else (0, 0, m.ffn_dim, 0)
        for m in models
    )
    assert shapes == [(0, 0, 256, 0), (2, 1, 256, 0), (3, 1, 128, 128), (4, 2, 128, 0)]
    for m in enumerate_models(SMALL_SPACE, model("tiny")):
        shape = ffn_shape(m)
        assert shape.active_width == 4 * m.d_model  # every candidate keeps the dense width active
        assert shape.expansion in SMALL_SPACE.expansion and shape.granularity in SMALL_SPACE.granularity


def test_decode_speed_budget_bounds_the_bytes_read_per_decode_step():
    from pipeline.model.accounting import decode_read_bytes

    budget = Budget(decode_bytes=parse_bandwidth("1GB/s") / parse_rate("400 tok/s"))  # 2.5 MB per step
    result = plan(TRUE, budget, SMALL_SPACE, model("tiny"), tokens=1e9, context=256)
    assert all(decode_read_bytes(c.model, 256)["total"] <= 2.5e6 for c in result.feasible)
    everything = evaluate(list(enumerate_models(SMALL_SPACE, model("tiny"))), TRUE, 1e9, 256)
    assert 0 < len(result.feasible) < len(everything)


def test_a_budget_nothing_fits_names_the_smallest_architecture():
    with pytest.raises(
        PlanError, match=r"no architecture of the search space fits INT4 weights <= 1e-09 GB.*smallest needs"
    ):
        plan(TRUE, Budget(memory_bytes=1), SMALL_SPACE, model("tiny"), tokens=1e9)


def test_planned_counts_equal_the_model_built_on_the_meta_device():
    result = plan(TRUE, Budget(memory_bytes=parse_bytes("6MB")), SMALL_SPACE, model("tiny"), tokens=1e9, top=4)
    quant = QuantConfig(group_size=32)
    for c in [*result.best, result.frontier_memory[-1]]:
        with torch.device("meta"):
            built = Transformer(c.model)
        params = dict(built.named_parameters())
        assert param_counts(c.model).total == sum(p.numel() for p in params.values())
        # INT4 bytes recounted from the built module: each quantized weight at 4 bits
        # plus one bf16 scale per group, router FP32, the rest (norms) bf16.
        quantized = {name for name, _ in quantized_input_dims(c.model)}
        by_hand = 0
        for name, p in params.items():
            if name in quantized:
                by_hand += p.numel() // 2 + p.numel() // quant.group_size * 2
            elif "router" in name or "gate" in name:
                by_hand += 4 * p.numel()
            else:
                by_hand += 2 * p.numel()
        assert c.int4_bytes == by_hand, c.model.name
        assert c.inputs == law_inputs(c.model, 1e9)
        assert c.inputs.n_active == matmul_params_active(c.model)


def test_planned_config_round_trips_as_a_recipe_model():
    result = plan(TRUE, Budget(memory_bytes=parse_bytes("6MB")), SMALL_SPACE, model("tiny"), tokens=1e9)
    again = from_dict(ModelConfig, yaml.safe_load(yaml.safe_dump(asdict(result.chosen.model))), "model")
    assert again == result.chosen.model


# --------------------------------------------------------------------------- the fit stage


def _timed(name: str, family: str, tokens: float, seconds: float | None, loss: float) -> Observation:
    return Observation(name, family, LawInputs(1e6, tokens, 4.0, 4.0, 0.0), loss, seconds=seconds)


def test_loss_at_equal_seconds_interpolates_log_loss_in_log_seconds_by_hand():
    from pipeline.scaling.analysis import loss_at_seconds

    points = [
        _timed("s-e16k4-100", "e16k4", 100, 10.0, 5.0),
        _timed("s-e16k4-400", "e16k4", 400, 40.0, 4.0),
        _timed("s-e16k4-1600", "e16k4", 1600, 160.0, 3.5),
        _timed("m-e16k4-400", "e16k4", 400, 25.0, 1.0),  # another size: never used for s
        _timed("s-e16k4-800", "e16k4", 800, None, 0.5),  # no seconds (resumed): never used
    ]
    # Halfway in log seconds between 10 s and 40 s: the geometric mean of the losses.
    assert loss_at_seconds(points, "e16k4", "s", 20.0) == pytest.approx(math.sqrt(5.0 * 4.0), rel=1e-12)
    w = math.log(100 / 40) / math.log(160 / 40)
    assert loss_at_seconds(points, "e16k4", "s", 100.0) == pytest.approx(4.0 ** (1 - w) * 3.5**w, rel=1e-12)
    assert loss_at_seconds(points, "e16k4", "s", 40.0) == 4.0
    for outside in (9.9, 160.1):  # interpolation only
        assert loss_at_seconds(points, "e16k4", "s", outside) is None
    assert loss_at_seconds(points, "dense", "s", 20.0) is None


def test_the_equal_seconds_tables_by_hand():
    from pipeline.scaling.analysis import paired_at_seconds, vs_dense_seconds_table

    points = [
        _timed("s-dense-100", "dense", 100, 20.0, 4.6),
        _timed("s-dense-400", "dense", 400, 80.0, 3.9),
        _timed("s-e16k4-100", "e16k4", 100, 10.0, 5.0),
        _timed("s-e16k4-400", "e16k4", 400, 40.0, 4.0),
        _timed("s-e16k4-1600", "e16k4", 1600, 160.0, 3.5),
    ]
    header, rows = vs_dense_seconds_table(points)
    assert header == ["size", "dense tokens", "seconds", "dense loss", "e16k4 - dense"]
    assert rows == [
        ["s", 100, 20.0, 4.6, round(math.sqrt(20.0) - 4.6, 4)],
        ["s", 400, 80.0, 3.9, round(math.sqrt(14.0) - 3.9, 4)],
    ]
    moe = paired_at_seconds(points, "e16k4", "dense", "moe")
    assert moe.deltas == pytest.approx((4.6 - math.sqrt(20.0), 3.9 - math.sqrt(14.0))) and moe.wins == 2
    # The other way round: dense at the MoE runs' seconds; 10 s and 160 s lie outside dense's runs.
    assert paired_at_seconds(points, "dense", "e16k4", "x").deltas == pytest.approx((4.0 - math.sqrt(4.6 * 3.9),))


def _seed_sweep(
    uri: str,
    sweep: str,
    sizes: list[str],
    tokens: list[int],
    noise: float,
    arch_only: str = "",
    scale: float = 1.0,
    archs: tuple[str, ...] = ("dense", "dense_total", "e4k1", "e8k2", "e16k4", "e15k3s1", "e32k4"),
    seed: int = 0,
) -> int:
    """FINISHED sweep_point runs in the store at ``uri``, as `make sweep` tags them, with
    losses drawn from TRUE (times ``scale``) on the moe_grid models (``seed``: the runs'
    sweep.seed, a replicate). Returns the number of points."""
    import json

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import TrackingConfig, ensure_experiment

    client = MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(client, TrackingConfig(uri=uri), uri)
    grid, base = _grid(), model("tiny")
    rng = np.random.default_rng(3 + seed)
    count = 0
    for size, arch, budget in itertools.product(sizes, [arch_only] if arch_only else archs, tokens):
        cfg = point_model(grid, base, size, arch)
        loss = scale * TRUE.predict_one(law_inputs(cfg, budget)) * math.exp(rng.normal(0, noise))
        tags = {"stage": "sweep_point", "sweep": sweep, "sweep.size": size, "sweep.arch": arch,
                "sweep.tokens": str(budget), "sweep.model": json.dumps(asdict(cfg)),
                "sweep.seed": str(seed)}  # fmt: skip
        run = client.create_run(exp, tags=tags)
        seconds = budget / (1000.0 if arch.startswith("dense") else 800.0)  # MoE steps: 0.8x the tokens/s
        resumes = 1.0 if (size, arch, budget) == ("s", "e8k2", tokens[-1]) else 0.0
        client.log_batch(run.info.run_id, metrics=[Metric("final/val_loss", loss, 0, 0),
                                                   Metric("final/tokens_seen", budget, 0, 0),
                                                   Metric("perf/train_seconds", seconds, 0, 0),
                                                   Metric("perf/resumes", resumes, 0, 0)])  # fmt: skip
        client.set_terminated(run.info.run_id, "FINISHED")
        count += 1
    return count


def _fit_cli(tmp_path: Path, uri: str, *overrides: str):
    """``python -m pipeline.stages scaling_fit`` on the store at ``uri``, its Ray session files in a
    private directory (Unix socket paths must stay short: under /tmp)."""
    import subprocess
    import sys

    from support import PrivateRayDir

    from tools.drill import env_for

    repo = Path(__file__).resolve().parents[2]
    ray_dir = PrivateRayDir("ray-scaling-")
    try:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.stages",
                "scaling_fit",
                f"tracking.uri={uri}",
                f"scaling.out_dir={tmp_path / 'out'}",
                *([] if any(o.startswith("scaling.pairs=") for o in overrides) else ["scaling.pairs=[]"]),
                # one form: the choice between forms is tested in test_forms.py (a choice costs 4 fits per form)
                *([] if any(o.startswith("scaling.forms=") for o in overrides) else ["scaling.forms=[joint]"]),
                *overrides,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
            cwd=repo,
            env=env_for(repo, ray_dir.path),
        )
    finally:
        ray_dir.remove()


@pytest.mark.slow
def test_scaling_fit_stage_reads_the_sweep_from_mlflow_fits_and_logs(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # a sweep too small to fit: refused before any work, naming the key; nothing written
    _seed_sweep(uri, "tiny_sweep", ["xs"], [120000], noise=0.0)
    bad = _fit_cli(tmp_path, uri, "scaling.sweep=tiny_sweep", "scaling.hold_out_sizes=[]")
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert "scaling.sweep: sweep 'tiny_sweep': 7 sweep point(s) to fit" in bad.stderr
    assert "9 coefficients" in bad.stderr and not (tmp_path / "out").exists()

    # an older run of one point with a wrong loss: the newest run of a point is the one fitted
    _seed_sweep(uri, "synth", ["xs"], [120000], noise=0.0, arch_only="e16k4", scale=2.0)
    n = _seed_sweep(uri, "synth", ["xs", "s", "m"], [120000, 600000], noise=0.002)
    moe_pair = "scaling.pairs=[{a: e16k4, b: dense, label: moe}]"
    # no seed replicates: the noise weights (conf: per budget, dense or routed) cannot be
    # estimated; named before Ray starts, nothing written
    unweighable = _fit_cli(tmp_path, uri, "scaling.sweep=synth", "sweep.name=synth", "scaling.hold_out_sizes=[m]")
    assert unweighable.returncode == 2, unweighable.stderr[-2000:]
    assert "no seed replicates among the fitted points of the group(s) tokens 120000, dense" in unweighable.stderr
    assert not (tmp_path / "out").exists()
    # seeds 1 and 2 of the dense twin and one MoE at both budgets (m's seeds at 600000 are
    # replicates of held-out points and must not be counted)
    for seed in (1, 2):
        n += _seed_sweep(uri, "synth", ["xs", "s", "m"], [120000, 600000], 0.002, archs=("dense", "e16k4"), seed=seed)
    # synth's points are moe_grid's models: named synth, moe_grid's config describes them
    proc = _fit_cli(tmp_path, uri, "scaling.sweep=synth", "sweep.name=synth", "scaling.hold_out_sizes=[m]", moe_pair)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["points"] == n == 66 and fit["held_out_points"] == 11 and fit["sweep"] == "synth"
    groups = {g["group"]: (g["cells"], g["dof"]) for g in fit["noise_weights"]["groups"]}
    # three sizes' cells at 120000; at 600000 m's are held out: two cells, 2 dof each
    assert groups == {"tokens 120000, dense": (3, 6), "tokens 120000, routed": (3, 6), "tokens 600000, dense": (2, 4),
                      "tokens 600000, routed": (2, 4)}  # fmt: skip
    row = next(r for r in (out / "points.csv").read_text().splitlines() if r.startswith("xs-e16k4-120000,"))
    header = (out / "points.csv").read_text().splitlines()[0].split(",")
    cols = dict(zip(header, row.split(",")))
    assert float(cols["loss"]) < 1.2 * float(cols["predicted"])  # not the doubled loss
    assert fit["fit_error"]["rms"] < 0.005 and fit["held_out_within_band"] is True
    assert fit["range"]["tokens"] == 600000
    # m is fitted at 120000 tokens (held out at 600000 only); e15k3s1 shares 1 of G 4
    assert fit["shape_range"] == {"n_layers": [2, 4], "d_model": [64, 128], "shared_share": [0.0, 0.25]}
    for name in ("predicted_vs_measured.png", "loss_vs_params.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    comparison = (out / "comparison.md").read_text()
    assert "e16k4 - dense" in comparison and "## At equal training seconds" in comparison
    assert "65 of 66 runs have their training seconds" in comparison  # the resumed run is left out
    header, *lines = (out / "points.csv").read_text().splitlines()
    rows = {r.split(",")[0]: r.split(",") for r in lines}
    assert float(rows["m-dense-600000"][-1]) == 600.0 and rows["s-e8k2-600000"][-1] == ""
    assert header.split(",")[-4:] == ["predicted", "interval_low", "interval_high", "train_seconds"]
    for row in rows.values():  # each prediction inside its bootstrap interval
        predicted, low, high = map(float, row[-4:-1])
        assert low < predicted < high, row
    held = [r for r in rows.values() if r[8] == "1"]
    inside = sum(float(r[-3]) <= float(r[9]) <= float(r[-2]) for r in held)
    assert fit["intervals"]["replicates"] == 200 and fit["held_out_inside_interval"] == inside >= 4
    assert "bootstrap prediction intervals" in (out / "comparison.md").read_text()
    assert fit["form_name"] == "joint" and "the only form: not cross-validated" in comparison
    # MoE runs are slower per token here: at the dense run's seconds they have fewer tokens.
    (moe_vs_dense,) = [c for c in fit["comparisons_at_equal_seconds"] if c["label"] == "moe"]
    (at_tokens,) = [c for c in fit["comparisons"] if c["label"] == "moe"]
    assert moe_vs_dense["cells"] == 3 and moe_vs_dense["mean_delta"] < at_tokens["mean_delta"]
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("mobilemoe")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'scaling_fit'")
    assert run.info.status == "FINISHED" and run.data.tags["sweep"] == "synth"
    assert run.data.metrics["final/held_out_max_rel_error"] == pytest.approx(fit["held_out_error"]["max"])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"fit.json", "points.csv", "comparison.md", "predicted_vs_measured.png"} <= logged


# --------------------------------------------------------------------------- make plan


TINY_SPACE_OVERRIDES = [
    "scaling.plan.base=tiny",
    "scaling.plan.context=256",
    "scaling.plan.tokens=1e9",
    "scaling.plan.space.n_layers=[2,4]",
    "scaling.plan.space.d_model=[64,128]",
    "scaling.plan.space.head_dim=32",
    "scaling.plan.space.n_kv_heads=2",
    "scaling.plan.space.expansion=[1,4,8]",
    "scaling.plan.space.granularity=[1,4]",
    "scaling.plan.space.vocab_size=[4096]",
    "scaling.plan.references=[tiny,tiny_dense_active]",
]


def _write_fit(path: Path) -> Path:
    import json

    intervals = {"thetas": [list(TRUE.theta)] * 50, "residuals": [-0.01, 0.01], "level": 0.95}
    path.write_text(json.dumps({"coefficients": TRUE.coefficients, "S": S_MEANS, "formula": TRUE.formula(),
                                "sweep": "synthetic",
                                "range": {"n_active": 3e7, "tokens": 1e7},
                                "shape_range": {"n_layers": [3, 3], "d_model": [64, 128], "shared_share": [0.0, 0.25]},
                                "intervals": intervals}))  # fmt: skip
    return path


def test_the_plan_says_how_sure_and_which_candidates_cannot_be_told_apart():
    """Refits: 360 of TRUE, 40 with the granularity term reversed (gamma < 0), under which
    the coarser B is lower than the chosen A: 10% of the refits put B lower, so the two
    cannot be told apart at 97.5%; C (fewer parameters) is never lower."""
    from pipeline.scaling.plan_report import uncertainty, uncertainty_text
    from pipeline.scaling.planner import Budget, Candidate, Plan

    base = model("tiny")
    inputs = {"A": LawInputs(2e6, 6e5, 2.0, 8.0, 0.25), "B": LawInputs(2e6, 6e5, 2.0, 4.0, 0.25),
              "C": LawInputs(1e6, 6e5, 2.0, 8.0, 0.25)}  # fmt: skip
    cands = [Candidate(replace(base, name=k), 1, 1.0, 1, x, TRUE.predict_one(x)) for k, x in inputs.items()]
    assert cands[0].loss < cands[1].loss < cands[2].loss
    plan = Plan(Budget(memory_bytes=10**9), cands, [], [], enumerated=3)
    reversed_gamma = list(TRUE.theta)
    reversed_gamma[2] = -0.5
    fit = {"intervals": {"thetas": [list(TRUE.theta)] * 360 + [reversed_gamma] * 40, "residuals": [0.0], "level": 0.9}}
    sure = uncertainty(plan, fit)
    assert [r["name"] for r in sure["rows"]] == ["B", "C"]
    assert sure["rows"][0]["share_lower_than_chosen"] == 0.1 and sure["rows"][0]["told_apart"] is False
    assert sure["rows"][1]["share_lower_than_chosen"] == 0.0 and sure["rows"][1]["told_apart"] is True
    # residuals of 0: the interval is the spread of the refits' predictions for A
    lows = [math.exp(log_loss(np.array(t), design_matrix([inputs["A"]]))[0]) for t in (TRUE.theta, reversed_gamma)]
    assert sure["interval"] == pytest.approx(sorted(lows), rel=1e-9) and sure["level"] == 0.9
    assert "cannot be told apart from 1 of the next 2: B" in uncertainty_text(plan, sure)
    assert "No bootstrap refits" in uncertainty_text(plan, uncertainty(plan, {}))
    # the optimizer's curse: the 360 TRUE refits pick A as the law does (optimism 0); the 40
    # reversed ones pick their own minimum, B, which they predict below the law's B
    rev = {k: math.exp(log_loss(np.array(reversed_gamma), design_matrix([x]))[0]) for k, x in inputs.items()}
    assert min(rev, key=rev.get) == "B"
    optimism = 0.1 * (rev["B"] / cands[1].loss - 1)
    sel = sure["selection"]
    assert sel["optimism_mean"] == pytest.approx(optimism, rel=1e-9) and sel["refits_picking_chosen"] == 0.9
    assert sel["optimism_sd"] == pytest.approx(abs(rev["B"] / cands[1].loss - 1) * 0.3, rel=1e-9)  # sqrt(.1 * .9)
    assert sel["corrected_pred_loss"] == pytest.approx(cands[0].loss / (1 + optimism), rel=1e-9)
    fixed = 0.1 * (rev["A"] / cands[0].loss - 1)  # A held fixed: the reversed refits' bias there
    assert sel["fixed_choice_mean"] == pytest.approx(fixed, rel=1e-9)
    assert sel["choosing_mean"] == pytest.approx(optimism - fixed, rel=1e-9)
    text = uncertainty_text(plan, sure)
    assert f"A held fixed is predicted {fixed:+.2%}, so choosing adds {optimism - fixed:+.2%}" in text
    assert f"Corrected for both, the choice's predicted loss is {cands[0].loss / (1 + optimism):.4f}" in text
    # every candidate within budget competes, not only the rows shown: with one row, B still wins 10%
    assert uncertainty(replace(plan, top=1), fit)["selection"] == sel
    # a weighted fit: the chosen model's residual is drawn at its own group's weight (A is
    # routed at 6e5 tokens: weight 3), the told-apart shares (refits' means) do not move
    from pipeline.scaling.bootstrap import RESIDUAL_UNIT

    weighted = {"intervals": {**fit["intervals"], "residuals": [-0.01, 0.01], "residual_unit": RESIDUAL_UNIT},
                "noise_weights": {"by": ["routed"], "groups": [
                    {"group": "routed", "key": {"routed": True}, "sd_log_loss": 0.006},
                    {"group": "dense", "key": {"routed": False}, "sd_log_loss": 0.002}]}}  # fmt: skip
    wide = uncertainty(plan, weighted)
    assert wide["noise_weight"] == pytest.approx(3.0) and wide["noise_group"] == "routed"
    assert wide["rows"] == sure["rows"]
    assert wide["interval"][0] == pytest.approx(lows[0] * math.exp(-0.03), rel=1e-9)
    assert wide["interval"][1] == pytest.approx(lows[1] * math.exp(0.03), rel=1e-9)
    assert "drawn at noise weight 3, routed" in uncertainty_text(plan, wide)
    # the weight is the chosen model's own: a dense choice ahead of routed runners-up draws at 1
    dense = LawInputs(2e6, 6e5, 1.0, 1.0, 0.0)
    first = Candidate(replace(base, name="D"), 1, 1.0, 1, dense, TRUE.predict_one(dense))
    assert uncertainty(Plan(Budget(memory_bytes=10**9), [first, *cands], [], [], enumerated=4), weighted)[
        "noise_weight"
    ] == pytest.approx(1.0)


def test_plan_command_writes_a_config_the_recipe_composes_and_builds(tmp_path, capsys):
    from pipeline.recipe import compose, validate
    from pipeline.stages import plan as plan_cli

    fit = _write_fit(tmp_path / "fit.json")
    conf = tmp_path / "conf"
    argv = [
        "--memory",
        "6MB",
        "--flops",
        "20MFLOP",
        "--name",
        "planned_test",
        "--fit",
        str(fit),
        "--conf-dir",
        str(conf),
    ]
    # every candidate's shared expert is half the active width (2 of G = 4 units)
    assert plan_cli.main([*argv, *TINY_SPACE_OVERRIDES, "scaling.plan.space.shared_fraction=[0.5]"]) == 0
    printed = capsys.readouterr().out
    assert "Best within budget" in printed and "tiny_dense_active" in printed  # the references table
    assert "## How sure (bootstrap refits of the law)" in printed and "95% interval for a measured run" in printed
    written = conf / "model" / "planned_test.yaml"
    assert written.read_text().startswith(f"# {plan_cli.MARKER}")
    # the recipe composes it by name (here through Hydra's search path) and accepts it
    raw = compose([f"hydra.searchpath=[file://{conf}]", "model=planned_test"])
    recipe = validate(raw)
    assert recipe.model.name == "planned_test"
    assert int4_weight_bytes(recipe.model) <= 6_000_000 and flops_per_token(recipe.model, 256, "decode") <= 20e6
    # the fit's sizes have 3 layers and the space 2 or 4: the chosen depth is named as an
    # extrapolation, and the shared expert's half beyond the sweep's quarter; its width
    # (64 or 128) is inside the sizes' 64-128
    said = (f"the chosen model has {recipe.model.n_layers} layers where the sweep's fitted models have 3-3 layers, "
            "and a shared expert 50% of the active FFN width where the sweep's fitted models have 0%-25%: its "
            "loss is")  # fmt: skip
    assert said in printed and "widths 64-128" not in printed
    out = plan_cli.repo_path(plan_cli.OUT_ROOT) / "planned_test"
    try:
        assert (out / "frontier_memory.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    with torch.device("meta"):
        Transformer(recipe.model)


@pytest.mark.parametrize(
    "layers,width,shared_units,said",
    [
        (2, 64, 0, ""),  # every lower bound is inside
        (4, 128, 1, ""),  # every upper bound is inside: 1 of G 4 is 25%
        (1, 64, 0, "1 layers where the sweep's fitted models have 2-4 layers"),
        (4, 192, 0, "width 192 where the sweep's fitted models have widths 64-128"),
        (3, 96, 2, "a shared expert 50% of the active FFN width where the sweep's fitted models have 0%-25%"),
        (5, 32, 0, "5 layers where the sweep's fitted models have 2-4 layers, and width 32 where"),
    ],
)
def test_a_plan_beyond_the_fitted_shapes_is_named(layers, width, shared_units, said):
    from pipeline.model.config import MoEConfig
    from pipeline.scaling.plan_report import beyond_sweep_shapes

    fit = {"shape_range": {"n_layers": [2, 4], "d_model": [64, 128], "shared_share": [0.0, 0.25]}}
    unit = 32  # G = 4 units of the active FFN width: 4 - shared_units routed, top-k of them
    moe = MoEConfig(num_experts=8, top_k=4 - shared_units, expert_ffn_dim=unit,
                    num_shared_experts=1 if shared_units else 0, shared_ffn_dim=unit * shared_units)  # fmt: skip
    cfg = replace(model("tiny"), n_layers=layers, d_model=width, head_dim=width // 4, n_heads=4, moe=moe)
    text = beyond_sweep_shapes(fit, cfg)
    assert (said in text) if said else text == ""
    assert beyond_sweep_shapes({}, cfg) == ""  # a fit without the span claims nothing


def test_a_plan_held_to_the_sweep_chooses_inside_what_the_law_was_fitted_on(tmp_path, capsys):
    """scaling.plan.within_sweep: with a fit whose sweep reached Ê 4, G 4, 2-3 layers and a
    quarter-width shared expert, the plan picks the best candidate inside all of those
    (counted here by hand, not by the planner's rule) and says how many within budget it
    left out; planned freely, TRUE's more-is-better terms pick one outside."""
    import json

    from pipeline.scaling.plan_report import outside_sweep
    from pipeline.scaling.planner import Budget, SearchSpace, enumerate_models, evaluate, within
    from pipeline.stages import plan as plan_cli

    fit = json.loads(_write_fit(tmp_path / "fit.json").read_text())
    fit["range"] = {"n_active": 3e7, "tokens": 1e7, "expansion": 4.0, "granularity": 4.0}
    fit["shape_range"] = {"n_layers": [2, 3], "d_model": [64, 128], "shared_share": [0.0, 0.25]}
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    argv = ["--memory", "6MB", "--flops", "20MFLOP", "--conf-dir", str(tmp_path / "conf")]
    overrides = [*TINY_SPACE_OVERRIDES, "scaling.plan.space.shared_fraction=[0.0,0.25,0.5]"]
    held = "scaling.plan.within_sweep=true"
    space = SearchSpace(n_layers=[2, 4], d_model=[64, 128], head_dim=32, n_kv_heads=2, expansion=[1, 4, 8],
                        granularity=[1, 4], shared_fraction=[0.0, 0.25, 0.5], vocab_size=[4096])  # fmt: skip
    cands = evaluate(list(enumerate_models(space, model("tiny"))), TRUE, 1e9, 256)
    cands = [c for c in cands if within(c, Budget(memory_bytes=6e6, flops_per_token=20e6))]
    inside = [c for c in cands if c.model.n_layers <= 3 and c.inputs.expansion <= 4 and c.inputs.granularity <= 4
              and c.inputs.shared <= 0.25]  # fmt: skip
    best = min(inside, key=lambda c: c.loss)
    free = min(cands, key=lambda c: c.loss)
    assert free.model.name != best.model.name and outside_sweep(fit)(free)  # the test can tell the two apart
    try:
        assert plan_cli.main([*argv, "--fit", str(tmp_path / "fit.json"), "--name", "held_test", *overrides, held]) == 0
        printed = capsys.readouterr().out
        assert f"{len(cands)} within budget; {len(cands) - len(inside)} of them left out, outside what" in printed
        assert f"{best.model.name}: predicted loss {best.loss:.4f}" in printed
        assert plan_cli.main([*argv, "--fit", str(tmp_path / "fit.json"), "--name", "free_test", *overrides]) == 0
        assert f"{free.model.name}: predicted loss {free.loss:.4f}" in capsys.readouterr().out
    finally:
        import shutil

        for name in ("held_test", "free_test"):
            shutil.rmtree(plan_cli.repo_path(plan_cli.OUT_ROOT) / name, ignore_errors=True)
    # nothing inside the budget and the sweep: named, with the best one's reason
    tight = {**fit, "range": {**fit["range"], "expansion": 1.0, "granularity": 1.0}, "shape_range": {
        "n_layers": [9, 9], "d_model": [64, 128], "shared_share": [0.0, 0.0]}}  # fmt: skip
    (tmp_path / "tight.json").write_text(json.dumps(tight))
    assert plan_cli.main([*argv, "--fit", str(tmp_path / "tight.json"), "--name", "tight_test", *overrides, held]) == 2
    assert f"lie outside what the law was fitted on (the best, {free.model.name}: " in capsys.readouterr().err
    reason = outside_sweep(tight)(free)
    assert f"Ê = {free.inputs.expansion:.3g} above the sweep's largest 1" in reason and "layers where" in reason
    for partial in ({"range": {"n_active": 1.0}, "shape_range": fit["shape_range"]}, {"range": fit["range"]}):
        with pytest.raises(PlanError, match="records no range or shape_range"):
            outside_sweep(partial)


def test_the_loop_holds_the_point_its_one_point_sweep_names_now():
    """After a replan the loop's sweep keeps the earlier choice's runs in MLflow: the
    closed-loop command holds the point conf/sweep/<loop>.yaml names (read here from the
    file itself); a grid of several points names none."""
    import yaml

    from pipeline.stages.closed_loop import conf_point

    spec = yaml.safe_load((CONF / "sweep" / "closed_loop.yaml").read_text())["sweep"]
    assert conf_point("closed_loop") == f"{spec['size']}-{spec['arch']}-{spec['tokens']}"
    assert conf_point("micro_grid") is None and conf_point("no_such_sweep") is None


def test_a_loop_sweep_names_a_point_only_when_it_has_one_size_one_arch_and_the_three_keys(tmp_path, monkeypatch):
    """conf_point reads conf/sweep/<name>.yaml: one size and one architecture with size,
    arch and tokens name a point; two sizes (or two archs) are a grid and name none; a
    one-point file without tokens is refused by name."""
    import pipeline.recipe
    from pipeline.stages.closed_loop import conf_point

    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    monkeypatch.setattr(pipeline.recipe, "repo_path", lambda p: tmp_path / p)
    size, arch = {"name": "m", "d_model": 128}, {"name": "e8k2", "experts": 8, "top_k": 2}
    point = {"size": "m", "arch": "e8k2", "tokens": 600000}
    files = {
        "one": {"sizes": [size], "archs": [arch], **point},
        "two_sizes": {"sizes": [size, {**size, "name": "s"}], "archs": [arch], **point},
        "two_archs": {"sizes": [size], "archs": [arch, {**arch, "name": "e4k1"}], **point},
        "no_tokens": {"sizes": [size], "archs": [arch], "size": "m", "arch": "e8k2"},
    }
    for name, spec in files.items():
        (tmp_path / "conf" / "sweep" / f"{name}.yaml").write_text(yaml.safe_dump({"sweep": spec}))
    assert conf_point("one") == "m-e8k2-600000"
    assert conf_point("two_sizes") is None and conf_point("two_archs") is None
    with pytest.raises(ConfigError, match="no_tokens.yaml: no sweep.size, sweep.arch and sweep.tokens"):
        conf_point("no_tokens")


def test_the_sweeps_own_largest_expansion_and_granularity_are_inside_it():
    """outside_sweep compares with a relative slack of 1e-9: a candidate whose Ê or G is the
    sweep's largest up to float rounding is inside, one 0.1% above is outside."""
    from types import SimpleNamespace

    from pipeline.scaling.plan_report import outside_sweep

    cfg = model("tiny")
    fit = {"range": {"expansion": 4.0, "granularity": 2.0}, "shape_range": {"n_layers": [1, 99]}}
    reason = outside_sweep(fit)

    def cand(expansion: float, granularity: float) -> SimpleNamespace:
        return SimpleNamespace(inputs=SimpleNamespace(expansion=expansion, granularity=granularity), model=cfg)

    assert reason(cand(4.0 * (1 + 1e-12), 2.0 * (1 + 1e-12))) == ""
    assert "Ê = 4 above the sweep's largest 4" in reason(cand(4.004, 2.0))
    assert "G = 2 above the sweep's largest 2" in reason(cand(4.0, 2.002))


def test_the_loop_command_reads_the_point_its_conf_names_among_an_earlier_choices_runs(tmp_path, monkeypatch, capsys):
    """``closed_loop`` without --point, reading the sweep's runs (the store stubbed here:
    two choices' runs under one sweep name, as after a replan): the point conf/sweep/<sweep>.yaml
    names now is held, with its seeds; a conf point the store lacks is named as the
    conf's; without a one-point conf, two points ask for --point."""
    import pipeline.recipe
    import pipeline.stages.scaling
    from pipeline import tracking
    from pipeline.stages import closed_loop as cli

    fit = _one_law_fit()
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    earlier, now = LawInputs(2e6, 6e5, 2.0, 8.0, 0.5), LawInputs(1.5e6, 6e5, 4.0, 4.0, 0.5)
    runs = [
        Observation("l6-e3k1s1-600000", "e3k1s1", earlier, 4.50, seconds=9.0),
        Observation("l3-e14k2s2-600000", "e14k2s2", now, 4.30, seconds=8.0),
        Observation("l3-e14k2s2-600000-seed1", "e14k2s2", now, 4.40, seconds=8.0),
    ]
    monkeypatch.setattr(tracking, "tagged_runs", lambda cfg, tags: ["stub"])
    monkeypatch.setattr(pipeline.stages.scaling, "observations", lambda found, hold_out_sizes: list(runs))
    monkeypatch.setattr(pipeline.recipe, "repo_path", lambda p: tmp_path / p)
    (tmp_path / "conf" / "sweep").mkdir(parents=True)
    one = {"sizes": [{"name": "l3"}], "archs": [{"name": "e14k2s2"}], "size": "l3", "arch": "e14k2s2"}
    (tmp_path / "conf" / "sweep" / "loop.yaml").write_text(yaml.safe_dump({"sweep": {**one, "tokens": 600000}}))
    (tmp_path / "conf" / "sweep" / "moved.yaml").write_text(yaml.safe_dump({"sweep": {**one, "tokens": 300000}}))
    args = ["--params", str(REPO / "params.yaml"), "--fit", str(tmp_path / "fit.json"), "--out", str(tmp_path / "o")]
    assert cli.main([*args, "--sweep", "loop"]) == 0
    held = json.loads((tmp_path / "o" / "loop.json").read_text())
    assert held["point"] == "l3-e14k2s2-600000" and held["measured"] == pytest.approx(4.35)  # both seeds
    capsys.readouterr()
    assert cli.main([*args, "--sweep", "moved"]) == 2
    err = capsys.readouterr().err
    assert "conf/sweep/moved.yaml's point l3-e14k2s2-300000: not a finished point of sweep moved in MLflow" in err
    assert cli.main([*args, "--sweep", "no_conf"]) == 2
    err = capsys.readouterr().err
    assert "sweep no_conf in MLflow: 3 points" in err and "name one with --point" in err


def test_the_shipped_plans_hold_the_tiny_planner_to_the_sweep_and_let_the_paper_planner_extrapolate():
    """conf/plan/tiny.yaml plans inside what the law was fitted on (the loop's 13 of 13 runs
    inside came from such plans, docs/scaling.md); the paper's budgets lie beyond every
    sweep point, so conf/plan/paper.yaml cannot hold its plans to it."""
    tiny, paper = (yaml.safe_load((CONF / "plan" / f"{name}.yaml").read_text()) for name in ("tiny", "paper"))
    assert tiny["within_sweep"] is True and paper["within_sweep"] is False


def test_references_that_name_the_twins_list_each_model_once():
    """plan=tiny names tiny's twins itself; the twins the planner adds must not repeat them."""
    from types import SimpleNamespace

    from pipeline.stages.plan import references

    def names(refs: list[str]) -> list[str]:
        cfg = SimpleNamespace(plan=SimpleNamespace(references=refs, group_size=32))
        return [m.name for m in references(cfg)]

    assert names(["tiny", "tiny_dense_active", "tiny_dense_total"]) == ["tiny", "tiny_dense_active", "tiny_dense_total"]
    assert names(["tiny"]) == ["tiny", "tiny_dense_active", "tiny_dense_total"]
    assert names(["tiny_dense_active"]) == ["tiny_dense_active"]  # no MoE: no twins


@pytest.mark.parametrize(
    "args,message",
    [
        (["--memory", "3GBB"], "plan: --memory '3GBB': not byte"),
        (["--memory", "1B"], "plan: no architecture of the search space fits INT4 weights"),
        (["--decode-speed", "30"], "--decode-speed and --bandwidth go together"),
        (["--memory", "6MB", "--name", "tiny"], "exists and was not written by the planner"),
        (["--memory", "6MB", "--fit", "/nonexistent/fit.json"], "run `make scaling-fit` first"),
        ([], "give a memory budget, a compute budget, or both"),
    ],
)
def test_plan_command_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    import shutil

    from pipeline.stages import plan as plan_cli

    conf = tmp_path / "conf"
    shutil.copytree(CONF / "model", conf / "model")
    before = (conf / "model" / "tiny.yaml").read_bytes()
    plans = sorted((REPO / plan_cli.OUT_ROOT).glob("*")) if (REPO / plan_cli.OUT_ROOT).exists() else []
    argv = ["--fit", str(_write_fit(tmp_path / "fit.json")), "--conf-dir", str(conf), *args, *TINY_SPACE_OVERRIDES]
    assert plan_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert (conf / "model" / "tiny.yaml").read_bytes() == before
    after = sorted((REPO / plan_cli.OUT_ROOT).glob("*")) if (REPO / plan_cli.OUT_ROOT).exists() else []
    assert after == plans  # no plan directory left behind


def test_closed_loop_command_holds_a_saved_loop_file_against_a_fit(tmp_path, capsys):
    """``closed_loop --runs-from``: no MLflow; written under the file's own name (a
    control's file must not overwrite the main loop's); a bad file or point is named."""
    from pipeline.scaling.closed_loop import compare_replicates
    from pipeline.stages import closed_loop as cli

    fit = _one_law_fit()
    (tmp_path / "fit.json").write_text(json.dumps(fit))
    x = LawInputs(2e6, 6e5, 2.0, 8.0, 0.25)
    names = ("l3-e7k1s1-600000", "l3-e7k1s1-600000-seed1")
    points = [Observation(n, "e7k1s1", x, TRUE.predict_one(x) * f, seconds=9.0) for n, f in zip(names, (1.0, 1.02))]
    saved = tmp_path / "saved" / "closed_loop_in_range.json"
    saved.parent.mkdir()
    saved.write_text(json.dumps(compare_replicates(fit, points, names[0])))
    out = tmp_path / "out"
    args = ["--fit", str(tmp_path / "fit.json"), "--out", str(out), "--runs-from", str(saved)]
    assert cli.main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["closed_loop_in_range.json", "closed_loop_in_range.md"]
    assert json.loads((out / "closed_loop_in_range.json").read_text()) == json.loads(saved.read_text())
    assert cli.main([*args, "--point", names[1], "--name", "one"]) == 0
    assert json.loads((out / "one.json").read_text())["measured"] == points[1].loss
    assert cli.main([*args, "--point", names[0], "--name", "both"]) == 0  # a point's name: with its seeds
    assert json.loads((out / "both.json").read_text())["measured"] == pytest.approx(
        (points[0].loss + points[1].loss) / 2
    )
    old = {**json.loads(saved.read_text()), "inputs": {**vars(x), "shared": True}}  # S 0/1: named, not misread
    (tmp_path / "old.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert cli.main([*args[:-1], str(tmp_path / "old.json")]) == 2
    assert "a loop file from when the law's S was 0/1" in capsys.readouterr().err
    capsys.readouterr()
    assert cli.main([*args, "--point", "l3-x-1"]) == 2
    assert f"--point l3-x-1: not a finished point of --runs-from {saved}" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"point": 5, "inputs": vars(x), "measured": 4.0}))
    assert cli.main([*args[:-1], str(tmp_path / "bad.json")]) == 2
    assert "not a loop file" in capsys.readouterr().err
