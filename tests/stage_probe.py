"""What the stage-server tests run in place of ``python -m pipeline.stages``'s main
(tests/runner/test_stage_server.py): ``sys.argv[1]`` says what to do."""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from pipeline.runner.stage_client import SERVER_ENV


def _sockets() -> int:
    """How many sockets this process holds open."""
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:  # the listing's own descriptor, closed by now
            continue
    return found


def main() -> None:
    what = sys.argv[1]
    if what == "show":  # show NAME CODE: what the process is, then exit with CODE
        import numpy as np

        seen = {
            "cwd": os.getcwd(),
            "argv": sys.argv,
            "env": {k: os.environ.get(k) for k in ("PROBE", "IMPORT_PROBE", "SERVER_ONLY", SERVER_ENV)},
            "random": random.random(),
            "numpy": float(np.random.random()),
            "pid": os.getpid(),
            "sockets": _sockets(),
            "line_buffering": sys.stdout.line_buffering,
        }
        print(json.dumps(seen))
        print(f"stderr of {sys.argv[2]}", file=sys.stderr)
        atexit.register(print, "atexit ran")
        sys.exit(int(sys.argv[3]))
    if what == "wait":  # wait PIDFILE: write the pid, sleep until interrupted
        Path(sys.argv[2]).write_text(str(os.getpid()))
        try:
            time.sleep(120)
        finally:
            print("interrupted", flush=True)
    if what == "die":  # die SIGNUM: end by that signal, as a crash or the OOM killer would
        signum = int(sys.argv[2])
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        time.sleep(10)
    raise SystemExit(f"stage_probe: unknown {what!r}")
