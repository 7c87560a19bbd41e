"""Whole-model training throughput: the tiny MoE beside its dense twin of equal active size.

One process, the same batch shape, interleaved repetitions (machines are noisy; only ratios
measured side by side mean anything). A step is what the training loop does: forward with
the auxiliary loss, the token-summed cross-entropy, backward, gradient clipping, AdamW.
Prints each model's tokens/s, the MoE's share of the dense twin's (the MoE as training runs
it, with the fused CPU kernel and the fused head-and-loss; with torch's grouped GEMM; and
with the plain head, logits then ``F.cross_entropy``), and each model's
achieved FP32 FLOP/s as a fraction of this machine's FP32 GEMM rate measured in the same
run (a square ``torch.mm``: the attainable peak, not the datasheet's). Training FLOPs per
token are 3x the forward's (``pipeline.model.accounting.flops_per_token``: forward,
and backward at twice the forward). The host allocator policy is the training loop's
(pipeline/train/hostalloc.py: freed large blocks kept); ``--policy system`` keeps glibc's
own, for a comparison between runs (within one process the heap a policy kept would
serve the other's allocations). Not a test: run ``make bench-train``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from pipeline.configbase import from_dict
from pipeline.model import ModelConfig, Transformer, flops_per_token
from pipeline.train import hostalloc
from pipeline.train.loop import adamw

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def model_config(name: str) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((CONF / f"{name}.yaml").read_text()), "model")


def gemm_flops_per_s(n: int = 1024, reps: int = 10) -> float:
    """FP32 FLOP/s of an n x n x n ``torch.mm`` (median of ``reps``): the attainable peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


class Trainer:
    """One model, its optimizer and a fixed batch: ``step()`` is one training step."""

    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int, dispatch: str = "auto", plain_head=False) -> None:
        torch.manual_seed(0)
        self.plain_head = plain_head  # logits, then F.cross_entropy (before pipeline/model/loss.py)
        self.model = Transformer(cfg).set_moe_dispatch(dispatch)
        self.optimizer = adamw(self.model, lr=1e-3, weight_decay=0.1)  # the training loop's
        tokens_BS = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1))
        self.inputs_BS, self.labels_BS = tokens_BS[:, :-1], tokens_BS[:, 1:]
        self.tokens = batch * seq_len
        self.train_flops = 3 * flops_per_token(cfg, seq_len) * self.tokens

    def step(self) -> None:
        if self.plain_head:
            logits_BSV, aux = self.model(self.inputs_BS, return_aux=True)
            loss = F.cross_entropy(logits_BSV.flatten(0, 1), self.labels_BS.flatten(), reduction="sum")
        else:
            loss, aux = self.model(self.inputs_BS, labels_BS=self.labels_BS)  # the training loop's forward
        (loss / self.labels_BS.numel() + aux).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", default="tiny")
    parser.add_argument("--dense", default="tiny_dense_active")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--policy", choices=("keep", "system"), default="keep", help="host allocator policy")
    args = parser.parse_args()
    if args.policy == "keep" and not hostalloc.keep_freed_blocks():
        print("(not glibc: the allocator policy is the C library's own)")
    grouped = f"{args.moe} (grouped GEMM)"
    plain = f"{args.moe} (plain head and loss)"
    trainers = {
        args.moe: Trainer(model_config(args.moe), args.batch, args.seq_len),
        grouped: Trainer(model_config(args.moe), args.batch, args.seq_len, dispatch="grouped"),
        plain: Trainer(model_config(args.moe), args.batch, args.seq_len, plain_head=True),
        args.dense: Trainer(model_config(args.dense), args.batch, args.seq_len),
    }
    for trainer in trainers.values():  # warm-up (allocator, first-call dispatch)
        trainer.step()
    samples: dict[str, list[float]] = {name: [] for name in trainers}
    peak = []
    for _ in range(args.reps):  # interleaved: drift hits both alike
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.step()
            samples[name].append(time.perf_counter() - start)
        peak.append(gemm_flops_per_s(reps=3))
    peak_flops = statistics.median(peak)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq_len}, "
        f"reps {args.reps} (median), host allocator {args.policy}; "
        f"FP32 GEMM peak {peak_flops / 1e9:.1f} GFLOP/s (1024^3 mm)"
    )
    tokens_per_s = {}
    for name, trainer in trainers.items():
        seconds = statistics.median(samples[name])
        tokens_per_s[name] = trainer.tokens / seconds
        print(
            f"{name}: {seconds * 1e3:.1f} ms/step, {tokens_per_s[name]:,.0f} tokens/s, "
            f"{trainer.train_flops / seconds / peak_flops:.0%} of the GEMM peak"
        )
    for name in (args.moe, grouped, plain):
        print(
            f"{name} / {args.dense} tokens/s = {tokens_per_s[name] / tokens_per_s[args.dense]:.2f}x (target >= 0.95x)"
        )
    print(f"{args.moe}: fused head and loss / plain tokens/s = {tokens_per_s[args.moe] / tokens_per_s[plain]:.2f}x")


if __name__ == "__main__":
    main()
