"""MLflow tracking against throwaway SQLite stores (never the repo's mlflow.db).

Only light imports at module level: the spawn test's child process re-imports this module
to find its target, and torch + mlflow.pytorch would add seconds to it.
"""

import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from pipeline import tracking
from pipeline.configbase import ConfigError
from pipeline.runner import artifacts
from pipeline.tracking import (
    PARENT_ENV,
    TrackingConfig,
    TrackingError,
    dvc_input_hashes,
    end_recipe_run,
    flatten_params,
    runs_of_parent,
    stage_run,
    start_recipe_run,
)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DVC_YAML = """\
stages:
  data:
    cmd: python stages/data.py
    deps: [stages/data.py]
    outs: [outputs/data]
  tokenizer:
    cmd: python stages/tokenizer.py
    deps: [outputs/data/text]
    outs: [outputs/tokenizer/tok.json]
  pretrain:
    cmd: python stages/pretrain.py
    deps:
      - stages/pretrain.py
      - outputs/data/packed/train.bin
      - ./outputs/tokenizer/tok.json
    params: [pretrain]
    outs: [outputs/pretrain]
"""

DVC_LOCK = """\
schema: '2.0'
stages:
  data:
    cmd: python stages/data.py
    deps:
    - path: stages/data.py
      md5: '1111'
    outs:
    - path: outputs/data
      md5: aaaa.dir
      size: 10
      nfiles: 3
  tokenizer:
    cmd: python stages/tokenizer.py
    deps:
    - path: outputs/data/text
      md5: stale
    outs:
    - path: outputs/tokenizer/tok.json
      md5: bbbb
  pretrain:
    cmd: python stages/pretrain.py
    deps:
    - path: outputs/data/packed/train.bin
      md5: old-own-entry
    outs:
    - path: outputs/pretrain
      md5: cccc.dir
"""


def tiny_lm(vocab=32, dim=8):
    import torch

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, dim)
            self.proj = torch.nn.Linear(dim, dim)
            self.head = torch.nn.Linear(dim, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.proj(self.embed(ids))))

    return TinyLM()


def client_for(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def dvc_init(root):
    """Make ``root`` a DVC project (lineage is read through DVC's own API)."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    dvc_init(root)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "dvc.lock").write_text(DVC_LOCK)
    if shutil.which("git"):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run([*git, "init", "-q"], cwd=root, check=True)
        subprocess.run([*git, "add", "dvc.yaml"], cwd=root, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=root, check=True)
    return root


@pytest.fixture(autouse=True)
def no_parent_env(monkeypatch):
    monkeypatch.delenv(PARENT_ENV, raising=False)
    yield
    import mlflow

    while mlflow.active_run():  # a failed test must not leak an active run into the next
        mlflow.end_run()


def test_dvc_input_hashes_reads_upstream_outs_only(repo):
    # Source-file deps have no producing stage; the stage's own (stale) lock entry is ignored;
    # a dep inside an out directory reports the directory's hash.
    assert dvc_input_hashes(repo, "pretrain") == {
        "outputs/data": "aaaa.dir",
        "outputs/tokenizer/tok.json": "bbbb",
    }
    assert dvc_input_hashes(repo, "data") == {}
    assert dvc_input_hashes(repo, "no_such_stage") == {}
    assert dvc_input_hashes(repo / "missing", "pretrain") == {}


def test_flatten_params_dots_indexes_and_truncates():
    from mlflow.utils import validation

    assert tracking.MAX_PARAM_VALUE == validation.MAX_PARAM_VAL_LENGTH
    assert tracking.MAX_TAG_VALUE == validation.MAX_TAG_VAL_LENGTH
    assert tracking.MAX_DATASET_DIGEST == validation.MAX_DATASET_DIGEST_SIZE
    flat = flatten_params(
        {
            "model": {"moe": {"top_k": 4}, "dims": [1, 2]},
            "data": {"sources": [{"name": "bible", "weight": 0.5}]},
            "note": "x" * 7000,
            "odd key!": None,
        }
    )
    assert flat["model.moe.top_k"] == "4"
    assert flat["model.dims"] == "[1, 2]"
    assert flat["data.sources.0.name"] == "bible"
    assert len(flat["note"]) == 6000 and flat["note"].endswith("[truncated]")
    assert flat["odd key_"] == "None"


def test_config_validation_and_uri_precedence(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="^experiment:"):
        TrackingConfig(experiment="")
    with pytest.raises(ConfigError, match="^uri:"):
        TrackingConfig(uri="")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.resolve_tracking_uri(TrackingConfig())
    assert default == f"sqlite:///{tracking.REPO_ROOT / 'mlflow.db'}"
    assert tracking.default_artifact_root(default) == (tracking.REPO_ROOT / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert tracking.resolve_tracking_uri(TrackingConfig()) == "http://server:5000"
    assert tracking.resolve_tracking_uri(TrackingConfig(uri="sqlite:///x.db")) == "sqlite:///x.db"
    assert tracking.default_artifact_root("http://server:5000") is None


@pytest.mark.slow
def test_recipe_with_two_nested_stages(uri, repo, monkeypatch, tmp_path):
    import mlflow
    import mlflow.pytorch
    import torch

    cfg = TrackingConfig(uri=uri, experiment="recipe-test")
    parent = start_recipe_run(cfg, {"purpose": "test"}, repo_root=repo)
    monkeypatch.setenv(PARENT_ENV, parent)

    manifest = {"sources": [{"name": "bible", "sha256": "ab" * 32, "licence": "public domain"}]}
    with stage_run(cfg, "data", {"data": {"seq_len": 64, "sources": manifest["sources"]}}, repo_root=repo) as run:
        digest = run.log_dataset(manifest, "mix", context="training")
        extra = tmp_path / "stats.json"
        extra.write_text("{}")
        run.log_artifact(extra, "stats")

    model = tiny_lm()
    ids = torch.randint(0, 32, (1, 6))
    with stage_run(cfg, "pretrain", {"train": {"lr": 4e-4}}, {"size": "tiny"}, repo_root=repo) as run:
        history = []
        for step in range(5):
            run.log_metrics({"train/loss": 3.0 - 0.1 * step, "lr": 1e-3}, step=step)
            history.append((step, 3.0 - 0.1 * step))
        artifacts.log_loss_curve(run, {"train": history, "val": history[::2]}, "loss")
        model_uri = artifacts.log_model(run, model, ids, "final")
    end_recipe_run(parent, "FINISHED", cfg)

    client = client_for(uri)
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.tags["purpose"] == "test"
    runs = runs_of_parent(parent, uri)
    assert [r.info.run_name for r in runs] == ["data", "pretrain"]
    data_run, pre_run = runs
    for r in runs:
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.info.status == "FINISHED"
        assert r.info.experiment_id == client.get_run(parent).info.experiment_id
        assert len(r.data.tags["git_commit"]) == 40 or not shutil.which("git")
        assert r.data.tags["git_dirty"] in ("false", "true", "unknown")
    assert data_run.data.params["data.seq_len"] == "64"
    assert data_run.data.params["data.sources.0.licence"] == "public domain"
    assert data_run.data.tags["stage"] == "data"
    assert pre_run.data.tags["stage"] == "pretrain"
    assert pre_run.data.tags["size"] == "tiny"
    assert pre_run.data.tags["dvc_input.outputs/data"] == "aaaa.dir"
    assert pre_run.data.tags["dvc_input.outputs/tokenizer/tok.json"] == "bbbb"

    # Dataset input with the manifest's digest and context.
    (ds_input,) = data_run.inputs.dataset_inputs
    assert ds_input.dataset.name == "mix" and ds_input.dataset.digest == digest
    assert {t.key: t.value for t in ds_input.tags}["mlflow.data.context"] == "training"
    assert "datasets/mix.json" in ds_input.dataset.source
    data_artifacts = {a.path for a in client.list_artifacts(data_run.info.run_id)}
    assert {"config.yaml", "datasets", "stats"} <= data_artifacts
    config_yaml = yaml.safe_load(mlflow.artifacts.load_text(f"{data_run.info.artifact_uri}/config.yaml"))
    assert config_yaml["data"]["sources"][0]["name"] == "bible"

    history = client.get_metric_history(pre_run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert history[-1].value == pytest.approx(2.6)
    plots = {a.path for a in client.list_artifacts(pre_run.info.run_id, "plots")}
    assert plots == {"plots/loss.png"}
    assert uri[len("sqlite:///") :].rsplit("/", 1)[0] in pre_run.info.artifact_uri  # beside the db

    # Logged model: linked to the run, loads back, sequence length stays dynamic.
    logged = mlflow.search_logged_models(experiment_ids=[pre_run.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged if m.name == "final"] == [pre_run.info.run_id]
    assert [o.model_id for o in pre_run.outputs.model_outputs] == [logged[0].model_id]
    loaded = mlflow.pytorch.load_model(model_uri)
    longer = torch.randint(0, 32, (1, 11))
    with torch.no_grad():
        assert torch.allclose(loaded(ids), model(ids))
        assert torch.allclose(loaded(longer), model(longer))


def test_failure_marks_run_failed_and_stage_makes_own_parent(uri, repo):
    import mlflow

    cfg = TrackingConfig(uri=uri, experiment="failing")
    with pytest.raises(ValueError, match="boom"):
        with stage_run(cfg, "sft", {"lr": 1}, repo_root=repo) as run:
            run.log_metrics({"loss": 1.0}, step=0)
            raise ValueError("boom")
    client = client_for(uri)
    child = client.get_run(run.run_id)
    assert child.info.status == "FAILED"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name == "stage:sft"
    assert parent.info.status == "FAILED"
    assert mlflow.active_run() is None
    # Why it failed, in the run: the message, the type, the traceback.
    assert child.data.tags["error.type"] == "ValueError" and child.data.tags["error.message"] == "boom"
    trace = mlflow.artifacts.load_text(f"{child.info.artifact_uri}/error.txt")
    assert "raise ValueError" in trace and trace.rstrip().endswith("ValueError: boom")


def test_a_failed_check_raised_in_a_ray_task_leaves_its_numbers_in_the_run(uri, repo):
    """The export stage's checks run in a Ray task: the error arrives wrapped
    (RayTaskError), and the run still holds the check's numbers as metrics and JSON."""
    import mlflow
    from ray.exceptions import RayTaskError

    from pipeline.export.artifacts import ExportCheckError

    details = {"pte": {"excess_noise_db_max": 31.5, "top1_disagree_beyond_noise": 3, "passed": False}}
    try:
        raise ExportCheckError("export checks failed: pte: ...", details)
    except ExportCheckError as err:
        assert pickle.loads(pickle.dumps(err)).details == details  # crosses Ray intact
        wrapped = RayTaskError("export_all", "Traceback (most recent call last): ...", err).as_instanceof_cause()
    cfg = TrackingConfig(uri=uri, experiment="failing")
    with pytest.raises(ExportCheckError):
        with stage_run(cfg, "export", repo_root=repo) as run:
            raise wrapped
    child = client_for(uri).get_run(run.run_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["error.type"] == "ExportCheckError"
    assert child.data.tags["error.message"].startswith("export checks failed: pte")
    assert child.data.metrics["failed/pte/excess_noise_db_max"] == 31.5
    assert child.data.metrics["failed/pte/top1_disagree_beyond_noise"] == 3
    logged = mlflow.artifacts.load_dict(f"{child.info.artifact_uri}/error_details.json")
    assert logged == details


def test_stale_parent_id_is_a_clear_error(uri, repo, monkeypatch):
    monkeypatch.setenv(PARENT_ENV, "0123456789abcdef0123456789abcdef")
    with pytest.raises(TrackingError, match=PARENT_ENV):
        with stage_run(TrackingConfig(uri=uri), "eval", repo_root=repo):
            pass


def test_model_that_torch_export_cannot_trace_raises(uri, repo):
    import torch

    class DataDependent(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(int(ids.sum().item()))  # output shape depends on values

    with stage_run(TrackingConfig(uri=uri, experiment="export-fail"), "export", repo_root=repo) as run:
        with pytest.raises(TrackingError, match="torch.export"):
            artifacts.log_model(run, DataDependent(), torch.ones(1, 4, dtype=torch.int64), "bad")


def test_disabled_tracking_is_a_no_op(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path / 'never.db'}", enabled=False)
    with stage_run(cfg, "data", {"a": 1}) as run:
        run.log_metrics({"x": 1.0}, step=1)
        run.log_dataset({"a": 1}, "d", "training")
        assert run.run_id is None and run.for_workers() is None
    assert not (tmp_path / "never.db").exists()


def _worker(logger, tmp_dir):
    logger.log_metrics({"worker/loss": 0.5}, step=7)
    path = os.path.join(tmp_dir, "worker.txt")
    with open(path, "w") as f:
        f.write("hi")
    logger.log_artifact(path, "workers")


@pytest.mark.slow
def test_worker_logger_from_spawned_process(uri, repo, tmp_path):
    with stage_run(TrackingConfig(uri=uri, experiment="remote"), "pretrain", repo_root=repo) as run:
        logger = run.for_workers()
        logger.log_metrics({"driver/loss": 1.0}, step=1)  # builds a client ...
        assert b"MlflowClient" not in pickle.dumps(logger)  # ... that never travels
        proc = multiprocessing.get_context("spawn").Process(target=_worker, args=(logger, str(tmp_path)))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 0
    client = client_for(uri)
    (metric,) = client.get_metric_history(run.run_id, "worker/loss")
    assert (metric.step, metric.value) == (7, 0.5)
    assert [a.path for a in client.list_artifacts(run.run_id, "workers")] == ["workers/worker.txt"]


def test_cli_url_prints_the_address_of_the_experiments_runs(uri, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from pipeline.tracking.__main__ import main

    assert main(["url", "--ui", "http://127.0.0.1:5999/", "--experiment", "ui-page"]) == 0
    assert "no runs of experiment 'ui-page' yet" in capsys.readouterr().out
    assert main(["start", "--experiment", "ui-page"]) == 0
    run_id = capsys.readouterr().out.strip()
    experiment = client_for(uri).get_run(run_id).info.experiment_id
    assert main(["url", "--ui", "http://127.0.0.1:5999/", "--experiment", "ui-page"]) == 0
    assert capsys.readouterr().out.strip() == f"http://127.0.0.1:5999/#/experiments/{experiment}/runs"


def test_cli_start_prints_only_the_run_id(uri, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from pipeline.tracking.__main__ import main

    assert main(["start", "--experiment", "cli", "--tag", "trigger=make"]) == 0
    run_id = capsys.readouterr().out.strip()
    assert main(["end", run_id, "--status", "FAILED"]) == 0
    run = client_for(uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["trigger"] == "make"


def test_dvc_input_hashes_resolves_templated_deps(tmp_path):
    dvc_init(tmp_path)
    (tmp_path / "params.yaml").write_text("data:\n  out_dir: data/mix\nstage:\n  sft:\n    init: outputs/mid/model\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  sft:\n    cmd: x\n    deps:\n      - ${data.out_dir}/sft\n      - ${stage.sft.init}\n"
        "  mix:\n    cmd: y\n    outs: [data/mix]\n  mid:\n    cmd: z\n    outs: [outputs/mid/model]\n"
    )
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  mix:\n    cmd: y\n    outs:\n    - path: data/mix\n      md5: cccc.dir\n"
        "  mid:\n    cmd: z\n    outs:\n    - path: outputs/mid/model\n      md5: dddd.dir\n"
    )
    assert dvc_input_hashes(tmp_path, "sft") == {"data/mix": "cccc.dir", "outputs/mid/model": "dddd.dir"}


def test_the_report_links_the_run_that_wrote_the_stage_output_not_a_newer_study(uri, repo):
    from pipeline.tracking import TrackingError, latest_stage_runs

    cfg = TrackingConfig(uri=uri, experiment="studies")
    ids = []
    for out_dir in ("outputs/qat", "outputs/qat_study/8da2w"):  # the recipe's run, then a study
        with stage_run(cfg, "qat", {"stage": {"out_dir": out_dir, "scheme": "8da4w"}}, repo_root=repo) as run:
            ids.append(run.run_id)
        time.sleep(0.01)  # distinct start times: "newest" is well defined
    ui = "http://127.0.0.1:5000"
    assert latest_stage_runs(cfg, ["qat"], ui)["qat"]["run_id"] == ids[1]  # the newest, whatever it wrote
    assert latest_stage_runs(cfg, ["qat"], ui, {"qat": "outputs/qat"})["qat"]["run_id"] == ids[0]
    assert latest_stage_runs(cfg, ["qat"], ui, {"qat": "outputs/elsewhere"}) == {}
    with pytest.raises(TrackingError, match="qat: cannot search MLflow for an out_dir with a quote"):
        latest_stage_runs(cfg, ["qat"], ui, {"qat": "it's"})
