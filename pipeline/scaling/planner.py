"""The architecture planner: the best predicted loss within a phone's budgets.

Enumerates architectures of a :class:`SearchSpace` (depth, width, FFN width,
expansion, granularity, shared expert, vocabulary, tied embeddings), keeps those within
the budgets, predicts each one's loss with a fitted :class:`ScalingLaw`, and returns the
best ones and the Pareto frontiers of predicted loss against INT4 weight memory and
against FLOPs per token. Every count (INT4 bytes, FLOPs, bytes read per decode step) is
:mod:`pipeline.model.accounting`'s, on the config the recipe would train.

Budgets:
- memory: INT4 weight bytes (8da4w, ``accounting.int4_weight_bytes``), e.g. ``3GB``
  (SI, 3e9 bytes) or ``3GiB`` (2^30);
- compute: forward FLOPs per decoded token at ``context`` cached tokens
  (``accounting.flops_per_token(..., "decode")``), e.g. ``2e9`` or ``2GFLOP``; or a decode speed with
  a memory bandwidth, which bounds the bytes one decode step reads
  (``accounting.decode_read_bytes``): bandwidth / speed.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from pipeline.configbase import ConfigError, require
from pipeline.model.accounting import decode_read_bytes, flops_per_token, int4_weight_bytes
from pipeline.model.config import GROUPED_MM_ALIGN, ModelConfig, MoEConfig
from pipeline.quant.config import QuantConfig
from pipeline.scaling.law import LawInputs, ScalingLaw, law_inputs


class PlanError(ValueError):
    """A budget cannot be read, or nothing in the search space fits it."""


@functools.cache
def _units():
    """Pint's registry with FLOP (its own dimension) and token added."""
    import pint

    units = pint.UnitRegistry()
    units.define("FLOP = [compute] = flop = FLOPs = flops = FLOPS")
    units.define("token = [tokens] = tok = tokens")
    return units


UNIT_HINT = "SI prefixes kB, MB, GB, TB; binary KiB, MiB, GiB"


def _quantity(text: str, unit: str, what: str, example: str, bare: bool) -> float:
    """``text`` in ``unit`` (pint parses it: SI and binary prefixes, ``3GB``, ``3GiB``,
    ``2 GFLOP``, ``60GB/s``). ``bare``: a number without a unit is taken as ``unit``.
    Raises PlanError naming ``what`` for a typo (``3GBB``), a wrong unit, or a value that
    is not finite and > 0."""
    import pint

    units = _units()
    try:
        quantity = units.Quantity(str(text).strip())
    except (pint.errors.PintError, ValueError, TypeError, AttributeError, OverflowError) as err:
        raise PlanError(
            f"{what} {text!r}: not {unit} ({type(err).__name__}: {err}); e.g. {example} ({UNIT_HINT})"
        ) from None
    # Pint counts bytes and bits as dimensionless, like radians and percent: the unit's
    # name must be one of them.
    if unit.startswith("byte"):
        names = [name for name, _ in quantity.unit_items()]
        if not names or not all(n.endswith(("byte", "bit")) or n == "second" for n in names):
            raise PlanError(f"{what} {text!r}: give a size in bytes, e.g. {example} ({UNIT_HINT})")
    elif quantity.unitless and not bare:
        raise PlanError(f"{what} {text!r}: give a unit, e.g. {example}")
    try:
        value = float(quantity.magnitude if quantity.unitless else quantity.to(unit).magnitude)
    except (pint.errors.PintError, ValueError, TypeError, OverflowError) as err:
        raise PlanError(f"{what} {text!r}: not {unit} ({type(err).__name__}: {err}); e.g. {example}") from None
    if not (math.isfinite(value) and value > 0):
        raise PlanError(f"{what} {text!r}: must be finite and > 0")
    return value


def parse_bytes(text: str, what: str = "memory budget") -> int:
    """Bytes from ``3GB`` (SI, 3e9), ``3GiB`` (binary, 3 * 2^30), ``700 MB``.

    Raises PlanError naming ``what`` and the text for a typo (``3GBB``), a bare number,
    a unit that is not bytes or bits (``3Gb`` is a gilbert to pint, not gigabits), or
    less than one byte."""
    value = _quantity(text, "byte", what, "3GB, 3GiB, 700MB", bare=False)
    if value < 1:
        raise PlanError(f"{what} {text!r}: less than one byte")
    return int(value)


def parse_flops(text: str, what: str = "compute budget") -> float:
    """FLOPs per token from ``2e9``, ``2GFLOP``, ``800 MFLOPs``, ``2 GFLOP/token``;
    PlanError otherwise."""
    per_token = str(text).strip().endswith(("/token", "/tok"))
    unit = "FLOP / token" if per_token else "FLOP"
    return _quantity(text, unit, what, "2e9, 2GFLOP, 800MFLOPs, 2 GFLOP/token", bare=True)


def parse_bandwidth(text: str, what: str = "--bandwidth") -> float:
    """Bytes per second from ``60GB/s``; PlanError otherwise."""
    return _quantity(text, "byte / second", what, "60GB/s", bare=False)


def parse_rate(text: str, what: str = "decode speed") -> float:
    """Tokens per second from ``30`` or ``30 tok/s``; PlanError otherwise."""
    return _quantity(text, "token / second", what, "30, 30 tok/s", bare=True)


@dataclass
class Budget:
    """What a phone allows. ``memory_bytes``: INT4 weights; ``flops_per_token``: decode
    FLOPs at ``context``; ``decode_bytes``: bytes read per decode step (bandwidth /
    target speed). None: not constrained."""

    memory_bytes: int | None = None
    flops_per_token: float | None = None
    decode_bytes: float | None = None

    def __post_init__(self) -> None:
        if self.memory_bytes is None and self.flops_per_token is None and self.decode_bytes is None:
            raise PlanError("give a memory budget, a compute budget, or both")

    def describe(self) -> str:
        parts = []
        if self.memory_bytes is not None:
            parts.append(f"INT4 weights <= {self.memory_bytes / 1e9:.3g} GB")
        if self.flops_per_token is not None:
            parts.append(f"decode FLOPs/token <= {self.flops_per_token / 1e9:.3g} G")
        if self.decode_bytes is not None:
            parts.append(f"bytes read per decode step <= {self.decode_bytes / 1e9:.3g} GB")
        return ", ".join(parts)


@dataclass
class SearchSpace:
    """The architectures the planner enumerates (every combination of the lists).

    At FFN width ``ffn_mult * d_model`` (the active width), granularity G splits it into
    G expert units; ``shared_fraction`` of them form one shared expert, the rest are the
    routed top-k; ``expansion`` x G units exist in all (total / active width). Expansion
    1 is the dense model (granularity and shared expert do not apply).

    ``vocab_size`` is a knob for memory and FLOPs, but losses of different tokenizers
    are not comparable and a sweep at one tokenizer cannot fit its effect: the law
    counts the output head in N like any matmul, so a larger vocabulary only looks
    better. List more than one only to see what a vocabulary costs."""

    n_layers: list[int] = field(default_factory=lambda: [12, 16, 20, 24, 28, 32])
    d_model: list[int] = field(default_factory=lambda: [512, 640, 768, 896, 1024, 1280, 1536])
    head_dim: int = 64
    n_kv_heads: int = 4
    ffn_mult: list[int] = field(default_factory=lambda: [4])
    expansion: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 12, 16])
    granularity: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    shared_fraction: list[float] = field(default_factory=lambda: [0.0, 0.5])
    vocab_size: list[int] = field(default_factory=lambda: [128256])  # the paper's tokenizer
    tie_embeddings: list[bool] = field(default_factory=lambda: [True, False])

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "ffn_mult", "expansion", "granularity", "vocab_size"):
            values = getattr(self, key)
            require(
                bool(values) and all(v >= 1 for v in values),
                key,
                f"must be a non-empty list of ints >= 1, got {values}",
            )
        require(
            self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim", f"must be even and >= 2, got {self.head_dim}"
        )
        require(self.n_kv_heads >= 1, "n_kv_heads", "must be >= 1")
        require(
            bool(self.shared_fraction) and all(0 <= f < 1 for f in self.shared_fraction),
            "shared_fraction",
            f"must be a non-empty list of fractions in [0, 1), got {self.shared_fraction}",
        )
        require(bool(self.tie_embeddings), "tie_embeddings", "must list true, false or both")


@dataclass(frozen=True)
class Candidate:
    """One architecture with its accounting and predicted loss."""

    model: ModelConfig
    int4_bytes: int
    flops_per_token: float  # decode, at the plan's context
    decode_bytes: int  # read per decode step, at the plan's context
    inputs: LawInputs
    loss: float

    def row(self) -> dict:
        """The table row of this candidate (counts in millions / GB / GFLOPs)."""
        m = self.model
        moe = m.moe
        return {
            "name": m.name,
            "layers": m.n_layers,
            "d_model": m.d_model,
            "experts": moe.num_experts if moe else 1,
            "top_k": moe.top_k if moe else 1,
            "expert_ffn": moe.expert_ffn_dim if moe else m.ffn_dim,
            "shared_ffn": (moe.num_shared_experts * moe.shared_ffn_dim) if moe else 0,
            "granularity": round(self.inputs.granularity, 2),
            "expansion": round(self.inputs.expansion, 2),
            "vocab": m.vocab_size,
            "tied": m.tie_embeddings,
            "N_act_M": _sig(self.inputs.n_active / 1e6),
            "int4_GB": _sig(self.int4_bytes / 1e9),
            "GFLOPs_per_token": _sig(self.flops_per_token / 1e9),
            "decode_read_GB": _sig(self.decode_bytes / 1e9),
            "pred_loss": round(self.loss, 4),
        }


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tables from MB to GB read alike)."""
    return float(f"{x:.{digits}g}")


def enumerate_models(space: SearchSpace, base: ModelConfig, group_size: int = 32) -> Iterator[ModelConfig]:
    """Every architecture of ``space`` that the recipe can train and quantize: head
    counts that divide, expert widths on the grouped-GEMM alignment, and whole INT4
    groups of ``group_size`` on every quantized weight. ``base`` supplies the rest
    (RoPE, norms, router settings, context length)."""
    quant = QuantConfig(group_size=group_size)
    router = base.moe or MoEConfig(num_experts=2, top_k=1, expert_ffn_dim=GROUPED_MM_ALIGN)
    for layers, d, mult, vocab, tie in itertools.product(
        space.n_layers, space.d_model, space.ffn_mult, space.vocab_size, space.tie_embeddings
    ):
        if d % space.head_dim or (d // space.head_dim) % space.n_kv_heads:
            continue
        trunk = replace(
            base,
            name="candidate",
            vocab_size=vocab,
            d_model=d,
            n_layers=layers,
            n_heads=d // space.head_dim,
            n_kv_heads=space.n_kv_heads,
            head_dim=space.head_dim,
            tie_embeddings=tie,
            moe=None,
            ffn_dim=mult * d,
        )
        width = mult * d
        for expansion, granularity, fraction in itertools.product(
            space.expansion, space.granularity, space.shared_fraction
        ):
            if expansion == 1:
                if granularity != 1 or fraction != 0:
                    continue  # dense: one candidate per trunk
                candidate = trunk
            else:
                shared_units = fraction * granularity
                if width % granularity or shared_units != int(shared_units) or granularity - shared_units < 1:
                    continue
                unit = width // granularity
                if unit % GROUPED_MM_ALIGN:
                    continue
                shared_units = int(shared_units)
                moe = replace(
                    router,
                    num_experts=expansion * granularity - shared_units,
                    top_k=granularity - shared_units,
                    expert_ffn_dim=unit,
                    num_shared_experts=1 if shared_units else 0,
                    shared_ffn_dim=unit * shared_units,
                )
                candidate = replace(trunk, moe=moe, ffn_dim=0)
            try:
                quant.check_fits(candidate)
            except ConfigError:
                continue
            yield replace(candidate, name=candidate_name(candidate, len(space.vocab_size) > 1))


def candidate_name(cfg: ModelConfig, with_vocab: bool) -> str:
    """``l20_d768_e60k4s4`` (layers, width, routed experts, top-k, shared units), or
    ``l20_d768_dense``; ``_untied`` and ``_v<vocab>`` when they vary."""
    moe = cfg.moe
    ffn = "dense" if moe is None else f"e{moe.num_experts}k{moe.top_k}"
    if moe is not None and moe.num_shared_experts:
        ffn += f"s{moe.shared_ffn_dim // moe.expert_ffn_dim}"
    name = f"l{cfg.n_layers}_d{cfg.d_model}_{ffn}"
    name += "" if cfg.tie_embeddings else "_untied"
    return name + (f"_v{cfg.vocab_size}" if with_vocab else "")


def evaluate(
    models: list[ModelConfig],
    law: ScalingLaw,
    tokens: float,
    context: int,
    group_size: int = 32,
    embedding_bits: int = 4,
) -> list[Candidate]:
    """Accounting and predicted loss of each model (at ``tokens`` training tokens).

    INT4 bytes are the on-device estimate of ``accounting.int4_weight_bytes`` (bf16
    scales and norms; ``embedding_bits`` 8 for an INT8 embedding)."""
    inputs = [law_inputs(m, tokens) for m in models]
    losses = law.predict(inputs) if inputs else np.zeros(0)
    return [
        Candidate(
            model=m,
            int4_bytes=int4_weight_bytes(m, group_size=group_size, embedding_bits=embedding_bits),
            flops_per_token=flops_per_token(m, context, "decode"),
            decode_bytes=decode_read_bytes(m, context, group_size=group_size)["total"],
            inputs=x,
            loss=float(loss),
        )
        for m, x, loss in zip(models, inputs, losses)
    ]


def within(candidate: Candidate, budget: Budget) -> bool:
    """Whether ``candidate`` fits every budget given."""
    return (
        (budget.memory_bytes is None or candidate.int4_bytes <= budget.memory_bytes)
        and (budget.flops_per_token is None or candidate.flops_per_token <= budget.flops_per_token)
        and (budget.decode_bytes is None or candidate.decode_bytes <= budget.decode_bytes)
    )


def pareto(candidates: list[Candidate], cost: str) -> list[Candidate]:
    """The candidates no other beats on both ``cost`` (an attribute, lower is better)
    and predicted loss, ordered by cost."""
    frontier: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: (getattr(c, cost), c.loss)):
        if not frontier or c.loss < frontier[-1].loss:
            frontier.append(c)
    return frontier


@dataclass
class Plan:
    """The planner's answer: the best ``top`` architectures within budget, and the
    frontiers of predicted loss against INT4 memory and against FLOPs per token (over
    every enumerated architecture, so references can be placed against them)."""

    budget: Budget
    feasible: list[Candidate]  # within budget and admitted, best predicted loss first
    frontier_memory: list[Candidate]
    frontier_flops: list[Candidate]
    enumerated: int
    top: int = 10
    outside: int = 0  # within budget but refused by the plan's ``admit`` (outside the sweep's reach)

    @property
    def best(self) -> list[Candidate]:
        return self.feasible[: self.top]

    @property
    def chosen(self) -> Candidate:
        return self.feasible[0]


def plan(
    law: ScalingLaw,
    budget: Budget,
    space: SearchSpace,
    base: ModelConfig,
    tokens: float,
    context: int = 1024,
    group_size: int = 32,
    top: int = 10,
    embedding_bits: int = 4,
    admit: Callable[[Candidate], str] | None = None,
) -> Plan:
    """Plan an architecture (see the module doc). Raises PlanError naming the budget
    when no architecture of ``space`` fits it, with the smallest that exist.

    ``group_size`` and ``embedding_bits`` are the recipe's QAT settings: candidates
    whose weights the groups do not tile are left out, and INT4 bytes count them.
    ``admit``: why a candidate may not be chosen ("" when it may; e.g.
    :func:`pipeline.scaling.plan_report.outside_sweep`); PlanError naming the lowest-loss
    candidate's reason when every candidate within budget is refused."""
    models = list(enumerate_models(space, base, group_size))
    candidates = evaluate(models, law, tokens, context, group_size, embedding_bits)
    if not candidates:
        raise PlanError("the search space holds no architecture the recipe can train (check head_dim, widths)")
    feasible = [c for c in candidates if within(c, budget)]
    if not feasible:
        smallest = min(candidates, key=lambda c: c.int4_bytes)
        cheapest = min(candidates, key=lambda c: c.flops_per_token)
        lightest = min(candidates, key=lambda c: c.decode_bytes)
        raise PlanError(
            f"no architecture of the search space fits {budget.describe()}: the smallest needs "
            f"{smallest.int4_bytes / 1e9:.4g} GB of INT4 weights ({smallest.model.n_layers} layers x d_model "
            f"{smallest.model.d_model}), the cheapest {cheapest.flops_per_token / 1e9:.4g} GFLOPs per token, "
            f"the lightest reads {lightest.decode_bytes / 1e9:.4g} GB per decode step; "
            f"raise the budget or add smaller shapes to the search space"
        )
    refused = {id(c): admit(c) for c in feasible} if admit else {}
    kept = [c for c in feasible if not refused.get(id(c))]
    if not kept:
        best = min(feasible, key=lambda c: c.loss)
        raise PlanError(
            f"all {len(feasible)} architectures within {budget.describe()} lie outside what the law was fitted on "
            f"(the best, {best.model.name}: {refused[id(best)]}); widen the sweep or plan by extrapolation "
            "(scaling.plan.within_sweep=false)"
        )
    outside, feasible = len(feasible) - len(kept), sorted(kept, key=lambda c: c.loss)
    return Plan(
        budget=budget,
        feasible=feasible,
        frontier_memory=pareto(candidates, "int4_bytes"),
        frontier_flops=pareto(candidates, "flops_per_token"),
        enumerated=len(candidates),
        outside=outside,
        top=top,
    )


def frontier_loss_at(frontier: list[Candidate], cost: str, value: float) -> float | None:
    """The best predicted loss on ``frontier`` at ``cost`` <= ``value`` (None if none)."""
    fits = [c.loss for c in frontier if getattr(c, cost) <= value]
    return min(fits) if fits else None


def model_yaml(model: ModelConfig, header: str) -> str:
    """``model`` as a ``conf/model/`` file, with ``header`` as comment lines."""
    import yaml

    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(asdict(model), sort_keys=False)
