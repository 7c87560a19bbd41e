"""Training and data maths against independent references: label/mask alignment on a
hand-made mixture, the split rule recomputed with hashlib, the step's gradient against
a loss written out by hand (across micro-batches and across two ranks), and checkpoint
atomicity under SIGKILL at every write the saver makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.data.base import Document
from pipeline.train.batches import IGNORE_INDEX, TokenBatches

# --------------------------------------------------------------------------- labels and masks


def test_labels_are_the_next_token_where_the_mask_says_it_is_a_target(tmp_path):
    n = 200
    tokens = np.arange(n, dtype=np.uint32)  # token i is i: a window's first input tells its start
    mask = (np.random.default_rng(0).random(n) < 0.4).astype(np.uint8)
    np.save(tmp_path / "train_tokens.npy", tokens)
    np.save(tmp_path / "train_loss_mask.npy", mask)
    batches = TokenBatches(tmp_path, "train", seq_len=16, batch_size=8, seed=3)
    inputs, labels = batches.train_batch(step=5, micro=1, rank=0)
    assert inputs.shape == labels.shape == (8, 16)
    for row_in, row_lab in zip(inputs.tolist(), labels.tolist()):
        start = row_in[0]
        assert row_in == list(range(start, start + 16))
        # position i predicts token start+i+1, which counts only if *its* mask bit is set
        want = [start + i + 1 if mask[start + i + 1] else IGNORE_INDEX for i in range(16)]
        assert row_lab == want


def test_windows_depend_on_seed_step_micro_and_rank_only(tmp_path):
    np.save(tmp_path / "train_tokens.npy", np.arange(500, dtype=np.uint32))
    np.save(tmp_path / "train_loss_mask.npy", np.ones(500, dtype=np.uint8))
    a = TokenBatches(tmp_path, "train", 8, 4, seed=1)
    b = TokenBatches(tmp_path, "train", 8, 4, seed=1)
    assert torch.equal(a.train_batch(3, 0, 1)[0], b.train_batch(3, 0, 1)[0])
    firsts = {tuple(a.train_batch(*args)[0][:, 0].tolist()) for args in [(3, 0, 1), (4, 0, 1), (3, 1, 1), (3, 0, 0)]}
    assert len(firsts) == 4  # another step, micro-batch or rank draws other windows


# --------------------------------------------------------------------------- the split rule


def test_split_is_decided_by_the_document_key_not_its_text(monkeypatch):
    from pipeline.data.mixing import MixtureConfig, collect
    from pipeline.data.sources import SourceConfig

    def side(key: str, fraction: float) -> str:  # the rule, recomputed here
        value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
        return "val" if value < fraction else "train"

    keys = [f"chapter-{i}" for i in range(60)]
    docs = [Document(f"{k} part {p}: " + "text " * (p + 3), "books", "s", key=k) for k in keys for p in range(3)]
    from dataclasses import make_dataclass

    import pipeline.data.sources as sources

    monkeypatch.setitem(
        sources.KINDS,
        "fixed_docs",
        sources.Kind("fixed_docs", "text", "CC0", make_dataclass("NoOptions", []), lambda options, cfg: iter(docs)),
    )
    mix = MixtureConfig(sources=[SourceConfig(name="s", kind="fixed_docs")], total_tokens=100, val_fraction=0.3)
    [sd] = collect(mix).sources
    got = {d.key: "train" for d in sd.train} | {d.key: "val" for d in sd.val}
    assert got == {k: side(k, 0.3) for k in keys}
    # every part of a chapter on the same side, and both sides used
    assert len(sd.train) + len(sd.val) == 180 and {"train", "val"} == set(got.values())


# --------------------------------------------------------------------------- the step's gradient


def micro_job(micro_data: Path, grad_accum: int):
    from jobs import micro_job as base_job

    job = base_job(micro_data, steps=3, mixture="sft")  # SFT: micro-batches differ in target counts
    job.train["grad_accum"] = grad_accum
    job.train["grad_clip"] = 1e9  # no clipping: the gradient itself is compared
    job.train["batch_size"] = 3
    return job


class _GradsBeforeStep:
    """Callback that records every parameter's gradient just before the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_start(self, state) -> None:
        names = {id(p): n for n, p in state.model.named_parameters()}

        def hook(optimizer, args, kwargs):
            if self.grads:
                return
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.grads[names[id(p)]] = p.grad.detach().clone()

        state.optimizer.register_step_pre_hook(hook)

    def on_step_end(self, state, metrics) -> None:
        pass

    def on_eval(self, state, metrics) -> None:
        pass

    def on_train_end(self, state) -> None:
        pass


def _reference_grads(job, batches: list[tuple[torch.Tensor, torch.Tensor]], world: int) -> dict[str, torch.Tensor]:
    """d/dθ of (sum of target cross-entropies over every micro-batch of every rank) /
    (their target count) + (sum of the aux losses) / (ranks x micro-batches), written out."""
    from pipeline.configbase import from_dict
    from pipeline.model import ModelConfig, Transformer

    torch.manual_seed(job.seed)
    model = Transformer(from_dict(ModelConfig, job.model, "model"))
    targets = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
    ce, aux = 0.0, 0.0
    for inputs, labels in batches:
        logits, a = model(inputs, return_aux=True)
        ce = ce + F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        aux = aux + a
    (ce / targets + aux / len(batches)).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_is_token_weighted_over_micro_batches(micro_data):
    from pipeline.train.loop import run_loop

    job = micro_job(micro_data, grad_accum=3)
    job.model["moe"]["aux_loss_coef"] = 0.01  # so the aux term's averaging is checked too
    probe = _GradsBeforeStep()
    run_loop(job, 0, 1, None, [probe])
    data = TokenBatches(job.mixture_dir, "train", job.train["seq_len"], 3, job.seed)
    batches = [data.train_batch(0, m, 0) for m in range(3)]
    counts = [int((lab != IGNORE_INDEX).sum()) for _, lab in batches]
    assert len(set(counts)) > 1, counts  # unequal target counts: a mean of means would differ
    want = _reference_grads(job, batches, world=1)
    assert set(probe.grads) == set(want)
    for name, grad in want.items():
        torch.testing.assert_close(probe.grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def _ddp_grads_worker(rank: int, world: int, init_file: str, micro_data: Path, out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from pipeline.train.loop import run_loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        job = micro_job(micro_data, grad_accum=2)
        probe = _GradsBeforeStep()
        run_loop(job, rank, world, None, [probe])
        save_file({k: v.contiguous() for k, v in probe.grads.items()}, str(out / f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_gradient_is_token_weighted_over_micro_batches_and_ranks(micro_data, tmp_path):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_ddp_grads_worker, args=(2, str(tmp_path / "init"), micro_data, tmp_path), nprocs=2, join=True)
    job = micro_job(micro_data, grad_accum=2)
    data = TokenBatches(job.mixture_dir, "train", job.train["seq_len"], 3, job.seed)
    batches = [data.train_batch(0, m, r) for r in range(2) for m in range(2)]
    want = _reference_grads(job, batches, world=2)
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: {name}")


# --------------------------------------------------------------------------- atomicity under SIGKILL

_SAVER = r"""
import os, signal, sys, torch
import pipeline.train.checkpoint as ck

root, kill_at = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def point(name, fn):
    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup code runs
        result = fn(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapped

for name in ("save_tensors", "_write_text_synced", "fsync_dir"):
    setattr(ck, name, point(name, getattr(ck, name)))
ck.os.rename = point("rename", ck.os.rename)
state = {"w": torch.full((64,), 2.0), "b": torch.arange(8.0)}
ck.save_checkpoint(root, 2, state, None, {"step": 2})
print("points", calls["n"])
"""


@pytest.mark.slow
def test_checkpoint_writes_are_atomic_under_sigkill_at_every_write_point(tmp_path):
    from pipeline.train.checkpoint import load_checkpoint

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def attempt(path: Path, kill_at: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _SAVER, str(path), str(kill_at)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    clean = attempt(tmp_path / "clean" / "ck", 0)
    assert clean.returncode == 0, clean.stderr
    points = int(clean.stdout.split()[-1])
    assert points >= 10  # before and after every write, rename and fsync of the saver
    for kill_at in range(1, points + 1):
        path = tmp_path / f"kill{kill_at}" / "ck"
        proc = attempt(path, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-500:])
        if path.exists():  # renamed into place: complete and intact (hashes verified)
            ckpt = load_checkpoint(path)
            assert ckpt.step == 2 and torch.equal(ckpt.model_state["w"], torch.full((64,), 2.0)), kill_at
        # Anything else is a hidden temporary, never a half-written checkpoint.
        assert all(p == path or p.name.startswith(".tmp-") for p in path.parent.iterdir()), kill_at


# --------------------------------------------------------------------------- windows at the edges of a split


def _split(root: Path, n: int) -> Path:
    np.save(root / "train_tokens.npy", np.arange(n, dtype=np.uint32))
    np.save(root / "train_loss_mask.npy", np.ones(n, dtype=np.uint8))
    return root


def test_a_split_of_exactly_one_window_is_usable_and_one_token_less_is_refused(tmp_path):
    batches = TokenBatches(_split(tmp_path, 17), "train", seq_len=16, batch_size=16, seed=0)
    assert batches.max_start == 0
    inputs, labels = batches.train_batch(step=0, micro=0, rank=0)
    assert inputs.tolist() == [list(range(16))] * 16
    assert labels.tolist() == [list(range(1, 17))] * 16
    with pytest.raises(ValueError, match=r"16 tokens, fewer than one window of seq_len\+1=17"):
        TokenBatches(_split(tmp_path, 16), "train", seq_len=16, batch_size=1, seed=0)


def test_training_windows_reach_both_ends_of_the_split(tmp_path):
    batches = TokenBatches(_split(tmp_path, 20), "train", seq_len=16, batch_size=64, seed=0)
    starts = batches.train_batch(step=0, micro=0, rank=0)[0][:, 0].tolist()
    assert set(starts) == {0, 1, 2, 3}  # every start from the first token to the last window's


def test_eval_batches_are_evenly_spaced_windows_by_hand(tmp_path):
    n, seq, batch, n_batches = 103, 4, 3, 4
    tokens = np.arange(n, dtype=np.uint32)
    np.save(tmp_path / "val_tokens.npy", tokens)
    np.save(tmp_path / "val_loss_mask.npy", np.ones(n, dtype=np.uint8))
    np.save(tmp_path / "val_domains.npy", (tokens % 3).astype(np.uint8))
    (tmp_path / "manifest.json").write_text(json.dumps({"domains": ["a", "b", "c"]}))
    batches = TokenBatches(tmp_path, "val", seq_len=seq, batch_size=batch, seed=0)
    # 12 windows from start 0 to the last possible start 98, evenly spaced: floor(98 * i / 11)
    starts = [98 * i // 11 for i in range(12)]
    for rank, world in ((0, 1), (1, 2)):
        got = list(batches.eval_batches(n_batches, rank, world))
        mine = list(range(rank, n_batches, world))
        assert len(got) == len(mine)
        for b, (inputs, labels, domains) in zip(mine, got):
            want = starts[b * batch : (b + 1) * batch]
            assert inputs.tolist() == [list(range(s, s + seq)) for s in want]
            assert labels.tolist() == [list(range(s + 1, s + seq + 1)) for s in want]
            assert domains.tolist() == [[(s + i) % 3 for i in range(1, seq + 1)] for s in want]


def test_constant_schedule_by_hand():
    from pipeline.train.schedule import ScheduleConfig, lr_at

    cfg = ScheduleConfig(kind="constant", lr=0.3, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(10)] == pytest.approx([0.15, 0.3] + [0.3] * 8)


def test_normalise_by_hand():
    from pipeline.data.base import normalise

    # NFC (e + combining acute -> é), any run of whitespace -> one space, ends trimmed
    assert normalise("  Cafe\u0301 \t au\n\nlait ") == "Caf\u00e9 au lait"


def test_schedule_numbers_must_be_finite_real_numbers():
    from pipeline.configbase import ConfigError
    from pipeline.train.schedule import ScheduleConfig

    for bad in (True, float("nan"), float("inf"), "0.1"):
        with pytest.raises(ConfigError, match=r"^lr: must be > 0"):
            ScheduleConfig(lr=bad)


def test_a_dense_model_has_no_expert_load_to_record():
    from types import SimpleNamespace

    from pipeline.model import ModelConfig, Transformer
    from pipeline.train.callbacks import BalanceCallback

    dense = ModelConfig(
        name="d", vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, max_seq_len=16, ffn_dim=32
    )
    state = SimpleNamespace(model=Transformer(dense), expert_load=[])
    callback = BalanceCallback()
    callback.on_train_start(state)
    metrics: dict = {}
    callback.on_step_end(state, metrics)
    assert metrics == {} and state.expert_load == []
