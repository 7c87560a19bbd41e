"""Configs of a training stage and of the Ray cluster it runs on.

Pre-training, mid-training and SFT share one loop; they differ only by these values
(data mixture, schedule, starting checkpoint, sequence length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from pipeline.configbase import require
from pipeline.quant.config import QuantConfig
from pipeline.train.schedule import ScheduleConfig


@dataclass
class TrainStageConfig:
    mixture: str  # directory of the stage's data mixture (an output of the mix stage)
    tokenizer: str  # tokenizer.json written by the mix stage
    out_dir: str  # this stage's declared output directory
    init_checkpoint: str | None = None  # upstream stage's final model directory
    seq_len: int = 256
    batch_size: int = 16  # sequences per worker per micro-batch
    grad_accum: int = 1
    schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(
            kind="cosine", lr=1e-3, warmup_steps=10, total_steps=100, min_lr_ratio=0.1
        )
    )
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: Literal["float32", "bfloat16"] = "float32"
    # How the ranks share the model (pipeline/train/parallel.py): "ddp" replicates it
    # and all-reduces gradients; "fsdp2" shards parameters, gradients and optimizer
    # state over the ranks (torch's fully_shard), for models that do not fit one device.
    # Checkpoints are the same full tensors either way.
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    # torch.compile each transformer block (the grouped expert GEMM stays eager).
    compile: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # Held-out chat prompts answered by the final model (SFT only; 0 disables).
    sample_prompts: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        for key in ("mixture", "tokenizer", "out_dir"):
            require(bool(getattr(self, key)), key, "must be a non-empty path")
        for key in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, key)
            require(isinstance(value, int) and value >= 1, key, f"must be an int >= 1, got {value!r}")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "betas",
            f"must be two numbers in [0, 1), got {self.betas}",
        )
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(self.grad_clip > 0, "grad_clip", "must be > 0")
        require(self.dtype in ("float32", "bfloat16"), "dtype", f"must be 'float32' or 'bfloat16', got {self.dtype!r}")
        require(self.parallel in ("ddp", "fsdp2"), "parallel", f"must be 'ddp' or 'fsdp2', got {self.parallel!r}")
        require(self.sample_prompts >= 0, "sample_prompts", "must be >= 0")

    @property
    def steps(self) -> int:
        return self.schedule.total_steps


@dataclass
class QATStageConfig(TrainStageConfig):
    """Quantization-aware training: the training loop over a fake-quantized model, plus
    what the stage measures against (PTQ, and an FP32 control trained alike)."""

    scheme: str = "8da4w"  # or the study schemes 8da3w, 8da2w: see pipeline/quant/config.py
    group_size: int = 32
    granularity: Literal["per_group", "per_channel"] = "per_group"
    embedding: Literal["int4", "int8"] = "int4"  # the tied embedding/output head
    # Mixture whose validation text gives bits per byte (the SFT val split has chats).
    text_mixture: str = ""
    # Also continue SFT in full precision for the same steps and data: QAT's gain over
    # PTQ is then not mistaken for the gain of more training.
    control: bool = True
    # Validation batches of the side-by-side comparison (more than eval_batches: the
    # quantization gaps are small differences of losses on the same batches).
    compare_batches: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        require(bool(self.text_mixture), "text_mixture", "must be a non-empty path")
        require(self.compare_batches >= 1, "compare_batches", f"must be >= 1, got {self.compare_batches}")
        require(self.init_checkpoint is not None, "init_checkpoint", "QAT starts from a trained model: give its path")
        self.quant()  # validates scheme, group_size, granularity, embedding by name

    def quant(self) -> QuantConfig:
        return QuantConfig(self.scheme, self.group_size, self.granularity, self.embedding)

    def train_config(self) -> TrainStageConfig:
        """The plain training-loop part of this config."""
        mine = asdict(self)
        return TrainStageConfig(**{f.name: getattr(self, f.name) for f in fields(TrainStageConfig) if f.name in mine})


@dataclass
class RayConfig:
    address: str | None = None  # None: start Ray embedded; "auto" or ray://... joins a cluster
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: bool = False
    # Ray Train run storage (resume lives here) and staged inputs: a path, or a URI
    # (s3://, gs://, file://); on a cluster a URI or an absolute path every node shares.
    storage_path: str = "checkpoints"
    # Restarts of a training job whose worker group failed (a lost node, a killed
    # worker); each resumes from the last checkpoint every rank reported. -1: no limit.
    max_failures: int = 1
    # How long a job waits for its workers' resources, at the start and at each restart,
    # before it fails naming what the cluster lacks.
    start_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
        require(bool(self.storage_path), "storage_path", "must be a non-empty path")
        require(
            self.storage_path != "???",  # Hydra's "must be given" marker (conf/ray/cluster.yaml)
            "storage_path",
            "is not set: give a URI (s3://bucket/runs) or an absolute path every node of the cluster mounts",
        )
        require(
            isinstance(self.max_failures, int) and self.max_failures >= -1,
            "max_failures",
            f"must be an int >= -1 (-1: no limit), got {self.max_failures!r}",
        )
        require(self.start_timeout_s > 0, "start_timeout_s", f"must be > 0 seconds, got {self.start_timeout_s}")

    def worker_resources(self) -> dict[str, int]:
        """What one training worker occupies (on one node): ``{"CPU": c[, "GPU": 1]}``."""
        return {"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})}

    def job_resources(self) -> dict[str, int]:
        """What a training job of this config occupies: ``{"CPU": n[, "GPU": g]}``."""
        return {k: v * self.num_workers for k, v in self.worker_resources().items()}
