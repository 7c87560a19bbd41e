"""Moving a stage's finished outputs into place, so a reader never sees half of them.

The work writes into a scratch directory beside the output directory (same
filesystem); each item is then swapped in by renames, and the previous version is
removed only after its replacement is in place. A failure at any point before the
swap leaves the previous outputs byte-identical.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_beside(out_dir: Path) -> Iterator[Path]:
    """A fresh directory next to ``out_dir`` (same filesystem, so renames are atomic);
    removed on exit whatever happened."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = out_dir.parent / f".{out_dir.name}.publish-{secrets.token_hex(4)}"
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish(scratch: Path, out_dir: Path, owns_out_dir: bool = False) -> list[str]:
    """Swap every item of ``scratch`` into ``out_dir``; return the names published.

    Items are swapped one by one (not the whole directory) so that files another tool
    keeps beside them, such as DVC's ``.gitignore``, survive. With ``owns_out_dir``,
    non-hidden items of ``out_dir`` that the new result does not have are removed.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in scratch.iterdir())
    for name in names:
        swap_into(scratch / name, out_dir / name)
    if owns_out_dir:
        for stale in out_dir.iterdir():
            if stale.name not in names and not stale.name.startswith("."):
                _remove(stale)
    return names


def swap_into(new: Path, dest: Path) -> None:
    """Replace ``dest`` by ``new`` with renames only; the old one is removed last."""
    old = dest.with_name(f".{dest.name}.old-{secrets.token_hex(4)}")
    if dest.exists():
        dest.rename(old)
    new.rename(dest)
    if old.exists():
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
