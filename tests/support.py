"""What tests share to stay deterministic: waiting on events, private ports and services.

Rules this module enforces (see the flaky-suite issue): a test never asserts a timing;
every wait waits on the event itself with a generous deadline and says what it waited
for when it gives up; every process a test starts runs in its own session and is
stopped with its whole session even when the test fails; ports are picked free.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from tools.drill import DrillError, kill_session

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T],
    what: str,
    timeout: float = 300.0,
    interval: float = 0.2,
    alive: subprocess.Popen | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy and return that.

    ``what`` names the event in the failure message. When ``alive`` is given, a process
    that exits first ends the wait at once (with its exit code) instead of at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"process {alive.pid} exited with {alive.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (callers retry if it is taken)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_session(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop ``proc`` (started with ``start_new_session``) and everything in its session:
    SIGTERM, then SIGKILL whatever is left after ``grace`` seconds; reap ``proc``.

    The session, not the process group: Ray puts its actor and worker processes in
    groups of their own."""
    try:
        kill_session(proc.pid, signal.SIGTERM, timeout=grace)
    except DrillError:
        kill_session(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def crash_session(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc``'s whole session at once (a crash, not a shutdown) and wait until
    every member is gone, so nothing of it still writes when the test goes on."""
    kill_session(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@contextmanager
def started(args: list[str], **popen) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen`` in a new session, stopped by its group id on exit."""
    proc = subprocess.Popen(args, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        stop_session(proc)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def server_on_free_port(
    what: str,
    command: Callable[[int], list[str]],
    health: Callable[[int], str],
    env: dict,
    cwd: Path | None = None,
    timeout: float = 180.0,
) -> Iterator[int]:
    """A server (``command(port)``) on a free loopback port, stopped by PID; yields the
    port once ``health(port)`` (a URL) answers 200.

    A port taken between :func:`free_port` and the server's bind makes the server exit;
    that start is retried on another port (up to three times). A server that stays up
    without answering fails, with the end of its log."""
    for _attempt in range(3):
        port = free_port()
        log = tempfile.TemporaryFile()
        with started(command(port), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT) as server:
            try:
                wait_for(
                    lambda url=health(port): _healthy(url),
                    f"{what} on 127.0.0.1:{port} to answer {health(port)}",
                    timeout=timeout,
                    interval=0.2,
                    alive=server,
                )
            except AssertionError:
                if server.poll() is not None:  # exited (port taken?): try another port
                    continue
                log.seek(0)
                raise AssertionError(
                    f"{what} on 127.0.0.1:{port} never answered:\n{log.read()[-3000:].decode()}"
                ) from None
            yield port
            return
    raise AssertionError(f"{what} exited at start on three free ports in a row")


@contextmanager
def mlflow_server(
    mlflow_bin: Path,
    backend_uri: str,
    env: dict | None = None,
    cwd: Path | None = None,
    extra_args: tuple[str, ...] = (),
) -> Iterator[str]:
    """An ``mlflow server`` on a free loopback port (:func:`server_on_free_port`); yields
    its URL."""
    env = {**(env or os.environ), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def command(port: int) -> list[str]:
        return [str(mlflow_bin), "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
                "--port", str(port), "--workers", "1", *extra_args]  # fmt: skip

    with server_on_free_port(
        "mlflow server", command, lambda port: f"http://127.0.0.1:{port}/health", env, cwd
    ) as port:
        yield f"http://127.0.0.1:{port}"


# The requests moto serves before it starts authenticating (IAM user, its key, its
# policy, the bucket): everything after must be signed with the user's key.
_S3_SETUP_REQUESTS = 4


@contextmanager
def s3_server(moto_bin: Path, bucket: str, env: dict | None = None) -> Iterator[dict]:
    """An S3 API (moto's server mode) on a free loopback port, stopped by PID.

    IAM authentication is on: the server creates a user with an S3 policy and an access
    key, and the bucket, in its first requests; afterwards a request signed with any
    other key is refused. Yields ``{"endpoint": "127.0.0.1:PORT", "bucket", "env"}``,
    where ``env`` holds the user's credentials as the AWS SDK reads them from the
    environment (and the region), and ``uri(path)`` the ``s3://`` URI pyarrow and Ray
    Train take, with the endpoint in its query."""
    import boto3

    env = {**(env or os.environ), "INITIAL_NO_AUTH_ACTION_COUNT": str(_S3_SETUP_REQUESTS)}
    with server_on_free_port(
        "moto server",
        lambda port: [str(moto_bin), "-H", "127.0.0.1", "-p", str(port)],
        lambda port: f"http://127.0.0.1:{port}/moto-api/",
        env,
        timeout=60,
    ) as port:
        endpoint = f"127.0.0.1:{port}"
        setup = {"endpoint_url": f"http://{endpoint}", "region_name": "us-east-1"}
        setup |= {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="recipe")
        key = iam.create_access_key(UserName="recipe")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="recipe", PolicyName="s3", PolicyDocument=json.dumps(policy))
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
        yield {
            "endpoint": endpoint,
            "bucket": bucket,
            "env": {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            },
            "uri": lambda path: f"s3://{bucket}/{path}?endpoint_override={endpoint}&scheme=http",
        }


class ListenerWatch:
    """Every TCP/UDP listening socket opened by a process tree while it runs.

    A thread polls (every ``interval`` s) the listening sockets of ``pid`` and all its
    descendants, with psutil, and keeps ``(process name, address, port)``. Short-lived
    listeners between two polls can be missed; Ray's (GCS, raylet, workers) and the
    rendezvous store live for a whole stage."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.seen: set[tuple[str, str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> ListenerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                            self.seen.add((proc.name(), conn.laddr.ip, conn.laddr.port))
                except psutil.Error:  # gone between the listing and the look
                    continue
            self._stop.wait(self.interval)

    def beyond_loopback(self) -> list[tuple[str, str, int]]:
        """The listeners seen on any address that is not loopback (127.0.0.0/8, ::1)."""
        import ipaddress

        def loopback(ip: str) -> bool:
            addr = ipaddress.ip_address(ip.split("%")[0])
            mapped = getattr(addr, "ipv4_mapped", None)
            return (mapped or addr).is_loopback

        return sorted(item for item in self.seen if not loopback(item[1]))


def ray_snapshot_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has *registered* for a run (the ones a rerun resumes from).

    A ``checkpoint_*`` directory appears in storage before Ray records it in the run's
    checkpoint-manager snapshot; only recorded ones are handed back by
    ``ray.train.get_checkpoint()``, so a test that interrupts a run waits for this list.
    """
    try:
        return registered_checkpoints((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except OSError:
        return []  # not written yet


def registered_checkpoints(snapshot: str) -> list[str]:
    """The checkpoint folder names in the text of a run's checkpoint-manager snapshot
    (see :func:`ray_snapshot_checkpoints`); [] for a snapshot caught mid-write."""
    try:
        state = json.loads(snapshot)
    except ValueError:
        return []
    if isinstance(state, str):  # Ray stores the pydantic JSON as a JSON string
        try:
            state = json.loads(state)
        except ValueError:
            return []
    return [str(r.get("checkpoint_dir_name")) for r in state.get("checkpoint_results", [])]


@pytest.fixture(autouse=True)
def ray_never_starts():
    """For a module that imports it: every case must stop before Ray (a started Ray would
    also leak into later tests)."""
    yield
    import ray

    assert not ray.is_initialized(), "the runner started Ray before rejecting the input"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: equal snapshots, untouched outputs."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class PrivateRayDir:
    """A test module's own Ray session directory (sockets, logs), so that nothing there
    sees or joins a Ray started by another test or by the user. Created on first use: a
    module that an xdist worker only imports leaves nothing behind. It sits in /tmp rather
    than under pytest's tmp_path: Unix socket paths must stay under 108 bytes."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._path: str | None = None

    @property
    def path(self) -> str:
        if self._path is None:
            self._path = tempfile.mkdtemp(prefix=self.prefix, dir="/tmp")
        return self._path

    def remove(self) -> None:
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None
