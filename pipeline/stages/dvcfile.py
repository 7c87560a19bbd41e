"""``dvc.yaml`` and the Makefile's stage targets, generated from the stage registry
(``python -m pipeline.stages dvc``).

Each stage's entry is its :class:`~pipeline.runner.spec.Dvc` declaration: the command
runs the stage by name, the code and data deps, params and outputs are the declared
ones. A test fails when the committed file drifts from what this module writes, as for
params.yaml.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.runner.spec import Dvc, Stage

HEADER = """\
# Generated from the stage declarations in pipeline/stages/ by `make params`
# (python -m pipeline.stages dvc -o dvc.yaml). Do not edit: change the stage's module;
# a test fails when the two drift.
#
# Each stage reads only the declared outputs of the stages before it; `params` lists the
# keys of params.yaml (composed from conf/) it reads, and ${...} paths come from
# params.yaml too, so a path changed in conf/ moves here as well. Code deps are the code
# that determines a stage's result (for training stages, the same code whose hash names
# a resumable run).
#
# Every output is `persist: true`: DVC does not delete it before running the stage.
# The stage runner publishes a new result atomically once it is complete, so a stage
# that fails (bad config, bad input, a crash) leaves every earlier output byte-identical,
# under plain `dvc repro` as under `make`. The price: DVC's run-cache is off for these
# stages, so returning to an earlier config re-runs the stage (or `dvc exp apply` /
# `git checkout` + `dvc checkout` restores an earlier result from the cache).
"""
# Loss curves of the training stages (`dvc plots show`): the columns of loss.csv.
PLOT_AXES = {"x": "step", "y": ["train_loss", "val_loss"]}


def stage_entry(name: str, dvc: Dvc) -> dict:
    """One stage of dvc.yaml as a mapping, in DVC's key order."""
    entry: dict = {
        "desc": dvc.desc,
        "cmd": f"python -m pipeline.stages {name} --params params.yaml",
        "deps": [*dvc.code, *dvc.deps],
        "params": list(dvc.params),
    }
    for kind in ("outs", "metrics", "plots"):
        items = [
            {o.path: {**({} if o.cache else {"cache": False}), "persist": True}} for o in dvc.outs if o.kind == kind
        ]
        if items:
            entry[kind] = items
    return entry


def render(stages: list[Stage]) -> str:
    """dvc.yaml's text for ``stages`` (in recipe order)."""
    body = {"stages": {s.name: stage_entry(s.name, s.dvc) for s in stages if s.dvc is not None}}
    plots = [o.path for s in stages if s.dvc is not None for o in s.dvc.outs if o.kind == "plots"]
    if plots:
        body["plots"] = [{path: PLOT_AXES} for path in plots]
    return HEADER + yaml.safe_dump(body, sort_keys=False, width=120)


MAKE_STAGES = "STAGES := "  # the Makefile line that lists one target per stage


def make_stages_line(stages: list[Stage]) -> str:
    """The Makefile's ``STAGES := ...`` line: a `make <stage>` target per recipe stage."""
    return MAKE_STAGES + " ".join(s.name for s in stages if s.dvc is not None)


def sync_makefile(path: Path, stages: list[Stage]) -> bool:
    """Rewrite the ``STAGES :=`` line of the Makefile at ``path`` if it differs; returns
    whether it changed. Raises ValueError when the Makefile has no such line."""
    lines = path.read_text().splitlines(keepends=True)
    found = [i for i, line in enumerate(lines) if line.startswith(MAKE_STAGES)]
    if len(found) != 1:
        raise ValueError(f"{path}: expected one line starting with {MAKE_STAGES!r}, found {len(found)}")
    want = make_stages_line(stages) + "\n"
    if lines[found[0]] == want:
        return False
    lines[found[0]] = want
    path.write_text("".join(lines))
    return True


def makefile_drift(path: Path, stages: list[Stage]) -> bool:
    """Whether the Makefile's stage line differs from the registry's stages."""
    lines = [line.rstrip("\n") for line in path.read_text().splitlines() if line.startswith(MAKE_STAGES)]
    return lines != [make_stages_line(stages)]


def drift(path: Path, stages: list[Stage]) -> bool:
    """Whether the file at ``path`` differs from what the registry generates."""
    return not path.is_file() or path.read_text() != render(stages)
