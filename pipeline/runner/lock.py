"""One run at a time per stage output, and per piece of work.

Two runs of the same stage into the same output directory (a run by hand while
``dvc repro`` runs it) would overwrite each other's outputs; two runs of the same work
(same fingerprint, e.g. a by-hand run and a sweep point) would share one Ray Train run
folder. The runner takes exclusive, non-blocking file locks (filelock) on both before it
opens a tracking run or starts Ray; a second run stops at once, naming the process that
holds the lock. The OS releases a lock when its holder dies, so a killed run never
blocks the next one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.hashing import sha256_json
from pipeline.process import ProcessId
from pipeline.runner.errors import StageLockedError


@contextmanager
def stage_lock(lock_dir: Path, stage: str, what: str) -> Iterator[Path]:
    """Hold the lock of ``stage`` on ``what`` (e.g. ``"outputs /abs/out_dir"``, ``"run
    <fingerprint>"``); raise StageLockedError naming the holder if it is taken."""
    from filelock import FileLock, Timeout

    lock_dir.mkdir(parents=True, exist_ok=True)
    base = lock_dir / f"{stage}-{sha256_json(what)[:12]}"
    holder_file = base.with_suffix(".holder.json")
    lock = FileLock(str(base.with_suffix(".lock")), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StageLockedError(
            f"stage {stage} is already running ({what}; {_holder(holder_file)}); "
            f"wait for it to finish or stop that process"
        ) from None
    try:
        me = ProcessId.current()
        holder_file.write_text(
            json.dumps({"host": me.host, "pid": me.pid, "started": me.started, "command": me.command})
        )
        yield base
    finally:
        holder_file.unlink(missing_ok=True)
        lock.release()


def _holder(path: Path) -> str:
    try:
        return "held by " + ProcessId(**json.loads(path.read_text())).describe()
    except (OSError, ValueError, TypeError):
        return "holder unknown"
