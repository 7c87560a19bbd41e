"""Scratch copies of this repository, for tools that must not touch the working tree."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALING = "outputs/scaling/"


def copy_repo(dest: Path, leave_out: Iterable[str] = ()) -> Path:
    """Copy the tracked and untracked (not ignored) files into ``dest``, without stage
    outputs and without the paths in ``leave_out``. Modification times are kept, so
    make sees a shared venv as current. ``outputs/scaling/`` is copied: it is no stage's
    output but the scaling tools' committed results, which the report stage reads."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    skipped = set(leave_out)
    for rel in files:
        src = REPO_ROOT / rel
        stage_output = rel.startswith(("outputs/", "data/mix/", "data/eval/")) and not rel.startswith(SCALING)
        if src.is_file() and not stage_output and rel not in skipped:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest
