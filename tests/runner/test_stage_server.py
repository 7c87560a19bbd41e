"""The recipe's stage server: a stage run through it is the process DVC started in all
but its pid (streams, directory, environment, argv, exit status, signals, death with
its client), and it refuses what it must not run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.recipe import REPO_ROOT
from pipeline.runner import stage_server
from pipeline.runner.stage_server import SERVER_ENV

PROBE = REPO_ROOT / "tests" / "stage_probe.py"
# The server, with the probe in place of pipeline.stages' main (what a forked child runs),
# and an "import" that sets a variable of the kind read at process start.
SERVER = (
    "import os, sys, stage_probe; from pipeline.runner import stage_server; "
    "warm = lambda: os.environ.update(KMP_PROBE='set by an import'); "
    "sys.exit(stage_probe.main() if stage_server.serve(sys.argv[1], os.getppid(), warm) else 0)"
)
# A stage process started by DVC, reduced to the client.
CLIENT = (
    "import sys; from pipeline.runner.stage_server import request; "
    "code = request(sys.argv[1], ['pipeline/stages/__main__.py', *sys.argv[2:]]); "
    "sys.exit(99 if code is None else code)"
)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", **extra}


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    address = str(tmp_path_factory.mktemp("srv", numbered=True) / "s")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, address], cwd=REPO_ROOT, env=_env())
    assert stage_server._bound(address, proc)
    yield address
    proc.terminate()
    proc.wait(timeout=10)


def _client(address: str, *argv: str, cwd: Path = REPO_ROOT, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, address, *argv],
        cwd=cwd,
        env=_env(**extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_stage_run_by_the_server_has_the_clients_streams_directory_environment_and_exit_code(server):
    proc = _client(server, "show", "first", "3", PROBE="a", **{SERVER_ENV: server})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # the stage's exit code is the client's
    seen = json.loads(out.splitlines()[0])
    assert seen["argv"] == ["pipeline/stages/__main__.py", "show", "first", "3"]
    assert seen["cwd"] == str(REPO_ROOT) and seen["probe"] == "a"
    assert seen["imported"] == "set by an import"  # as the client's own imports would have set it
    assert seen["pid"] != proc.pid  # run by the server's child, not by the client ...
    assert seen["server"] is None  # ... which does not hand the server on to what it starts
    assert "stderr of first" in err  # both streams are the client's own
    assert out.splitlines()[-1] == "atexit ran"  # the interpreter's normal exit
    # A second stage: another child, with fresh random state (not a copy of the server's).
    again = _client(server, "show", "second", "0")
    out2, _ = again.communicate(timeout=60)
    assert again.returncode == 0
    second = json.loads(out2.splitlines()[0])
    assert second["pid"] != seen["pid"] and second["random"] != seen["random"]


def _waiting(server: str, tmp_path: Path) -> tuple[subprocess.Popen, int]:
    pidfile = tmp_path / "pid"
    proc = _client(server, "wait", str(pidfile))
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    return proc, int(pidfile.read_text())


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_client_reaches_the_stage_and_the_client_ends_as_the_stage_did(server, tmp_path, signum):
    proc, child = _waiting(server, tmp_path)
    proc.send_signal(signum)  # as DVC's process group gets it
    out, err = proc.communicate(timeout=30)
    assert _gone(child)
    if signum == signal.SIGINT:
        # The stage handled it (KeyboardInterrupt, its cleanup ran) and exited with the
        # code a process that imported Ray exits with (1: Ray's import keeps Python from
        # ending by the signal itself), which the client passes on.
        assert "interrupted" in out and "KeyboardInterrupt" in err
        assert proc.returncode == 1
    else:  # no handler: the stage died of the signal, and so does the client
        assert "interrupted" not in out
        assert proc.returncode == -signum


def test_the_stage_dies_with_its_client(server, tmp_path):
    proc, child = _waiting(server, tmp_path)
    proc.kill()  # a SIGKILL to DVC's group: nothing is passed on
    proc.wait(timeout=10)
    assert _gone(child)
    # The server goes on serving.
    after = _client(server, "show", "after", "0")
    assert after.wait(timeout=60) == 0


def test_the_server_refuses_another_directory_start_time_variables_and_changed_code(server, tmp_path):
    proc = _client(server, "show", "elsewhere", "0", cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 99 and out == ""  # refused: the caller runs the stage itself
    assert f"the stage runs in {tmp_path}" in err and "running the stage in this process" in err
    proc = _client(server, "show", "threads", "0", OMP_NUM_THREADS="1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 99 and "the stage's OMP_NUM_THREADS is not the server's" in err
    mtime = PROBE.stat().st_mtime_ns
    os.utime(PROBE, ns=(mtime, mtime + 1_000_000))  # a loaded module of the repo changed on disk
    try:
        proc = _client(server, "show", "changed", "0")
        out, err = proc.communicate(timeout=60)
    finally:
        os.utime(PROBE, ns=(mtime, mtime))
    assert proc.returncode == 99 and "tests/stage_probe.py changed since the server started" in err


def test_an_unreachable_server_is_named_and_the_caller_runs_the_stage(tmp_path):
    code = stage_server.request(str(tmp_path / "none"), ["x", "show"])
    assert code is None


def test_the_server_stops_by_pid_with_its_owner_and_when_its_owner_is_gone(tmp_path):
    with stage_server.running(_env()) as env:
        address = env[SERVER_ENV]
        (server,) = [p for p in psutil.Process().children() if address in p.cmdline()]
        assert Path(address).parent.stat().st_mode & 0o077 == 0  # the socket's folder: this user only
    assert _gone(server.pid) and not Path(address).parent.exists()
    with stage_server.running(_env(), enabled=False) as env:  # MOBILEMOE_NO_STAGE_SERVER
        assert env == {} and not [p for p in psutil.Process().children() if "pipeline.stages" in p.cmdline()]
    # Its owner killed without a chance to stop it: the server sees it and ends.
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-m', 'pipeline.stages', 'serve', {str(tmp_path / 's')!r}, "
            "str(os.getpid())]); "
            "print(p.pid, flush=True); time.sleep(300)",
        ],
        cwd=REPO_ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(owner.stdout.readline())
    owner.kill()
    owner.wait()
    assert _gone(pid, within_s=60)  # its imports, then one poll of its parent
