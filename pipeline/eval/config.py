"""The evaluation stages' configs: the suite to build, and which models to score on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.configbase import require

TASKS = ("continuation", "knowledge", "code", "math", "worked_answer", "compare", "instruct", "heldout_bpb")
DEFAULT_ITEMS = {
    "continuation": 100,
    "knowledge": 48,
    "code": 80,
    "math": 80,
    "worked_answer": 200,
    "compare": 400,
    "instruct": 80,
    "heldout_bpb": 48,
}
TARGETS = ("pretrain", "midtrain", "sft", "qat")


@dataclass
class BenchmarkConfig:
    """A public benchmark file on disk, in its standard layout (pipeline/eval/benchmarks.py)."""

    layout: str
    path: str
    name: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        from pipeline.eval.benchmarks import LAYOUTS

        require(self.layout in LAYOUTS, "layout", f"must be one of {list(LAYOUTS)}, got {self.layout!r}")
        require(bool(self.path), "path", "must be a path to a .jsonl or .parquet file")
        require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


@dataclass
class SuiteConfig:
    """Which tasks, how many items each, and which benchmark files join them."""

    out_dir: str = "data/eval"
    seed: int = 0
    items: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_ITEMS))
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    # Characters of context plus answer (text, for rolling tasks) an item may have: a
    # small model's context must hold every request.
    max_chars: int = 600
    max_tokens: int = 64  # generation budget of the generative tasks

    def __post_init__(self) -> None:
        require(bool(self.out_dir), "out_dir", "must be a non-empty path")
        unknown = sorted(set(self.items) - set(TASKS))
        require(not unknown, "items", f"unknown task {unknown[:1]}; known: {list(TASKS)}")
        bad = {k: v for k, v in self.items.items() if not (isinstance(v, int) and v >= 4)}
        require(not bad, "items", f"counts must be integers >= 4, got {bad}")
        require(self.max_chars >= 80, "max_chars", f"must be >= 80, got {self.max_chars}")
        require(self.max_tokens >= 4, "max_tokens", f"must be >= 4, got {self.max_tokens}")
        names = [b.name or b.layout for b in self.benchmarks]
        clash = sorted({n for n in names if names.count(n) > 1 or n in self.items})
        require(not clash, "benchmarks", f"task names must be unique; {clash} are used twice (set `name`)")


@dataclass
class EvalTarget:
    """One model to evaluate: a training stage's checkpoint directory (its ``model/``) or
    QAT's converted INT4 file; ``program`` is an exported .pte scored on the generative
    tasks as well; ``chat`` runs the chat tasks (instruction-tuned models)."""

    model: str
    chat: bool = False
    program: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.model), "model", "must be a path to a checkpoint directory or a converted .safetensors")
        require(
            self.program is None or self.program.endswith(".pte"), "program", f"must be a .pte, got {self.program!r}"
        )


@dataclass
class EvalTargets:
    """The model of each stage that is evaluated (a target left out is not run)."""

    pretrain: EvalTarget | None = None
    midtrain: EvalTarget | None = None
    sft: EvalTarget | None = None
    qat: EvalTarget | None = None

    def get(self, name: str) -> EvalTarget:
        """The target ``name``; raises ConfigError naming the key when it is not configured."""
        require(name in TARGETS, f"targets.{name}", f"unknown target; known: {list(TARGETS)}")
        target = getattr(self, name)
        require(target is not None, f"targets.{name}", "is not configured")
        return target


@dataclass
class EvalStageConfig:
    suite: str  # the evalsets stage's directory
    tokenizer: str
    targets: EvalTargets
    out_dir: str = "outputs/eval"  # one subdirectory per target
    batch_size: int = 32  # sequences per forward pass

    def __post_init__(self) -> None:
        for key in ("suite", "tokenizer", "out_dir"):
            require(bool(getattr(self, key)), key, "must be a non-empty path")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
