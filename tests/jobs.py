"""A micro training job and its callbacks, run in-process by the training-loop tests
(tests/train, tests/tracking): no Ray, the loop itself."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from shapes import VOCAB

from pipeline.model import ModelConfig, MoEConfig
from pipeline.train.callbacks import BalanceCallback, CheckpointCallback, MetricsCallback
from pipeline.train.config import TrainStageConfig
from pipeline.train.loop import WorkerJob
from pipeline.train.schedule import ScheduleConfig


def micro_job(micro_data: Path, steps: int, mixture: str = "pretrain") -> WorkerJob:
    model = ModelConfig(
        name="t",
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        max_seq_len=64,
        moe=MoEConfig(
            num_experts=4,
            top_k=2,
            expert_ffn_dim=16,
            num_shared_experts=1,
            shared_ffn_dim=16,
            route_scale=2.5,
            bias_update_rate=0.01,
        ),
    )
    train = TrainStageConfig(
        mixture=str(micro_data / mixture),
        tokenizer=str(micro_data / "tokenizer" / "tokenizer.json"),
        out_dir="unused",
        seq_len=32,
        batch_size=8,
        schedule=ScheduleConfig(kind="cosine", lr=1e-2, warmup_steps=2, total_steps=steps),
        log_every=1,
        eval_every=5,
        eval_batches=2,
        checkpoint_every=5,
    )
    return WorkerJob(
        stage="pretrain",
        model=asdict(model),
        train=asdict(train),
        seed=0,
        mixture_dir=str(micro_data / mixture),
        bytes_per_token=3.0,
    )


class Reports:
    """Stands in for ray.train.report: keeps a copy of each reported checkpoint."""

    def __init__(self, keep_dir: Path) -> None:
        self.keep_dir, self.roots = keep_dir, []

    def __call__(self, metrics: dict, checkpoint: Path | None) -> None:
        import shutil

        dest = self.keep_dir / f"report_{len(self.roots)}"
        shutil.copytree(checkpoint, dest)
        self.roots.append(dest)


def job_callbacks(job: WorkerJob, reports: Reports) -> list:
    return [BalanceCallback(), MetricsCallback(1, None), CheckpointCallback(5, {"model": job.model}, report=reports)]
