"""Lineage of a stage run: the git commit, and the DVC hashes of the inputs it reads."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def git_tags(repo_root: Path) -> dict[str, str]:
    """``git_commit`` (or "unknown") and ``git_dirty`` (tracked files modified)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    # Untracked files (outputs, caches) do not change what the code does; edits do.
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status)).lower()
    return {"git_commit": commit, "git_dirty": dirty}


def dvc_input_hashes(repo_root: Path, stage: str) -> dict[str, str]:
    """``{upstream out path: its DVC hash}`` for each dep of ``stage`` that another stage
    produces, read through DVC's own API (``dvc.repo.Repo`` and its stage index, which
    resolves ``${...}`` templating and reads ``dvc.lock``).

    The hash is the *upstream* stage's recorded out, not this stage's own lock entry:
    DVC rewrites a stage's entry only after it finishes, so while it runs the upstream
    outs are what it actually reads. A dep inside an upstream out directory reports the
    directory. A folder that is not a DVC project, or a stage it does not define, has no
    lineage to report (empty dict); a malformed project is logged and reported empty too,
    since lineage must never stop a stage.
    """
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_root))
    except NotDvcRepoError:
        return {}
    try:
        stages = list(repo.index.stages)
        ours = next((s for s in stages if s.name == stage), None)
        if ours is None:
            return {}
        outs = {
            os.path.normpath(o.fs_path): (o.def_path, o.hash_info.value)
            for s in stages
            if s is not ours
            for o in s.outs
            if o.hash_info and o.hash_info.value
        }
        deps = [os.path.normpath(d.fs_path) for d in ours.deps]
    except (DvcException, ValueError, TypeError, AttributeError, KeyError) as err:
        # DVC validates dvc.yaml/dvc.lock lazily and not always with its own errors.
        log.warning("no DVC lineage for stage %s: %s: %s", stage, type(err).__name__, err)
        return {}
    finally:
        repo.close()
    hashes: dict[str, str] = {}
    for path in deps:
        for out_path, (name, value) in outs.items():
            if path == out_path or path.startswith(out_path + os.sep):
                hashes[name.replace(os.sep, "/")] = value
    return hashes
