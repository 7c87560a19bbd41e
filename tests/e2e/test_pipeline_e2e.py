"""The whole chain on the micro preset through real Ray, DVC and MLflow, in a copy of the repo.

One module-scoped run of `make repro` (every stage) feeds every test here; then the no-op
re-run, metrics, a bad config, `dvc exp run -S` (the drill and the sweep:
tests/e2e/test_recovery_and_sweep.py; resume with two workers on two nodes:
tests/e2e/test_cluster.py). Everything is
queried through the tools themselves (MLflow client, dvc CLI).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from support import ListenerWatch, PrivateRayDir, mlflow_server, started

from tools.drill import env_for, scratch_copy

pytestmark = pytest.mark.slow
TRAIN_STAGES = ("pretrain", "midtrain", "sft")
EVAL_TARGETS = ("pretrain", "midtrain", "sft", "qat")


# Ray's session files of this module's runs: its own (nothing here joins another Ray).
RAY_DIR = PrivateRayDir("ray-e2e-")


def _env(repo: Path) -> dict:
    return env_for(repo, RAY_DIR.path)


def sh(repo: Path, *cmd: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="module", autouse=True)
def _private_ray_dir():
    yield
    RAY_DIR.remove()


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git+DVC copy of the project whose default experiment is the micro preset, after
    one `make repro` (the log is kept in repro.log)."""
    dest = tmp_path_factory.mktemp("e2e") / "repo"
    scratch_copy(dest, _env(dest), "micro")
    t0 = time.perf_counter()
    log = dest / "repro.log"
    with log.open("w") as out, started(["make", "repro"], cwd=dest, env=_env(dest), stdout=out, stderr=out) as proc:
        with ListenerWatch(proc.pid) as watch:
            code = proc.wait(timeout=900)
    if code != 0:
        raise AssertionError(f"make repro failed ({code}):\n{log.read_text()[-6000:]}")
    print(f"make repro (micro) took {time.perf_counter() - t0:.0f}s")
    REPRO_WATCH.append(watch)
    return dest


REPRO_WATCH: list[ListenerWatch] = []  # the listening sockets of the fixture's `make repro`


def test_every_stage_ran_in_the_recipes_stage_server(repo):
    """`make repro` started the warm stage server, and no stage had to run without it
    (pipeline/runner/stage_server.py: a refusal or a lost server says so in the log)."""
    log = (repo / "repro.log").read_text()
    assert log.count("stage server: ready") == 1, log[-3000:]
    assert "running the stage in this process" not in log and "stage server lost" not in log


def test_nothing_the_recipe_starts_listens_beyond_loopback(repo):
    """Every stage's process tree (the embedded Ray's GCS, raylet, workers; Ray Train's
    workers and their rendezvous store; the stage processes) listens on 127.0.0.1 only."""
    (watch,) = REPRO_WATCH
    names = {name for name, _, _ in watch.seen}
    # The watch saw the processes it is about (else the check below proves nothing).
    assert {"gcs_server", "raylet"} <= names, sorted(watch.seen)
    assert any(name.startswith("ray::") for name in names), sorted(watch.seen)
    assert not watch.beyond_loopback(), f"listening beyond loopback: {watch.beyond_loopback()}"


@pytest.fixture(scope="module")
def mlflow_client(repo):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # module-level queries (logged models) use it too
    yield MlflowClient(tracking_uri=uri)
    mlflow.set_tracking_uri(None)


def _stage_runs(client) -> dict:
    exp = client.get_experiment_by_name("mobilemoe")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["recipe"], [p.info.run_name for p in parents]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {r.info.run_name: r for r in children}


def test_outputs_and_dvc_lock(repo):
    lock = (repo / "dvc.lock").read_text()
    for stage in ("mix", *TRAIN_STAGES):
        assert f"  {stage}:" in lock
    for stage in TRAIN_STAGES:
        metrics = json.loads((repo / "outputs" / stage / "metrics.json").read_text())
        assert metrics["step"] == 6 and metrics["val_loss"] > 0
        assert (repo / "outputs" / stage / "model" / "meta.json").is_file()
    samples = json.loads((repo / "outputs" / "sft" / "samples.json").read_text())
    assert {s["task"] for s in samples} == {"define", "continue", "math", "reason"}


def test_export_stage_outputs(repo):
    assert "  export:" in (repo / "dvc.lock").read_text()
    out = repo / "outputs" / "export"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(check["passed"] for check in metrics["checks"].values()), metrics["checks"]
    assert metrics["checks"]["sparse_int4"]["portable_compute"] == []
    for item in ("model.pte", "model.pt2", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"):
        assert (out / item).stat().st_size > 0, item
    sample = json.loads((out / "sample.json").read_text())
    assert len(sample["tokens"]) >= 1 and isinstance(sample["completion"], str)


def test_profile_stage_outputs(repo):
    assert "  profile:" in (repo / "dvc.lock").read_text()
    out = repo / "outputs" / "profile"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["speedup"] == {}  # the micro preset profiles the MoE alone
    assert all(x > 0 for x in metrics["moe"]["decode_tok_s"].values())
    assert "No dense baseline is configured" in (out / "report.md").read_text()
    assert (out / "plots" / "throughput.png").stat().st_size > 0
    profile = json.loads((out / "profile.json").read_text())
    assert profile["machine"]["threads"] == 2 and profile["runs"] == 2


def test_every_model_stage_is_evaluated_and_the_report_comes_last(repo):
    lock = (repo / "dvc.lock").read_text()
    suite = json.loads((repo / "data" / "eval" / "suite.json").read_text())
    assert set(suite["tasks"]) == {
        "continuation",
        "knowledge",
        "code",
        "math",
        "worked_answer",
        "compare",
        "instruct",
        "heldout_bpb",
    }
    assert suite["held_out"] == 0.1  # the micro mixtures' val_fraction
    for target in EVAL_TARGETS:
        assert f"  eval_{target}:" in lock
        metrics = json.loads((repo / "outputs" / "eval" / target / "metrics.json").read_text())
        chat = target in ("midtrain", "sft", "qat")  # midtrain: the before-SFT reference
        assert ("instruct" in metrics["tasks"]) == chat and ("instruct" in metrics) == chat
        assert metrics["form"] == ("int4" if target == "qat" else "fp32")
        assert -1.0 <= metrics["centred_acc"] <= 1.0
        assert metrics["tasks"]["heldout_bpb"]["score"] > 0
        assert all(t["n"] == suite["tasks"][name]["items"] for name, t in metrics["tasks"].items())
    pte = json.loads((repo / "outputs" / "eval" / "qat" / "metrics.json").read_text())["pte_tasks"]
    assert set(pte) == {"math", "instruct"}  # the .pte on the generative tasks
    # The report ran last and shows every stage (none missing).
    order = [line.split("'")[1] for line in (repo / "repro.log").read_text().splitlines() if "Running stage '" in line]
    assert order[-1] == "report", order
    report = (repo / "outputs" / "report" / "report.md").read_text()
    assert "missing" not in report.lower(), report[:2000]
    html = (repo / "outputs" / "report" / "report.html").read_text()
    assert "<table>" in html and 'src="data:image/png;base64,' in html and 'src="plots/' not in html
    shown = sh(repo, ".venv/bin/dvc", "metrics", "show").stdout
    assert all(f"outputs/eval/{t}/metrics.json" in shown for t in EVAL_TARGETS), shown


def test_qat_stage_outputs(repo):
    from pipeline.model.accounting import int4_weight_bytes
    from pipeline.quant.format import load_quantized

    assert "  qat:" in (repo / "dvc.lock").read_text()
    out = repo / "outputs" / "qat"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 6
    for name in ("sft_fp32", "ptq", "qat_int4", "control_fp32", "control_ptq", "ptq_per_channel"):
        assert metrics[f"loss_{name}"] > 0 and metrics[f"bpb_{name}"] > 0, name
    assert metrics["ptq_gap"] == metrics["loss_ptq"] - metrics["loss_sft_fp32"]
    # The fake-quantized model before its first step is the PTQ model: the worker's
    # start-of-training validation equals the driver's PTQ loss on the same batches.
    assert abs(metrics["qat_train_val_loss_at_start"] - metrics["loss_ptq"]) < 1e-5
    assert "qat_train_moe_max_over_mean" in metrics  # expert load during QAT
    coverage = json.loads((out / "coverage.json").read_text())
    assert coverage["scheme"]["group_size"] == 32
    for when in ("after_prepare", "after_convert"):
        rows = coverage[when]["rows"]
        experts = [r for r in rows if ".experts." in r["name"]]
        assert len(experts) == 2 * 3 and all(r["scheme"].startswith("int4/g32 + int8 act") for r in experts)
        assert {r["scheme"] for r in rows if r["scheme"].startswith("fp32")} == {"fp32 router", "fp32 norm"}
    import torch

    model, q = load_quantized(out / "quantized" / "model.safetensors")
    assert q.group_size == 32
    assert metrics["weight_bytes"] == int4_weight_bytes(model.cfg, 32, scale_bytes=4, norm_bytes=4)
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 5, dtype=torch.long))).all()


def test_mlflow_parent_with_nested_stage_runs(repo, mlflow_client):
    import mlflow

    runs = _stage_runs(mlflow_client)
    assert set(runs) == {
        "mix",
        *TRAIN_STAGES,
        "qat",
        "export",
        "profile",
        "evalsets",
        *(f"eval_{t}" for t in EVAL_TARGETS),
        "report",
    }
    evaluated = runs["eval_sft"]
    assert evaluated.data.metrics["centred_acc"] == pytest.approx(
        json.loads((repo / "outputs" / "eval" / "sft" / "metrics.json").read_text())["centred_acc"]
    )
    assert {"metrics.json", "items.jsonl"} <= {a.path for a in mlflow_client.list_artifacts(evaluated.info.run_id)}
    parent = evaluated.data.tags["mlflow.parentRunId"]
    assert {"report/report.html", "report/report.md"} <= {
        a.path for a in mlflow_client.list_artifacts(parent, "report")
    }
    report_html = (repo / "outputs" / "report" / "report.html").read_text()
    assert evaluated.info.run_id in report_html  # linked for the local UI
    profile = runs["profile"]
    assert profile.info.status == "FINISHED"
    assert profile.data.metrics["moe/decode_tok_s/32"] > 0
    profile_artifacts = {a.path for a in mlflow_client.list_artifacts(profile.info.run_id)}
    assert {"report.md", "profile.json", "plots", "metrics.json"} <= profile_artifacts
    export = runs["export"]
    assert export.info.status == "FINISHED"
    assert export.data.metrics["checks/pte/top1_disagree_beyond_noise"] == 0  # the gate's numbers, logged
    assert export.data.metrics["checks/pte/decode_excess_noise_db"] <= 6
    assert mlflow_client.get_metric_history(export.info.run_id, "perf/lower_seconds")
    export_artifacts = {a.path for a in mlflow_client.list_artifacts(export.info.run_id)}
    assert {"model.pte", "model.pt2", "hf", "operators.json", "metrics.json"} <= export_artifacts, export_artifacts
    qat = runs["qat"]
    assert qat.info.status == "FINISHED"
    assert qat.data.metrics["final/loss_qat_int4"] > 0
    for key in ("train/loss", "control/train/loss", "moe/max_over_mean", "val/loss"):
        assert [m.step for m in mlflow_client.get_metric_history(qat.info.run_id, key)][-1] == 6, key
    qat_artifacts = {a.path for a in mlflow_client.list_artifacts(qat.info.run_id)}
    assert {"coverage.json", "metrics.json", "quantized", "checkpoint"} <= qat_artifacts, qat_artifacts
    mix = runs["mix"]
    assert {d.dataset.name for d in mix.inputs.dataset_inputs} == {
        "pretrain-mixture",
        "midtrain-mixture",
        "sft-mixture",
    }
    for stage in TRAIN_STAGES:
        run = runs[stage]
        rid = run.info.run_id
        assert run.info.status == "FINISHED"
        assert re.fullmatch(r"[0-9a-f]{40}", run.data.tags["git_commit"])
        assert run.data.params["model.d_model"] == "64"
        assert run.data.params["stage.schedule.total_steps"] == "6"
        history = mlflow_client.get_metric_history(rid, "train/loss")
        assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]
        for key in (
            "val/loss",
            "train/lr",
            "perf/tokens_per_s",
            "train/grad_norm",
            "moe/max_over_mean",
            "moe/dead_fraction",
        ):
            assert mlflow_client.get_metric_history(rid, key), key
        # bits per byte only where the loss covers all text (not SFT's assistant-only loss)
        assert bool(mlflow_client.get_metric_history(rid, "val/bpb")) == (stage != "sft")
        assert run.data.metrics["final/val_loss"] > 0
        artifacts = {a.path for a in mlflow_client.list_artifacts(rid)}
        assert {"config.yaml", "checkpoint", "tokenizer", "metrics.json", "plots"} <= artifacts, artifacts
        plots = {a.path for a in mlflow_client.list_artifacts(rid, "plots")}
        assert f"plots/{stage}_loss.png" in plots
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == [f"{stage}-mixture"]
        models = mlflow.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{rid}'", output_format="list"
        )
        assert [m.name for m in models] == [f"{stage}-model"]
    # lineage: each stage is tagged with the DVC hash of the upstream outputs it read
    lock = (repo / "dvc.lock").read_text()
    pre_tag = runs["midtrain"].data.tags["dvc_input.outputs/pretrain/model"]
    assert pre_tag in lock
    assert runs["pretrain"].data.tags["dvc_input.data/mix"] in lock


def test_logged_model_loads_and_predicts(repo, mlflow_client):
    import mlflow
    import torch

    run = _stage_runs(mlflow_client)["sft"]
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}'",
        output_format="list",
    )
    program = mlflow.pytorch.load_model(models[0].model_uri)
    tokens = torch.arange(3, 10, dtype=torch.long).view(1, 7)  # not the logged example's length
    logits = program(tokens)
    assert logits.shape == (1, 7, 512)
    # The logged program is the stage's published model: the same logits as the eager one
    # (one export of the same FP32 graph; the tolerance is FP32 reordering's, not a gate).
    from pipeline.eval.models import load_model

    eager, _ = load_model(repo / "outputs" / "sft" / "model")
    with torch.no_grad():
        expected = eager.set_moe_dispatch("gather")(tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_second_repro_is_a_noop_and_metrics_show(repo, mlflow_client):
    # Correctness only: how long the no-op takes is not this test's business (sh's
    # timeout catches a hang). `make repro` asks DVC first and starts nothing.
    exp_id = mlflow_client.get_experiment_by_name("mobilemoe").experiment_id
    runs_before = len(mlflow_client.search_runs([exp_id]))
    proc = sh(repo, "make", "repro")
    assert "every stage: up to date (dvc status); nothing to run" in proc.stdout, proc.stdout
    assert "Ray" not in proc.stdout + proc.stderr, proc.stderr[-2000:]  # no Ray started or joined
    assert len(mlflow_client.search_runs([exp_id])) == runs_before  # no parent run for nothing
    proc = sh(repo, ".venv/bin/dvc", "repro")
    assert "Data and pipelines are up to date" in proc.stdout, proc.stdout
    shown = sh(repo, ".venv/bin/dvc", "metrics", "show").stdout
    for stage in (*TRAIN_STAGES, "qat"):
        assert f"outputs/{stage}/metrics.json" in shown
    assert "val_loss" in shown


def test_driver_log_has_one_line_per_event_and_a_progress_bar(repo, mlflow_client):
    log = (repo / "repro.log").read_text()
    # Ray Train's print patch used to duplicate every worker line in the driver's log.
    # once per training job: three stages, then QAT and its control
    assert sum("step 6: loss=" in line for line in log.splitlines()) == 5, log[-3000:]
    assert "Failed to query Ray Train Controller actor state" not in log
    assert "Failed to load" not in log  # torchao's CUDA-only kernels on a CPU machine
    for stage in (*TRAIN_STAGES, "qat", "qat-control"):
        assert re.search(rf"{stage}: 100%\|[#]+\| 6/6 ", log), stage
    exp = mlflow_client.get_experiment_by_name("mobilemoe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on training runs


def _outputs_snapshot(repo: Path) -> dict[str, bytes]:
    roots = [repo / "data" / "mix", *(repo / "outputs" / stage for stage in (*TRAIN_STAGES, "qat"))]
    return {str(p.relative_to(repo)): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_bad_config_leaves_every_earlier_output_byte_identical(repo, mlflow_client):
    before = _outputs_snapshot(repo)
    runs_before = len(mlflow_client.search_runs([mlflow_client.get_experiment_by_name("mobilemoe").experiment_id]))
    conf = repo / "conf" / "stage" / "midtrain.yaml"
    original = conf.read_text()
    conf.write_text(original.replace("lr: 1.0e-3", "lr: -1.0e-3"))
    assert "lr: -1.0e-3" in conf.read_text()
    try:
        # make validates the whole config before DVC touches anything.
        proc = sh(repo, "make", "repro", check=False)
        assert proc.returncode != 0
        assert "stage.midtrain.schedule.lr: must be > 0" in proc.stderr, proc.stderr[-2000:]
        assert "Running stage" not in proc.stdout
        assert _outputs_snapshot(repo) == before
        # Plain `dvc repro` on a bad params.yaml runs the stage, which refuses the config;
        # the outputs are `persist: true`, so DVC did not delete them first.
        params = repo / "params.yaml"
        params.write_text(params.read_text().replace("lr: 0.001", "lr: -0.001", 1))  # midtrain's
        proc = sh(repo, ".venv/bin/dvc", "repro", check=False)
        assert proc.returncode != 0
        assert "stage.midtrain.schedule.lr: must be > 0" in proc.stdout + proc.stderr
        assert _outputs_snapshot(repo) == before
    finally:
        conf.write_text(original)
        # params.yaml was edited by hand above: make refuses to overwrite it unless told.
        assert "params.yaml was edited by hand" in sh(repo, "make", "params", check=False).stderr
        sh(repo, "make", "params", "FORCE=1")
    assert "Data and pipelines are up to date" in sh(repo, ".venv/bin/dvc", "status").stdout
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("mobilemoe").experiment_id])
    assert len(runs) == runs_before  # stopped before any tracking run opened


def test_dvc_exp_run_with_hydra_override_reruns_only_what_changed(repo):
    # The report's title: DVC's Hydra composition rewrites params.yaml and only the report
    # re-runs; the experiment table carries the new value beside every stage's metrics.
    proc = sh(repo, ".venv/bin/dvc", "exp", "run", "-S", "stage.report.title=Micro recipe", timeout=900)
    assert re.findall(r"Running stage '([^']+)'", proc.stdout) == ["report"], proc.stdout[-3000:]
    assert (repo / "outputs" / "report" / "report.md").read_text().startswith("# Micro recipe")
    import csv

    rows = list(csv.DictReader(sh(repo, ".venv/bin/dvc", "exp", "show", "--csv").stdout.splitlines()))
    experiments = [r for r in rows if r["Experiment"]]  # named experiment rows
    assert experiments, rows
    assert experiments[-1]["stage.report.title"] == "Micro recipe"
    sft = json.loads((repo / "outputs" / "eval" / "sft" / "metrics.json").read_text())
    column = next(c for c in experiments[-1] if c.endswith("centred_acc") and "sft" in c)
    assert float(experiments[-1][column]) == pytest.approx(sft["centred_acc"])
    column = next(c for c in experiments[-1] if c.endswith("loss_qat_int4"))
    assert float(experiments[-1][column]) > 0


def test_mlflow_ui_serves_the_runs(repo):
    import urllib.request

    with mlflow_server(
        repo / ".venv" / "bin" / "mlflow", f"sqlite:///{repo / 'mlflow.db'}", env=_env(repo), cwd=repo
    ) as url:
        req = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=mobilemoe")
        with urllib.request.urlopen(req, timeout=30) as r:
            exp = json.loads(r.read())["experiment"]
        body = json.dumps({"experiment_ids": [exp["experiment_id"]], "max_results": 100}).encode()
        req = urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            names = {run["info"]["run_name"] for run in json.loads(r.read())["runs"]}
        assert {"recipe", "mix", "pretrain", "midtrain", "sft"} <= names
