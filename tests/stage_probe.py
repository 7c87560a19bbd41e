"""What the stage-server tests run in place of ``python -m pipeline.stages``'s main
(tests/runner/test_stage_server.py): ``sys.argv[1]`` says what to do."""

from __future__ import annotations

import atexit
import json
import os
import random
import sys
import time
from pathlib import Path

from pipeline.runner.stage_server import SERVER_ENV


def main() -> None:
    what = sys.argv[1]
    if what == "show":  # show NAME CODE: what the process is, then exit with CODE
        seen = {
            "cwd": os.getcwd(),
            "argv": sys.argv,
            "probe": os.environ.get("PROBE"),
            "imported": os.environ.get("KMP_PROBE"),
            "server": os.environ.get(SERVER_ENV),
            "random": random.random(),
            "pid": os.getpid(),
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
    raise SystemExit(f"stage_probe: unknown {what!r}")
