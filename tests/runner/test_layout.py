"""The layout stays as drawn: import contracts, lint, format, and DVC's code deps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

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


def test_training_stages_depend_on_exactly_the_code_that_names_a_resumable_run():
    from pipeline.stages.qat import QAT_RESULT_CODE
    from pipeline.stages.train import RESULT_CODE

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, entries in (
        ("pretrain", RESULT_CODE),
        ("midtrain", RESULT_CODE),
        ("sft", RESULT_CODE),
        ("qat", QAT_RESULT_CODE),
    ):
        code = {d for d in stages[name]["deps"] if isinstance(d, str) and d.startswith("pipeline/")}
        assert code == {f"pipeline/{entry}" for entry in entries}, name


def test_every_output_persists_through_a_failed_run():
    # DVC deletes a stage's outputs before running it unless they are `persist: true`;
    # the runner publishes atomically, so persisting them is what keeps a failed run
    # from costing the previous result.
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                assert isinstance(entry, dict), f"{name}.{kind}: {entry} has no options"
                (options,) = entry.values()
                assert options.get("persist") is True, f"{name}.{kind}: {entry}"
