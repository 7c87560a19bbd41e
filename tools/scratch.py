"""Scratch copies of this repository, for tools that must not touch the working tree."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def copy_repo(dest: Path, leave_out: Iterable[str] = ()) -> Path:
    """Copy the tracked and untracked (not ignored) files into ``dest``, without stage
    outputs and without the paths in ``leave_out``. Modification times are kept, so
    make sees a shared venv as current."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    skipped = set(leave_out)
    for rel in files:
        src = REPO_ROOT / rel
        if src.is_file() and not rel.startswith(("outputs/", "data/mix/", "data/eval/")) and rel not in skipped:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
