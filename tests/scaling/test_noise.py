"""The fit's noise weights (pipeline/scaling/noise.py): estimated from the fitted points'
seed replicates per group, and the weighted Huber objective they enter."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from pipeline.configbase import ConfigError, from_dict
from pipeline.scaling import forms, noise
from pipeline.scaling.config import ScalingStageConfig
from pipeline.scaling.fit import HUBER_DELTA, Observation, ScalingFitError, fit_law, huber_objective, starting_points
from pipeline.scaling.law import LawInputs, ScalingLaw, design_matrix
from pipeline.scaling.select import choose_form, leave_one_size_out_errors
from pipeline.stages.scaling import hold_out
from pipeline.stages.sweep import point_name

FEW = {"alpha": (0.2, 0.5), "beta": (0.3,), "log_a": (3.0,), "log_b": (6.0,), "log_c": (0.0, 0.5)}
TRUE = ScalingLaw((3.0, 0.32, 0.3, 0.6, 0.08, math.log(300.0), 0.3, math.log(1.7)), forms.POWER)


def _point(name: str, loss: float, tokens: float = 1e6, expansion: float = 4, held_out: bool = False) -> Observation:
    x = LawInputs(1e6, tokens, expansion, 1 if expansion == 1 else 2, 0.0)
    return Observation(name, name.split("-")[1], x, loss, held_out=held_out, size=name.split("-")[0])


def _seeds(name: str, losses: list[float], **kw) -> list[Observation]:
    return [_point(name if i == 0 else f"{name}-seed{i}", v, **kw) for i, v in enumerate(losses)]


def _ss(values: list[float]) -> float:
    logs = [math.log(v) for v in values]
    return sum((v - sum(logs) / len(logs)) ** 2 for v in logs)


def test_the_pooled_sd_weighs_cells_by_their_degrees_of_freedom_and_ignores_held_out_seeds():
    # group (1e6 tokens, routed): cells of 3, 2 and 2 seeds, 4 dof; by hand with ddof 1
    a, b, c = [4.0, 4.2, 4.1], [5.0, 5.5], [4.6, 4.62]
    points = _seeds("s-e8k2-1000000", a) + _seeds("m-e8k2-1000000", b) + _seeds("m-e4k1-1000000", c)
    # dense at 1e6: cells of 2 and 4 seeds (4 dof); a held-out routed cell whose seeds must not count
    d, e = [4.4, 4.3], [4.9, 4.95, 4.7, 4.85]
    points += _seeds("s-dense-1000000", d, expansion=1) + _seeds("m-dense-1000000", e, expansion=1)
    points += _seeds("m-e8k2-10000000", [3.0, 3.3], tokens=1e7, held_out=True)
    points.append(_point("s-e16k4-1000000", 4.5))  # no replicate: in the group, adds nothing
    model = noise.estimate(points, ("tokens", "routed"))
    routed = math.sqrt((_ss(a) + _ss(b) + _ss(c)) / (2 + 1 + 1))
    dense = math.sqrt((_ss(d) + _ss(e)) / (1 + 3))
    assert model.groups == {(1e6, True): (3, 4, pytest.approx(routed, rel=1e-12)),
                            (1e6, False): (2, 4, pytest.approx(dense, rel=1e-12))}  # fmt: skip
    # one group (tokens only): the five cells pooled
    assert noise.estimate(points, ("tokens",)).groups[(1e6,)][2] == pytest.approx(
        math.sqrt((_ss(a) + _ss(b) + _ss(c) + _ss(d) + _ss(e)) / 8), rel=1e-12
    )
    weighed, got = noise.weigh(points, ("tokens", "routed"))
    quietest = min(routed, dense)
    by = {p.name: p.noise for p in weighed}
    assert by["s-e16k4-1000000"] == pytest.approx(routed / quietest)
    assert by["s-dense-1000000"] == pytest.approx(dense / quietest) and routed / dense > 1.5  # not both 1
    # held out, no estimate for its group (never fitted): the noisiest group's weight, not the quietest's
    assert by["m-e8k2-10000000"] == pytest.approx(routed / quietest)
    assert got.to_dict()["groups"][0] == {"group": "tokens 1000000, dense", "key": {"tokens": 1e6, "routed": False},
                                          "cells": 2, "dof": 4, "sd_log_loss": dense}  # fmt: skip
    # the weight a fit.json's reader gives any law inputs: the same rule from the saved model
    saved = got.to_dict()
    assert noise.scale_of(saved, points[0].inputs) == (pytest.approx(routed / quietest), "tokens 1000000, routed")
    assert noise.scale_of(saved, _point("x-dense-1000000", 4.0, expansion=1).inputs) == (1.0, "tokens 1000000, dense")
    # a plan's nominal budget is its group's when within 2% (the runs see the next whole step's tokens)
    for tokens in (9.81e5, 1.019e6):
        assert noise.scale_of(saved, _point("x-dense-1", 4.0, tokens=tokens, expansion=1).inputs)[0] == 1.0
    for tokens in (9.75e5, 1.025e6):
        assert "no seeds there" in noise.scale_of(saved, _point("x-dense-1", 4.0, tokens=tokens, expansion=1).inputs)[1]
    keyless = {**saved, "groups": [{k: v for k, v in g.items() if k != "key"} for g in saved["groups"]]}
    with pytest.raises(ValueError, match="no group keys .* rerun make scaling-fit"):
        noise.scale_of(keyless, points[0].inputs)
    weight, group = noise.scale_of(saved, _point("x-dense-5000000", 4.0, tokens=5e6, expansion=1).inputs)
    assert weight == pytest.approx(routed / quietest) and "tokens 5000000, dense (no seeds there" in group
    assert noise.scale_of(None, points[0].inputs) == (1.0, "all points")


def test_a_fitted_group_without_replicates_too_few_or_identical_seeds_is_named():
    points = _seeds("s-e8k2-1000000", [4.0, 4.1, 4.3]) + _seeds("m-e8k2-1000000", [4.0, 4.1, 4.05])
    points.append(_point("s-dense-1000000", 4.2, expansion=1))
    with pytest.raises(ScalingFitError, match=r"group\(s\) tokens 1000000, dense, so their noise is unknown"):
        noise.weigh(points, ("tokens", "routed"))
    assert noise.weigh(points, ("tokens",))[1].groups  # pooled over dense and routed: 4 dof
    thin = points + [_point("s-dense-1000000-seed1", 4.3, expansion=1)]
    with pytest.raises(ScalingFitError, match=r"tokens 1000000, dense \(1\) have fewer than 4 degrees of freedom"):
        noise.weigh(thin, ("tokens", "routed"))
    # 3 dof (cells of 2 and 3 seeds): still too few; a fourth seed makes 4, enough
    three = thin + _seeds("m-dense-1000000", [4.4, 4.5, 4.45], expansion=1)
    with pytest.raises(ScalingFitError, match=r"dense \(3\) have fewer than 4"):
        noise.weigh(three, ("tokens", "routed"))
    four = three + [_point("m-dense-1000000-seed3", 4.52, expansion=1)]
    assert noise.weigh(four, ("tokens", "routed"))[1].groups[(1e6, False)][1] == 4
    for loss in (math.nan, 0.0):
        with pytest.raises(ScalingFitError, match=r"loss must be finite and > 0: s-e8k2-1000000-seed1"):
            noise.weigh([points[0], replace(points[1], loss=loss), *points[2:]], ("tokens",))
    with pytest.raises(ScalingFitError, match="every point is held out"):
        noise.weigh([replace(p, held_out=True) for p in points], ("tokens",))
    with pytest.raises(ValueError, match="name a key twice"):
        noise.estimate(points, ("tokens", "tokens"))
    same = _seeds("s-e8k2-1000000", [4.0] * 5)
    with pytest.raises(ScalingFitError, match="agree exactly"):
        noise.weigh(same, ("tokens",))
    weighed, model = noise.weigh([replace(p, noise=7.0) for p in points], ())
    assert model is None and {p.noise for p in weighed} == {1.0}
    with pytest.raises(ValueError, match="the keys are tokens, routed"):
        noise.estimate(points, ("family",))
    with pytest.raises(ConfigError, match="noise_groups"):
        from_dict(ScalingStageConfig, {"noise_groups": ["tokens", "size"]}, "scaling")
    with pytest.raises(ConfigError, match="twice"):
        from_dict(ScalingStageConfig, {"noise_groups": ["tokens", "tokens"]}, "scaling")


def test_routed_is_any_expansion_or_granularity_above_1():
    assert noise.is_routed(LawInputs(1e6, 1e6, 4, 1, 0.0))  # e4k1: coarse experts
    assert noise.is_routed(LawInputs(1e6, 1e6, 1, 4, 0.0))  # granularity without expansion
    assert not noise.is_routed(LawInputs(1e6, 1e6, 1, 1, 0.25))  # dense (dense_total too)


def test_the_bootstrap_refits_keep_each_drawn_point_s_weight(monkeypatch):
    from pipeline.scaling import bootstrap as boot

    points, _ = noise.weigh(_heteroscedastic(seed=2), ("tokens",))
    result = fit_law(points, starts=starting_points(FEW, forms.POWER), form=forms.POWER)
    fitted = [p for p in points if not p.held_out]
    seen = []
    real = boot.huber_objective

    def spy(form, X, y, delta=HUBER_DELTA, noise_P=None):
        seen.append((np.array(y), np.array(noise_P)))
        return real(form, X, y, delta, noise_P)

    monkeypatch.setattr(boot, "huber_objective", spy)
    boot.bootstrap(points, result, replicates=3)
    by_loss = {math.log(p.loss): p.noise for p in fitted}
    assert len(seen) == 3 and len({p.noise for p in fitted}) == 3  # three budgets, three weights
    for y, noise_P in seen:
        assert noise_P.tolist() == [by_loss[v] for v in y]


def test_the_weighted_objective_divides_each_residual_by_its_noise():
    """Value and gradient against the Huber loss written out per point (and finite
    differences); noise 1 everywhere is the unweighted objective, bit for bit."""
    form = forms.POWER
    xs = [LawInputs(3e5 * 2**i, 1e6 * 3**i, 1 + i, 2**i, 0.5 * (i % 2)) for i in range(5)]
    X = design_matrix(xs)
    theta = starting_points(FEW, form)[1] + 0.01
    pred = form.log_loss(theta, X)
    y = pred + np.array([0.0004, -0.02, 0.003, -0.0009, 0.05])  # inside and beyond δ
    s = np.array([1.0, 4.0, 0.5, 2.5, 30.0])
    value, grad = huber_objective(form, X, y, noise_P=s)(theta)
    d = HUBER_DELTA
    by_hand = 0.0
    for r, si in zip(pred - y, s):
        z = r / si
        by_hand += (0.5 * z * z if abs(z) <= d else d * (abs(z) - d / 2)) / d**2
    assert value == pytest.approx(by_hand, rel=1e-12)
    eps = 1e-7
    numeric = [(huber_objective(form, X, y, noise_P=s)(theta + e)[0] - huber_objective(form, X, y, noise_P=s)(
        theta - e)[0]) / (2 * eps) for e in np.eye(len(theta)) * eps]  # fmt: skip
    assert np.allclose(grad, numeric, rtol=1e-5, atol=1e-3)
    plain = huber_objective(form, X, y)(theta)
    ones = huber_objective(form, X, y, noise_P=np.ones(5))(theta)
    assert plain[0] == ones[0] and np.array_equal(plain[1], ones[1])


def _heteroscedastic(seed: int = 0, noisy: float = 0.08) -> list[Observation]:
    """Four sizes x three budgets x six shapes from TRUE; the two smaller budgets
    ``noisy`` (SD of log loss), the largest 0.2%; three seeds of every shape of size a
    (the replicates the noise is read from); size d at the largest budget held out."""
    rng = np.random.default_rng(seed)
    sd = {1e6: noisy, 3e6: noisy, 1e7: 0.002}
    shapes = [(1, 1, 0), (4, 1, 0), (4, 2, 0), (4, 4, 0), (4, 4, 0.25), (8, 4, 0)]
    points = []
    for (size, N), D, (E, G, S) in itertools.product([("a", 3e5), ("b", 1e6), ("c", 3e6), ("d", 1e7)], sd, shapes):
        x = LawInputs(N, D, E, G, float(S))
        for seed_i in range(3 if size == "a" else 1):
            loss = TRUE.predict_one(x) * math.exp(rng.normal(0, sd[D]))
            points.append(Observation(point_name(size, f"e{E}g{G}s{S}", int(D), seed_i), f"e{E}g{G}s{S}", x, loss,
                                      size=size))  # fmt: skip
    return hold_out(points, ["d"])


def test_weighting_by_the_replicates_noise_predicts_the_quiet_held_out_runs_better():
    """Where the smaller budgets are 40x noisier, the fit weighted by the noise their
    seeds show predicts the held-out runs at the largest budget within about their own
    noise in every one of six draws; weighing every point alike, the noisy points pull
    the law off by several times that on average (measured: weighted 0.20-0.24% in
    each draw; unweighted 0.19-2.2%, mean 0.72%)."""
    starts = starting_points(FEW, forms.POWER)
    plain, weighted = [], []
    for seed in range(6):
        points = _heteroscedastic(seed)
        weighed, model = noise.weigh(points, ("tokens",))
        assert model.groups[(1e7,)][2] == pytest.approx(0.002, rel=0.6)  # 12 dof: the SD within ±60%
        assert model.groups[(1e6,)][2] == pytest.approx(0.08, rel=0.6)
        plain.append(fit_law(points, starts=starts, form=forms.POWER).held_out.rms)
        weighted.append(fit_law(weighed, starts=starts, form=forms.POWER).held_out.rms)
    assert max(weighted) < 0.004
    assert np.mean(plain) > 2.0 * np.mean(weighted)


def test_write_fit_weighs_the_points_it_is_given(tmp_path):
    """``write_fit`` estimates the weights itself (the stage's check only validates):
    unweighted points in, noise_weights and weighted choosing scores out."""
    from pipeline.scaling.artifacts import write_fit

    raw = [replace(p, noise=1.0) for p in _heteroscedastic(seed=3)]
    summary = write_fit(raw, [], tmp_path, dense="e1g1s0", replicates=2, form_names=["power", "joint"],
                        starts_for=lambda form: starting_points(FEW, form), noise_groups=["tokens"])  # fmt: skip
    assert [g["group"] for g in summary["noise_weights"]["groups"]] == [
        "tokens 1000000", "tokens 3000000", "tokens 10000000"
    ]  # fmt: skip
    assert all(f["cv_score"] < f["cv_error"]["rms"] for f in summary["form_selection"])
    assert "## Noise weights" in (tmp_path / "comparison.md").read_text()
    assert summary["seed_noise"]["cells"] == {}  # the held-out runs (size d) have no seeds here


def test_the_form_is_chosen_by_the_noise_weighted_leave_one_size_out_score():
    points, _ = noise.weigh(_heteroscedastic(seed=1), ("tokens",))

    def few(form):
        return starting_points(FEW, form)

    result, scores = choose_form(points, [forms.POWER, forms.JOINT], few)
    for s in scores:
        errors, weights = leave_one_size_out_errors(points, forms.get(s.form), few(forms.get(s.form)))
        assert s.cv_score == pytest.approx(math.sqrt(sum((e / w) ** 2 for e, w in zip(errors, weights)) / len(errors)))
        assert s.cv_score < s.cross_validated.rms  # the noisy points' errors count less
    assert result.law.form.name == min(scores, key=lambda s: s.cv_score).form
    # every weight 1: the score is the plain RMS, bit for bit
    _, plain = choose_form([replace(p, noise=1.0) for p in points], [forms.POWER], few)
    assert plain[0].cv_score is None  # one form: nothing chosen, nothing scored
    _, two = choose_form([replace(p, noise=1.0) for p in points], [forms.POWER, forms.JOINT], few)
    assert all(s.cv_score == s.cross_validated.rms for s in two)


def test_a_prediction_interval_is_as_wide_as_its_own_point_s_noise():
    """The smaller budgets 10x noisier than the largest: each point's 95% predictive
    interval draws the fit's studentized residuals at its own weight, so fresh runs at
    a point's own noise land inside about 95% of the time, in the quiet group and in the
    noisy ones, and the quiet intervals are several times narrower (measured: the quiet
    held-out runs' median width is 0.11x the noisy points'). Residuals not divided by
    their weights make the quiet intervals as wide as the noisy ones' scatter; draws not
    multiplied by the target's weight make the noisy ones cover too little."""
    from pipeline.scaling.bootstrap import bootstrap, predictive_draws

    raw = _heteroscedastic(seed=5, noisy=0.02)
    # a held-out run at a budget no seed measured: drawn at the noisiest group's weight
    far = LawInputs(1e7, 3e7, 4, 2, 0.0)
    raw.append(Observation("d-e4g2s0-30000000", "e4g2s0", far, TRUE.predict_one(far), held_out=True, size="d"))
    points, _ = noise.weigh(raw, ("tokens",))
    result = fit_law(points, starts=starting_points(FEW, forms.POWER), form=forms.POWER)
    intervals, _ = bootstrap(points, result, replicates=100, seed=2)
    sd = {1e6: 0.02, 3e6: 0.02, 1e7: 0.002}
    rng = np.random.default_rng(7)
    quiet = [p for p in points if p.held_out and p.inputs.tokens == 1e7]
    noisy = [p for p in points if p.inputs.tokens == 1e6 and not p.held_out]
    for group in (quiet, noisy):
        inside = [
            intervals.contains(p.name, TRUE.predict_one(p.inputs) * math.exp(rng.normal(0, sd[p.inputs.tokens])))
            for p in group
            for _ in range(50)
        ]
        assert 0.85 <= np.mean(inside) <= 1.0, (group[0].name, np.mean(inside))

    def width(group):
        return np.median([math.log(intervals.predictions[p.name][1] / intervals.predictions[p.name][0]) for p in group])

    assert width(quiet) < 0.3 * width(noisy), (width(quiet), width(noisy))
    assert width(quiet) < 2 * 1.96 * 0.002 * 1.5  # about its own noise's width, not the pool's
    (unmeasured,) = [p for p in points if p.inputs.tokens == 3e7]
    assert unmeasured.noise == max(p.noise for p in points) > 5
    assert width([unmeasured]) > 0.7 * width(noisy)
    # the stored residuals are studentized, centred and inflated, by hand
    fitted = [p for p in points if not p.held_out]
    X = design_matrix([p.inputs for p in fitted])
    z = (np.log([p.loss for p in fitted]) - forms.POWER.log_loss(np.array(result.law.theta), X)) / [
        p.noise for p in fitted
    ]
    n, k = len(fitted), len(forms.POWER.coefficients)
    assert np.allclose(intervals.residuals, (z - z.mean()) * math.sqrt(n / (n - k)), rtol=0, atol=1e-15)
    assert intervals.to_dict()["residual_unit"] == "the quietest noise group's SD"
    # weight 1 is the plain draw, bit for bit; a weight scales the drawn residual
    thetas = np.array(intervals.thetas[:5])
    args = (forms.POWER, thetas, np.array([-0.01, 0.02]), [quiet[0].inputs, noisy[0].inputs])
    plain = predictive_draws(*args, np.random.default_rng(3))
    assert np.array_equal(plain, predictive_draws(*args, np.random.default_rng(3), [1.0, 1.0]))
    scaled = predictive_draws(*args, np.random.default_rng(3), [1.0, 10.0])
    mean = np.array([forms.POWER.log_loss(t, design_matrix(args[3])) for t in thetas])
    assert np.allclose(scaled - mean, (plain - mean) * [1.0, 10.0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="2 positive weights"):
        predictive_draws(*args, np.random.default_rng(3), [1.0, 0.0])
