"""The recipe's stage server: a stage run through it is the process DVC started in all
but its pid (streams, directory, environment, argv, exit status, signals, death with
its client), and it refuses what it must not run."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.recipe import REPO_ROOT
from pipeline.runner import stage_client
from pipeline.runner.stage_client import SERVER_ENV

PROBE = REPO_ROOT / "tests" / "stage_probe.py"
SERVER_MODULE = REPO_ROOT / "pipeline" / "runner" / "stage_server.py"
# The server, with the probe in place of pipeline.stages' main (what a forked child runs),
# and an "import" that sets a variable.
SERVER = (
    "import os, sys, stage_probe; from pipeline.runner import stage_server; "
    "warm = lambda: os.environ.update(IMPORT_PROBE='set by an import'); "
    "sys.exit(stage_probe.main() if stage_server.serve(sys.argv[1], os.getppid(), warm) else 0)"
)
# A stage process started by DVC, reduced to the client.
CLIENT = (
    "import sys; from pipeline.runner.stage_client import request; "
    "code = request(sys.argv[1], ['pipeline/stages/__main__.py', *sys.argv[2:]]); "
    "sys.exit(99 if code is None else code)"
)
# A variable read at process start that the server and (unless a test drops it) its clients have.
START_VAR = {"OMP_PROBE": "1"}


def _env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}", **START_VAR, **extra}
    return {k: v for k, v in env.items() if k not in drop}


def _gone(pid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    address = str(tmp_path_factory.mktemp("srv", numbered=True) / "s")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, address], cwd=REPO_ROOT, env=_env(SERVER_ONLY="x"))
    assert stage_client._bound(address, proc)
    yield address
    proc.terminate()
    proc.wait(timeout=10)


def _client(address: str, *argv: str, cwd: Path = REPO_ROOT, drop: tuple[str, ...] = (), **kw) -> subprocess.Popen:
    streams = {"stdout": kw.pop("stdout", subprocess.PIPE), "stderr": subprocess.PIPE}
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, address, *argv], cwd=cwd, env=_env(drop, **kw), text=True, **streams
    )


def _shown(proc: subprocess.Popen, code: int) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    return json.loads(out.splitlines()[0])


def test_a_stage_run_by_the_server_has_the_clients_streams_directory_environment_and_exit_code(server):
    proc = _client(server, "show", "first", "3", PROBE="a", **{SERVER_ENV: server})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err  # the stage's exit code is the client's
    seen = json.loads(out.splitlines()[0])
    assert seen["argv"] == ["pipeline/stages/__main__.py", "show", "first", "3"]
    assert seen["cwd"] == str(REPO_ROOT)
    assert seen["env"] == {
        "PROBE": "a",  # the client's environment ...
        "IMPORT_PROBE": "set by an import",  # ... with what the server's imports set, as its own would have
        "SERVER_ONLY": None,  # ... and not the server's own
        SERVER_ENV: None,  # not handed on to what the stage starts
    }
    assert seen["pid"] != proc.pid and seen["sockets"] == 1  # a child of the server, holding only its client
    assert "stderr of first" in err  # both streams are the client's own
    assert out.splitlines()[-1] == "atexit ran"  # the interpreter's normal exit
    # A second stage: another child, with fresh random state (not a copy of the server's),
    # and a value the client set itself where the server's imports set another.
    second = _shown(_client(server, "show", "second", "0", IMPORT_PROBE="the client's"), 0)
    assert second["pid"] != seen["pid"]
    assert second["random"] != seen["random"] and second["numpy"] != seen["numpy"]
    assert second["env"]["IMPORT_PROBE"] == "the client's"


def test_the_stage_writes_to_a_terminal_line_by_line(server):
    """On a terminal, stdout is line-buffered, as a fresh interpreter's is (the server's own
    stdout is not a terminal)."""
    main, sub = pty.openpty()
    try:
        proc = _client(server, "show", "tty", "0", stdout=sub)
        os.close(sub)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        line = os.read(main, 65536).decode().splitlines()[0]
    finally:
        os.close(main)
    assert json.loads(line)["line_buffering"] is True


def _waiting(server: str, tmp_path: Path, **kw) -> tuple[subprocess.Popen, int]:
    pidfile = tmp_path / f"pid{len(list(tmp_path.iterdir()))}"
    proc = _client(server, "wait", str(pidfile), **kw)
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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_a_stage_that_dies_of_a_signal_ends_its_client_by_the_same_signal(server, signum):
    """SIGINT: the client's own handler is Python's (it must not raise KeyboardInterrupt
    instead); SIGKILL (the OOM killer): a signal whose handler cannot be set."""
    proc = _client(server, "die", str(int(signum)))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signum, err
    assert "Traceback" not in err  # the client ended by the signal, not by a KeyboardInterrupt of its own


def test_the_stage_dies_with_its_client(server, tmp_path):
    proc, child = _waiting(server, tmp_path)
    proc.kill()  # a SIGKILL to DVC's group: nothing is passed on
    proc.wait(timeout=10)
    assert _gone(child)
    after = _client(server, "show", "after", "0")  # the server goes on serving
    assert after.wait(timeout=60) == 0


def test_a_signal_before_the_stage_started_is_passed_on_or_raised_again(server, tmp_path):
    """While the server runs one stage, the next client waits; a SIGINT it gets then
    reaches its stage when that starts, or, when the server refuses it, the client
    itself (it must not go on to run the stage as if nothing had come)."""
    first, child = _waiting(server, tmp_path)
    queued = _client(server, "wait", str(tmp_path / "queued"))
    refused = _client(server, "show", "refused", "0", cwd=tmp_path)
    time.sleep(1.0)  # both wait in the backlog while the first stage runs
    queued.send_signal(signal.SIGINT)
    refused.send_signal(signal.SIGINT)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == -signal.SIGTERM and _gone(child)
    out, err = queued.communicate(timeout=60)  # its stage started and was interrupted at once
    assert queued.returncode == 1 and "KeyboardInterrupt" in err, (out, err)
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == -signal.SIGINT and out == "", err  # not 99: it did not run the stage


def test_the_server_refuses_another_interpreter_directory_start_time_variables_and_changed_code(server, tmp_path):
    def refused(proc: subprocess.Popen, said: str) -> None:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 99 and out == "", err  # refused: the caller runs the stage itself
        assert said in err and "running the stage in this process" in err

    refused(_client(server, "show", "elsewhere", "0", cwd=tmp_path), f"the stage runs in {tmp_path}")
    refused(_client(server, "show", "threads", "0", OMP_NUM_THREADS="1"), "the stage's OMP_NUM_THREADS is not")
    refused(_client(server, "show", "lacks", "0", drop=("OMP_PROBE",)), "the stage's OMP_PROBE is not the server's")
    link = tmp_path / "python"  # the same binary by another name is another interpreter to the server
    link.symlink_to(sys.executable)
    proc = subprocess.Popen([str(link), "-c", CLIENT, server, "show", "x", "0"], cwd=REPO_ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    refused(proc, "is not the server's")
    for module in (PROBE, SERVER_MODULE):  # a module of the repository the server imported changed on disk
        mtime = module.stat().st_mtime_ns
        os.utime(module, ns=(mtime, mtime + 1_000_000))
        try:
            refused(_client(server, "show", "changed", "0"), f"{module.relative_to(REPO_ROOT)} changed since")
        finally:
            os.utime(module, ns=(mtime, mtime))


def test_a_module_changed_while_the_server_imported_it_is_not_trusted(tmp_path):
    """A file whose modification time is not before the server's imports began may hold
    code the server did not load (edited during them): refused, though its time has not
    moved since."""
    mtime = PROBE.stat().st_mtime_ns
    os.utime(PROBE, ns=(mtime, time.time_ns() + 3600 * 10**9))
    address = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, address], cwd=REPO_ROOT, env=_env())
    try:
        assert stage_client._bound(address, proc)
        client = _client(address, "show", "x", "0")
        _, err = client.communicate(timeout=120)
        assert client.returncode == 99 and "tests/stage_probe.py changed since the server started" in err
    finally:
        os.utime(PROBE, ns=(mtime, mtime))
        proc.terminate()
        proc.wait(timeout=10)


def test_a_bad_request_is_refused_and_leaves_no_descriptor_of_it_in_the_server(server, tmp_path):
    read_end, write_end = os.pipe()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(server)
            socket.send_fds(sock, [stage_client.HEADER.pack(1000)], [write_end, write_end, write_end])
            sock.sendall(b"{")  # and no more: cut short
            sock.shutdown(socket.SHUT_WR)
            assert b"cut short" in sock.makefile("rb").readline()
        os.close(write_end)
        write_end = -1
        os.set_blocking(read_end, False)
        assert os.read(read_end, 1) == b""  # EOF: nobody holds the write end any more
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    assert _client(server, "show", "then", "0").wait(timeout=60) == 0


def test_an_unreachable_server_or_a_closed_stream_runs_the_stage_in_the_caller(server, tmp_path):
    assert stage_client.request(str(tmp_path / "none"), ["x", "show"]) is None
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server, "show", "x", "0"], cwd=REPO_ROOT, env=_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            pass_fds=(), preexec_fn=lambda: os.close(0))  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 99 and "fd 0 is closed" in err


def test_a_folder_left_by_a_killed_recipe_is_removed_by_the_next(tmp_path):
    """A server folder whose owner's pid is gone is removed; one whose owner lives (this
    process), or that is not a server folder, stays."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{stage_client.FOLDER_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{stage_client.FOLDER_PREFIX}{os.getpid()}-abc"
    other = tmp_path / f"{stage_client.FOLDER_PREFIX}x-abc"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "socket").write_text("")
    assert stage_client.remove_stale_folders(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and other.exists()


def test_the_server_stops_by_pid_with_its_owner_and_when_its_owner_is_gone(tmp_path):
    with stage_client.running(_env()) as env:
        address = env[SERVER_ENV]
        (server,) = [p for p in psutil.Process().children() if address in p.cmdline()]
        assert Path(address).parent.stat().st_mode & 0o077 == 0  # the socket's folder: this user only
    assert _gone(server.pid) and not Path(address).parent.exists()
    with stage_client.running(_env(), enabled=False) as env:  # MOBILEMOE_NO_STAGE_SERVER
        assert env == {} and not [p for p in psutil.Process().children() if "pipeline.stages" in p.cmdline()]
    # Its owner killed without a chance to stop it: the server sees it, ends, and removes its folder.
    (tmp_path / "srv").mkdir()
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time; "
            f"p = subprocess.Popen([sys.executable, '-m', 'pipeline.stages', 'serve', {str(tmp_path / 'srv' / 's')!r}, "
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
    assert not (tmp_path / "srv").exists()
