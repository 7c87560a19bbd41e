"""One Ray for a whole recipe: every stage joins it, and it stops with the recipe."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import REPO_ROOT
from pipeline.train.config import RayConfig
from tools.drill import env_for

# What a stage does first: start (or join) Ray; then it says where it is.
STAGE = """
import os, ray
from pipeline.runner import cluster
from pipeline.train.config import RayConfig
cluster.start(RayConfig())
print(ray.get_runtime_context().gcs_address, os.environ.get(cluster.RECIPE_RAY_ENV), ray.cluster_resources()["device"])
"""
PARAMS = str(REPO_ROOT / "params.yaml")


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


@pytest.fixture
def env():
    ray_dir = tempfile.mkdtemp(prefix="ray-recipe-", dir="/tmp")  # Unix socket paths stay short
    yield env_for(REPO_ROOT, ray_dir)
    shutil.rmtree(ray_dir, ignore_errors=True)


def _wrapped(*command: str, params: str = PARAMS) -> list[str]:
    return [sys.executable, "-m", "pipeline.runner.recipe_ray", "--params", params, *command]


@pytest.mark.slow
def test_every_stage_of_a_recipe_joins_one_ray_that_stops_with_it(env):
    stages = f"{sys.executable} -c '{STAGE}' && {sys.executable} -c '{STAGE}' && exit 3"
    proc = subprocess.run(
        _wrapped("sh", "-c", stages), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 3, proc.stderr[-3000:]  # the command's own exit code
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("127.0.0.1:")]
    assert len(lines) == 2, proc.stdout
    (first, recipe, device), (second, _, _) = lines
    # Both stages joined the recipe's Ray (the one embedded Ray, with the device resource) ...
    assert first == second == recipe and float(device) == 1.0
    # ... which stopped with the command.
    assert not _listening(first)


@pytest.mark.slow
def test_sigterm_reaches_the_running_stage_before_ray_stops(env, tmp_path):
    # The command stands for DVC running a stage: a grandchild that records the signal.
    stage = tmp_path / "stage.py"
    stage.write_text(
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (pathlib.Path({str(tmp_path / 'got')!r}).write_text('TERM'), "
        "sys.exit(143)))\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('')\n"
        "time.sleep(300)\n"
    )
    # The shell stays the parent (as DVC is), the stage its child: both must get the signal.
    proc = subprocess.Popen(_wrapped("sh", "-c", f"{sys.executable} {stage}; exit 0"), cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + 240
    while not (tmp_path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the stage never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert (tmp_path / "got").read_text() == "TERM"


def test_on_a_cluster_the_command_runs_as_it_is(env, tmp_path):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["ray"]["address"] = "ray://head:10001"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    script = "import os; print(os.environ.get('MOBILEMOE_RECIPE_RAY', 'unset'))"
    proc = subprocess.run(
        _wrapped(sys.executable, "-c", script, params=str(path)), cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "unset"), proc.stderr[-2000:]


def test_bad_use_and_a_bad_params_file_are_named(tmp_path):
    usage = subprocess.run([sys.executable, "-m", "pipeline.runner.recipe_ray"], capture_output=True, text=True)
    assert usage.returncode == 2 and "recipe_ray --params params.yaml CMD" in usage.stderr
    bad = tmp_path / "params.yaml"
    bad.write_text("ray:\n  num_workers: many\n")
    proc = subprocess.run(_wrapped("true", params=str(bad)), cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "ray.num_workers" in proc.stderr, proc.stderr


def _repro_with(tmp_path: Path, old: str, new: str) -> subprocess.CompletedProcess:
    """``pipeline.runner.repro`` on the default params.yaml with ``old`` replaced by ``new``,
    run in ``tmp_path``: no dvc.yaml, no mlflow.db there, so reaching either would fail
    differently from the config error expected."""
    params = tmp_path / "params.yaml"
    params.write_text((REPO_ROOT / "params.yaml").read_text().replace(old, new, 1))
    assert new in params.read_text()
    return subprocess.run(
        [sys.executable, "-m", "pipeline.runner.repro", "--params", str(params)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )


def test_repro_names_a_bad_params_file_before_dvc_ray_or_mlflow(tmp_path):
    proc = _repro_with(tmp_path, "num_workers: 1", "num_workers: many")
    assert proc.returncode == 2 and "ray.num_workers" in proc.stderr, proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
    # `dvc status`, started beside the validation, is stopped and says nothing of its own
    # (here it would have said that there is no DVC repository).
    assert "ERROR" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_whole_recipe_refuses_a_qat_study_scheme_before_dvc(tmp_path):
    # The export lowers 8da4w only: `make repro` with 8da2w would train QAT, then fail.
    proc = _repro_with(tmp_path, "scheme: 8da4w", "scheme: 8da2w")
    assert proc.returncode == 2, proc.stderr
    assert "stage.qat.scheme: 8da2w is a QAT study scheme" in proc.stderr, proc.stderr
    assert "make qat-study SCHEME=8da2w" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


CLUSTER = RayConfig(address="ray://head:10001")  # on a cluster: the command runs without a Ray here


@pytest.mark.parametrize(
    ("script", "code", "status"),
    [
        ("exit 0", 0, "FINISHED"),
        ("exit 255", 255, "FAILED"),  # DVC's code for a failed stage: a failure, not a kill
        ("kill -TERM $$", 128 + signal.SIGTERM, "KILLED"),  # a signal ended it
    ],
)
def test_the_parent_run_ends_failed_or_killed_by_how_dvc_ended(script, code, status):
    from pipeline.runner.recipe_ray import run_in_ray
    from pipeline.runner.repro import parent_status

    outcome = run_in_ray(CLUSTER, ["sh", "-c", script])
    assert (outcome.code, parent_status(outcome)) == (code, status)


def test_a_signal_passed_on_counts_as_a_kill_whatever_the_command_returns(tmp_path):
    # The command stands for DVC: it traps SIGTERM and exits with a code of its own.
    from pipeline.runner.recipe_ray import run_in_ray
    from pipeline.runner.repro import parent_status

    ready = tmp_path / "ready"
    script = f"trap 'exit 3' TERM; touch {ready}; while :; do sleep 0.1; done"
    timer = threading.Thread(target=_signal_when, args=(ready, signal.SIGTERM))
    timer.start()
    outcome = run_in_ray(CLUSTER, ["sh", "-c", script])
    timer.join()
    assert (outcome.code, parent_status(outcome)) == (3, "KILLED")


def _signal_when(ready, signum) -> None:
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signum)  # to this process: run_in_ray passes it on to the command's group


@pytest.mark.parametrize("ignores_sigint", [False, True])
def test_a_dvc_status_no_longer_needed_is_interrupted_then_reaped(tmp_path, ignores_sigint):
    # DVC releases its read locks on SIGINT; a SIGKILL leaves them in .dvc/tmp/rwlock.
    from pipeline.runner.repro import stop_status

    ready, cleaned = tmp_path / "ready", tmp_path / "cleaned"
    handler = (
        "signal.SIG_IGN" if ignores_sigint else f"lambda *_: (pathlib.Path({str(cleaned)!r}).touch(), sys.exit(1))"
    )
    script = (
        "import pathlib, signal, sys, time\n"
        f"signal.signal(signal.SIGINT, {handler})\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    stop_status(proc, grace_s=1.0)
    assert proc.returncode is not None  # reaped
    if ignores_sigint:
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - started >= 1.0
    else:
        assert cleaned.exists() and proc.returncode == 1  # it ran its own clean-up
    stop_status(None)  # nothing started (DVC_FLAGS given): nothing to do


def test_a_study_scheme_is_refused_for_exactly_the_targets_that_reach_the_export():
    from pipeline.configbase import ConfigError
    from pipeline.recipe import compose, validate
    from pipeline.runner.preflight import check_export_scheme

    study = validate(compose(["stage.qat.scheme=8da2w"]))
    for ok in (["qat"], ["sft", "qat"], ["eval_sft"]):  # upstream of the export, or beside it
        check_export_scheme(study, ok, repo=REPO_ROOT)
    for targets, named in (([], "every stage"), (["profile"], "profile"), (["eval_qat"], "eval_qat")):
        with pytest.raises(ConfigError, match=rf"^stage\.qat\.scheme: 8da2w .*\({named} would reach it\)"):
            check_export_scheme(study, targets, repo=REPO_ROOT)
    with pytest.raises(ConfigError, match=r"\(export, report would reach it\)"):
        check_export_scheme(study, ["qat", "export", "report"], repo=REPO_ROOT)
    check_export_scheme(validate(compose()), ["report"], repo=REPO_ROOT)  # the deployed scheme: anything goes
