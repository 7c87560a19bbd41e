"""A stage, declared: its inputs, its output directory, the config it reads, its work.

The runner (:mod:`pipeline.runner.run`) owns *how* every stage runs; a stage module
(:mod:`pipeline.stages`) only says *what* it is with a :class:`Stage`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

Kind = Literal["outs", "metrics", "plots"]


@dataclass(frozen=True)
class Out:
    """One output as ``dvc.yaml`` declares it. ``path`` may use ``${...}`` keys of
    params.yaml. Uncached outputs (timings, MLflow links) are measured again on every
    run; every output persists, because the runner publishes atomically (a failed run
    keeps the previous result)."""

    path: str
    kind: Kind = "outs"
    cache: bool = True


@dataclass(frozen=True)
class Dvc:
    """How the recipe's DAG declares a stage; ``dvc.yaml`` is generated from these
    (``python -m pipeline.stages dvc``), never written by hand.

    ``code``: the files and packages whose change changes the result (for training
    stages also the code whose hash names a resumable run). ``deps``: data inputs,
    ``${...}`` paths into params.yaml. ``params``: the params.yaml keys the stage reads.
    ``order``: its place in the recipe (the report lists runs in this order).
    """

    order: int
    desc: str
    code: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[Out, ...]
    deps: tuple[str, ...] = ()


if TYPE_CHECKING:  # pragma: no cover
    from pipeline.recipe import RecipeConfig
    from pipeline.runner.inputs import Input
    from pipeline.tracking import RunLogger


@dataclass
class StageContext:
    """What a stage's work sees. ``scratch`` is where it writes the items it produces;
    the runner moves them into ``out_dir`` atomically once the work has succeeded."""

    name: str
    recipe: RecipeConfig
    raw: dict  # the validated config as plain values (what MLflow records)
    out_dir: Path  # the stage's output directory (a sweep point's own, in a multirun)
    inputs: dict[str, Any]  # config key -> what that input's check read
    scratch: Path | None = None
    run: RunLogger | None = None
    journal: Path | None = None  # where tracking writes what it could not record
    resume: ResumePlan | None = None  # the stage's resume plan, once the runner asked for it


@dataclass(frozen=True)
class ResumePlan:
    """How a resumable stage's work is named, and found again after an interruption.

    ``key`` fingerprints everything that determines the result (recorded on the MLflow
    run; a finished run of the same key may stand for the work). ``jobs`` are the Ray
    Train jobs the work runs, in order, and ``runs`` their Ray Train run names: a run
    folder left in the run storage means an interrupted execution, whose MLflow run is
    then continued rather than duplicated."""

    key: str
    jobs: tuple[Any, ...]
    runs: tuple[str, ...]


@dataclass
class StageResult:
    """What the work produced besides the files in ``scratch``."""

    metrics: dict[str, Any]  # final metrics (the numbers also go to MLflow as final/*)
    # Logs artifacts from the *published* out_dir into the stage's run.
    log: Callable[[RunLogger, Path], None] | None = None
    # Runs once the tracking run is closed: e.g. delete a finished Ray run's storage.
    on_published: Callable[[], None] | None = None
    # Numbers that describe this execution rather than its result (seconds, tokens/s):
    # they go to MLflow only, never into files DVC hashes.
    perf: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    out_dir: Callable[[RecipeConfig], str]  # the configured output directory
    inputs: Callable[[RecipeConfig], list[Input]]
    params: Callable[[dict], dict]  # the slice of the raw config this stage reads
    work: Callable[[StageContext], StageResult]
    # The items the work must leave in scratch; nothing is published unless all are there.
    outputs: tuple[str, ...]
    # How the work resumes (ResumePlan), or None for a stage that cannot resume.
    resume: Callable[[StageContext], ResumePlan | None] = lambda ctx: None
    # What the stage's Ray work occupies, {"CPU": n, "GPU": g}; checked against the
    # embedded Ray before it starts. Default: the training job's workers.
    resources: Callable[[RecipeConfig], dict[str, int]] = lambda recipe: recipe.ray.job_resources()
    # The whole out_dir is this stage's output: items the new result lacks are removed
    # on publish. Otherwise only the produced items are replaced.
    owns_out_dir: bool = False
    # Tags recorded on the stage's MLflow run besides the lineage (e.g. a sweep's names).
    tags: Callable[[StageContext], dict[str, str]] = lambda ctx: {}
    # A FINISHED MLflow run with the same resume key and tags stands for this work: it is
    # not run again (a sweep continues where it stopped). Its final metrics are returned.
    reuse_finished: bool = False
    # Top-level config sections the stage reads besides the recipe's (validated by the
    # stage itself, e.g. the sweep point of a scaling sweep).
    extra_keys: tuple[str, ...] = ()
    # Inputs named by those sections (given the raw config), checked with the others.
    raw_inputs: Callable[[dict], list[Input]] = lambda raw: []
    # The output directory when one of those sections names it (else ``out_dir``).
    raw_out_dir: Callable[[dict], str] | None = None
    # Its place in dvc.yaml; None for work that runs beside the recipe (a sweep point).
    dvc: Dvc | None = None


def metric(path: str) -> Out:
    """A DVC metrics file (``dvc metrics show``), not cached: it is small and always rewritten."""
    return Out(path, "metrics", cache=False)


def plot(path: str) -> Out:
    """A DVC plots file (``dvc plots show``), not cached."""
    return Out(path, "plots", cache=False)


def uncached(path: str) -> Out:
    """An output measured again on every run (timings, MLflow links): DVC keeps no copy."""
    return Out(path, cache=False)
