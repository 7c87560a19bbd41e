"""Stage ``mix``: materialise the sources, train the tokenizer, write the three mixtures.

Outputs (``data.out_dir``, owned whole by this stage): ``tokenizer/``, ``pretrain/``,
``midtrain/``, ``sft/`` (tokens, loss masks, manifests) and ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.runner.inputs import SourcesInput
from pipeline.runner.spec import Dvc, Out, Stage, StageContext, StageResult
from pipeline.tracking.keys import flat_numbers

MIXTURES = ("pretrain", "midtrain", "sft")


def _mixtures(recipe) -> dict:
    return {name: getattr(recipe.data, name) for name in MIXTURES}


def _work(ctx: StageContext) -> StageResult:
    from pipeline.data.build import build_into, source_origins
    from pipeline.runner import cluster, remote

    cluster.start(ctx.recipe.ray)
    mixtures = _mixtures(ctx.recipe)
    started = time.perf_counter()
    # One Ray task, so on a cluster the build lands on a worker like every other stage;
    # what it writes comes back into this machine's scratch (DVC's outputs are here).
    # The sources it reads are its node's: they must be what was checked here.
    metrics = remote.call(
        ctx.recipe.ray,
        build_into,
        remote.Out(ctx.scratch),
        mixtures["pretrain"],
        mixtures["midtrain"],
        mixtures["sft"],
        ctx.recipe.model.vocab_size,
        origins=source_origins(mixtures),
    )
    seconds = time.perf_counter() - started

    def log(run, out_dir: Path) -> None:
        for name in MIXTURES:
            manifest = json.loads((out_dir / name / "manifest.json").read_text())
            run.log_dataset(manifest, name=f"{name}-mixture", context=name)
            run.log_artifact(out_dir / name / "manifest.json", f"manifests/{name}")
        run.log_artifact(out_dir / "tokenizer", "tokenizer")
        run.log_artifact(out_dir / "metrics.json")
        run.log_metrics(flat_numbers(metrics))

    return StageResult(metrics, log=log, perf={"perf/build_seconds": seconds})


MIX = Stage(
    name="mix",
    out_dir=lambda recipe: recipe.data.out_dir,
    inputs=lambda recipe: [SourcesInput("data", _mixtures(recipe), recipe.model.vocab_size)],
    params=lambda raw: {"data": raw["data"], "model": {"vocab_size": raw["model"]["vocab_size"]}},
    work=_work,
    outputs=("tokenizer", *MIXTURES, "metrics.json"),
    resources=lambda recipe: {"CPU": 1},
    owns_out_dir=True,
    dvc=Dvc(
        order=10,
        desc="the tokenizer and the pretrain/midtrain/sft mixtures from the configured sources",
        code=(
            "pipeline/stages/mix.py",
            "pipeline/data",
            "pipeline/configbase.py",
            "pipeline/hashing.py",
            "pipeline/recipe.py",
        ),
        params=("data", "model.vocab_size"),
        outs=(Out("${data.out_dir}"),),
    ),
)

STAGES = (MIX,)
