"""Moving a stage's finished outputs into place.

The work writes into a scratch directory beside the output directory (same filesystem).
Nothing is published unless every declared output is there (a task that wrote on
another node leaves the driver's scratch empty: that must not pass for a result). Each
item then replaces its predecessor by renames alone; the predecessor goes into the
scratch directory and is deleted with it, so nothing half-deleted is ever left inside
an output. Items are replaced one after another: a crash between two renames leaves
some new and some old items, each of them whole (and DVC sees the stage as changed).
A failure before publication leaves the previous outputs byte-identical.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pipeline.fsutil import swap_into
from pipeline.runner.errors import StageError

SCRATCH_MARK = ".publish-"


@contextmanager
def scratch_beside(out_dir: Path) -> Iterator[Path]:
    """A fresh directory next to ``out_dir`` (same filesystem, so renames are atomic);
    removed on exit whatever happened."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.parent / f".{out_dir.name}{SCRATCH_MARK}{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def remove_stale_scratch(out_dir: Path) -> None:
    """Delete scratch directories a killed run left beside ``out_dir`` (call under its lock)."""
    for stale in out_dir.parent.glob(f".{out_dir.name}{SCRATCH_MARK}*"):
        shutil.rmtree(stale, ignore_errors=True)


def publish(scratch: Path, out_dir: Path, expected: Sequence[str], owns_out_dir: bool = False) -> list[str]:
    """Swap every item of ``scratch`` into ``out_dir``; return the names published.

    Raises StageError, publishing nothing, unless every name in ``expected`` exists in
    ``scratch``. Items are swapped one by one (not the whole directory) so that files
    another tool keeps beside them, such as DVC's ``.gitignore``, survive. With
    ``owns_out_dir``, items of ``out_dir`` that the new result does not have are removed
    (hidden files excepted).
    """
    names = sorted(p.name for p in scratch.iterdir() if not p.name.startswith("."))
    missing = sorted(set(expected) - set(names))
    if missing:
        raise StageError(
            f"the work did not produce {', '.join(missing)} in {scratch} (nothing was published; "
            f"on a cluster, was it written on another node?)"
        )
    trash = scratch / ".replaced"
    trash.mkdir()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        swap_into(scratch / name, out_dir / name, trash)
    if owns_out_dir:
        for stale in out_dir.iterdir():
            if stale.name not in names and not stale.name.startswith("."):
                stale.rename(trash / stale.name)
    return names
