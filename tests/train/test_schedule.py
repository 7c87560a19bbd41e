import math

import pytest

from pipeline.configbase import ConfigError, from_dict
from pipeline.train.schedule import ScheduleConfig, lr_at


def cfg(**kw):
    base = dict(kind="cosine", lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    base.update(kw)
    return ScheduleConfig(**base)


def lrs(c):
    return [lr_at(c, s) for s in range(c.total_steps + 1)]


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_from_near_zero_to_peak(kind):
    c = cfg(kind=kind)
    assert lr_at(c, 0) == pytest.approx(1e-4)  # lr / warmup_steps, not 0: the first step moves
    assert lr_at(c, 4) == pytest.approx(5e-4)
    assert lr_at(c, 9) == pytest.approx(1e-3)
    assert lr_at(c, 10) == pytest.approx(1e-3)
    warm = [lr_at(c, s) for s in range(10)]
    assert all(b > a for a, b in zip(warm, warm[1:]))


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_decaying_schedules_end_at_min_lr_and_never_increase_after_warmup(kind):
    c = cfg(kind=kind)
    values = lrs(c)[c.warmup_steps :]
    assert values[-1] == pytest.approx(1e-4)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))
    # Past the end the lr stays at the floor instead of wrapping around (cosine would).
    assert lr_at(c, c.total_steps + 500) == pytest.approx(1e-4)


def test_cosine_midpoint_and_linear_midpoint():
    assert lr_at(cfg(kind="cosine"), 60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lr_at(cfg(kind="cosine"), 35) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(cfg(kind="linear"), 60) == pytest.approx(1e-3 - 0.9e-3 * 0.5)


def test_wsd_holds_peak_then_decays_over_last_fraction():
    c = cfg(kind="wsd", warmup_steps=10, total_steps=100, decay_fraction=0.2)
    assert c.decay_start == 80
    # Hand-computed: updates 80..99 are the 20-update window; update 80 + i uses
    # lr - (lr - final) * (i + 1) / 20, so update 99 (the last one taken) is at the final lr.
    assert all(lr_at(c, s) == 1e-3 for s in range(10, 80))
    assert lr_at(c, 80) == pytest.approx(1e-3 - 0.9e-3 * 1 / 20)
    assert lr_at(c, 89) == pytest.approx(1e-3 - 0.9e-3 * 10 / 20)
    assert lr_at(c, 99) == pytest.approx(1e-4)
    assert lr_at(c, 100) == pytest.approx(1e-4)


@pytest.mark.parametrize("total, fraction, window", [(100, 0.2, 20), (37, 0.25, 9), (10, 0.05, 1), (50, 1.0, 50)])
def test_wsd_decays_exactly_the_configured_number_of_updates(total, fraction, window):
    c = cfg(kind="wsd", warmup_steps=0, total_steps=total, decay_fraction=fraction, min_lr_ratio=0.0)
    taken = [lr_at(c, s) for s in range(total)]  # the lrs of the updates a run makes
    decayed = [lr for lr in taken if lr < 1e-3]
    assert len(decayed) == window
    assert taken[-1] == 0.0  # the last update is at the final lr, also for a one-update window
    assert decayed == sorted(decayed, reverse=True)


def test_constant_ignores_min_lr_ratio():
    c = cfg(kind="constant", min_lr_ratio=0.0)
    assert set(lrs(c)[10:]) == {1e-3}


def test_no_warmup_starts_at_peak():
    c = cfg(warmup_steps=0)
    assert lr_at(c, 0) == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(kind="step"), "kind"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=110), "warmup_steps"),
        (dict(warmup_steps=200), "warmup_steps"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=10.5), "total_steps"),
        (dict(min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
        (dict(decay_fraction=0.0), "decay_fraction"),
        (dict(decay_fraction=1.2), "decay_fraction"),
        (dict(kind="wsd", warmup_steps=50, total_steps=100, decay_fraction=0.6), "decay_fraction"),
    ],
)
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ConfigError) as err:
        cfg(**kw)
    assert str(err.value).startswith(f"{field}:")


def test_negative_step_rejected():
    with pytest.raises(ConfigError, match="step"):
        lr_at(cfg(), -1)


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ConfigError, match="warmup:"):
        from_dict(ScheduleConfig, {"kind": "cosine", "warmup": 5})
