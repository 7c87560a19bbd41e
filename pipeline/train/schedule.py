"""Learning-rate schedules as one pure function of (config, step).

Every schedule starts with a linear warmup and then follows its shape:

- ``cosine``: half-cosine from ``lr`` down to ``lr * min_lr_ratio`` (pre-training).
- ``linear``: straight line from ``lr`` down to ``lr * min_lr_ratio`` (mid-training).
- ``wsd``: warmup-stable-decay; holds ``lr`` and then decays linearly over the last
  ``decay_fraction`` of ``total_steps`` (mid-training of the MiniCPM kind).
- ``constant``: holds ``lr`` after warmup (``min_lr_ratio`` is ignored).

``step`` counts optimizer steps already taken, so ``lr_at(cfg, 0)`` is the lr of the
first update. Cosine and linear follow the usual convention: the first update after
warmup is at the peak and ``lr_at(cfg, total_steps)`` (after the last update) is the
final lr. The wsd window is counted in updates: its last N updates are all decayed, the
first by 1/N of the way, the last (``step = total_steps - 1``) to exactly the final lr,
so a one-update window still decays. Steps past the end stay at the final lr, so a run
extended by a few steps does not see the lr jump.

A pure function (rather than a stateful ``torch.optim.lr_scheduler``) makes resuming
trivial: the training loop sets ``group["lr"] = lr_at(cfg, step)`` from the restored step,
with no scheduler state to checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.configbase import ConfigError, require

KINDS = ("cosine", "linear", "wsd", "constant")


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    lr: float = 4e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        require(self.kind in KINDS, "kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}")
        require(_is_number(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr!r}")
        require(
            _is_int(self.total_steps) and self.total_steps > 0,
            "total_steps",
            f"must be an integer > 0, got {self.total_steps!r}",
        )
        require(
            _is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "warmup_steps",
            f"must be an integer >= 0, got {self.warmup_steps!r}",
        )
        # Warmup that covers the whole run leaves no schedule at all: almost always a
        # units mistake (tokens vs steps), so refuse it instead of training at a ramp.
        require(
            self.warmup_steps < self.total_steps,
            "warmup_steps",
            f"must be < total_steps ({self.total_steps}), got {self.warmup_steps}",
        )
        require(
            _is_number(self.min_lr_ratio) and 0.0 <= self.min_lr_ratio <= 1.0,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio!r}",
        )
        require(
            _is_number(self.decay_fraction) and 0.0 < self.decay_fraction <= 1.0,
            "decay_fraction",
            f"must be in (0, 1], got {self.decay_fraction!r}",
        )
        if self.kind == "wsd":
            # The decay must not start inside the warmup, or the stable phase is negative
            # and the "warmup" would overshoot a decaying target.
            require(
                self.decay_start >= self.warmup_steps,
                "decay_fraction",
                f"wsd decay of {self.total_steps - self.decay_start} steps overlaps the "
                f"{self.warmup_steps} warmup steps (total_steps={self.total_steps})",
            )

    @property
    def final_lr(self) -> float:
        return self.lr if self.kind == "constant" else self.lr * self.min_lr_ratio

    @property
    def decay_start(self) -> int:
        """First step of the wsd decay phase."""
        return self.total_steps - max(1, round(self.decay_fraction * self.total_steps))


def lr_at(cfg: ScheduleConfig, step: int) -> float:
    """Learning rate for the update made after ``step`` completed optimizer steps."""
    if step < 0:
        raise ConfigError(f"step: must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        # (step + 1) so the very first update already moves (lr/warmup, not 0) and the
        # last warmup step reaches exactly lr.
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.kind == "constant":
        return cfg.lr
    if cfg.kind == "wsd":  # updates decay_start .. total_steps-1, inclusive
        start, first = cfg.decay_start, 1
    else:  # from the peak at warmup_steps to the final lr at total_steps
        start, first = cfg.warmup_steps, 0
    progress = min(1.0, max(0.0, (step + first - start) / (cfg.total_steps - start)))
    low = cfg.final_lr
    if cfg.kind == "cosine":
        return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - low) * progress


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
