"""Replacing files and directories by renames only, so a reader never sees half of one."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path


def swap_into(new: Path, dest: Path, trash: Path) -> None:
    """Replace ``dest`` by ``new`` with renames alone; the previous ``dest`` is moved into
    the directory ``trash`` (same filesystem), for the caller to delete."""
    if dest.exists():
        dest.rename(trash / f"{dest.name}-{secrets.token_hex(4)}")
    new.rename(dest)


def replace_dir(new: Path, dest: Path) -> None:
    """Make directory ``new`` the directory ``dest``; the old one is deleted last, from a
    sibling trash folder, so ``dest`` is always either the old or the new tree whole."""
    trash = dest.parent / f".{dest.name}.replaced-{secrets.token_hex(4)}"
    trash.mkdir()
    try:
        swap_into(new, dest, trash)
    finally:
        shutil.rmtree(trash, ignore_errors=True)
