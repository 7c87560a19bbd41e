"""A sweep's grid: model sizes x architectures x token budgets, as model configs.

A sweep point is named by three knobs (``size``, ``arch``, ``tokens``) that a Hydra
multirun sweeps as a Cartesian product (``conf/sweep/*.yaml``). An architecture is a
named bundle of the MoE knobs (routed experts, top-k, granularity, shared expert)
because the knobs are only meaningful together: at granularity G a routed expert is
``ffn_mult * d_model / G`` wide, so top-k + shared units = G keeps the active width
(compute) of the dense model while E = expansion x G sets the total width (memory).
Nothing forces that sum: an arch with a smaller top-k has a narrower active width, and
the law reads its granularity and expansion from the built config
(``accounting.ffn_shape``), not from the arch's ``granularity`` field. The dense twins
(``twin: active`` and ``twin: total`` of a named MoE architecture) are built with
:func:`pipeline.model.twins.dense_twin`, at every size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from pipeline.configbase import ConfigError, require
from pipeline.model.config import GROUPED_MM_ALIGN, ModelConfig, MoEConfig
from pipeline.model.twins import dense_twin

# Names end up in MLflow tags, search filters and point names "<size>-<arch>-<tokens>".
NAME = re.compile(r"^[A-Za-z0-9_]+$")


def _check_name(name: str) -> None:
    require(bool(NAME.match(name or "")), "name", f"{name!r}: use letters, digits and underscores only")


@dataclass
class SizeSpec:
    """The trunk of one model size; the FFN comes from the architecture."""

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        _check_name(self.name)
        for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")


@dataclass
class ArchSpec:
    """One architecture family: an MoE (``experts`` routed, ``top_k``, ``granularity``,
    and ``shared`` > 0 for one shared expert ``shared`` routed experts wide) or a dense twin of one
    (``twin: active|total``, ``of: <moe arch name>``); ``dense`` alone is a plain dense
    FFN of ``ffn_mult * d_model``."""

    name: str
    experts: int = 0
    top_k: int = 0
    granularity: int = 1
    shared: int = 0
    twin: str | None = None  # "active" or "total": a dense twin of the arch named in `of`
    of: str | None = None
    dense: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name)
        kinds = sum([self.dense, self.twin is not None, self.experts > 0])
        require(kinds == 1, "experts", f"{self.name}: give exactly one of experts (MoE), twin (+ of) or dense: true")
        if self.twin is not None:
            require(self.twin in ("active", "total"), "twin", f"must be 'active' or 'total', got {self.twin!r}")
            require(bool(self.of), "of", f"{self.name}: a twin names the MoE arch it twins (of: <arch>)")
        if self.experts > 0:
            require(1 <= self.top_k <= self.experts, "top_k", f"{self.name}: must be in [1, experts={self.experts}]")
            require(self.granularity >= 1, "granularity", f"must be >= 1, got {self.granularity}")
            require(self.shared >= 0, "shared", f"must be >= 0, got {self.shared}")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0


@dataclass
class SweepConfig:
    """A named sweep and the point this job runs (``size``, ``arch``, ``tokens``).

    ``tokens``: training tokens of the point (steps = tokens / tokens per step, rounded
    up). What the fit holds out is the fit's config (``stage.scaling.hold_out_sizes``)."""

    name: str
    sizes: list[SizeSpec]
    archs: list[ArchSpec]
    size: str
    arch: str
    tokens: int
    ffn_mult: int = 4

    def __post_init__(self) -> None:
        _check_name(self.name)
        require(self.ffn_mult >= 1, "ffn_mult", "must be >= 1")
        require(self.tokens >= 1, "tokens", f"must be >= 1, got {self.tokens}")
        sizes, archs = [s.name for s in self.sizes], [a.name for a in self.archs]
        for kind, names in (("sizes", sizes), ("archs", archs)):
            dup = sorted({n for n in names if names.count(n) > 1})
            require(not dup, kind, f"duplicate name {dup[0]!r}" if dup else "")
        require(self.size in sizes, "size", f"{self.size!r} is not one of sizes {sizes}")
        require(self.arch in archs, "arch", f"{self.arch!r} is not one of archs {archs}")
        for a in self.archs:
            if a.twin is not None:
                ref = next((b for b in self.archs if b.name == a.of), None)
                require(ref is not None and ref.is_moe, f"archs.{a.name}.of", f"{a.of!r} is not an MoE arch of {archs}")

    def size_spec(self, name: str) -> SizeSpec:
        return next(s for s in self.sizes if s.name == name)

    def arch_spec(self, name: str) -> ArchSpec:
        return next(a for a in self.archs if a.name == name)


def point_model(sweep: SweepConfig, base: ModelConfig, size: str | None = None, arch: str | None = None) -> ModelConfig:
    """The model of sweep point (``size``, ``arch``) (default: the job's own point).

    ``base`` supplies what the grid does not set (vocabulary, RoPE, norms, router
    settings, sequence length). Raises ConfigError naming the arch when an expert width
    ``ffn_mult * d_model / granularity`` is not a whole multiple of the grouped-GEMM
    alignment."""
    size_spec = sweep.size_spec(size or sweep.size)
    arch_spec = sweep.arch_spec(arch or sweep.arch)
    trunk = replace(
        base,
        name=f"{sweep.name}_{size_spec.name}_{arch_spec.name}",
        d_model=size_spec.d_model,
        n_layers=size_spec.n_layers,
        n_heads=size_spec.n_heads,
        n_kv_heads=size_spec.n_kv_heads,
        head_dim=size_spec.head_dim,
    )
    width = sweep.ffn_mult * size_spec.d_model
    if arch_spec.dense:
        return replace(trunk, moe=None, ffn_dim=width)
    if arch_spec.twin is not None:
        moe = _moe_model(trunk, width, sweep.arch_spec(arch_spec.of))
        return replace(dense_twin(moe, arch_spec.twin), name=trunk.name)
    return _moe_model(trunk, width, arch_spec)


def _moe_model(trunk: ModelConfig, width: int, arch: ArchSpec) -> ModelConfig:
    expert = width // arch.granularity
    if width % arch.granularity or expert % GROUPED_MM_ALIGN:
        raise ConfigError(
            f"sweep.archs.{arch.name}.granularity: d_model x ffn_mult = {width} split {arch.granularity} ways is "
            f"{width / arch.granularity:g} wide, not a multiple of {GROUPED_MM_ALIGN} (size d_model={trunk.d_model})"
        )
    router = trunk.moe or MoEConfig(num_experts=1, top_k=1, expert_ffn_dim=expert)
    moe = replace(
        router,
        num_experts=arch.experts,
        top_k=arch.top_k,
        expert_ffn_dim=expert,
        num_shared_experts=1 if arch.shared else 0,
        shared_ffn_dim=expert * arch.shared,
    )
    return replace(trunk, moe=moe, ffn_dim=0)


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that train on at least ``tokens`` tokens."""
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
    return math.ceil(tokens / tokens_per_step)
