"""The profile's dense twins built side by side in child processes: each child builds its own
spec, a failing one is named with its error and stops the rest, an interrupt reaps them
all, the spec's JSON form, how many run at once (that a child builds the bytes the profile
builds in its own process: tests/profile/test_profile.py)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
from shapes import MAX_CONTEXT, micro_cfg

from pipeline.export.budget import lowering_peak_bytes
from pipeline.model.twins import dense_twin
from pipeline.profile import twin_build
from pipeline.profile.twin_build import TwinSpec, build_twins, concurrency


def twin_specs(folder, kv_cache: str = "float32") -> list[TwinSpec]:
    folder.mkdir(exist_ok=True)
    return [
        TwinSpec(
            dense_twin(micro_cfg(), match, 32), 32, seed, MAX_CONTEXT, True, 1, 2, kv_cache, folder / f"{match}.pte"
        )
        for seed, match in enumerate(("total", "active"), start=3)
    ]


@pytest.mark.slow  # two children start (torch, ExecuTorch) and build a model each
def test_each_child_builds_its_own_spec_and_a_failing_one_is_named_and_stops_the_rest(tmp_path):
    """Only the second spec is bad: the error names its program (so the second child got
    the second spec), and the first child, still lowering, is stopped before it writes."""
    good, bad = twin_specs(tmp_path)
    bad = replace(bad, kv_cache="int3")
    with pytest.raises(RuntimeError, match=r"active\.pte failed \(exit 1\):[\s\S]*int3"):
        build_twins([good, bad], workers=2)
    assert not good.path.exists() and not bad.path.exists()


def test_spec_survives_its_json_form(tmp_path):
    (spec,) = twin_specs(tmp_path)[:1]
    assert TwinSpec.from_json(spec.to_json()) == spec


def test_concurrency_is_bounded_by_cores_twins_and_the_memory_of_the_lowering_peaks(tmp_path):
    specs = twin_specs(tmp_path)
    peak = max(lowering_peak_bytes(s.cfg, "fused", s.max_context) for s in specs)
    assert concurrency(specs, 2, 10 * peak) == 2
    assert concurrency(specs, 1, 10 * peak) == 1
    assert concurrency(specs, 8, 10 * peak) == 2  # no more than there are twins
    assert concurrency(specs, 2, 2 * peak - 1) == 1  # room for one lowering only
    assert concurrency(specs, 2, 0) == 1 and concurrency([], 4, 10 * peak) == 1


def test_an_interrupt_stops_and_reaps_every_child(tmp_path, monkeypatch):
    """Ctrl-C while the children run: none is left behind (not even the one first in line)."""
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def sleeper(cmd, **kwargs):  # a child that would run for a minute
        started.append(real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(twin_build.subprocess, "Popen", sleeper)
    monkeypatch.setattr(twin_build.time, "sleep", interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_twins(twin_specs(tmp_path), workers=2)
    assert len(started) == 2 and all(proc.returncode is not None for proc in started)
