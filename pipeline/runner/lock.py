"""One run per stage output at a time.

Two runs of the same stage into the same output directory (a run by hand while
``dvc repro`` runs it) would share one Ray Train run folder and overwrite each other's
outputs. The runner takes an exclusive, non-blocking file lock (filelock) named after
the output directory before it opens a tracking run or starts Ray; the second run
stops at once, naming the process that holds the lock. The OS releases the lock when
its holder dies, so a killed run never blocks the next one.
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
def stage_lock(lock_dir: Path, stage: str, out_dir: Path) -> Iterator[Path]:
    """Hold the lock of ``stage`` writing ``out_dir``; raise StageLockedError if taken."""
    from filelock import FileLock, Timeout

    lock_dir.mkdir(parents=True, exist_ok=True)
    base = lock_dir / f"{stage}-{sha256_json(str(out_dir.resolve()))[:12]}"
    holder_file = base.with_suffix(".holder.json")
    lock = FileLock(str(base.with_suffix(".lock")), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StageLockedError(
            f"stage {stage} is already running into {out_dir} ({_holder(holder_file)}); "
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
