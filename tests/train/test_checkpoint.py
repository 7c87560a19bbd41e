import json

import pytest
import torch
from safetensors import safe_open

from pipeline.train import checkpoint as ckpt_mod
from pipeline.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_fits,
    load_checkpoint,
    problem,
    restore_rng_state,
    restore_training_state,
    save_checkpoint,
    spec_of,
    tensor_specs,
    training_state,
)

V, D = 17, 8


class TinyLM(torch.nn.Module):
    """Embedding tied to the output head, plus a non-trained buffer like a router bias."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.mlp = torch.nn.Linear(D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.head = torch.nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("expert_bias", torch.zeros(4))

    def forward(self, ids):
        return self.head(self.norm(torch.relu(self.mlp(self.embed(ids)))))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, 5), generator=g)


def train_step(model, opt, ids):
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.expert_bias += 0.5  # buffers change too and must round-trip


def make_optimizer(params, fused=None):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


@pytest.mark.parametrize("fused", [None, True], ids=["for-loop", "fused"])  # the loop trains fused (loop.adamw)
def test_resume_matches_uninterrupted_training_with_tied_weights_and_reordered_params(tmp_path, fused):
    from functools import partial

    make_optimizer_ = partial(make_optimizer, fused=fused)
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_optimizer_(model.parameters())
    for s in range(3):
        train_step(model, opt, batch(s))
    path = save_checkpoint(tmp_path / "ck", 3, *training_state(model, opt), {"tokens_seen": 30})
    train_step(model, opt, batch(3))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = TinyLM()
    # Reversed order: restore must map optimizer state by name, not by position.
    opt2 = make_optimizer_(list(resumed.parameters())[::-1])
    ck = load_checkpoint(path)
    assert ck.path == path and ck.step == 3 and ck.meta == {"tokens_seen": 30}
    check_fits({k: spec_of(v) for k, v in resumed.state_dict().items()}, tensor_specs(ck.path), str(ck.path))
    restore_training_state(resumed, opt2, ck)  # torch's set_state_dict: by FQN
    assert resumed.head.weight is resumed.embed.weight
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    train_step(resumed, opt2, batch(3))

    got = resumed.state_dict()
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert resumed.head.weight is resumed.embed.weight


def test_tied_weight_is_stored_once_and_comes_back_under_both_names(tmp_path):
    model = TinyLM()
    path = save_checkpoint(tmp_path / "ck", 1, model.state_dict(), None, {})
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("embed.weight" in keys) != ("head.weight" in keys)
    ck = load_checkpoint(path)
    assert torch.equal(ck.model_state["head.weight"], model.embed.weight)
    assert ck.optimizer_state is None


def test_partially_overlapping_views_are_cloned(tmp_path):
    base = torch.arange(12.0)
    state = {"a": base, "b": base[:6].view(2, 3)}  # same storage, different view
    ck = load_checkpoint(save_checkpoint(tmp_path / "ck", 0, state, None, {}))
    assert torch.equal(ck.model_state["b"], torch.arange(6.0).view(2, 3))
    assert torch.equal(ck.model_state["a"], base)


def test_regrouped_optimizer_takes_hparams_by_parameter_name(tmp_path):
    model = TinyLM()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    train_step(model, opt, batch(0))
    path = save_checkpoint(tmp_path / "ck", 1, *training_state(model, opt), {})

    opt2 = torch.optim.AdamW([{"params": no_decay[::-1], "weight_decay": 0.5}, {"params": decay, "weight_decay": 0.5}])
    restore_training_state(model, opt2, load_checkpoint(path))
    assert [g["weight_decay"] for g in opt2.param_groups] == [0.0, 0.1]
    for p in model.parameters():
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_restore_rejects_an_optimizer_over_other_parameters(tmp_path):
    model = TinyLM()
    opt = make_optimizer(model.parameters())
    train_step(model, opt, batch(0))
    ck = load_checkpoint(save_checkpoint(tmp_path / "ck", 1, *training_state(model, opt), {}))
    fewer = make_optimizer([model.mlp.weight, model.mlp.bias])
    with pytest.raises(
        CheckpointError, match=r"optimizer parameters differ: missing \[\], unexpected \['embed.weight'"
    ):
        restore_training_state(model, fewer, ck)
    without = load_checkpoint(save_checkpoint(tmp_path / "weights", 1, model.state_dict(), None, {}))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        restore_training_state(model, opt, without)


def test_crash_during_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = TinyLM()
    opt = make_optimizer(model.parameters())
    path = tmp_path / "ck"
    save_checkpoint(path, 1, *training_state(model, opt), {"n": 1})
    real_save = ckpt_mod.save_tensors

    def crash(file, tensors, header):
        real_save(file, tensors, header)
        if file.name == "optimizer.safetensors":
            raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "save_tensors", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck2", 2, *training_state(model, opt), {"n": 2})
    with pytest.raises(CheckpointError, match="exists: a checkpoint directory is written once"):
        save_checkpoint(path, 2, model.state_dict(), None, {"n": 2})
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left behind
    assert load_checkpoint(path).meta == {"n": 1}


def test_a_root_of_the_older_layout_is_refused_with_how_to_flatten_it(tmp_path):
    # Formats 1 and 2 published latest.json + step_N/; the step directory itself reads.
    root = tmp_path / "model"
    step = save_checkpoint(root / "step_7", 7, TinyLM().state_dict(), None, {"a": 1})
    (root / "latest.json").write_text(json.dumps({"step": 7, "dir": "step_7"}))
    assert load_checkpoint(step).meta == {"a": 1}
    with pytest.raises(CheckpointError, match=rf"older layout .* mv {root}/step_7/\* {root}/ && rm -r"):
        load_checkpoint(root)
    assert "older layout" in problem(root)


@pytest.fixture
def saved(tmp_path):
    model = TinyLM()
    opt = make_optimizer(model.parameters())
    train_step(model, opt, batch(0))
    return save_checkpoint(tmp_path / "step_1", 1, *training_state(model, opt), {"step_hint": 1})


def test_truncated_safetensors_is_reported(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"step_1.*model.safetensors.*truncated"):
        load_checkpoint(saved)
    assert "truncated" in problem(saved)


def test_garbage_safetensors_of_right_size_is_reported(saved):
    f = saved / "optimizer.safetensors"
    f.write_bytes(b"\xff" * f.stat().st_size)
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors does not match the sha256"):
        load_checkpoint(saved)
    # Without the hash check the parser still refuses the bytes.
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors: cannot read safetensors"):
        load_checkpoint(saved, verify=False)


def test_one_flipped_byte_of_the_right_size_is_caught(saved):
    f = saved / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the tensor data: safetensors alone would load it
    f.write_bytes(bytes(data))
    load_checkpoint(saved, verify=False)
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match the sha256 .*corrupt"):
        load_checkpoint(saved)


def test_non_finite_tensors_are_never_written(tmp_path):
    for bad in (float("nan"), float("inf")):
        state = {"ok": torch.ones(2), "layers.3.w": torch.tensor([1.0, bad])}
        with pytest.raises(CheckpointError, match=r"model tensor 'layers.3.w' holds non-finite"):
            save_checkpoint(tmp_path / "ck", 1, state, None, {})
    model = TinyLM()
    opt = make_optimizer(model.parameters())
    train_step(model, opt, batch(0))
    next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"optimizer tensor 'embed.weight/exp_avg' holds non-finite"):
        save_checkpoint(tmp_path / "ck", 1, *training_state(model, opt), {})
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "meta.json").unlink(), "missing meta.json"),
        (lambda p: (p / "optimizer.safetensors").unlink(), "missing optimizer.safetensors"),
        (lambda p: (p / "meta.json").write_text('{"step": 1}'), "lacks the required 'checkpoint'"),
        (lambda p: (p / "meta.json").write_text('{"checkpoint": {"step": 1}}'), "checkpoint.format_version"),
        (lambda p: (p / "meta.json").write_text("{trunc"), "unreadable meta.json"),
    ],
)
def test_damaged_checkpoint_errors_name_path_and_problem(saved, damage, message):
    damage(saved)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(saved)
    assert str(saved) in str(err.value) and message in str(err.value)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step_5")


def test_header_specs_list_every_misfit(saved):
    found = tensor_specs(saved)  # from the safetensors header: no tensor is loaded
    ck = load_checkpoint(saved)
    assert found == {k: spec_of(v) for k, v in ck.model_state.items()}  # tied aliases included
    expected = dict(found)
    expected.pop("norm.bias")
    expected["mlp.weight"] = ((D, D + 1), "F32")
    expected["mlp.bias"] = ((D,), "BF16")
    expected["new.weight"] = ((3,), "F32")
    with pytest.raises(CheckpointError) as err:
        check_fits(expected, found, "ckpt")
    msg = str(err.value)
    assert "missing keys ['new.weight']" in msg
    assert "unexpected keys ['norm.bias']" in msg
    assert "mlp.weight: checkpoint (8, 8) F32 vs model (8, 9) F32" in msg
    assert "mlp.bias: checkpoint (8,) F32 vs model (8,) BF16" in msg


def test_extra_tensors_and_rng_state_round_trip(tmp_path):
    torch.manual_seed(7)
    rng = capture_rng_state()
    assert rng["rng/cpu"].dtype == torch.uint8
    want = torch.rand(4)
    extra = {**rng, "loader/position": torch.tensor([3, 9])}
    ck = load_checkpoint(save_checkpoint(tmp_path / "ck", 1, {"w": torch.ones(2)}, None, {}, extra=extra))
    assert torch.equal(ck.extra["loader/position"], torch.tensor([3, 9]))
    torch.rand(100)
    restore_rng_state(ck.extra)
    assert torch.equal(torch.rand(4), want)


def test_bad_meta_and_arguments_are_rejected_without_leaving_files(tmp_path):
    state = {"w": torch.ones(2)}
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "ck", 1, state, None, {"checkpoint": 1})
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "ck", 1, state, None, {"obj": object()})
    with pytest.raises(CheckpointError, match="step"):
        save_checkpoint(tmp_path / "ck", -1, state, None, {})
    assert [p.name for p in tmp_path.iterdir()] == []
