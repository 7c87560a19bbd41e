"""The training loop without Ray: learning, masking, and exact resume from a checkpoint."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from jobs import Reports, job_callbacks, micro_job

from pipeline.model import ModelConfig, MoEConfig
from pipeline.quant.fake import FakeQuantExperts
from pipeline.train.batches import IGNORE_INDEX, TokenBatches
from pipeline.train.callbacks import BalanceCallback, Callback, MetricsCallback
from pipeline.train.checkpoint import load_checkpoint
from pipeline.train.config import TrainStageConfig
from pipeline.train.loop import run_loop


def test_batches_mask_prompt_tokens_and_resample_identically(micro_data):
    sft = TokenBatches(micro_data / "sft", "train", seq_len=64, batch_size=4, seed=0)
    inputs, labels = sft.train_batch(step=3, micro=0, rank=0)
    again, labels_again = sft.train_batch(step=3, micro=0, rank=0)
    assert torch.equal(inputs, again) and torch.equal(labels, labels_again)
    masked = labels == IGNORE_INDEX
    assert masked.any() and (~masked).any()  # user turns are masked, answers are not
    other, _ = sft.train_batch(step=4, micro=0, rank=0)
    assert not torch.equal(inputs, other)


def test_loop_learns_and_balances(micro_data, tmp_path, monkeypatch):
    from pipeline.train import hostalloc

    policies = []
    monkeypatch.setattr(hostalloc, "keep_freed_blocks", lambda: policies.append("keep") or True)
    job = micro_job(micro_data, steps=30)
    reports = Reports(tmp_path)
    state = run_loop(job, rank=0, world=1, resume=None, callbacks=job_callbacks(job, reports))
    assert policies == ["keep"]  # a CPU training keeps its freed gradient buffers (hostalloc.py)
    losses = [v for _, v in state.history["train/loss"]]
    assert losses[-1] < losses[0] - 1.0, losses
    assert "val/loss" in state.history and "val/bpb" in state.history
    assert "moe/max_over_mean" in state.history
    load = torch.tensor(state.expert_load)  # (layers, experts) tokens routed over the stage
    assert load.shape == (2, 4)
    assert load.sum(1).tolist() == [30 * 8 * 32 * 2] * 2  # steps * batch * seq * top_k per layer
    assert len(reports.roots) == 6  # steps 5, 10, ..., 30


QAT_8DA4W = {"scheme": "8da4w", "group_size": 8, "granularity": "per_group", "embedding": "int4"}


@pytest.mark.parametrize("quant", [None, QAT_8DA4W], ids=["fp32", "qat"])
def test_resume_from_checkpoint_equals_uninterrupted(micro_data, tmp_path, quant):
    job = replace(micro_job(micro_data, steps=10), quant=quant)
    straight = run_loop(job, 0, 1, None, job_callbacks(job, Reports(tmp_path / "a")))
    if quant is not None:  # the fake-quantized model is what trained
        assert isinstance(straight.model.layers[0].ffn.experts, FakeQuantExperts)

    reports = Reports(tmp_path / "b")
    first_half = replace(micro_job(micro_data, steps=10), quant=quant)
    callbacks = job_callbacks(first_half, reports)

    class InterruptError(Exception):
        pass

    class StopAfterFirstCheckpoint:
        def on_train_start(self, state):
            pass

        def on_step_end(self, state, metrics):
            if reports.roots:
                raise InterruptError

        def on_train_end(self, state):
            pass

    with pytest.raises(InterruptError):
        run_loop(first_half, 0, 1, None, callbacks + [StopAfterFirstCheckpoint()])
    ckpt = load_checkpoint(reports.roots[-1])
    assert ckpt.step == 5
    resumed = run_loop(job, 0, 1, ckpt, job_callbacks(job, Reports(tmp_path / "c")))
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


def _ddp_worker(rank: int, world: int, init_file: str, micro_data: Path, out_dir: Path) -> None:
    import torch.distributed as dist

    from pipeline.train.checkpoint import save_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        job = micro_job(micro_data, steps=8)
        job.train["grad_accum"] = 2
        state = run_loop(job, rank, world, None, [BalanceCallback(), MetricsCallback(1, None)])
        save_checkpoint(
            out_dir / f"rank{rank}",
            state.step,
            state.model.state_dict(),
            None,
            meta={"history": state.history},
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_with_grad_accumulation_stay_in_lockstep(micro_data, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), micro_data, tmp_path), nprocs=2, join=True)
    r0 = load_checkpoint(tmp_path / "rank0")
    r1 = load_checkpoint(tmp_path / "rank1")
    assert r0.step == r1.step == 8
    for name, tensor in r0.model_state.items():
        # weights via DDP's gradient all-reduce, expert biases via all-reduced token counts
        torch.testing.assert_close(tensor, r1.model_state[name], rtol=0, atol=0, msg=name)
    biases = [t for n, t in r0.model_state.items() if n.endswith("expert_bias_E")]
    assert biases and any(b.abs().sum() > 0 for b in biases)  # the balancer did move them
    losses = [v for _, v in r0.meta["history"]["train/loss"]]
    assert losses[-1] < losses[0]


def test_validation_is_split_by_domain_consistently(micro_data):
    import json

    from pipeline.data.mixing import load_split, load_val_domains
    from pipeline.model import Transformer
    from pipeline.train.loop import evaluate

    domains, names = load_val_domains(micro_data / "pretrain")
    tokens, _ = load_split(micro_data / "pretrain", "val")
    assert names == ["literature", "math"] and len(domains) == len(tokens)
    manifest = json.loads((micro_data / "pretrain" / "manifest.json").read_text())
    for i, name in enumerate(names):  # every val token is labelled with its source's domain
        expected = sum(s["tokens"]["val"] for s in manifest["sources"].values() if s["domain"] == name)
        assert int((np.asarray(domains) == i).sum()) == expected

    job = micro_job(micro_data, steps=5)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**job.model, "moe": MoEConfig(**job.model["moe"])}))
    val = TokenBatches(micro_data / "pretrain", "val", seq_len=32, batch_size=8, seed=0)
    losses = evaluate(model, val, 4, 0, 1, torch.device("cpu"), "float32")
    assert set(losses) == {"all", "literature", "math"}
    # the overall loss is the target-weighted mean of the per-domain losses
    counts = {n: 0 for n in names}
    for _, labels, dom in val.eval_batches(4, 0, 1):
        for i, n in enumerate(names):
            counts[n] += int(((labels != IGNORE_INDEX) & (dom == i)).sum())
    weighted = sum(losses[n] * counts[n] for n in names) / sum(counts.values())
    assert abs(weighted - losses["all"]) < 1e-9
    assert losses["math"] != losses["literature"]


class _Plant(Callback):
    """Plants a fault into the model once training starts (the loop builds the model)."""

    def __init__(self, plant) -> None:
        self.plant = plant

    def on_train_start(self, state) -> None:
        self.plant(state.model)


def _nan_grad_in(name: str):
    def plant(model) -> None:
        param = dict(model.named_parameters())[name]
        # Finite forward, finite loss; the backward of this one tensor overflows.
        param.register_hook(lambda g: torch.where(torch.arange(g.numel()).view_as(g) == 0, float("inf"), g))

    return plant


def _nan_aux_loss_in_layer(layer: int):
    def plant(model) -> None:
        moe = model.layers[layer].ffn
        original = moe._aux_loss
        moe._aux_loss = lambda route, counts, n: original(route, counts, n) + float("nan")

    return plant


@pytest.mark.parametrize(
    "plant, term, layer",
    [
        (_nan_grad_in("layers.1.attn.wq.weight"), "gradient norm", "layers.1.attn.wq.weight"),
        (_nan_aux_loss_in_layer(0), "auxiliary loss", None),
    ],
)
def test_non_finite_step_stops_before_the_optimizer_and_any_checkpoint(micro_data, tmp_path, plant, term, layer):
    job = micro_job(micro_data, steps=12)
    reports = Reports(tmp_path)
    before = {}

    class Snapshot(Callback):
        def on_train_start(self, state) -> None:
            before.update({k: v.clone() for k, v in state.model.state_dict().items()})
            self.model = state.model

    snap = Snapshot()
    with pytest.raises(FloatingPointError) as err:
        run_loop(job, 0, 1, None, [_Plant(plant), snap, *job_callbacks(job, reports)])
    message = str(err.value)
    assert "at step 1" in message and term in message, message
    if layer:
        assert f"first non-finite gradient: {layer}" in message
    assert reports.roots == []  # nothing reported, so nothing to resume from
    for name, tensor in snap.model.state_dict().items():  # the optimizer never stepped
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0, msg=name)


def test_adamw_takes_the_fused_kernel_and_gives_the_for_loops_update():
    """The loop's optimizer: fused on CPU, with the decay split of param_groups, and
    the same parameters as torch's for-loop AdamW after several steps (non-default lr,
    betas and decay; FP32 rounding apart)."""
    from pipeline.train.loop import adamw, param_groups

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin.load_state_dict(net.state_dict())
    fused = adamw(net, lr=3e-2, weight_decay=0.2, betas=(0.8, 0.9))
    loop = torch.optim.AdamW(param_groups(twin, 0.2), lr=3e-2, betas=(0.8, 0.9), foreach=False)
    assert all(g["fused"] for g in fused.param_groups)
    assert [g["weight_decay"] for g in fused.param_groups] == [0.2, 0.0]
    x = torch.randn(8, 6)
    for _ in range(5):
        for model, opt in ((net, fused), (twin, loop)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(3)
    start = torch.nn.Linear(6, 5).weight
    assert float((net[0].weight - start).abs().max()) > 0.05  # and they moved (5 steps of lr 3e-2)
