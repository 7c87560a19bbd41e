"""Model family: dispatch, routing, balancing, KV cache, accounting and config checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from shapes import small_moe, tiny_config

from pipeline.configbase import ConfigError, from_dict
from pipeline.model import ExpertBiasBalancer, KVCache, ModelConfig, MoE, MoEConfig, Transformer, generate, param_counts
from pipeline.model.layers import SwiGLU

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
NAMED = sorted(p.stem for p in CONF.glob("*.yaml"))


def load_model_config(name: str) -> ModelConfig:
    return from_dict(ModelConfig, yaml.safe_load((CONF / f"{name}.yaml").read_text()), "model")


def test_named_configs_include_the_family():
    for name in (
        "tiny",
        "tiny_dense_active",
        "tiny_dense_total",
        "mobilemoe_s",
        "mobilemoe_m",
        "mobilemoe_l",
        "mobilellm_pro",
        "olmoe_1b7b",
    ):
        assert name in NAMED


@pytest.mark.parametrize("name", NAMED)
def test_reported_param_count_matches_meta_module(name):
    cfg = load_model_config(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    built = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert param_counts(cfg).total == built


def test_a_model_built_on_the_meta_device_computes_nothing_through_torch_dynamo():
    """Every stage with a checkpoint input checks it against the model built on the meta
    device (pipeline.runner.inputs.expected_specs). torch runs some ops on meta tensors
    (normal_, the RoPE tables' arithmetic) through Python references that import
    torch._dynamo, seconds of each such stage's start; the build must not (a fresh
    interpreter, so nothing else imported it), must give the CPU build's specs, and
    must leave the RoPE tables (not in the state dict) on the meta device too."""
    import json
    import subprocess
    import sys

    code = (
        "import json, sys, yaml\n"
        "from pipeline.configbase import from_dict\n"
        "from pipeline.model import ModelConfig\n"
        "from pipeline.runner.inputs import expected_specs\n"
        "cfg = from_dict(ModelConfig, yaml.safe_load(open(sys.argv[1])), 'model')\n"
        "specs = {k: [list(v[0]), str(v[1])] for k, v in expected_specs(cfg).items()}\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules, 'specs': specs}))\n"
    )
    root = CONF.parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code, str(CONF / "tiny.yaml")], cwd=root, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["dynamo"], "building the model on the meta device imported torch._dynamo"
    from pipeline.train.tensorfile import spec_of

    cpu = Transformer(load_model_config("tiny")).state_dict()
    assert got["specs"] == {k: [list(spec_of(t)[0]), str(spec_of(t)[1])] for k, t in cpu.items()}
    with torch.device("meta"):
        meta = Transformer(load_model_config("tiny"))
    assert meta.rope_cos.is_meta and meta.rope_sin.is_meta


def test_paper_sizes():
    s = param_counts(load_model_config("mobilemoe_s"))
    assert 1.2e9 <= s.total <= 1.3e9 and 265e6 <= s.active <= 280e6
    l_ = param_counts(load_model_config("mobilemoe_l"))
    assert 5.2e9 <= l_.total <= 5.4e9 and 0.90e9 <= l_.active <= 0.94e9
    pro = param_counts(load_model_config("mobilellm_pro"))
    assert 1.05e9 <= pro.total <= 1.11e9 and pro.active == pro.total


def test_dense_twins_match_tiny():
    tiny = param_counts(load_model_config("tiny"))
    same_active = param_counts(load_model_config("tiny_dense_active"))
    same_total = param_counts(load_model_config("tiny_dense_total"))
    assert abs(same_active.active - tiny.active) / tiny.active < 0.01
    assert abs(same_total.total - tiny.total) / tiny.total < 0.01


@pytest.mark.parametrize("dispatch", ["grouped", "fused"])
def test_grouped_dispatch_equals_reference_forward_and_backward(dispatch):
    torch.manual_seed(0)
    moe = MoE(32, small_moe())
    moe.dispatch = dispatch
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(3, 5, 32)
    ref = copy.deepcopy(moe)
    ref.dispatch = "loop"
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, _ = moe(x1)
    y2, _ = ref(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y1)
    (y1 * grad).sum().backward()
    (y2 * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for (name, p1), p2 in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_gather_dispatch_equals_grouped_and_exports():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    tokens = torch.randint(0, 64, (2, 9))
    grouped = model(tokens)
    model.set_moe_dispatch("gather")
    torch.testing.assert_close(model(tokens), grouped, rtol=1e-5, atol=1e-5)
    seq = torch.export.Dim("seq", min=2, max=32)
    program = torch.export.export(model, (tokens,), dynamic_shapes=({1: seq},))
    torch.testing.assert_close(program.module()(tokens[:, :5]), model(tokens[:, :5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["grouped", "fused"])
def test_grouped_dispatch_handles_experts_with_no_tokens(dispatch):
    torch.manual_seed(1)
    moe = MoE(32, small_moe(num_experts=8, top_k=1))
    moe.dispatch = dispatch
    torch.nn.init.normal_(moe.router.weight_ED, 0, 0.1)
    torch.nn.init.normal_(moe.experts.w1_EFD, 0, 0.1)
    moe.router.expert_bias_E[3] = 100.0  # every token goes to expert 3
    x = torch.randn(1, 4, 32)
    ref = copy.deepcopy(moe)
    ref.dispatch = "loop"
    torch.testing.assert_close(moe(x)[0], ref(x)[0])


@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_one_expert_top1_equals_dense_swiglu(score_func):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=1, top_k=1, expert_ffn_dim=24, score_func=score_func, route_norm=True, route_scale=1.0)
    moe = MoE(16, cfg)
    dense = SwiGLU(16, 24)
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.weight_ED)
        moe.experts.w1_EFD.copy_(dense.w1.weight[None])
        moe.experts.w3_EFD.copy_(dense.w3.weight[None])
        moe.experts.w2_EDF.copy_(dense.w2.weight[None])
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(moe(x)[0], dense(x), rtol=1e-5, atol=1e-6)


def test_expert_bias_changes_choice_not_gates():
    torch.manual_seed(0)
    moe = MoE(32, small_moe(num_experts=8, top_k=2, route_norm=False, route_scale=1.0))
    torch.nn.init.normal_(moe.router.weight_ED, 0, 0.5)
    x_TD = torch.randn(64, 32)
    before = moe.router(x_TD)
    moe.router.expert_bias_E[5] = 10.0  # forces expert 5 into every token's top-2
    after = moe.router(x_TD)
    assert (after.experts_TK == 5).any(-1).all()
    assert not torch.equal(before.experts_TK.sort(-1).values, after.experts_TK.sort(-1).values)
    # gates are the unbiased sigmoid scores of the chosen experts
    torch.testing.assert_close(after.gates_TK, torch.sigmoid(after.logits_TE).gather(-1, after.experts_TK))
    assert (after.gates_TK < 1.0).all()  # the +10 bias never leaks into a gate


def test_balancing_hook_drives_skewed_router_towards_uniform():
    torch.manual_seed(0)
    moe = MoE(32, small_moe(num_experts=8, top_k=2, bias_update_rate=0.005)).train()
    u_D = torch.nn.functional.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        torch.nn.init.normal_(moe.router.weight_ED, 0, 0.05)
        moe.router.weight_ED[:2] += 1.5 * u_D  # skew: experts 0 and 1 win for most tokens
    balancer = ExpertBiasBalancer([moe])
    history = []
    for _ in range(120):
        x = torch.randn(16, 64, 32) * 0.5 + u_D  # a fresh batch each step, like training
        with torch.no_grad():
            moe(x)
        history.append(balancer.step()["moe/max_over_mean"])
    start, end = sum(history[:5]) / 5, sum(history[-20:]) / 20
    assert start > 2.5, start
    assert end < 1.3, end
    assert moe.router.expert_bias_E[:2].max() < moe.router.expert_bias_E[2:].min()
    assert moe.router.tokens_per_expert_E.sum() == 0  # counts reset after each step


def test_aux_and_z_losses_are_positive_and_differentiable():
    torch.manual_seed(0)
    moe = MoE(
        32, small_moe(score_func="softmax", route_norm=False, route_scale=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)
    )
    torch.nn.init.normal_(moe.router.weight_ED, 0, 0.1)
    _, aux = moe(torch.randn(2, 8, 32))
    assert aux > 0
    aux.backward()
    assert moe.router.weight_ED.grad.abs().sum() > 0


def test_sigmoid_aux_loss_is_finite_when_every_score_underflows():
    # Sigmoid scores of logits below about -104 are exactly 0 in fp32: the balance loss's
    # per-token normaliser must not become 0/0.
    torch.manual_seed(0)
    moe = MoE(32, small_moe(score_func="sigmoid", aux_loss_coef=0.01))
    with torch.no_grad():
        moe.router.weight_ED.fill_(-1.0)
    x = torch.ones(1, 4, 32) * 10.0  # logits of -320 for every expert
    route = moe.router(x.view(4, 32))
    assert (route.scores_TE == 0).all()
    _, aux = moe(x)
    assert torch.isfinite(aux), aux
    aux.backward()
    assert torch.isfinite(moe.router.weight_ED.grad).all()


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_decoding_equals_full_forward(window):
    torch.manual_seed(0)
    cfg = tiny_config(sliding_window=window, global_every=2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(tokens)
    cache = KVCache(cfg, batch=2, max_len=12)
    prefill = model(tokens[:, :4], start_pos=0, cache=cache)
    steps = [prefill] + [model(tokens[:, i : i + 1], start_pos=i, cache=cache) for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_sliding_window_changes_attention():
    torch.manual_seed(0)
    base = Transformer(tiny_config(n_layers=1)).eval()
    windowed = Transformer(tiny_config(n_layers=1, sliding_window=3, global_every=2)).eval()
    windowed.load_state_dict(base.state_dict())
    tokens = torch.randint(0, 64, (1, 10))
    a, b = base(tokens), windowed(tokens)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # inside the window: identical
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_generate_greedy_matches_argmax_of_full_forward():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = torch.randint(0, 64, (1, 5))
    new = generate(model, prompt, max_new_tokens=6)
    seq = prompt
    for _ in range(6):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(new, seq[:, 5:])
    gen = torch.Generator().manual_seed(0)
    sampled = generate(model, prompt, max_new_tokens=6, temperature=1.0, top_k=5, generator=gen)
    assert sampled.shape == (1, 6)


def test_generate_stops_at_eos():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prompt = torch.randint(0, 64, (1, 5))
    first = generate(model, prompt, max_new_tokens=1)[0, 0].item()
    out = generate(model, prompt, max_new_tokens=10, eos_id=first)
    assert out.shape == (1, 1)


def test_tied_embeddings_share_one_parameter():
    model = Transformer(tiny_config())
    assert model.head is None
    untied = Transformer(tiny_config(tie_embeddings=False))
    assert untied.head is not None
    assert param_counts(untied.cfg).total - param_counts(model.cfg).total == 64 * 32


def test_training_step_decreases_loss_bf16_and_fp32():
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Transformer(tiny_config()).to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        tokens = torch.randint(0, 64, (4, 16))
        losses = []
        for _ in range(10):
            logits, aux = model.forward_with_aux(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, 64), tokens[:, 1:].reshape(-1)) + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 0.5, (dtype, losses)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(moe=dict(num_experts=4, top_k=5, expert_ffn_dim=16)), "model.moe.top_k"),
        (dict(n_heads=6, n_kv_heads=4), "model.n_kv_heads"),
        (dict(d_model=36), "model.d_model"),
        (dict(moe=dict(num_experts=4, top_k=2, expert_ffn_dim=12)), "model.moe.expert_ffn_dim"),
        (dict(moe=dict(num_experts=4, top_k=2, expert_ffn_dim=16, score_func="relu")), "model.moe.score_func"),
        (dict(moe=dict(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=1)), "model.moe.shared_ffn_dim"),
        (dict(hidden=3), "model.hidden"),
        (dict(moe=dict(num_experts=4, top_k=2, expert_ffn_dim=16, topk=2)), "model.moe.topk"),
        (dict(head_dim=7), "model.head_dim"),
    ],
)
def test_invalid_configs_are_rejected_naming_the_field(overrides, field):
    data = dict(
        name="t",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        moe=dict(num_experts=4, top_k=2, expert_ffn_dim=16),
    )
    data.update(overrides)
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, data, "model")
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_router_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    moe = MoE(32, small_moe())
    torch.nn.init.normal_(moe.router.weight_ED)
    x_TD = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        route = moe.router(x_TD)
    assert route.logits_TE.dtype == torch.float32 and route.gates_TK.dtype == torch.float32
    torch.testing.assert_close(route.logits_TE, x_TD @ moe.router.weight_ED.T, rtol=1e-6, atol=1e-6)
