"""Training and validation batches drawn from a mixture's memory-mapped token arrays.

Training windows are a pure function of (seed, step, micro-batch, rank): resuming at
step N draws exactly the batches an uninterrupted run would have drawn, with no
sampler state to checkpoint. Validation windows are fixed and evenly spaced, so every
evaluation of every stage scores the same text.

Shape legend: B sequences, S sequence length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.mixing import load_split, load_val_domains
from pipeline.model.loss import IGNORE_INDEX


class TokenBatches:
    def __init__(self, mixture_dir: str | Path, split: str, seq_len: int, batch_size: int, seed: int) -> None:
        self.tokens, self.loss_mask = load_split(mixture_dir, split)
        # Per-token domain ids (val only): lets evaluation report a loss per domain.
        self.domains, self.domain_names = load_val_domains(mixture_dir) if split == "val" else (None, [])
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.max_start = len(self.tokens) - (seq_len + 1)
        if self.max_start < 0:
            raise ValueError(
                f"{mixture_dir} {split} split has {len(self.tokens)} tokens, "
                f"fewer than one window of seq_len+1={seq_len + 1}"
            )

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        window = torch.from_numpy(self.tokens[idx].astype(np.int64))
        mask = torch.from_numpy(self.loss_mask[idx].astype(bool))
        inputs_BS = window[:, :-1]
        labels_BS = window[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return inputs_BS, labels_BS

    def train_batch(self, step: int, micro: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, rank])
        starts = rng.integers(0, self.max_start + 1, size=self.batch_size)
        return self._windows(starts)

    def eval_batches(self, n_batches: int, rank: int, world: int):
        """This rank's share of ``n_batches`` fixed, evenly spaced validation batches, as
        (inputs_BS, labels_BS, domains_BS) with the domain id of each label."""
        n_windows = n_batches * self.batch_size
        starts = np.linspace(0, self.max_start, n_windows).astype(np.int64)
        for b in range(rank, n_batches, world):
            batch_starts = starts[b * self.batch_size : (b + 1) * self.batch_size]
            inputs_BS, labels_BS = self._windows(batch_starts)
            idx = batch_starts[:, None] + np.arange(1, self.seq_len + 1)[None, :]
            domains_BS = torch.from_numpy(self.domains[idx].astype(np.int64))
            yield inputs_BS, labels_BS, domains_BS
