"""The training loop without Ray: learning, masking, and exact resume from a checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.build import build_all
from pipeline.data.mixing import MixtureConfig
from pipeline.model import ModelConfig, MoEConfig
from pipeline.train.batches import IGNORE_INDEX, TokenBatches
from pipeline.train.callbacks import BalanceCallback, CheckpointCallback, MetricsCallback
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint
from pipeline.train.config import TrainStageConfig
from pipeline.train.loop import WorkerJob, run_loop
from pipeline.train.schedule import ScheduleConfig

VOCAB = 512


def _mixture(kind: str, sources: list[dict]) -> MixtureConfig:
    return MixtureConfig(sources=sources, total_tokens=15000, val_fraction=0.1, seed=0, kind=kind)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mix") / "mix"
    text = [{"name": "arithmetic", "kind": "arithmetic", "weight": 1.0, "domain": "math",
             "options": {"n_docs": 300}},
            {"name": "fortunes", "kind": "fortunes", "weight": 1.0, "domain": "literature", "max_docs": 300}]
    chat = [{"name": "math", "kind": "math", "weight": 1.0, "domain": "math", "options": {"n_docs": 300}}]
    build_all(_mixture("text", text), _mixture("text", text[:1]), _mixture("chat", chat), VOCAB, out,
              tokenizer_max_bytes=200_000)
    return out


def _job(data_dir: Path, steps: int, mixture: str = "pretrain") -> WorkerJob:
    model = ModelConfig(name="t", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        head_dim=8, max_seq_len=64,
                        moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=1,
                                      shared_ffn_dim=16, route_scale=2.5, bias_update_rate=0.01))
    train = TrainStageConfig(mixture=str(data_dir / mixture), tokenizer=str(data_dir / "tokenizer" / "tokenizer.json"),
                             out_dir="unused", seq_len=32, batch_size=8,
                             schedule=ScheduleConfig(kind="cosine", lr=1e-2, warmup_steps=2, total_steps=steps),
                             log_every=1, eval_every=5, eval_batches=2, checkpoint_every=5)
    return WorkerJob(stage="pretrain", model=asdict(model), train=asdict(train), seed=0, bytes_per_token=3.0)


class Reports:
    """Stands in for ray.train.report: keeps the reported checkpoint roots."""

    def __init__(self, keep_dir: Path) -> None:
        self.keep_dir, self.roots = keep_dir, []

    def __call__(self, metrics: dict, root: Path | None) -> None:
        import shutil

        dest = self.keep_dir / f"report_{len(self.roots)}"
        shutil.copytree(root, dest)
        self.roots.append(dest)


def _callbacks(job: WorkerJob, reports: Reports) -> list:
    return [BalanceCallback(), MetricsCallback(1, None), CheckpointCallback(5, 2, {"model": job.model}, reports)]


def test_batches_mask_prompt_tokens_and_resample_identically(data_dir):
    sft = TokenBatches(data_dir / "sft", "train", seq_len=64, batch_size=4, seed=0)
    inputs, labels = sft.train_batch(step=3, micro=0, rank=0)
    again, labels_again = sft.train_batch(step=3, micro=0, rank=0)
    assert torch.equal(inputs, again) and torch.equal(labels, labels_again)
    masked = labels == IGNORE_INDEX
    assert masked.any() and (~masked).any()  # user turns are masked, answers are not
    other, _ = sft.train_batch(step=4, micro=0, rank=0)
    assert not torch.equal(inputs, other)


def test_loop_learns_and_balances(data_dir, tmp_path):
    job = _job(data_dir, steps=30)
    reports = Reports(tmp_path)
    state = run_loop(job, rank=0, world=1, resume=None, callbacks=_callbacks(job, reports))
    losses = [v for _, v in state.history["train/loss"]]
    assert losses[-1] < losses[0] - 1.0, losses
    assert "val/loss" in state.history and "val/bpb" in state.history
    assert "moe/max_over_mean" in state.history
    assert len(reports.roots) == 6  # steps 5, 10, ..., 30


def test_resume_from_checkpoint_equals_uninterrupted(data_dir, tmp_path):
    job = _job(data_dir, steps=10)
    straight = run_loop(job, 0, 1, None, _callbacks(job, Reports(tmp_path / "a")))

    reports = Reports(tmp_path / "b")
    first_half = _job(data_dir, steps=10)
    callbacks = _callbacks(first_half, reports)

    class Interrupt(Exception):
        pass

    class StopAfterFirstCheckpoint:
        def on_train_start(self, state):
            pass

        def on_step_end(self, state, metrics):
            if reports.roots:
                raise Interrupt

        def on_train_end(self, state):
            pass

    with pytest.raises(Interrupt):
        run_loop(first_half, 0, 1, None, callbacks + [StopAfterFirstCheckpoint()])
    ckpt = load_checkpoint(latest_checkpoint(reports.roots[-1]))
    assert ckpt.step == 5
    resumed = run_loop(job, 0, 1, ckpt, _callbacks(job, Reports(tmp_path / "c")))
    assert resumed.resumed_at == [5]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [v for _, v in straight.history["train/loss"]] == [v for _, v in resumed.history["train/loss"]]


def test_stage_config_rejects_bad_values():
    from pipeline.configbase import ConfigError, from_dict

    base = {"mixture": "m", "tokenizer": "t", "out_dir": "o"}
    with pytest.raises(ConfigError, match=r"^stage.pretrain.batch_size:"):
        from_dict(TrainStageConfig, {**base, "batch_size": 0}, "stage.pretrain")
    with pytest.raises(ConfigError, match=r"^stage.pretrain.schedule.warmup_steps:"):
        from_dict(TrainStageConfig, {**base, "schedule": {"warmup_steps": 10, "total_steps": 5}}, "stage.pretrain")
    with pytest.raises(ConfigError, match=r"^stage.pretrain.dtype:"):
        from_dict(TrainStageConfig, {**base, "dtype": "fp8"}, "stage.pretrain")
