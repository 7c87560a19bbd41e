"""Stages ``evalsets`` (build the evaluation suite) and ``eval_<target>`` (score one
model on it), pipeline/eval.

``evalsets`` publishes into ``stage.evalsets.out_dir`` (owned whole): ``suite.json`` and
one ``<task>.jsonl`` per task, built from the held-out band of the recipe's sources
(the smallest ``val_fraction`` of the mixtures) plus any configured benchmark files.

``eval_<target>`` (pretrain, midtrain, sft, qat) publishes into
``stage.eval.out_dir/<target>``: ``metrics.json`` (DVC metrics: the centred aggregate,
every task's score; for QAT also the .pte's generative scores) and ``items.jsonl``
(every prediction).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.recipe import repo_path
from pipeline.runner.errors import StageInputError
from pipeline.runner.inputs import ProgramInput, SuiteInput, TokenizerInput
from pipeline.runner.spec import Stage, StageContext, StageResult

SUITE_KEY = "stage.evalsets"
KEY = "stage.eval"


# --- evalsets -------------------------------------------------------------------------------


def held_out_fraction(recipe) -> float:
    """The band every mixture holds out: the smallest val_fraction."""
    return min(getattr(recipe.data, name).val_fraction for name in ("pretrain", "midtrain", "sft"))


class BenchmarksInput:
    """Every configured benchmark file reads in its layout (names file and line)."""

    key = f"{SUITE_KEY}.benchmarks"

    def __init__(self, benchmarks) -> None:
        self.benchmarks = benchmarks

    def check(self) -> int:
        from pipeline.eval.benchmarks import load_benchmark
        from pipeline.eval.tasks import TaskFileError

        for i, bench in enumerate(self.benchmarks):
            try:
                load_benchmark(bench.layout, repo_path(bench.path), bench.name, bench.limit)
            except (TaskFileError, ValueError) as err:
                raise StageInputError(f"{self.key}[{i}]: {err}") from None
        return len(self.benchmarks)


def _build_work(ctx: StageContext) -> StageResult:
    import ray

    from pipeline.eval.config import BenchmarkConfig
    from pipeline.eval.suites import build_suite
    from pipeline.runner import cluster

    recipe, cfg = ctx.recipe, ctx.recipe.stage.evalsets
    cluster.start(recipe.ray)
    # Benchmark paths as absolute paths: the task may run on another node's cwd.
    local = type(cfg)(
        out_dir=cfg.out_dir,
        seed=cfg.seed,
        items=dict(cfg.items),
        benchmarks=[BenchmarkConfig(b.layout, str(repo_path(b.path)), b.name, b.limit) for b in cfg.benchmarks],
    )
    record = ray.get(ray.remote(num_cpus=1)(build_suite).remote(local, held_out_fraction(recipe), ctx.scratch))
    metrics = {"held_out": record["held_out"], "items": {name: t["items"] for name, t in record["tasks"].items()}}

    def log(run, out_dir: Path) -> None:
        run.log_artifact(out_dir, "evalsets")

    return StageResult(metrics, log=log)


EVALSETS = Stage(
    name="evalsets",
    out_dir=lambda recipe: recipe.stage.evalsets.out_dir,
    inputs=lambda recipe: [BenchmarksInput(recipe.stage.evalsets.benchmarks)],
    params=lambda raw: {"data": raw["data"], "stage": raw["stage"]["evalsets"]},
    work=_build_work,
    outputs=("suite.json",),
    resources=lambda recipe: {"CPU": 1},
    owns_out_dir=True,
)


# --- eval_<target> --------------------------------------------------------------------------


def _inputs(target: str):
    def inputs(recipe) -> list:
        cfg = recipe.stage.eval
        t = cfg.targets.get(target)
        program_context = recipe.stage.export.max_context if t.program is not None else None
        # Cheapest first: the tokenizer and the suite (read, hashed, every item fitted)
        # before the model's checkpoint is verified.
        items = [
            TokenizerInput(f"{KEY}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size),
            SuiteInput(
                f"{KEY}.suite",
                repo_path(cfg.suite),
                repo_path(cfg.tokenizer),
                recipe.model.max_seq_len,
                program_context,
            ),
            _model_input(f"{KEY}.targets.{target}.model", repo_path(t.model), recipe.model),
        ]
        if t.program is not None:
            items.append(
                ProgramInput(f"{KEY}.targets.{target}.program", repo_path(t.program), 1, recipe.model.vocab_size)
            )
        return items

    return inputs


def _model_input(key: str, path: Path, model):
    from pipeline.runner.inputs import CheckpointInput, QuantizedModelInput

    return QuantizedModelInput(key, path, model) if path.suffix == ".safetensors" else CheckpointInput(key, path, model)


def _work(target: str):
    def work(ctx: StageContext) -> StageResult:
        import ray

        from pipeline.eval.run import evaluate_model
        from pipeline.runner import cluster
        from pipeline.stages.mix import flat_numbers

        recipe, cfg = ctx.recipe, ctx.recipe.stage.eval
        t = cfg.targets.get(target)
        cluster.start(recipe.ray)
        task = ray.remote(num_cpus=recipe.ray.cpus_per_worker)(evaluate_model)
        metrics, seconds = ray.get(
            task.remote(
                repo_path(t.model),
                repo_path(cfg.suite),
                repo_path(cfg.tokenizer),
                ctx.scratch,
                t.chat,
                repo_path(t.program) if t.program else None,
                cfg.batch_size,
            )
        )

        def log(run, out_dir: Path) -> None:
            run.log_artifact(out_dir / "metrics.json")
            run.log_artifact(out_dir / "items.jsonl")
            run.log_metrics(flat_numbers(metrics))

        return StageResult(metrics, log=log, perf={f"perf/{k}_seconds": v for k, v in seconds.items()})

    return work


def eval_stage(target: str) -> Stage:
    """The stage that scores ``stage.eval.targets.<target>`` on the suite."""
    return Stage(
        name=f"eval_{target}",
        out_dir=lambda recipe: str(Path(recipe.stage.eval.out_dir) / target),
        inputs=_inputs(target),
        params=lambda raw: {
            "model": raw["model"],
            "stage": {**raw["stage"]["eval"], "targets": {target: raw["stage"]["eval"]["targets"][target]}},
        },
        work=_work(target),
        outputs=("metrics.json", "items.jsonl"),
        resources=lambda recipe: {"CPU": recipe.ray.cpus_per_worker},
    )
