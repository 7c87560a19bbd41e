"""``make drill``: interrupt a training stage the way operators do, and check recovery.

In a scratch git+DVC copy of this repository (micro preset by default):

1. ``make repro`` once, uninterrupted: the reference result;
2. by hand: start the stage, SIGKILL its whole session (driver, Ray, workers) at a
   random step once a checkpoint is registered, corrupt the newest registered checkpoint,
   rerun: the stage must fall back to an intact checkpoint (or start over) and say so;
3. under DVC: ``make <stage> DVC_FLAGS="--force --single-item"``, SIGKILL it at a random
   step, rerun the same command;

then check: the final weights equal the reference's bit for bit, ``dvc status`` of the
stage and its upstream is clean, ``dvc.lock`` is unchanged (the outputs are a function of
the inputs), no MLflow run is
left RUNNING, each interrupted stage execution is one MLflow run with ``resumes == 1``,
and no Ray run folder is left behind. Exit code 0 when every check holds.

``python -m tools.drill --help`` lists the options; the test suite runs the same checks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tools.scratch import REPO_ROOT, copy_repo


def env_for(repo: Path, ray_tmpdir: str) -> dict:
    """The environment of a shell in ``repo`` with its venv active, isolated from the
    caller's tracking server, parent run, Ray cluster and Ray session files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "MOBILEMOE_", "RAY_ADDRESS"))}
    env.update(
        PATH=f"{repo / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(repo),
        RAY_TMPDIR=ray_tmpdir,
        GIT_AUTHOR_NAME="drill",
        GIT_AUTHOR_EMAIL="drill@example.com",
        GIT_COMMITTER_NAME="drill",
        GIT_COMMITTER_EMAIL="drill@example.com",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def run(repo: Path, env: dict, *cmd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise DrillError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


class DrillError(AssertionError):
    """A check of the drill did not hold."""


def scratch_copy(dest: Path, env: dict, experiment: str = "micro") -> Path:
    """A git+DVC copy of this repository (tracked and untracked files, no outputs) whose
    default experiment is ``experiment``, sharing this repository's venv."""
    copy_repo(dest)
    (dest / ".venv").symlink_to(REPO_ROOT / ".venv")
    config = dest / "conf" / "config.yaml"
    config.write_text(config.read_text().replace("  - experiment: null", f"  - experiment: {experiment}"))
    run(dest, env, "make", "params")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch copy"]):
        run(dest, env, *cmd)
    return dest


def registered_checkpoints(storage: Path, stage: str) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint Ray Train has recorded for ``stage``'s runs."""
    found = []
    for run_dir in storage.glob(f"{stage}-*"):
        try:
            state = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            continue  # absent or caught mid-write
        for result in state.get("checkpoint_results", []):
            found.append((int(result["metrics"]["step"]), run_dir / result["checkpoint_dir_name"]))
    return sorted(found)


def weights_digest(checkpoint: Path) -> str:
    from pipeline.hashing import sha256_file

    return sha256_file(checkpoint / "model.safetensors")


@dataclass
class Interrupted:
    killed_after_step: int  # the last step the worker had reported when the kill landed
    registered: list[int]
    output: str


def run_and_kill(
    repo: Path, env: dict, cmd: list[str], stage: str, kill_step: int, timeout: float = 600
) -> Interrupted:
    """Start ``cmd`` in its own session, wait for the worker's ``step <kill_step>:`` line and
    for at least one registered checkpoint, then SIGKILL every process of the session."""
    proc = subprocess.Popen(
        cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if f"step {kill_step}:" in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while not (seen.is_set() and registered_checkpoints(repo / "checkpoints", stage)):
            if proc.poll() is not None:
                raise DrillError(
                    f"{' '.join(cmd)} ended ({proc.returncode}) before step {kill_step}:\n" + "".join(lines[-60:])
                )
            if time.monotonic() > deadline:
                raise DrillError(f"gave up after {timeout:.0f}s waiting for step {kill_step} and a checkpoint")
            time.sleep(0.05)
    finally:
        kill_session(proc.pid)  # the driver, its Ray and every worker: a crash, not a shutdown
        proc.wait(timeout=60)
        reader.join(timeout=10)
    steps = [int(m.group(1)) for line in lines for m in [re.search(r"step (\d+): ", line)] if m]
    registered = [s for s, _ in registered_checkpoints(repo / "checkpoints", stage)]
    return Interrupted(max(steps, default=0), registered, "".join(lines))


def session_members(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid``. Ray starts its actor and worker
    processes in process groups of their own, so a process *group* kill misses them;
    they stay in the session of the process that started Ray."""
    import psutil

    members = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def kill_session(sid: int, sig: int = signal.SIGKILL, timeout: float = 60) -> None:
    """Send ``sig`` to every process of session ``sid`` until none is left."""
    deadline = time.monotonic() + timeout
    while members := session_members(sid):
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise DrillError(f"session {sid} still has live processes {members} {timeout:.0f}s after signal {sig}")
        time.sleep(0.1)


def corrupt_newest(repo: Path, stage: str) -> Path:
    """Flip one byte inside the weights of the newest registered checkpoint (size kept)."""
    _step, folder = registered_checkpoints(repo / "checkpoints", stage)[-1]
    target = folder / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


@dataclass
class DrillReport:
    stage: str
    seed: int
    steps: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.notes.append(text)
        print(f"drill: {text}", flush=True)


def drill(repo: Path, env: dict, stage: str = "pretrain", seed: int | None = None, by_hand: bool = True) -> DrillReport:
    """Run the drill in ``repo`` (a scratch copy where ``make repro`` has completed).

    ``by_hand=False`` runs the DVC phase alone and corrupts the checkpoint there: every
    property in half the time (the test suite's choice; a stage killed and resumed by
    hand is also tested on its own there)."""
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    report = DrillReport(stage, seed)
    report.say(f"seed {seed} (python -m tools.drill --seed {seed} repeats these kill points)")
    params = json.loads(
        run(
            repo, env, sys.executable, "-c", "import json, yaml; print(json.dumps(yaml.safe_load(open('params.yaml'))))"
        ).stdout
    )
    total = params["stage"][stage]["schedule"]["total_steps"]
    if total < 3:
        raise DrillError(f"stage.{stage}.schedule.total_steps={total}: the drill needs at least 3 steps")
    reference = weights_digest(repo / "outputs" / stage / "model")
    lock = (repo / "dvc.lock").read_text()
    started_ms = int(time.time() * 1000)

    # 1. By hand, with a corrupted checkpoint.
    if by_hand:
        step = rng.randrange(2, total)
        cut = run_and_kill(repo, env, [sys.executable, "-m", "pipeline.stages", stage], stage, step)
        damaged = corrupt_newest(repo, stage)
        report.say(
            f"by hand: killed after step {cut.killed_after_step} (registered checkpoints at steps {cut.registered}); "
            f"corrupted {damaged.relative_to(repo)}"
        )
        rerun = run(repo, env, sys.executable, "-m", "pipeline.stages", stage)
        _said_how_it_resumed(rerun, report, "by hand")
        _check_result(repo, env, stage, reference, lock, report, "by hand")

    # 2. Under DVC, through make (with the corrupted checkpoint when there was no phase 1).
    step = rng.randrange(2, total)
    make = ["make", stage, "DVC_FLAGS=--force --single-item"]
    cut = run_and_kill(repo, env, make, stage, step)
    report.say(
        f"under dvc repro: killed after step {cut.killed_after_step} (registered checkpoints at steps {cut.registered})"
    )
    if not by_hand:
        report.say(f"under dvc repro: corrupted {corrupt_newest(repo, stage).relative_to(repo)}")
    rerun = run(repo, env, *make)
    if not by_hand:
        _said_how_it_resumed(rerun, report, "under dvc repro")
    _check_result(repo, env, stage, reference, lock, report, "under dvc repro")

    _check_tracking(repo, stage, report, started_ms, interrupted=2 if by_hand else 1)
    left = list((repo / "checkpoints").glob(f"{stage}-*"))
    if left:
        raise DrillError(f"Ray run folders left behind: {left}")
    report.say("every check held")
    return report


def _check_result(
    repo: Path, env: dict, stage: str, reference: str, lock: str, report: DrillReport, phase: str
) -> None:
    got = weights_digest(repo / "outputs" / stage / "model")
    if got != reference:
        raise DrillError(f"{phase}: final weights differ from the uninterrupted run's ({got} vs {reference})")
    # The stage and its upstream (a copy may not have run the stages downstream).
    status = run(repo, env, "dvc", "status", "--with-deps", stage).stdout
    if "Data and pipelines are up to date" not in status:
        raise DrillError(f"{phase}: dvc status {stage} is not clean:\n{status}")
    if (repo / "dvc.lock").read_text() != lock:
        raise DrillError(f"{phase}: dvc.lock changed although the inputs did not")
    report.say(f"{phase}: weights equal the uninterrupted run's; dvc status clean; dvc.lock unchanged")


def _said_how_it_resumed(rerun: subprocess.CompletedProcess, report: DrillReport, phase: str) -> None:
    said = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "resume:" in line]
    if not said:
        raise DrillError(
            f"{phase}: the rerun did not say how it handled the corrupted checkpoint:\n{rerun.stdout[-3000:]}"
        )
    report.say(f"{phase}: rerun said " + " / ".join(s.split("resume:", 1)[1].strip() for s in said))


def _check_tracking(repo: Path, stage: str, report: DrillReport, since_ms: int, interrupted: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mobilemoe")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    running = [(r.info.run_name, r.info.run_id) for r in runs if r.info.status == "RUNNING"]
    if running:
        raise DrillError(f"MLflow runs left RUNNING: {running}")
    stage_runs = [r for r in runs if r.data.tags.get("stage") == stage and r.info.start_time >= since_ms]
    resumed = sorted(r.data.tags.get("resumes") for r in stage_runs)
    # The drill's interrupted executions: each is one run, continued once.
    if resumed != ["1"] * interrupted or any(r.info.status != "FINISHED" for r in stage_runs):
        raise DrillError(
            f"expected {interrupted} {stage} run(s) since the drill started (each resumed once), all FINISHED; got "
            f"{[(r.info.status, r.data.tags.get('resumes')) for r in stage_runs]}"
        )
    report.say(f"MLflow: no run left RUNNING; {stage} shows one run per execution (resumes {resumed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.drill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default="pretrain", choices=["pretrain", "midtrain", "sft"])
    parser.add_argument("--seed", type=int, default=None, help="kill points (printed when chosen at random)")
    parser.add_argument("--experiment", default="micro", help="the preset the scratch copy runs")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy (its path is printed)")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="mobilemoe-drill-"))
    ray_tmp = tempfile.mkdtemp(prefix="ray-drill-", dir="/tmp")
    env = env_for(scratch / "repo", ray_tmp)
    try:
        repo = scratch_copy(scratch / "repo", env, args.experiment)
        print(f"drill: scratch copy {repo}; make repro (the uninterrupted reference) ...", flush=True)
        run(repo, env, "make", "repro", timeout=3600)
        drill(repo, env, args.stage, args.seed)
    except DrillError as err:
        print(f"drill FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if args.keep:
            print(f"drill: kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
