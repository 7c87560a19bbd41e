"""Side effects of the training loop, as callbacks: balancing, metrics, checkpoints.

Each callback sees the loop state after every optimizer step (``on_step_end``, with the
step's metrics, validation included when it ran), once at the start and the end, and
``on_eval`` for an evaluation outside a step (the starting model's, at step 0).
They run in list order, so the balancer's load statistics reach the metric logger.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.model import ExpertBiasBalancer
from pipeline.train.checkpoint import capture_rng_state, optimizer_param_names, save_checkpoint


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


class MetricsCallback(Callback):
    """Rank 0 keeps the metric history (saved in checkpoints) and logs it to MLflow."""

    def __init__(self, log_every: int, logger: Any | None) -> None:
        self.log_every = log_every
        self.logger = logger  # a tracking.RemoteMetricLogger, or None when disabled

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
            state.history.setdefault(key, []).append([state.step, float(value)])
        shown = " ".join(f"{k.removeprefix('train/').replace('/', '_')}={metrics[k]:.4g}" for k in
                         ("train/loss", "val/loss", "val/bpb", "train/lr", "train/tokens_per_s",
                          "moe/max_over_mean") if k in metrics)
        print(f"step {state.step}: {shown}", flush=True)
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=state.step)


def ray_report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    import ray.train

    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


class CheckpointCallback(Callback):
    """Every ``every`` steps and at the end: rank 0 writes a checkpoint (atomically, via
    checkpoint.py) into a scratch directory and every rank reports to Ray Train, which
    persists it under the run's storage path. Resume reads it back from there."""

    def __init__(self, every: int, meta: dict, report: Callable = ray_report) -> None:
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
        metrics = {k: v for k, v in self.last_metrics.items() if not k.startswith("moe/")}
        metrics["step"] = state.step
        if state.rank != 0:
            self.report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as scratch:
            root = Path(scratch)
            save_checkpoint(
                root, state.step, state.model.state_dict(), state.optimizer,
                meta={**self.meta, "step": state.step, "tokens_seen": state.tokens_seen,
                      "history": state.history, "resumed_at": state.resumed_at,
                      "expert_load": state.expert_load, "metrics": metrics},
                keep_last=1,
                param_names=optimizer_param_names(state.model, state.optimizer),
                extra=capture_rng_state(),
            )
            self.report(metrics, root)
