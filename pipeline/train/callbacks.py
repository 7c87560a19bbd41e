"""Side effects of the training loop, as callbacks: balancing, metrics, checkpoints.

Each callback sees the loop state after every optimizer step (``on_step_end``, with the
step's metrics, validation included when it ran), once at the start and the end, and
``on_eval`` for an evaluation outside a step (the starting model's, at step 0).
They run in list order, so the balancer's load statistics reach the metric logger.

None of them knows about Ray or MLflow: the checkpoint callback hands each checkpoint
to a ``report`` function and the metrics callback to a ``logger`` object, both given by
whoever runs the loop (the runner passes Ray Train's report and an MLflow logger).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.model import ExpertBiasBalancer
from pipeline.train.checkpoint import capture_rng_state, save_checkpoint, training_state


class Callback:
    def on_train_start(self, state) -> None:
        pass

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, state, metrics: dict[str, float]) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass


class BalanceCallback(Callback):
    """Auxiliary-loss-free balancing: update expert biases after each optimizer step."""

    def on_train_start(self, state) -> None:
        self.balancer = ExpertBiasBalancer(state.model.moe_layers())

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        metrics.update(self.balancer.step())
        counts_LE = self.balancer.last_counts_LE
        if counts_LE is not None:  # the stage's load histogram, summed over steps
            load = torch.tensor(state.expert_load) if state.expert_load else torch.zeros(counts_LE.shape)
            state.expert_load = (load + counts_LE.cpu()).tolist()


def is_perf(key: str) -> bool:
    """Metrics that describe the execution (speed), not the result: never in checkpoints."""
    return key.startswith("perf/")


class MetricsCallback(Callback):
    """Rank 0 keeps the metric history (saved in checkpoints) and logs every metric,
    ``perf/*`` included, to ``logger`` (``log_metrics(metrics, step=)``, or None)."""

    def __init__(self, log_every: int, logger: Any | None) -> None:
        self.log_every = log_every
        self.logger = logger  # a tracking.RunLogger, or None when disabled

    def on_eval(self, state, metrics: dict[str, float]) -> None:
        self._record(state, metrics)

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        due = state.step % self.log_every == 0 or any(k.startswith("val/") for k in metrics)
        if due:
            self._record(state, metrics)

    def _record(self, state, metrics: dict[str, float]) -> None:
        if state.rank != 0:
            return
        for key, value in metrics.items():
            if not is_perf(key):
                state.history.setdefault(key, []).append([state.step, float(value)])
        shown = " ".join(
            f"{k.split('/')[-1] if k.startswith(('train/', 'perf/')) else k.replace('/', '_')}={metrics[k]:.4g}"
            for k in ("train/loss", "val/loss", "val/bpb", "train/lr", "perf/tokens_per_s", "moe/max_over_mean")
            if k in metrics
        )
        print(f"step {state.step}: {shown}", flush=True)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=state.step)


class ProgressCallback(Callback):
    """A progress bar of the run's steps (tqdm) on rank 0, with ETA and the last loss.

    Worker output reaches the driver line by line (Ray forwards lines), so the bar is
    written as one line per refresh, at most every ``every_s`` seconds."""

    def __init__(self, total: int, desc: str, every_s: float = 15.0, file: Any = None) -> None:
        self.total, self.desc, self.every_s, self.file = total, desc, every_s, file
        self.bar = None

    def on_train_start(self, state) -> None:
        if state.rank != 0:
            return
        from tqdm import tqdm

        self.bar = tqdm(
            total=self.total,
            initial=state.step,
            desc=self.desc,
            unit="step",
            file=_LineStream(self.file),
            mininterval=self.every_s,
            maxinterval=self.every_s,
            ascii=True,
            ncols=100,
            dynamic_ncols=False,
        )

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            if "train/loss" in metrics:
                self.bar.set_postfix(loss=f"{metrics['train/loss']:.4g}", refresh=False)
            self.bar.update(1)

    def on_train_end(self, state) -> None:
        if self.bar is not None:
            self.bar.close()


class _LineStream:
    """A text stream that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, target: Any = None) -> None:
        import sys

        self.target = target or sys.stdout

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line:
            self.target.write(line + "\n")
            self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()


class CheckpointCallback(Callback):
    """Every ``every`` steps and at the end: rank 0 writes a checkpoint (atomically, via
    checkpoint.py) into a scratch directory and every rank calls ``report(metrics,
    checkpoint_dir or None)``; under Ray Train that reports to Ray, which persists it
    under the run's storage path, and resume reads it back from there."""

    def __init__(self, every: int, meta: dict, report: Callable[[dict, Path | None], None]) -> None:
        self.every, self.meta, self.report = every, meta, report
        self.last_metrics: dict[str, float] = {}

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        self.last_metrics.update(metrics)
        if state.step % self.every == 0:
            self._save(state)

    def on_train_end(self, state) -> None:
        if state.step % self.every != 0 or not self.last_metrics:
            self._save(state)

    def _save(self, state) -> None:
        metrics = {k: v for k, v in self.last_metrics.items() if not k.startswith("moe/") and not is_perf(k)}
        metrics["step"] = state.step
        # On every rank: with sharded parameters (FSDP2) gathering them is collective.
        model_state, optimizer_state = training_state(state.model, state.optimizer)
        if state.rank != 0:
            self.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as scratch:
            path = Path(scratch) / "checkpoint"
            save_checkpoint(
                path,
                state.step,
                model_state,
                optimizer_state,
                meta={
                    **self.meta,
                    "step": state.step,
                    "tokens_seen": state.tokens_seen,
                    "history": state.history,
                    "resumed_at": state.resumed_at,
                    "expert_load": state.expert_load,
                },
                extra=capture_rng_state(),
            )
            self.report(metrics, path)
