"""The layout stays as drawn: import contracts, lint and format."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.recipe import REPO_ROOT

BIN = Path(REPO_ROOT / ".venv" / "bin")


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_hold():
    # pyproject.toml [tool.importlinter]: the domain packages import neither Ray, MLflow,
    # DVC, Hydra nor the recipe's glue; stages -> runner -> recipe -> tracking -> domain.
    proc = _tool(str(BIN / "lint-imports"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_ruff_lint_and_format():
    lint = _tool(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = _tool(str(BIN / "ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout[-4000:]
