"""Recovery and the scaling sweep through real Ray, DVC and MLflow, in a copy of the repo.

One module-scoped `make pretrain` (mix -> pretrain, micro preset) feeds both tests: the
kill-corrupt-rerun drill under `dvc repro`, and a sweep run twice. They need no more of
the chain, so they live apart from tests/e2e/test_pipeline_e2e.py's whole `make repro`
and run beside it when the suite runs on two workers (`make test`).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support import PrivateRayDir

from tools.drill import drill, env_for, run, scratch_copy

pytestmark = pytest.mark.slow

# Ray's session files of this module's runs: its own (support.PrivateRayDir).
RAY_DIR = PrivateRayDir("ray-e2e-rec-")


def _env(repo: Path) -> dict:
    return env_for(repo, RAY_DIR.path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git+DVC copy of the project (micro preset) after `make pretrain`."""
    dest = tmp_path_factory.mktemp("e2e-recovery") / "repo"
    try:
        scratch_copy(dest, _env(dest), "micro")
        run(dest, _env(dest), "make", "pretrain")
        yield dest
    finally:
        RAY_DIR.remove()


@pytest.fixture(scope="module")
def mlflow_client(repo):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def test_drill_kill_corrupt_rerun_gives_the_uninterrupted_result(repo):
    # Kill pretrain at a random step under dvc repro and corrupt its newest checkpoint; the
    # rerun must reproduce the reference bit for bit. See tools/drill.py (`make drill` also
    # runs the by-hand phase; the fall-back past a damaged checkpoint:
    # tests/runner/test_runner.py).
    report = drill(repo, _env(repo), "pretrain", by_hand=False)
    assert report.notes[-1] == "every check held"
    print("\n".join(report.notes))


def test_scaling_sweep_runs_each_point_once_and_a_rerun_skips_the_finished_ones(repo, mlflow_client):
    """`make sweep` is a Hydra multirun of pretrain points (the dense twin and an MoE of
    conf/sweep/micro_grid.yaml), each its own tagged MLflow run and output directory;
    run again (the sweep script alone: make's set-up is not what is tested twice), it finds
    both points FINISHED with the same fingerprint and trains nothing."""
    run(repo, _env(repo), "make", "sweep", "SWEEP=micro_grid", timeout=600)
    exp = mlflow_client.get_experiment_by_name("mobilemoe")
    query = "tags.stage = 'sweep_point' and tags.sweep = 'micro_grid'"
    runs = mlflow_client.search_runs([exp.experiment_id], query)
    assert sorted(r.data.tags["sweep.arch"] for r in runs) == ["dense", "e8k4"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    (parent,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert mlflow_client.get_run(parent).info.run_name == "sweep:micro_grid"
    models = {r.data.tags["sweep.arch"]: json.loads(r.data.tags["sweep.model"]) for r in runs}
    assert models["dense"]["moe"] is None and models["dense"]["ffn_dim"] == 4 * 64
    assert models["e8k4"]["moe"]["num_experts"] == 8 and models["e8k4"]["moe"]["expert_ffn_dim"] == 64
    for arch in ("dense", "e8k4"):
        metrics = json.loads((repo / f"outputs/sweep/micro_grid/xs-{arch}-1024/metrics.json").read_text())
        assert metrics["tokens_seen"] == 1024 and metrics["step"] == 4
    # Each point's own training seconds, in MLflow only (the equal-time tables read them).
    assert all(r.data.metrics["perf/train_seconds"] > 0 for r in runs)
    for arch in ("dense", "e8k4"):  # and never in a file DVC hashes
        assert "seconds" not in (repo / f"outputs/sweep/micro_grid/xs-{arch}-1024/metrics.json").read_text()
    _closed_loop_on(repo, runs)
    again = run(
        repo, _env(repo), ".venv/bin/python", "-m", "pipeline.stages", "sweep", "-m", "sweep=micro_grid", timeout=300
    )
    assert again.stdout.count("already finished") == 2, again.stdout[-2000:]
    assert len(mlflow_client.search_runs([exp.experiment_id], query)) == 2
    # what a rerun looks up: the fingerprint and the sweep, not the stage alone
    from pipeline.tracking import TrackingConfig, finished_stage_run

    cfg = TrackingConfig(uri=f"sqlite:///{repo / 'mlflow.db'}")
    point = runs[0]
    key, tags = point.data.tags["resume_key"], {"sweep": "micro_grid"}
    assert finished_stage_run(cfg, "sweep_point", key, tags)["run_id"] == point.info.run_id
    assert finished_stage_run(cfg, "sweep_point", "pretrain-" + "0" * 12, tags) is None
    assert finished_stage_run(cfg, "sweep_point", key, {"sweep": "another_sweep"}) is None


def _closed_loop_on(repo: Path, runs: list) -> None:
    """``python -m pipeline.stages closed_loop`` on a point of the micro sweep, against a
    synthetic fit whose every refit is one law: the prediction is that law's, the
    interval its residuals' spread, and the verdict follows the measured loss."""
    import math

    from pipeline.scaling.law import COEFFICIENTS, S_MEANS, ScalingLaw
    from pipeline.stages.scaling import observations

    law = ScalingLaw((math.log(20.0), math.log(40.0), 0.6, 0.25, 0.08, 0.32, math.log(300.0), 0.3, math.log(1.7)))
    fit = {
        "coefficients": law.coefficients,
        "S": S_MEANS,
        "formula": law.formula(),
        "sweep": "synthetic",
        "intervals": {"thetas": [list(law.theta)] * 200, "residuals": [-0.02, 0.02], "level": 0.95},
    }
    (repo / "synthetic_fit.json").write_text(json.dumps(fit))
    args = [".venv/bin/python", "-m", "pipeline.stages", "closed_loop", "--sweep", "micro_grid",
            "--fit", "synthetic_fit.json", "--out", "closed"]  # fmt: skip
    two = subprocess.run(args, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=120)
    assert two.returncode == 2 and "2 points" in two.stderr and "--point" in two.stderr, two.stderr[-2000:]
    done = run(repo, _env(repo), *args, "--point", "xs-e8k4-1024", timeout=120)
    result = json.loads((repo / "closed" / "micro_grid.json").read_text())  # named after its sweep
    (point,) = [p for p in observations(runs, []) if p.name == "xs-e8k4-1024"]
    predicted = law.predict_one(point.inputs)
    assert result["measured"] == pytest.approx(point.loss) and result["predicted"] == pytest.approx(predicted)
    assert result["interval"] == pytest.approx([predicted * math.exp(-0.02), predicted * math.exp(0.02)])
    assert result["inside"] == (abs(math.log(point.loss / predicted)) <= 0.02)
    assert (repo / "closed" / "micro_grid.md").read_text() in done.stdout
    assert set(COEFFICIENTS) == set(fit["coefficients"])
