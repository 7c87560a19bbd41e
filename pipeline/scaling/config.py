"""Config of the scaling stages: which sweep the fit reads, what it holds out, and the
planner's search space and accounting context."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.configbase import require
from pipeline.scaling.forms import FORMS
from pipeline.scaling.noise import GROUP_KEYS
from pipeline.scaling.planner import SearchSpace

# The paper's released configs and dense baseline: placed against the planner's frontier.
PAPER_MODELS = ["mobilemoe_s", "mobilemoe_m", "mobilemoe_l", "mobilellm_pro"]


@dataclass
class PlanConfig:
    """``make plan``: the search space, the context the compute and decode-read budgets
    are counted at, the training tokens the loss is predicted for, the INT4 group, and
    the reference models (``conf/model/`` names; the first MoE's dense twins are added)."""

    space: SearchSpace = field(default_factory=SearchSpace)
    base: str = "mobilemoe_s"  # conf/model/ file giving RoPE, norms, router, context length
    context: int = 1024
    tokens: float = 6.0e12  # the paper's pre-training tokens
    group_size: int = 32  # the recipe's QAT group (conf: ${stage.qat.group_size})
    embedding: str = "int4"  # the recipe's QAT embedding, int4 or int8 (conf: ${stage.qat.embedding})
    top: int = 10
    references: list[str] = field(default_factory=lambda: list(PAPER_MODELS))
    # choose only among architectures inside what the law was fitted on (expansion and
    # granularity up to the sweep's largest; depth, width and shared share within its fitted
    # models'): plan_report.outside_sweep. Off for the paper's sizes, which every sweep
    # that 2 cores can run lies far below in depth and width; on for plan=tiny.
    within_sweep: bool = False

    def __post_init__(self) -> None:
        require(self.context >= 1, "context", "must be >= 1")
        require(self.tokens > 0, "tokens", "must be > 0")
        require(self.group_size >= 1, "group_size", "must be >= 1")
        require(self.top >= 1, "top", "must be >= 1")
        require(self.embedding in ("int4", "int8"), "embedding", f"must be int4 or int8, got {self.embedding!r}")
        require(bool(self.base), "base", "must name a conf/model/ file")


@dataclass
class PairSpec:
    """A paired comparison of two architecture families of the sweep (``a`` vs ``b``)."""

    a: str
    b: str
    label: str


@dataclass
class ScalingStageConfig:
    """``make scaling-fit`` reads the FINISHED points of ``sweep`` from MLflow; the
    points of the sizes in ``hold_out_sizes`` (at the largest token budget, or at every
    budget: ``hold_out_budgets``) are left out of the fit and predicted."""

    sweep: str = "moe_grid"
    out_dir: str = "outputs/scaling"
    hold_out_sizes: list[str] = field(default_factory=lambda: ["m"])
    # "largest": those sizes at the largest token budget only (each of N and D was seen in
    # the fit, not together); "all": at every budget (an extrapolation in N).
    hold_out_budgets: str = "largest"
    dense: str = "dense"  # the family that is the dense twin at equal active width
    pairs: list[PairSpec] = field(default_factory=list)
    plan: PlanConfig = field(default_factory=PlanConfig)
    # Bootstrap refits for the intervals of every coefficient and prediction (bootstrap.py).
    bootstrap_replicates: int = 200
    # The candidate law forms (pipeline/scaling/forms.py); the one with the lowest
    # leave-one-size-out error is the law (select.py).
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    # A points table of an earlier fit (its points.csv) to fit with the sweep's runs in
    # MLflow: a refit without the tracking store that measured them.
    points_csv: str | None = None
    # What the fit's noise weights are estimated per (pipeline/scaling/noise.py): any of
    # "tokens" and "routed"; [] weighs every point alike.
    noise_groups: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(bool(self.sweep), "sweep", "must name a sweep (conf/sweep/<name>.yaml)")
        require(bool(self.out_dir), "out_dir", "must be a non-empty path")
        require(
            self.bootstrap_replicates >= 20,
            "bootstrap_replicates",
            f"must be >= 20 for a 95% percentile interval, got {self.bootstrap_replicates}",
        )
        require(
            self.hold_out_budgets in ("largest", "all"),
            "hold_out_budgets",
            f"must be 'largest' or 'all', got {self.hold_out_budgets!r}",
        )
        require(bool(self.forms), "forms", f"must name one or more law forms of {', '.join(FORMS)}")
        unknown = [f for f in self.forms if f not in FORMS]
        require(not unknown, "forms", f"unknown law form(s) {unknown}; the forms are {', '.join(FORMS)}")
        require(len(set(self.forms)) == len(self.forms), "forms", f"lists a form twice: {self.forms}")
        unknown = [k for k in self.noise_groups if k not in GROUP_KEYS]
        require(not unknown, "noise_groups", f"unknown key(s) {unknown}; the keys are {', '.join(GROUP_KEYS)}")
        require(
            len(set(self.noise_groups)) == len(self.noise_groups),
            "noise_groups",
            f"lists a key twice: {self.noise_groups}",
        )
