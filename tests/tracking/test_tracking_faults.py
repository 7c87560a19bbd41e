"""Tracking as a side service: it may be busy, unreachable or lost, and training goes on.

Each test here pins one fault found when the recipe was run as an operator would:
a closed server port, a locked SQLite database (at start and during training), runs
left RUNNING by killed processes, and parameter keys that MLflow would merge.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import free_port, stop_session

from pipeline.process import ProcessId
from pipeline.tracking import (
    PARENT_ENV,
    RunLogger,
    TrackingConfig,
    TrackingError,
    check_store,
    ensure_experiment,
    flatten_params,
    read_journal,
    stage_run,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv(PARENT_ENV, raising=False)
    db = tmp_path / "mlflow.db"
    yield db, f"sqlite:///{db}"
    import mlflow

    while mlflow.active_run():
        mlflow.end_run()


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@contextmanager
def locked_sqlite(db: Path):
    """Another process holds an exclusive lock on the SQLite database until exit."""
    code = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == b"locked"  # waits for the lock itself
        yield proc
    finally:
        stop_session(proc)


def test_keys_that_sanitise_alike_keep_both_values():
    flat = flatten_params({"opts": {"a:b": 1, "a_b": 2, "c": 3}})
    assert flat["opts.c"] == "3"
    twins = {k: v for k, v in flat.items() if k.startswith("opts.a_b")}
    assert sorted(twins.values()) == ["1", "2"] and len(twins) == 2, flat
    # Two long keys cut at MLflow's 250-character limit would collide the same way.
    long = flatten_params({"x" * 300 + "1": 1, "x" * 300 + "2": 2})
    assert sorted(long.values()) == ["1", "2"] and all(len(k) <= 250 for k in long)


def test_closed_server_port_is_reported_in_seconds_naming_the_store():
    port = free_port()  # nothing listens there
    with pytest.raises(TrackingError) as err:
        check_store(TrackingConfig(uri=f"http://127.0.0.1:{port}", connect_timeout=2))
    assert f"http://127.0.0.1:{port}" in str(err.value) and "unreachable" in str(err.value)
    assert "tracking.enabled=false" in str(err.value)  # says what to do


def test_a_briefly_locked_database_delays_the_start_instead_of_failing(store):
    db, uri = store
    cfg = TrackingConfig(uri=uri, experiment="busy", retry_seconds=120)
    with stage_run(cfg, "warmup"):
        pass  # creates the database and the experiment
    with locked_sqlite(db) as locker:
        threading.Timer(3.0, stop_session, args=(locker,)).start()  # another writer finishes
        with stage_run(cfg, "pretrain", params={"lr": 1}) as run:
            run.log_metrics({"loss": 1.0}, step=1)
    finished = client_for(uri).get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.params["lr"] == "1"
    assert run.lost_summary() is None


@pytest.mark.slow
def test_tracking_lost_during_training_never_stops_it(store, tmp_path, micro_data):
    from jobs import job_callbacks, micro_job

    from pipeline.train.callbacks import MetricsCallback
    from pipeline.train.loop import run_loop

    db, uri = store
    cfg = TrackingConfig(uri=uri, experiment="lost", retry_seconds=0.5)
    journal = tmp_path / "journal.jsonl"
    with stage_run(cfg, "pretrain", params={"lr": 1}, journal=tmp_path / "driver.jsonl") as run:
        logger = run.for_workers(journal=journal)
        job = micro_job(micro_data, steps=6)
        with locked_sqlite(db):  # held for the rest of training: tracking is lost for good
            state = run_loop(job, 0, 1, None, [*job_callbacks(job, _Keep(tmp_path)), MetricsCallback(1, logger)])
            run.log_metrics({"final/val_loss": 1.0})  # the driver's own calls are best effort too
    import mlflow

    # The run could not be ended in the store; it was forgotten locally (through MLflow's
    # private run stack: this fails if that moves) so this process can open another.
    assert mlflow.active_run() is None
    assert state.step == 6  # training finished
    lost = read_journal(journal)
    assert [r["payload"]["step"] for r in lost] == [1, 2, 3, 4, 5, 6]  # every step's metrics, on disk
    assert lost[-1]["payload"]["metrics"]["train/loss"] == state.history["train/loss"][-1][1]
    assert "metrics (x6)" in logger.guard.summary()
    summary = run.lost_summary()
    assert "database is locked" in summary and "metrics" in summary and "end of run" in summary
    assert {r["what"] for r in read_journal(tmp_path / "driver.jsonl")} == {
        "metrics",
        "end of run",
        "end of parent run",
    }


class _Keep:
    """Stands in for Ray's report: keeps nothing (only training's completion matters here)."""

    def __init__(self, tmp_path):
        self.roots = []

    def __call__(self, metrics, root):
        pass


def _dead_owner_tags() -> dict[str, str]:
    code = "from pipeline.process import ProcessId; import json; print(json.dumps(ProcessId.current().to_tags()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)  # that process has exited: its runs are orphans


def test_runs_of_killed_processes_are_closed_and_the_interrupted_stage_continues(store, tmp_path):
    _, uri = store
    cfg = TrackingConfig(uri=uri, experiment="killed")
    client = client_for(uri)
    exp = ensure_experiment(client, cfg, uri)
    dead = _dead_owner_tags()
    killed_parent = client.create_run(exp, run_name="recipe", tags=dead).info.run_id
    interrupted = client.create_run(
        exp,
        run_name="pretrain",
        tags={
            **dead,
            "stage": "pretrain",
            "resume_key": "pretrain-0123",
            "resumes": "0",
            "mlflow.parentRunId": killed_parent,
        },
    ).info.run_id
    other_key = client.create_run(exp, tags={**dead, "stage": "pretrain", "resume_key": "pretrain-4567"}).info.run_id
    alive = client.create_run(exp, run_name="someone else's", tags=ProcessId.current().to_tags()).info.run_id
    foreign = client.create_run(exp, run_name="no owner recorded").info.run_id

    with stage_run(cfg, "pretrain", resume_key="pretrain-0123", continue_run=True) as run:
        assert run.run_id == interrupted and run.resumes == 1
    resumed = client.get_run(interrupted)
    assert resumed.info.status == "FINISHED" and resumed.data.tags["resumes"] == "1"
    new_parent = client.get_run(resumed.data.tags["mlflow.parentRunId"])
    assert new_parent.info.run_name == "stage:pretrain" and new_parent.info.status == "FINISHED"
    assert client.get_run(killed_parent).info.status == "KILLED"
    assert client.get_run(other_key).info.status == "KILLED"  # a different training run: closed, not continued
    assert client.get_run(alive).info.status == "RUNNING"  # its owner lives
    assert client.get_run(foreign).info.status == "RUNNING"  # not ours to judge
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_unfinished_run_with_nothing_left_to_resume_is_closed_not_continued(store):
    # Killed before its first checkpoint: the work restarts from scratch, so it is a new
    # execution (a new run), and the old one is closed as KILLED.
    _, uri = store
    cfg = TrackingConfig(uri=uri, experiment="restarted")
    client = client_for(uri)
    exp = ensure_experiment(client, cfg, uri)
    old = client.create_run(exp, tags={**_dead_owner_tags(), "stage": "sft", "resume_key": "sft-1"}).info.run_id
    with stage_run(cfg, "sft", resume_key="sft-1", continue_run=False) as run:
        assert run.run_id != old and run.resumes == 0
    assert client.get_run(old).info.status == "KILLED"
    assert client.get_run(run.run_id).data.tags["resume_key"] == "sft-1"


def test_logger_pickles_without_its_client_and_keeps_its_budget(tmp_path):
    import pickle

    logger = RunLogger("sqlite:///x.db", "abc", retry_seconds=7.0, journal=tmp_path / "j.jsonl")
    clone = pickle.loads(pickle.dumps(logger))
    assert (clone.run_id, clone.retry_seconds, clone.journal) == ("abc", 7.0, str(tmp_path / "j.jsonl"))
    assert clone.guard.retry_seconds == 7.0


def test_make_parent_run_follows_the_params_tracking_section(tmp_path, capsys):
    import yaml

    from pipeline.tracking.__main__ import main

    params = tmp_path / "params.yaml"
    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    params.write_text(yaml.safe_dump({"tracking": {"uri": uri, "experiment": "from-params"}}))
    assert main(["start", "--params", str(params)]) == 0
    run_id = capsys.readouterr().out.strip()
    assert client_for(uri).get_run(run_id).info.experiment_id == (
        client_for(uri).get_experiment_by_name("from-params").experiment_id
    )
    assert main(["end", run_id, "--params", str(params), "--status", "FAILED"]) == 0
    assert client_for(uri).get_run(run_id).info.status == "FAILED"
    params.write_text(yaml.safe_dump({"tracking": {"enabled": False, "uri": "http://127.0.0.1:9"}}))
    assert main(["start", "--params", str(params)]) == 0  # disabled: no store is contacted
    assert capsys.readouterr().out == ""
