"""Content fingerprints used for lineage and resume decisions: one implementation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """Hex sha256 of a JSON-able value, independent of dict key order."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def sha256_tree(root: str | Path) -> str:
    """Hex sha256 of a folder: of every file's relative path and sha256 (sorted), so two
    folders with the same files hash the same wherever they are."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return sha256_json([[p.relative_to(root).as_posix(), sha256_file(p)] for p in files])
