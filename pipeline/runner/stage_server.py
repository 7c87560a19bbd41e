"""A warm process that runs the recipe's stages (``python -m pipeline.stages serve SOCKET OWNER_PID``).

Every stage DVC runs is a fresh ``python -m pipeline.stages NAME`` process, and before
its work it imports torch, MLflow's SQL store, Ray and the stage modules: about 3.5 s on
2 cores, 13 times in a recipe. :mod:`pipeline.runner.recipe_ray` therefore starts this
server beside the recipe's Ray (``make repro``, ``make <stage>``). It imports those
modules once, runs nothing (no torch op, no Ray, no MLflow store: nothing a fork would
copy half-done) and waits on a Unix socket in a private directory. The stage process
DVC starts becomes a thin client (:func:`pipeline.runner.stage_client.request`): it sends its argv, interpreter,
working directory, environment and standard streams (the descriptors themselves,
``SCM_RIGHTS``); the server forks, and the child becomes that stage process in all but
its pid: the client's streams on fds 0-2 (stdout line-buffered on a terminal), its
directory, its environment (plus what the server's imports set there, as the client's
own imports would have), fresh random state (Python's and numpy's; the string-hash
seed stays the server's), default signal handlers; it runs ``python -m
pipeline.stages``'s ``main`` and ends through the interpreter's normal exit (threads
joined, ``atexit`` handlers run). Its exit status goes back to the client, which exits
the same way (by the same signal when the child died of one, SIGKILL included), so DVC
sees what it would have seen. The client passes SIGINT and SIGTERM on to the child (one
that comes before the child has set its handlers is held until it has; one that comes
before a refusal is raised again in the client, which then does not run the stage);
when the client dies (a SIGKILL to DVC's process group), the child sees its socket close
and kills itself with SIGKILL, as the group kill would have. The pattern is the one of
``multiprocessing``'s forkserver and of build systems' persistent workers.

The server refuses a request (and the client then runs the stage in its own process, as
without a server, saying why on stderr) when the client runs another interpreter or in
another directory than the server, or with another value of a variable read at process
start (:data:`_READ_AT_START`), or when a module of this repository the server imported
has changed on disk since its imports began: a child must run the code the client would
have run. The client does not ask when one of its fds 0-2 is closed (the socket would
take that number). An unreachable server, or one that fails before the stage starts, is
handled the same way: it speeds the recipe up and is never the reason a stage fails. It
serves one stage at a time (DVC runs them one after another); the child drops the
server's address from its environment, so nothing the stage starts asks the server while
it waits for that stage. It stops, removing its socket's folder, on SIGTERM (passed on to
a stage that runs then, whose end it still reports) and when its owner (the recipe's
runner, whose pid it is given) is no longer its parent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pipeline.runner.stage_client import HEADER, SERVER_ENV, kill_quietly

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
# Variables read when a process starts or a library loads (the interpreter, its locale,
# the C library, torch's OpenMP, MKL and OpenBLAS, Ray): a child has the server's
# reading of them, so they must be the client's too.
_READ_AT_START = (
    "PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "LANG", "LC_", "TZ",
    "OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "GOTO", "RAY_",
)  # fmt: skip
_PARENT_POLL_S = 1.0


class RefusedError(Exception):
    """The server will not run this request; the message says why."""


# ----------------------------------------------------------------------------- server


@dataclass
class _Warm:
    """What the server's requests are checked against and what its children inherit."""

    start_env: dict[str, str]  # the server's environment before its imports
    imported_env: dict[str, str | None]  # what its imports set (None: removed)
    modules: dict[str, int]  # {file: mtime_ns} of the repository's modules it imported
    since_ns: int  # when its imports began (a file changed after that may not be what it holds)

    def why_not(self, job: dict) -> str | None:
        """Why the server must not run ``job`` (None when it may)."""
        if job.get("executable") != sys.executable:
            return f"the stage's interpreter {job.get('executable')} is not the server's {sys.executable}"
        if job["cwd"] != os.getcwd():
            return f"the stage runs in {job['cwd']}, the server in {os.getcwd()}"
        for name in sorted(set(job["env"]) | set(self.start_env)):
            if name.startswith(_READ_AT_START) and job["env"].get(name) != self.start_env.get(name):
                return f"the stage's {name} is not the server's (it is read when a process starts)"
        for path, mtime in self.modules.items():
            try:
                now = os.stat(path).st_mtime_ns
            except OSError:
                now = None
            if now != mtime or now >= self.since_ns:
                return f"{os.path.relpath(path, REPO_ROOT)} changed since the server started"
        return None

    def environment(self, client_env: Mapping[str, str]) -> dict[str, str]:
        """The child's environment: the client's, plus what the server's imports set
        where the client had the server's own value (its own imports would have set the
        same); a value the client set otherwise stays the client's."""
        env = {k: v for k, v in client_env.items() if k != SERVER_ENV}
        for name, value in self.imported_env.items():
            if client_env.get(name) != self.start_env.get(name):
                continue
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


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


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """The request: its header and the client's three stream fds (closed again here when
    the request is bad). RefusedError, OSError or ValueError for a bad one."""
    data, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    try:
        if len(data) != HEADER.size or len(fds) != 3:
            raise RefusedError("malformed request")
        (size,) = HEADER.unpack(data)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise RefusedError("request cut short")
            body += chunk
        return json.loads(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _become(job: dict, fds: list[int], conn: socket.socket, warm: _Warm) -> None:
    """In the forked child: take the client's streams, directory, environment
    (:meth:`_Warm.environment`) and argv, reseed what a fresh interpreter seeds (Python's
    and numpy's random state; not the string-hash seed, fixed when the server started),
    restore default signal handling, and die with the client."""
    import random
    import threading

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(job["cwd"])
    env = warm.environment(job["env"])
    os.environ.clear()
    os.environ.update(env)
    sys.argv = list(job["argv"])
    # As a fresh interpreter sets up stdout: line-buffered on a terminal, unbuffered with -u.
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=bool(os.environ.get("PYTHONUNBUFFERED")))
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
    this one) is this one's parent and no SIGTERM came (one that comes while a stage
    runs is passed on to it, and its end still reported). Returns True in a forked
    child, which must then run the stage (``sys.argv`` is the client's); False when the
    server stops, having removed ``address``'s folder."""
    start_env, since_ns = dict(os.environ), time.time_ns()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(8)  # clients wait in the backlog while the imports below run
    started = time.perf_counter()
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if warm is not None:
        warm()
    imported = {k: os.environ.get(k) for k in set(os.environ) | set(start_env) if os.environ.get(k) != start_env.get(k)}
    state = _Warm(start_env, imported, _repo_modules(), since_ns)
    running: list[int] = []
    stop: list[int] = []

    def on_term(signum, frame):  # noqa: ARG001 - the handler's signature
        stop.append(signum)
        for pid in running:
            kill_quietly(pid, signum)

    signal.signal(signal.SIGTERM, on_term)
    print(f"stage server: ready ({time.perf_counter() - started:.1f} s of imports, done once)", file=sys.stderr)
    listener.settimeout(_PARENT_POLL_S)
    while not stop and os.getppid() == owner:  # (an orphan's parent is another process)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        if _handle(conn, state, running):
            listener.close()
            return True
        conn.close()
    listener.close()
    shutil.rmtree(os.path.dirname(address), ignore_errors=True)
    return False


def _handle(conn: socket.socket, warm: _Warm, running: list[int]) -> bool:
    """Serve one request; True in the forked child (which keeps ``conn`` open: its
    closing is how the child learns that the client is gone). ``running`` holds the
    child's pid while it runs."""
    try:
        job, fds = _receive(conn)
    except (RefusedError, OSError, ValueError) as err:
        _reply(conn, {"refused": str(err)})
        return False
    reason = warm.why_not(job)
    if reason is not None:
        for fd in fds:
            os.close(fd)
        _reply(conn, {"refused": reason})
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _become(job, fds, conn, warm)
        os.close(ready_w)  # its handlers are set: a signal passed on now is not lost
        return True
    running.append(pid)
    for fd in (*fds, ready_w):
        os.close(fd)
    # A signal that reached the child before its handlers were set would be lost (the
    # interpreter clears those the moment it forks), so the client learns the pid, and
    # passes signals on, once the child says it is ready (or has died).
    os.read(ready_r, 1)
    os.close(ready_r)
    _reply(conn, {"pid": pid})
    _, status = os.waitpid(pid, 0)
    running.remove(pid)
    code = os.waitstatus_to_exitcode(status)
    _reply(conn, {"signal": -code} if code < 0 else {"exit": code})
    return False
