"""A warm process that runs the recipe's stages (``python -m pipeline.stages serve SOCKET OWNER_PID``).

Every stage DVC runs is a fresh ``python -m pipeline.stages NAME`` process, and before
its work it imports torch, MLflow's SQL store, Ray and the stage modules: about 3.5 s on
2 cores, 13 times in a recipe. :mod:`pipeline.runner.recipe_ray` therefore starts this
server beside the recipe's Ray (``make repro``, ``make <stage>``). It imports those
modules once, runs nothing (no torch op, no Ray, no MLflow store: nothing a fork would
copy half-done) and waits on a Unix socket in a private directory. The stage process
DVC starts becomes a thin client (:func:`request`): it sends its argv, working directory,
environment and standard streams (the descriptors themselves, ``SCM_RIGHTS``); the server
forks, and the child becomes that stage process in all but its pid: the client's streams
on fds 0-2, its directory, its environment, fresh random seeds, default signal
handlers; it runs ``python -m pipeline.stages``'s ``main`` and ends through the interpreter's
normal exit (threads joined, ``atexit`` handlers run). Its exit status goes back to the
client, which exits the same way (by the same signal when the child died of one), so
DVC sees what it would have seen. The client passes SIGINT and SIGTERM on to the child;
when the client dies (a SIGKILL to DVC's process group), the child sees its socket close
and kills itself with SIGKILL, as the group kill would have. The pattern is the one of
``multiprocessing``'s forkserver and of build systems' persistent workers.

The server refuses a request (and the client then runs the stage in its own process, as
without a server, saying why on stderr) when the client runs in another directory than
the server's, or with another value of a variable read at process start (``PYTHON*``,
``LD_*``, ``MALLOC_*``, OpenMP's and MKL's), or when a module of this repository the
server imported has changed on disk since: a child must run the code the client would
have run. An unreachable server is handled the same way: it speeds the recipe up and is
never the reason a stage fails. It serves one stage at a time (DVC runs them one after
another); the child drops the server's address from its environment, so nothing the
stage starts asks the server while it waits for that stage. It stops when its owner
(the recipe's runner, whose pid it is given) is no longer its parent.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

# The variable that tells ``python -m pipeline.stages`` where the server listens.
SERVER_ENV = "MOBILEMOE_STAGE_SERVER"
# Set (to anything) in make's environment: no server, every stage a process of its own.
OFF_ENV = "MOBILEMOE_NO_STAGE_SERVER"
REPO_ROOT = Path(__file__).resolve().parents[2]
# What a stage process imports before its work (the driver's side; its Ray workers are
# processes of their own): loaded once by the server.
PRELOAD = (
    "torch",
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "ray",
    "ray.train.torch",
)
# Variables read when a process starts (the interpreter, the C library, OpenMP and MKL
# when torch loads them): a child takes the server's, so they must be the client's too.
_READ_AT_START = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_", "GOMP_", "MKL_")
_HEADER = struct.Struct("!I")
_PARENT_POLL_S = 1.0


class RefusedError(Exception):
    """The server will not run this request; the message says why."""


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
    base = None if len(tempfile.gettempdir()) < 64 else "/tmp"  # a socket path has ~100 bytes
    directory = tempfile.mkdtemp(prefix="mobilemoe-stages-", dir=base)  # mode 0700: this user only
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
    as this process would: this process's directory, environment and fds 0-2.

    Returns the exit code to end with (a stage killed by signal N makes this process
    kill itself with N, so its parent sees the same; that call does not return), or None
    when the server is not reachable or refuses (the reason is printed on stderr, and
    the caller runs the stage itself)."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
    except OSError as err:
        print(f"stage server at {address} not reachable ({err}); running the stage in this process", file=sys.stderr)
        return None
    header = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    pid: list[int] = []
    pending: list[int] = []

    def relay(signum, frame):  # noqa: ARG001 - the handler's signature
        if pid:
            _kill(pid[0], signum)
        else:
            pending.append(signum)

    previous = {s: signal.signal(s, relay) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with sock, sock.makefile("rb") as replies:
            socket.send_fds(sock, [_HEADER.pack(len(header))], [0, 1, 2])
            sock.sendall(header)
            first = json.loads(replies.readline() or b"{}")
            if "refused" in first:
                print(f"stage server: {first['refused']}; running the stage in this process", file=sys.stderr)
                return None
            if "pid" not in first:
                print("stage server closed before starting the stage; running it in this process", file=sys.stderr)
                return None
            pid.append(first["pid"])
            for signum in pending:
                _kill(pid[0], signum)
            end = json.loads(replies.readline() or b"{}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "signal" in end:
        signal.signal(end["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), end["signal"])
    if "exit" not in end:  # the server died while the stage ran
        print(f"stage server lost while the stage ran (pid {pid[0]})", file=sys.stderr)
        return 1
    return end["exit"]


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # already gone
        pass


# ----------------------------------------------------------------------------- server


def _repo_modules() -> dict[str, int]:
    """{file: mtime_ns} of every loaded module that lives in this repository."""
    found = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(str(REPO_ROOT)) and "/.venv/" not in path:
            try:
                found[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
    return found


def _why_not(job: dict, loaded: dict[str, int], start_env: Mapping[str, str]) -> str | None:
    """Why the server must not run ``job`` (None when it may); ``start_env`` is the
    server's environment before its imports."""
    if job["cwd"] != os.getcwd():
        return f"the stage runs in {job['cwd']}, the server in {os.getcwd()}"
    for name in sorted(set(job["env"]) | set(start_env)):
        if name.startswith(_READ_AT_START) and job["env"].get(name) != start_env.get(name):
            return f"the stage's {name} is not the server's (it is read when a process starts)"
    for path, mtime in loaded.items():
        try:
            changed = os.stat(path).st_mtime_ns != mtime
        except OSError:
            changed = True
        if changed:
            return f"{os.path.relpath(path, REPO_ROOT)} changed since the server started"
    return None


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    if len(data) != _HEADER.size or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise RefusedError("malformed request")
    (size,) = _HEADER.unpack(data)
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise RefusedError("request cut short")
        body += chunk
    return json.loads(body), fds


def _become(job: dict, fds: list[int], conn: socket.socket, imported_env: Mapping[str, str | None]) -> None:
    """In the forked child: take the client's streams, directory, environment (with what
    the server's imports set in it, ``imported_env``, as the client's own imports would
    have) and argv, reseed what a fresh interpreter seeds, restore default signal
    handling, and die with the client."""
    import random
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update({k: v for k, v in job["env"].items() if k != SERVER_ENV})
    for name, value in imported_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    sys.argv = list(job["argv"])
    interactive = os.isatty(1)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout.reconfigure(line_buffering=interactive, write_through=unbuffered)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def watch() -> None:  # the client never writes again: EOF means it is gone
        try:
            gone = conn.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="stage-client-watch", daemon=True).start()


def _reply(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:  # the client is gone; the child's watch has seen it too
        pass


def serve(address: str, owner: int, warm: Callable[[], object] | None = None) -> bool:
    """Listen at ``address``, import :data:`PRELOAD` and call ``warm`` (the stages'
    own imports), then run requests while the process ``owner`` (the pid that started
    this one) is this one's parent. Returns True in a forked child, which must then run
    the stage (``sys.argv`` is the client's); False when the server stops."""
    start_env = dict(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)  # clients wait in the backlog while the imports below run
    started = time.perf_counter()
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if warm is not None:
        warm()
    # What the imports did to the environment, a client's process would have done too.
    imported_env = {
        k: os.environ.get(k) for k in set(os.environ) | set(start_env) if os.environ.get(k) != start_env.get(k)
    }
    loaded = _repo_modules()
    print(f"stage server: ready ({time.perf_counter() - started:.1f} s of imports, done once)", file=sys.stderr)
    listener.settimeout(_PARENT_POLL_S)
    while os.getppid() == owner:  # (an orphan's parent is another process)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if _handle(conn, loaded, start_env, imported_env):
            listener.close()
            return True
        conn.close()
    return False


def _handle(conn: socket.socket, loaded: dict[str, int], start_env: dict[str, str], imported_env: dict) -> bool:
    """Serve one request; True in the forked child (which keeps ``conn`` open: its
    closing is how the child learns that the client is gone)."""
    try:
        job, fds = _receive(conn)
    except (RefusedError, OSError, ValueError) as err:
        _reply(conn, {"refused": str(err)})
        return False
    reason = _why_not(job, loaded, start_env)
    if reason is not None:
        for fd in fds:
            os.close(fd)
        _reply(conn, {"refused": reason})
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _become(job, fds, conn, imported_env)
        return True
    for fd in fds:
        os.close(fd)
    _reply(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    _reply(conn, {"signal": -code} if code < 0 else {"exit": code})
    return False
