"""``python -m pipeline.runner.params -o params.yaml [--force]``: ``make params`` without
the composition when nothing it reads has changed.

Composing ``conf/`` with Hydra and validating the result takes about a second, paid by
every ``make repro`` even when there is nothing to do. The composed file is a function
of the files under ``conf/`` and of the composer (``pipeline/recipe.py``), so after a
successful regeneration this writes a stamp (``.runner/params.json``: the digest of
those inputs and the sha256 of the file it wrote). The next call with the same inputs
and the file as it was written returns at once. Anything else (a changed, added,
moved or deleted conf file, a changed composer, a hand edit of the output, ``--force``,
a missing or unreadable stamp) takes the full path, :func:`pipeline.recipe.main`, which composes,
validates and refuses to overwrite a hand edit.

The recipe validates ``params.yaml`` again before DVC runs (``pipeline.runner.preflight``),
so skipping the validation here never lets a bad file through.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STAMP = REPO_ROOT / ".runner" / "params.json"


def inputs_digest(repo: Path = REPO_ROOT) -> str:
    """sha256 over every file under ``conf/`` (relative path and bytes, in sorted order)
    and the composer ``pipeline/recipe.py``: what the composed params file depends on."""
    h = hashlib.sha256()
    # os.walk with followlinks: Hydra reads through a symlinked folder, Path.rglob (3.11) does not.
    files = sorted(Path(root, name) for root, _, names in os.walk(repo / "conf", followlinks=True) for name in names)
    for path in [*files, repo / "pipeline" / "recipe.py"]:
        data = path.read_bytes()
        h.update(f"{path.relative_to(repo).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def up_to_date(output: Path, stamp: Path = STAMP, repo: Path = REPO_ROOT) -> bool:
    """Whether ``output`` is what regenerating it from the current inputs would write: the
    stamp names the same inputs digest and the same bytes of ``output``."""
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("output") == str(output.resolve())
        and recorded.get("inputs") == inputs_digest(repo)
        and recorded.get("sha256") == _sha256(output)
    )


def record(output: Path, inputs: str, stamp: Path = STAMP) -> None:
    """Write the stamp for ``output`` as just regenerated from the inputs whose digest is
    ``inputs`` (taken before the composition: a conf edit made during it is not stamped
    as composed). Atomic: temp file + rename."""
    stamp.parent.mkdir(parents=True, exist_ok=True)
    entry = {"output": str(output.resolve()), "inputs": inputs, "sha256": _sha256(output)}
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry, indent=2))
    tmp.replace(stamp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runner.params", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--force", action="store_true", help="overwrite an output that was edited by hand")
    parser.add_argument("--stamp", type=Path, default=STAMP, help=argparse.SUPPRESS)  # tests: a stamp of their own
    args = parser.parse_args(argv)
    if not args.force and up_to_date(args.output, args.stamp):
        return 0
    from pipeline.recipe import main as regenerate

    inputs = inputs_digest()
    code = regenerate(["params", "-o", str(args.output), *(["--force"] if args.force else [])])
    if code == 0:
        record(args.output, inputs, args.stamp)
    return code


if __name__ == "__main__":
    sys.exit(main())
