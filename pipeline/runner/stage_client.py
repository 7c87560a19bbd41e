"""The stage server's other side (pipeline/runner/stage_server.py): the client every
``python -m pipeline.stages NAME`` becomes inside ``make repro`` (:func:`request`), and the
owner that starts and stops the server (:func:`running`, used by
pipeline/runner/recipe_ray.py). Standard library only: a stage process imports this
before anything else, and the point is that it imports nothing heavy itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

# The variable that tells ``python -m pipeline.stages`` where the server listens.
SERVER_ENV = "MOBILEMOE_STAGE_SERVER"
# Set (to anything) in make's environment: no server, every stage a process of its own.
OFF_ENV = "MOBILEMOE_NO_STAGE_SERVER"
# The server's folder: FOLDER_PREFIX + the owner's pid + "-" + a random suffix.
FOLDER_PREFIX = "mobilemoe-stages-"
# A request: this header (the body's length) with the client's fds 0-2, then the body (JSON).
HEADER = struct.Struct("!I")


# ----------------------------------------------------------------------------- owner


@contextmanager
def running(env: Mapping[str, str], enabled: bool = True) -> Iterator[dict[str, str]]:
    """Start a server (environment ``env``, this directory) for the duration of the
    block; yields the variables that point ``python -m pipeline.stages`` at it. The
    server is a process group of its own (a Ctrl-C at the terminal reaches the stages
    through their clients only) and is stopped, by its PID, when the block ends. Not
    ``enabled`` (``MOBILEMOE_NO_STAGE_SERVER`` set, for a profiler that wants each stage
    as a process of its own): starts nothing, yields nothing."""
    if not enabled:
        yield {}
        return
    base = tempfile.gettempdir() if len(tempfile.gettempdir()) < 64 else "/tmp"  # a socket path has ~100 bytes
    remove_stale_folders(base)
    # mode 0700: this user only; named by this pid, so a later run can tell it is stale
    directory = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-", dir=base)
    address = os.path.join(directory, "socket")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.stages", "serve", address, str(os.getpid())],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        process_group=0,
    )
    try:
        yield {SERVER_ENV: address} if _bound(address, proc) else {}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


def remove_stale_folders(base: str) -> list[str]:
    """Remove this user's server folders in ``base`` whose owner (the pid in the name) is
    gone: what a recipe killed with SIGKILL, its server with it, left behind. Returns them."""
    removed = []
    for entry in os.scandir(base):
        owner = entry.name[len(FOLDER_PREFIX) :].split("-", 1)[0]
        if not entry.name.startswith(FOLDER_PREFIX) or not owner.isdigit():
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid() or not entry.is_dir(follow_symlinks=False):
                continue
            os.kill(int(owner), 0)
        except ProcessLookupError:  # the owner is gone
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
        except OSError:  # alive (another user's pid), or the entry went away
            continue
    return removed


def _bound(address: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """Wait until the server listens (it binds before its imports: a fraction of a
    second), so that no stage finds the socket missing. False, said on stderr, when the
    server ended or did not bind in time: the stages then run as processes of their own."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(address):
        if proc.poll() is not None or time.monotonic() > deadline:
            print(
                f"stage server did not start (exit code {proc.poll()}); stages run as processes of their own",
                file=sys.stderr,
            )
            return False
        time.sleep(0.01)
    return True


# ----------------------------------------------------------------------------- client


def request(address: str, argv: Sequence[str]) -> int | None:
    """Run ``python -m pipeline.stages`` with ``argv`` in the server at ``address``,
    as this process would: this process's interpreter, directory, environment and
    fds 0-2.

    Returns the exit code to end with (a stage killed by signal N makes this process
    kill itself with N, so its parent sees the same; that call does not return), or None
    when the server is not reachable, refuses, or fails before the stage started (the
    reason is printed on stderr, and the caller runs the stage itself). A SIGINT or
    SIGTERM that comes before the stage started is passed on to it, or, when the caller
    is to run the stage itself, raised again here."""
    closed = [fd for fd in (0, 1, 2) if not _is_open(fd)]
    if closed:  # the socket would take such a number, and the stage would hold it as a stream
        print(f"stage server not used: fd {closed[0]} is closed; running the stage in this process", file=sys.stderr)
        return None
    header = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "executable": sys.executable}
    body = json.dumps(header).encode()
    pid: list[int] = []
    pending: list[int] = []

    def relay(signum, frame):  # noqa: ARG001 - the handler's signature
        if pid:
            kill_quietly(pid[0], signum)
        else:
            pending.append(signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    end: dict = {}
    try:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(address)
        except OSError as err:
            print(
                f"stage server at {address} not reachable ({err}); running the stage in this process", file=sys.stderr
            )
            return None
        with sock, sock.makefile("rb") as replies:
            try:
                socket.send_fds(sock, [HEADER.pack(len(body))], [0, 1, 2])
                sock.sendall(body)
                first = json.loads(replies.readline() or b"{}")
            except (OSError, ValueError) as err:
                first = {"refused": f"no answer ({err})"}
            if "pid" not in first:
                said = first.get("refused", "closed before starting the stage")
                print(f"stage server: {said}; running the stage in this process", file=sys.stderr)
                return None
            pid.append(first["pid"])
            for signum in pending:
                kill_quietly(pid[0], signum)
            pending.clear()
            try:
                end = json.loads(replies.readline() or b"{}")
            except (OSError, ValueError):
                end = {}
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in pending:  # the stage never started: the caller gets the signal itself
            os.kill(os.getpid(), signum)
    if "signal" in end:
        _die_of(end["signal"])
    if "exit" not in end:  # the server died while the stage ran
        print(f"stage server lost while the stage ran (pid {pid[0]})", file=sys.stderr)
        return 1
    return end["exit"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _die_of(signum: int) -> None:
    """End this process by ``signum``, as the stage ended (no core file of this process
    for a stage's SIGSEGV or SIGABRT: the stage's own is the one that matters)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if signum not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be caught, nor reset
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # a signal whose default is not to end the process


def kill_quietly(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid``, if it still exists."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # already gone
        pass
