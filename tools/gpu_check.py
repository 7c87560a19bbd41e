"""The GPU path in one prepared run (under 10 minutes on one H100/H200): BF16 parity with
FP32 at the tiny shape, then the paper's S trained for a few hundred steps.

    python tools/gpu_check.py                      # on the machine's GPU
    python tools/gpu_check.py --compile            # the same with torch.compile
    python tools/gpu_check.py --device cpu ...     # the same code on CPU (what the suite runs)

Both parts run the recipe's own training loop (``pipeline.train.loop.run_loop``) on a
built mixture (``make mix``'s ``data/mix/pretrain`` by default), on one device, no Ray.

1. Parity: the tiny model trained three times: FP32 seed 0, FP32 seed 1 (another
   initialisation and data order), BF16 (autocast) seed 0 (FP32 seed 0's initialisation
   and data). The seed's effect on the final validation loss is the noise a user accepts
   anyway; BF16 passes when it moves the loss by at most twice that, or 1% of the loss,
   whichever is larger. Exits 1 when it does not.
2. Throughput: the S config (``conf/model/mobilemoe_s.yaml``) in BF16 for ``--steps``
   steps; prints tokens/s (median over the steps after ``--warmup``), model FLOP/s
   utilisation against the device's datasheet BF16 peak where the table below knows it
   and against a BF16 GEMM measured in the same run, and peak memory. Training FLOPs per
   token are 3x the forward's (``pipeline.model.accounting.flops_per_token``).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.configbase import from_dict  # noqa: E402
from pipeline.model import ModelConfig, flops_per_token  # noqa: E402
from pipeline.train.config import TrainStageConfig  # noqa: E402
from pipeline.train.loop import WorkerJob, run_loop  # noqa: E402
from pipeline.train.schedule import ScheduleConfig  # noqa: E402

# Dense BF16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity),
# by the name torch reports; the first key found in the name wins (PCIe before SXM).
DATASHEET_BF16_PEAK = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
}


class StepMetrics:
    """A loop callback that keeps every step's metrics (the loop logs nothing itself)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []

    def on_train_start(self, state) -> None:
        pass

    def on_eval(self, state, metrics: dict[str, float]) -> None:
        self.evals.append(metrics)

    def on_step_end(self, state, metrics: dict[str, float]) -> None:
        self.steps.append(metrics)
        if "val/loss" in metrics:
            self.evals.append(metrics)

    def on_train_end(self, state) -> None:
        pass


def model_config(name: str) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()), "model")


def train(
    cfg: ModelConfig, args: argparse.Namespace, steps: int, batch: int, seq_len: int, dtype: str, seed: int
) -> StepMetrics:
    """``steps`` steps of the recipe's loop on ``args.device``; the metrics of each step."""
    stage = TrainStageConfig(
        mixture=str(args.mixture),
        tokenizer="unused",
        out_dir="unused",
        seq_len=seq_len,
        batch_size=batch,
        schedule=ScheduleConfig(kind="cosine", lr=3e-3, warmup_steps=min(20, steps // 4), total_steps=steps),
        dtype=dtype,
        eval_every=steps,
        eval_batches=args.eval_batches,
        compile=args.compile,
    )
    job = WorkerJob(
        stage="gpu_check",
        model=dataclasses.asdict(cfg),
        train=dataclasses.asdict(stage),
        seed=seed,
        mixture_dir=str(args.mixture),
    )
    metrics = StepMetrics()
    run_loop(job, rank=0, world=1, resume=None, callbacks=[metrics], device=torch.device(args.device))
    return metrics


def parity(args: argparse.Namespace) -> bool:
    cfg = model_config(args.parity_model)
    final = {}
    for label, dtype, seed in (("fp32", "float32", 0), ("fp32_seed1", "float32", 1), ("bf16", "bfloat16", 0)):
        final[label] = train(cfg, args, args.parity_steps, args.batch, args.seq_len, dtype, seed).evals[-1]["val/loss"]
    noise = abs(final["fp32_seed1"] - final["fp32"])
    gap = abs(final["bf16"] - final["fp32"])
    bound = max(2 * noise, 0.01 * final["fp32"])
    ok = gap <= bound
    print(
        f"parity ({args.parity_model}, {args.parity_steps} steps, {args.batch}x{args.seq_len}): val loss "
        f"FP32 {final['fp32']:.4f}, FP32 seed 1 {final['fp32_seed1']:.4f}, BF16 {final['bf16']:.4f}; "
        f"|BF16-FP32| {gap:.4f} vs bound {bound:.4f} (max of 2x the seed's effect, 1% of the loss): "
        f"{'PASS' if ok else 'FAIL'}"
    )
    return ok


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of an n^3 matmul in ``dtype`` on ``device`` (median of 10)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(11):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cfg = model_config(args.model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    metrics = train(cfg, args, args.steps, args.batch, args.seq_len, "bfloat16", seed=0)
    wall = time.perf_counter() - started
    rates = [m["perf/tokens_per_s"] for m in metrics.steps[args.warmup :]] or [metrics.steps[-1]["perf/tokens_per_s"]]
    tokens_per_s = statistics.median(rates)
    achieved = tokens_per_s * 3 * flops_per_token(cfg, args.seq_len)
    measured_peak = gemm_flops_per_s(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)
    mfu = f"{achieved / datasheet:.1%} of the datasheet BF16 peak" if datasheet else "no datasheet peak for this device"
    if device.type == "cuda":
        memory = f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated"
    else:
        import resource

        memory = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"
    losses = [m["train/loss"] for m in metrics.steps]
    print(
        f"throughput ({args.model} on {name}, BF16, {args.steps} steps of {args.batch}x{args.seq_len}"
        f"{', compiled' if args.compile else ''}): {tokens_per_s:,.0f} tokens/s (median after {args.warmup} "
        f"steps); {achieved / 1e12:.2f} TFLOP/s = {mfu}, {achieved / measured_peak:.1%} of a BF16 GEMM measured "
        f"now ({measured_peak / 1e12:.1f} TFLOP/s); {memory}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"{wall:.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mixture", type=Path, default=ROOT / "data" / "mix" / "pretrain")
    parser.add_argument("--parity-model", default="tiny")
    parser.add_argument("--parity-steps", type=int, default=200)
    parser.add_argument("--model", default="mobilemoe_s")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the tokens/s median")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch; pass --device cpu to run the same checks on CPU")
    if not (args.mixture / "manifest.json").is_file():
        parser.error(f"--mixture {args.mixture}: not a built mixture (run `make mix`, or give one)")
    print(f"torch {torch.__version__}, device {args.device}")
    ok = parity(args)
    throughput(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
