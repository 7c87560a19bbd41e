"""One declaration per stage: dvc.yaml, the Makefile's targets and the report's order
all follow from the stages declared in pipeline/stages/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.recipe import REPO_ROOT
from pipeline.runner.spec import Dvc, Out, Stage, StageResult
from pipeline.stages import dvcfile, registry
from tools.scratch import copy_repo


def test_dvc_yaml_is_what_the_registry_generates():
    assert not dvcfile.drift(REPO_ROOT / "dvc.yaml", registry.recipe_stages()), (
        "dvc.yaml drifted from the stage declarations in pipeline/stages/: run `make params`"
    )


def test_the_makefile_has_a_target_for_every_stage():
    assert not dvcfile.makefile_drift(REPO_ROOT / "Makefile", registry.recipe_stages()), (
        "the Makefile's STAGES line drifted from the stage declarations: run `make params`"
    )
    listed = subprocess.run(
        ["make", "-s", "-n", *(s.name for s in registry.recipe_stages())],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]  # every name is a target make knows


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


def test_each_stage_runs_by_name_and_depends_on_its_own_module():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [s.name for s in registry.recipe_stages()]
    for stage in registry.recipe_stages():
        entry = stages[stage.name]
        assert entry["cmd"] == f"python -m pipeline.stages {stage.name} --params params.yaml"
        (module,) = (
            m for n, m in sys.modules.items() if n.startswith("pipeline.stages.") and stage in vars(m).get("STAGES", ())
        )
        own = str(Path(module.__file__).relative_to(REPO_ROOT))
        assert own in entry["deps"], f"{stage.name}: {own} is not a code dep"


def test_two_stages_with_one_place_are_refused(monkeypatch):
    import pipeline.stages.mix as mix

    def stage(name: str) -> Stage:
        return Stage(
            name=name,
            out_dir=lambda recipe: "outputs/x",
            inputs=lambda recipe: [],
            params=lambda raw: {},
            work=lambda ctx: StageResult({}),
            outputs=(),
            dvc=Dvc(order=mix.MIX.dvc.order, desc="x", code=(), params=(), outs=(Out("outputs/x"),)),
        )

    monkeypatch.setattr(mix, "STAGES", (mix.MIX, stage("other")))
    registry.all_stages.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"stages 'mix' and 'other' both declare order 10"):
            registry.all_stages()
        monkeypatch.setattr(mix, "STAGES", (mix.MIX, mix.MIX))
        with pytest.raises(ValueError, match=r"stage 'mix' is declared twice"):
            registry.all_stages()
    finally:
        registry.all_stages.cache_clear()


TOY = '''\
"""A toy stage: the one file a new stage needs when it reads existing config keys."""

from pipeline.runner.spec import Dvc, Out, Stage, StageResult, metric


def _work(ctx):
    (ctx.scratch / "vocab.txt").write_text(str(ctx.recipe.model.vocab_size))
    (ctx.scratch / "metrics.json").write_text("{}")
    return StageResult({})


TOY = Stage(
    name="toy",
    out_dir=lambda recipe: "outputs/toy",
    inputs=lambda recipe: [],
    params=lambda raw: {"model": {"vocab_size": raw["model"]["vocab_size"]}},
    work=_work,
    outputs=("vocab.txt", "metrics.json"),
    resources=lambda recipe: {"CPU": 1},
    dvc=Dvc(
        order=75,
        desc="a toy stage between profile and evalsets",
        code=("pipeline/stages/toy.py",),
        deps=("${stage.export.out_dir}/metrics.json",),
        params=("model.vocab_size",),
        outs=(Out("outputs/toy/vocab.txt"), metric("outputs/toy/metrics.json")),
    ),
)

STAGES = (TOY,)
'''


@pytest.mark.slow
def test_a_new_stage_is_one_module_found_by_dvc_make_and_the_report(tmp_path):
    repo = copy_repo(tmp_path / "repo")
    (repo / ".venv").symlink_to(REPO_ROOT / ".venv")
    (repo / "pipeline" / "stages" / "toy.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": str(repo)}

    def sh(*cmd: str) -> str:
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        return proc.stdout

    os.utime(repo / "dvc.yaml", (0, 0))  # older than the new module, as after an edit
    sh("make", "params")
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    names = list(stages)
    assert names.index("profile") < names.index("toy") < names.index("evalsets")
    assert stages["toy"]["cmd"] == "python -m pipeline.stages toy --params params.yaml"
    # DVC itself reads the generated file and places the stage after export's output.
    sh("git", "init", "-q")
    assert "toy" in sh(".venv/bin/dvc", "stage", "list").split()
    assert "-m pipeline.runner.repro --params params.yaml toy" in sh("make", "-n", "toy")
    order = sh(".venv/bin/python", "-c", "from pipeline.stages.report import run_stages; print(*run_stages())")
    assert order.split().index("toy") == order.split().index("profile") + 1
    # ... and it runs by name, through the runner, publishing its declared outputs.
    sh(".venv/bin/python", "-m", "pipeline.stages", "toy", "tracking.enabled=false")
    assert (repo / "outputs" / "toy" / "vocab.txt").read_text() == str(
        yaml.safe_load((repo / "params.yaml").read_text())["model"]["vocab_size"]
    )
