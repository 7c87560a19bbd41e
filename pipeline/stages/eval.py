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
from pipeline.runner.spec import Dvc, Out, Stage, StageContext, StageResult, metric

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


class HeldOutKeysInput:
    """The suite decides what is held out by the split keys the sources use by default;
    a mixture whose source is split by other keys (python_code at module granularity:
    one key per module) could train on a held-out function."""

    key = "data"

    def __init__(self, recipe) -> None:
        self.mixtures = {name: getattr(recipe.data, name) for name in ("pretrain", "midtrain", "sft")}

    def check(self) -> None:
        for name, mixture in self.mixtures.items():
            for i, source in enumerate(mixture.sources):
                if source.kind == "python_code" and source.options.get("granularity", "definition") != "definition":
                    raise StageInputError(
                        f"data.{name}.sources[{i}].options.granularity: the evaluation suite holds out stdlib "
                        "definitions by their own split key; a module-granularity source splits by module, "
                        "so held-out functions could be trained on (use granularity: definition)"
                    )


def _build_work(ctx: StageContext) -> StageResult:
    from pipeline.eval.suites import build_suite
    from pipeline.runner import cluster, remote

    recipe, cfg = ctx.recipe, ctx.recipe.stage.evalsets
    cluster.start(recipe.ray)
    # Every benchmark file travels with the task (it may run in another cwd, on another
    # node), keyed by its path as configured (relative ones are the repository's).
    files = {b.path: remote.In(repo_path(b.path)) for b in cfg.benchmarks}
    record = remote.call(recipe.ray, build_suite, cfg, held_out_fraction(recipe), remote.Out(ctx.scratch), files)
    metrics = {"held_out": record["held_out"], "items": {name: t["items"] for name, t in record["tasks"].items()}}

    def log(run, out_dir: Path) -> None:
        run.log_artifact(out_dir, "evalsets")

    return StageResult(metrics, log=log)


EVALSETS = Stage(
    name="evalsets",
    out_dir=lambda recipe: recipe.stage.evalsets.out_dir,
    inputs=lambda recipe: [HeldOutKeysInput(recipe), BenchmarksInput(recipe.stage.evalsets.benchmarks)],
    params=lambda raw: {"data": raw["data"], "stage": raw["stage"]["evalsets"]},
    work=_build_work,
    outputs=("suite.json",),
    resources=lambda recipe: {"CPU": 1},
    owns_out_dir=True,
    dvc=Dvc(
        order=80,
        desc="the evaluation suite: held-out items of the recipe's own sources, and any benchmark files configured",
        code=(
            "pipeline/stages/eval.py",
            "pipeline/eval",
            "pipeline/data",
            "pipeline/configbase.py",
            "pipeline/hashing.py",
            "pipeline/recipe.py",
        ),
        params=("data", SUITE_KEY),
        outs=(Out(f"${{{SUITE_KEY}.out_dir}}"),),
    ),
)


# --- eval_<target> --------------------------------------------------------------------------


def _inputs(target: str):
    def inputs(recipe) -> list:
        cfg = recipe.stage.eval
        t = cfg.targets.get(target)
        program = repo_path(t.program) if t.program is not None else None
        # Cheapest first: the tokenizer, the program's header, the suite (read, hashed,
        # every item fitted to the model and the program) before the checkpoint is verified.
        items = [TokenizerInput(f"{KEY}.tokenizer", repo_path(cfg.tokenizer), recipe.model.vocab_size)]
        if program is not None:
            key = f"{KEY}.targets.{target}.program"
            items.append(ProgramInput(key, program, 1, recipe.model.vocab_size, lengths_key=key))
        items += [
            SuiteInput(
                f"{KEY}.suite", repo_path(cfg.suite), repo_path(cfg.tokenizer), recipe.model.max_seq_len, program
            ),
            _model_input(f"{KEY}.targets.{target}.model", repo_path(t.model), recipe.model),
        ]
        return items

    return inputs


def _model_input(key: str, path: Path, model):
    from pipeline.runner.inputs import CheckpointInput, QuantizedModelInput

    return QuantizedModelInput(key, path, model) if path.suffix == ".safetensors" else CheckpointInput(key, path, model)


def _work(target: str):
    def work(ctx: StageContext) -> StageResult:
        from pipeline.eval.run import evaluate_model
        from pipeline.export.kernels import beside
        from pipeline.runner import cluster, remote
        from pipeline.tracking.keys import flat_numbers

        recipe, cfg = ctx.recipe, ctx.recipe.stage.eval
        t = cfg.targets.get(target)
        cluster.start(recipe.ray)
        metrics, seconds = remote.call(
            recipe.ray,
            evaluate_model,
            remote.In(repo_path(t.model)),
            remote.In(repo_path(cfg.suite)),
            remote.In(repo_path(cfg.tokenizer)),
            remote.Out(ctx.scratch),
            t.chat,
            remote.In(repo_path(t.program), beside=beside(t.program)) if t.program else None,
            cfg.batch_size,
            num_cpus=recipe.ray.cpus_per_worker,
        )

        def log(run, out_dir: Path) -> None:
            run.log_artifact(out_dir / "metrics.json")
            run.log_artifact(out_dir / "items.jsonl")
            run.log_metrics(flat_numbers(metrics))

        return StageResult(metrics, log=log, perf={f"perf/{k}_seconds": v for k, v in seconds.items()})

    return work


def _dvc(target: str, order: int, desc: str, program: bool) -> Dvc:
    out = f"${{{KEY}.out_dir}}/{target}"
    deps = [f"${{{KEY}.suite}}", f"${{{KEY}.tokenizer}}", f"${{{KEY}.targets.{target}.model}}"]
    if program:  # the .pte, and the kernel list beside the default program
        deps += [f"${{{KEY}.targets.{target}.program}}", "${stage.export.out_dir}/model.kernels.json"]
    return Dvc(
        order=order,
        desc=desc,
        code=(
            "pipeline/stages/eval.py",
            "pipeline/eval",
            "pipeline/model",
            "pipeline/quant",
            "pipeline/train/checkpoint.py",
            "pipeline/export/runner.py",
            "pipeline/data/tokenizer.py",
            "pipeline/data/chat.py",
            "pipeline/configbase.py",
            "pipeline/recipe.py",
        ),
        deps=tuple(deps),
        params=("model", *(f"{KEY}.{k}" for k in ("suite", "tokenizer", "batch_size", f"targets.{target}"))),
        outs=(Out(f"{out}/items.jsonl"), metric(f"{out}/metrics.json")),
    )


def eval_stage(target: str, order: int, desc: str, program: bool = False) -> Stage:
    """The stage that scores ``stage.eval.targets.<target>`` on the suite (and its
    ``program``, the exported .pte, when the target has one)."""
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
        dvc=_dvc(target, order, desc, program),
    )


STAGES = (
    EVALSETS,
    eval_stage("pretrain", 81, "the pre-trained model"),
    eval_stage("midtrain", 82, "the mid-trained model, chat tasks included (the before-SFT reference)"),
    eval_stage("sft", 83, "the instruction-tuned model, chat tasks included"),
    eval_stage("qat", 84, "QAT's converted INT4 model, and its .pte on the generative tasks", program=True),
)
