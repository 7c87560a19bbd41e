"""The model's maths against independent references: a naive transformer written for this
test (per-position loops, explicit formulas, float64), and accounting numbers computed
by hand. Values are deliberately non-default and non-symmetric (RoPE theta 10,000, random
norm weights, a non-zero expert bias, route scale 2.5, a sliding window at its edge), so
that a planted bug in the library's maths changes a number here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import ModelConfig, MoE, MoEConfig, Transformer
from pipeline.model.accounting import (
    flops_per_token,
    int4_weight_bytes,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    param_counts,
    summary,
)

# --------------------------------------------------------------------------- a naive reference


def naive_rmsnorm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def naive_rope(x_Dh, pos: int, theta: float):
    """Rotate the pairs (i, i + Dh/2) of one head by pos * theta^(-2i/Dh)."""
    half = x_Dh.shape[-1] // 2
    out = x_Dh.clone()
    for i in range(half):
        angle = pos * theta ** (-2 * i / x_Dh.shape[-1])
        a, b = x_Dh[..., i], x_Dh[..., i + half]
        out[..., i] = a * math.cos(angle) - b * math.sin(angle)
        out[..., i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_attention(attn, h_SD, cfg: ModelConfig, layer: int):
    S = h_SD.shape[0]
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    window = None if cfg.sliding_window is None or (layer + 1) % cfg.global_every == 0 else cfg.sliding_window
    q = (h_SD @ attn.wq.weight.double().T).view(S, H, Dh)
    k = (h_SD @ attn.wk.weight.double().T).view(S, Hkv, Dh)
    v = (h_SD @ attn.wv.weight.double().T).view(S, Hkv, Dh)
    if cfg.qk_norm:
        q = naive_rmsnorm(q, attn.q_norm.weight.double(), cfg.norm_eps)
        k = naive_rmsnorm(k, attn.k_norm.weight.double(), cfg.norm_eps)
    q = torch.stack([naive_rope(q[p], p, cfg.rope_theta) for p in range(S)])
    k = torch.stack([naive_rope(k[p], p, cfg.rope_theta) for p in range(S)])
    out = torch.zeros(S, H, Dh, dtype=torch.float64)
    group = H // Hkv  # query heads per key/value head
    for p in range(S):
        keys = [j for j in range(p + 1) if window is None or p - j < window]
        for h in range(H):
            kv = h // group
            scores = torch.stack([q[p, h] @ k[j, kv] for j in keys]) / math.sqrt(Dh)
            weights = torch.softmax(scores, 0)
            out[p, h] = sum(w * v[j, kv] for w, j in zip(weights, keys))
    return out.reshape(S, H * Dh) @ attn.wo.weight.double().T


def naive_swiglu(x_D, w1, w3, w2):
    return w2 @ (F.silu(w1 @ x_D) * (w3 @ x_D))


def naive_moe(moe: MoE, h_SD):
    cfg = moe.cfg
    router = moe.router.weight_ED.double()
    bias = moe.router.expert_bias_E.double()
    w1, w3, w2 = (w.double() for w in (moe.experts.w1_EFD, moe.experts.w3_EFD, moe.experts.w2_EDF))
    out = torch.zeros_like(h_SD)
    for t in range(h_SD.shape[0]):
        logits = router @ h_SD[t]
        scores = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, 0)
        chosen = sorted(range(cfg.num_experts), key=lambda e: -(scores[e] + bias[e]).item())[: cfg.top_k]
        gates = torch.stack([scores[e] for e in chosen])
        if cfg.route_norm:
            gates = gates / gates.sum()
        gates = gates * cfg.route_scale
        for g, e in zip(gates, chosen):
            out[t] += g * naive_swiglu(h_SD[t], w1[e], w3[e], w2[e])
        if moe.shared is not None:
            s = moe.shared
            out[t] += naive_swiglu(h_SD[t], s.w1.weight.double(), s.w3.weight.double(), s.w2.weight.double())
    return out


def naive_forward(model: Transformer, tokens: list[int]):
    cfg = model.cfg
    x = model.embed.weight.double()[tokens]
    for layer, block in enumerate(model.layers):
        x = x + naive_attention(block.attn, naive_rmsnorm(x, block.attn_norm.weight.double(), cfg.norm_eps), cfg, layer)
        h = naive_rmsnorm(x, block.ffn_norm.weight.double(), cfg.norm_eps)
        if isinstance(block.ffn, MoE):
            x = x + naive_moe(block.ffn, h)
        else:
            f = block.ffn
            x = x + torch.stack(
                [
                    naive_swiglu(h[t], f.w1.weight.double(), f.w3.weight.double(), f.w2.weight.double())
                    for t in range(len(tokens))
                ]
            )
    x = naive_rmsnorm(x, model.norm.weight.double(), cfg.norm_eps)
    head = model.embed.weight if cfg.tie_embeddings else model.head.weight
    return x @ head.double().T


def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every weight, norm gain and expert bias is random (nothing is 1 or 0)."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.2)
        for moe in model.moe_layers():
            moe.router.expert_bias_E.uniform_(-0.3, 0.3)
    return model.eval()


def config(**overrides) -> ModelConfig:
    base = dict(
        name="maths",
        vocab_size=48,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        max_seq_len=32,
        rope_theta=10_000.0,
        norm_eps=1e-2,  # not the default: every norm must take the config's epsilon
        sliding_window=3,
        global_every=2,
        moe=MoEConfig(
            num_experts=6,
            top_k=2,
            expert_ffn_dim=16,
            num_shared_experts=1,
            shared_ffn_dim=24,
            score_func="sigmoid",
            route_norm=True,
            route_scale=2.5,
        ),
    )
    base.update(overrides)
    return ModelConfig(**base)


TOKENS = [3, 17, 5, 40, 22, 9, 31, 0, 12]


@pytest.mark.parametrize(
    "cfg",
    [
        config(),  # sigmoid router, normalised, scaled; GQA; QK-norm; window 3 on layer 0
        config(
            moe=MoEConfig(
                num_experts=5, top_k=3, expert_ffn_dim=8, score_func="softmax", route_norm=False, route_scale=1.7
            )
        ),  # softmax gates over all E, no shared expert
        config(moe=None, ffn_dim=40, qk_norm=False, n_kv_heads=4, sliding_window=None, rope_theta=777.0),
        config(n_kv_heads=1, sliding_window=1, global_every=3, n_layers=3),  # window 1: attends to itself only
    ],
    ids=["sigmoid-moe", "softmax-moe", "dense", "mqa-window1"],
)
def test_forward_equals_a_naive_transformer(cfg):
    model = build(cfg)
    with torch.no_grad():
        got = model(torch.tensor([TOKENS])).double()[0]
    want = naive_forward(model, TOKENS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kv_cache_decoding_equals_the_naive_transformer_position_by_position():
    from pipeline.model import KVCache

    cfg = config()
    model = build(cfg, seed=3)
    cache = KVCache(cfg, batch=1, max_len=len(TOKENS))
    want = naive_forward(model, TOKENS)
    with torch.no_grad():
        first = model(torch.tensor([TOKENS[:4]]), start_pos=0, cache=cache)[0]
        steps = [model(torch.tensor([[t]]), start_pos=4 + i, cache=cache)[0, 0] for i, t in enumerate(TOKENS[4:])]
    torch.testing.assert_close(torch.cat([first, torch.stack(steps)]).double(), want, rtol=1e-4, atol=1e-4)


def test_generate_extends_greedily_by_the_naive_argmax():
    from pipeline.model import generate

    model = build(config(), seed=5)
    new = generate(model, torch.tensor([TOKENS[:3]]), max_new_tokens=4)[0].tolist()
    seq = TOKENS[:3]
    for _ in range(4):
        seq.append(int(naive_forward(model, seq)[-1].argmax()))
    assert new == seq[3:]


def test_router_gates_by_hand():
    # 1 token, 4 experts, top-2, sigmoid scores s = sigmoid(logits), bias steers selection.
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, route_norm=True, route_scale=2.5)
    moe = MoE(2, cfg)
    with torch.no_grad():
        moe.router.weight_ED.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.5, 0.5]]))
        moe.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.9, 0.0]))
    route = moe.router(torch.tensor([[2.0, 1.0]]))
    s = [1 / (1 + math.exp(-v)) for v in (2.0, 1.0, -2.0, 1.5)]  # 0.881, 0.731, 0.119, 0.818
    # selection by s + bias: 0.881, 0.731, 1.019, 0.818 -> experts 2 and 0
    assert sorted(route.experts_TK[0].tolist()) == [0, 2]
    gates = dict(zip(route.experts_TK[0].tolist(), route.gates_TK[0].tolist()))
    # gates from the unbiased scores, normalised over the two chosen, times 2.5
    assert gates[0] == pytest.approx(2.5 * s[0] / (s[0] + s[2]), rel=1e-6)
    assert gates[2] == pytest.approx(2.5 * s[2] / (s[0] + s[2]), rel=1e-6)


def test_shared_expert_is_added_to_the_routed_output():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=8, num_shared_experts=2, shared_ffn_dim=8))
    with torch.no_grad():
        for w in (moe.experts.w1_EFD, moe.experts.w3_EFD, moe.experts.w2_EDF):
            w.zero_()  # routed experts contribute nothing
    x = torch.randn(1, 5, 16)
    out, _ = moe(x)
    s = moe.shared
    assert s.w1.weight.shape == (16, 16)  # two shared experts of width 8 = one of width 16
    want = torch.stack(
        [
            naive_swiglu(x[0, t].double(), s.w1.weight.double(), s.w3.weight.double(), s.w2.weight.double())
            for t in range(5)
        ]
    )
    torch.testing.assert_close(out[0].double(), want, rtol=1e-5, atol=1e-6)


def test_rope_tables_by_hand():
    from pipeline.model.layers import rope_tables

    cos, sin = rope_tables(head_dim=4, max_len=3, theta=100.0)
    # inv_freq = [100^0, 100^(-2/4)] = [1, 0.1]; angle(pos, i) = pos * inv_freq[i]
    assert cos[2, 0].item() == pytest.approx(math.cos(2.0))
    assert sin[2, 1].item() == pytest.approx(math.sin(0.2))
    assert cos[1, 1].item() == pytest.approx(math.cos(0.1))


# --------------------------------------------------------------------------- accounting by hand

# d 32, 2 layers, 2 query heads / 1 KV head of 16, vocab 64, tied; 4 experts of width 32,
# top-2, one shared expert of width 64; layer 0 attends within a window of 4.
HAND = ModelConfig(
    name="hand",
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    max_seq_len=64,
    sliding_window=4,
    global_every=2,
    moe=MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, shared_ffn_dim=64),
)
# attention/layer: q 32*32 + k,v 2*32*16 + o 32*32 = 1024 + 1024 + 1024 = 3072
# norms: 2 layers * (2*32 + 2*16) + final 32 = 192 + 32 = 224
# routed expert: 3*32*32 = 3072; shared: 3*32*64 = 6144; router: 32*4 = 128
# total = 64*32 + 224 + 2*(3072 + 4*3072 + 6144 + 128) = 2048 + 224 + 43264 = 45536
# active = 2048 + 224 + 2*(3072 + 2*3072 + 6144 + 128) = 2272 + 30976 = 33248
HAND_TOTAL, HAND_ACTIVE = 45536, 33248


def test_param_counts_by_hand():
    counts = param_counts(HAND)
    assert (counts.total, counts.active, counts.router, counts.norms, counts.embedding) == (
        HAND_TOTAL,
        HAND_ACTIVE,
        256,
        224,
        2048,
    )
    with torch.device("meta"):
        assert sum(p.numel() for p in Transformer(HAND).parameters()) == HAND_TOTAL


def test_active_params_are_what_one_token_touches_in_the_built_model():
    """Count, in a real forward of one token, the parameters it reads: everything but the
    routed experts it was not sent to (the router reads all its rows)."""
    model = build(HAND, seed=1)
    used: list[set[int]] = []
    hooks = [
        moe.router.register_forward_hook(lambda m, i, out: used.append(set(out.experts_TK[0].tolist())))
        for moe in model.moe_layers()
    ]
    with torch.no_grad():
        model(torch.tensor([[7]]))
    for h in hooks:
        h.remove()
    per_expert = 3 * HAND.moe.expert_ffn_dim * HAND.d_model
    routed = sum(p.numel() for n, p in model.named_parameters() if "experts." in n)
    touched = sum(p.numel() for p in model.parameters()) - routed + sum(len(u) for u in used) * per_expert
    assert [len(u) for u in used] == [2, 2]
    assert touched == param_counts(HAND).active == HAND_ACTIVE


def test_int4_bytes_by_hand():
    # quantized = 45536 - 256 (router, FP32) - 224 (norms, bf16) = 45056 weights
    # INT4: 45056 / 2 = 22528 bytes; one bf16 scale per 32 weights: 1408 * 2 = 2816 bytes
    # router 256 * 4 = 1024; norms 224 * 2 = 448  ->  22528 + 2816 + 1024 + 448 = 26816
    assert int4_weight_bytes(HAND) == 26816
    # group 64, fp32 scales: 22528 + 704 * 4 + 1024 + 448 = 26816 - 2816 + 2816 = 26816
    assert int4_weight_bytes(HAND, group_size=64, scale_bytes=4) == 22528 + 704 * 4 + 1024 + 448


def test_flops_and_kv_cache_by_hand():
    # Matmul params: active minus norms (the tied embedding counts once, as the head):
    # 33248 - 224 = 33024 -> 2 * 33024 = 66048 FLOPs. Attention: 2 (QK and AV) * 2 FLOPs
    # * 2 heads * 16 dims = 128 FLOPs per attended position.
    # Decode with 10 cached: layer 0 sees min(10, 4) = 4, layer 1 sees 10 -> 14 positions.
    assert flops_per_token(HAND, 10, "decode") == pytest.approx(66048 + 128 * 14)
    # Prefill of 10: layer 0 averages min(i, 4) over i = 1..10 -> (1+2+3+4+6*4)/10 = 3.4;
    # layer 1 averages i -> 5.5.
    assert flops_per_token(HAND, 10, "prefill") == pytest.approx(66048 + 128 * 8.9)
    # KV: K and V, 1 head of 16, bf16 = 64 bytes per layer per token.
    assert kv_cache_bytes_per_token(HAND) == 128
    assert kv_cache_bytes(HAND, 10) == 64 * (4 + 10)
    assert kv_cache_bytes(HAND, 3) == 64 * (3 + 3)  # within the window
    assert kv_cache_bytes(HAND, 10, dtype_bytes=1) == 32 * 14
    s = summary(HAND, context=10)
    assert (s["params_total"], s["params_active"], s["int4_weight_bytes"]) == (HAND_TOTAL, HAND_ACTIVE, 26816)
    assert s["flops_per_token_decode"] == pytest.approx(66048 + 128 * 14)


def test_untied_head_counts_twice_in_params_once_more_in_flops():
    untied = ModelConfig(**{**HAND.__dict__, "tie_embeddings": False})
    assert param_counts(untied).total == HAND_TOTAL + 2048
    # The input lookup is free; the separate head is a real matmul: same FLOPs as tied.
    assert flops_per_token(untied, 10, "decode") == pytest.approx(flops_per_token(HAND, 10, "decode"))


# Two windowed layers before a global one (windows 4 on layers 0 and 1, layer 2 global),
# two KV heads: the per-layer sums and the head factor both show in the numbers.
HAND3 = ModelConfig(
    name="hand3",
    vocab_size=64,
    d_model=32,
    n_layers=3,
    n_heads=2,
    n_kv_heads=2,
    head_dim=16,
    max_seq_len=64,
    sliding_window=4,
    global_every=3,
    ffn_dim=64,
)


def test_accounting_sums_every_windowed_layer_and_counts_kv_heads():
    # Attended positions, prefill of 10: 3.4 + 3.4 (windowed) + 5.5 (global) = 12.3;
    # decode with 10 cached: 4 + 4 + 10 = 18. 128 FLOPs per attended position.
    matmul = param_counts(HAND3).active - param_counts(HAND3).norms
    assert flops_per_token(HAND3, 10, "prefill") == pytest.approx(2 * matmul + 128 * 12.3)
    assert flops_per_token(HAND3, 10, "decode") == pytest.approx(2 * matmul + 128 * 18)
    assert flops_per_token(HAND3, 10) == flops_per_token(HAND3, 10, "prefill")  # the default phase
    # A window as long as the prompt is the same as no window: (10 + 1) / 2 per layer.
    assert flops_per_token(HAND3, 4, "prefill") == pytest.approx(2 * matmul + 128 * 3 * 2.5)
    # KV: K and V, 2 heads of 16, bf16 = 128 bytes per layer per token.
    assert kv_cache_bytes_per_token(HAND3) == 3 * 128
    assert kv_cache_bytes(HAND3, 10) == 128 * (4 + 4 + 10)


def test_byte_counts_are_whole_bytes():
    assert isinstance(int4_weight_bytes(HAND), int) and isinstance(int4_weight_bytes(HAND3), int)
    assert isinstance(kv_cache_bytes(HAND3, 10), int)


def test_summary_reports_every_figure_at_its_default_context():
    s = summary(HAND)
    assert s == {
        "params_total": HAND_TOTAL,
        "params_active": HAND_ACTIVE,
        "params_embedding": 2048,
        "flops_per_token_prefill": flops_per_token(HAND, 1024, "prefill"),
        "flops_per_token_decode": flops_per_token(HAND, 1024, "decode"),
        "int4_weight_bytes": 26816,
        "kv_cache_bytes_per_token": 128,
        "context": 1024,
    }


# --------------------------------------------------------------------------- the second mutation run's survivors

DENSE = ModelConfig(
    name="dense",
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=2,
    n_kv_heads=1,
    head_dim=16,
    max_seq_len=64,
    qk_norm=False,
    ffn_dim=96,
)


def test_dense_counts_without_qk_norm_by_hand():
    # attention/layer 3072 (as HAND); norms 2 * (2*32) + 32 = 160 (no QK-norm); FFN 3*32*96 = 9216
    # total = active = 2048 + 160 + 2 * (3072 + 9216) = 26784; no router
    counts = param_counts(DENSE)
    assert (counts.total, counts.active, counts.router, counts.norms) == (26784, 26784, 0, 160)
    assert sum(p.numel() for p in Transformer(DENSE).parameters()) == 26784
    # INT4: (26784 - 160) / 2 = 13312; 26624 / 32 = 832 bf16 scales = 1664; norms 160 * 2 = 320
    assert int4_weight_bytes(DENSE) == 13312 + 1664 + 320


def test_int4_bytes_with_an_int8_embedding_and_fp32_norms_by_hand():
    # embedding 64*32 = 2048 at INT8 + one FP32 scale per row: 2048 + 64*4 = 2304
    # the other 45056 - 2048 = 43008 quantized weights at INT4: 21504 + 1344 scales * 4 = 26880
    # router 256 * 4 = 1024; norms 224 * 4 = 896
    assert int4_weight_bytes(HAND, scale_bytes=4, norm_bytes=4, embedding_bits=8) == 2304 + 26880 + 1024 + 896
    with pytest.raises(ValueError, match="embedding_bits: must be 4 or 8"):
        int4_weight_bytes(HAND, embedding_bits=2)


def test_kv_cache_holds_the_dtype_asked_for():
    from pipeline.model import KVCache

    cache = KVCache(HAND, batch=1, max_len=8, dtype=torch.bfloat16)
    assert {t.dtype for t in cache.k_BHkvLDh + cache.v_BHkvLDh} == {torch.bfloat16}
    assert len(cache.k_BHkvLDh) == len(cache.v_BHkvLDh) == HAND.n_layers


def test_gather_dispatch_by_hand_and_in_the_input_dtype():
    from pipeline.model.moe import gathered_experts

    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, route_scale=2.5))  # FP32 weights
    x_TD = torch.randn(5, 32, dtype=torch.float64)
    route = moe.router(x_TD)
    got_TD = gathered_experts(moe.experts, x_TD, route.experts_TK, route.gates_TK)
    w1, w3, w2 = (w.detach().double() for w in (moe.experts.w1_EFD, moe.experts.w3_EFD, moe.experts.w2_EDF))
    want_TD = torch.zeros(5, 32, dtype=torch.float64)
    for t in range(5):
        for gate, e in zip(route.gates_TK[t].double().tolist(), route.experts_TK[t].tolist()):
            want_TD[t] += gate * (w2[e] @ (F.silu(w1[e] @ x_TD[t]) * (w3[e] @ x_TD[t])))
    torch.testing.assert_close(got_TD, want_TD)
    # bf16 activations stay bf16 (weights and gates are cast to the input's dtype)
    low = gathered_experts(moe.experts, x_TD.bfloat16(), route.experts_TK, route.gates_TK)
    assert low.dtype == torch.bfloat16


def test_grouped_experts_compute_in_the_input_dtype():
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16))  # FP32 weights
    counts_E = torch.tensor([3, 0, 2, 1])
    x_ND = torch.randn(6, 32)
    full = moe.experts(x_ND, counts_E)
    low = moe.experts(x_ND.bfloat16(), counts_E)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.02)


def test_grouped_experts_run_in_bf16_under_autocast_and_the_layer_returns_the_stream_dtype():
    """Autocast does not cover ``_grouped_mm``; the experts cast to autocast's dtype as a
    linear layer would (on CUDA only BF16 takes the grouped kernel), and the combined
    output goes back to the FP32 residual stream's dtype."""
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16))
    counts_E = torch.tensor([3, 0, 2, 1])
    x_ND = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = moe.experts(x_ND, counts_E)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low, moe.experts(x_ND.bfloat16(), counts_E), rtol=0, atol=0)
    x_BSD = torch.randn(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_BSD, _ = moe(x_BSD)
    assert out_BSD.dtype == torch.float32
    torch.testing.assert_close(out_BSD, moe(x_BSD)[0], rtol=0.05, atol=0.02)


def test_routed_token_counts_add_up_over_forwards_until_the_balancer_reads_them():
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16)).train()
    x1, x2 = torch.randn(1, 5, 32), torch.randn(2, 3, 32)
    expected = torch.zeros(4)
    for x in (x1, x2):  # two micro-batches of one optimizer step
        experts = moe.router(x.reshape(-1, 32)).experts_TK.flatten()
        expected += torch.bincount(experts, minlength=4).float()
        moe(x)
    assert torch.equal(moe.router.tokens_per_expert_E, expected)
    assert moe.router.tokens_per_expert_E.sum() == (5 + 6) * 2


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_auxiliary_balance_loss_by_hand(score_func):
    torch.manual_seed(0)
    coef = 0.01
    cfg = MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, score_func=score_func, aux_loss_coef=coef)
    moe = MoE(32, cfg)
    x_BSD = torch.randn(2, 3, 32)  # B*S = 6 tokens (B/S would not be)
    _, aux = moe(x_BSD)
    logits_TE = x_BSD.reshape(6, 32) @ moe.router.weight_ED.detach().T
    scores_TE = torch.softmax(logits_TE, dim=-1) if score_func == "softmax" else torch.sigmoid(logits_TE)
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)  # sigmoid scores do not sum to 1
    chosen_TK = scores_TE.topk(2, dim=-1).indices
    frac_E = torch.bincount(chosen_TK.flatten(), minlength=4).float() / (6 * 2)
    want = coef * 4 * (frac_E * probs_TE.mean(0)).sum()
    torch.testing.assert_close(aux, want)


def test_attention_depends_on_relative_positions_only():
    # RoPE rotates q and k by their absolute positions, so their dot products depend on
    # the distance only; causal and window masks too. A sequence placed at positions
    # 3..12 (no cache) must give what it gives at 0..9.
    torch.manual_seed(0)
    model = Transformer(HAND).eval()
    tokens = torch.randint(0, HAND.vocab_size, (2, 10))
    with torch.no_grad():
        at_zero = model(tokens)
        shifted = model(tokens, start_pos=3)
    torch.testing.assert_close(shifted, at_zero, rtol=1e-4, atol=1e-4)


def test_router_z_loss_by_hand():
    torch.manual_seed(0)
    moe = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, z_loss_coef=0.5))
    x_BSD = torch.randn(2, 3, 32)
    _, aux = moe(x_BSD)
    logits_TE = (x_BSD.reshape(6, 32) @ moe.router.weight_ED.detach().T).double()
    want = 0.5 * (torch.log(torch.exp(logits_TE).sum(-1)) ** 2).mean()  # mean over tokens of lse^2
    torch.testing.assert_close(aux.double(), want, rtol=1e-5, atol=1e-7)


def test_a_shared_expert_exists_exactly_when_configured():
    none = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16))
    assert none.shared is None and not any(k.startswith("shared.") for k in none.state_dict())
    narrow = MoE(32, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=1, shared_ffn_dim=1))
    assert narrow.shared is not None and narrow.shared.w1.weight.shape == (1, 32)


# --------------------------------------------------------------------------- decode paths, step by step


def _generate_rows(model: Transformer, prompt: list[int], new: int, shift_first_decode: bool = False):
    """``generate`` on ``prompt``, with the logits row it decided each new token from
    (the prefill's last row, then one row per decode step): (new ids, rows (new, V)).
    ``shift_first_decode`` plants a bug: the first decode step one position too far."""
    from pipeline.model import generate

    rows: list[torch.Tensor] = []

    def shift(_module, args, kwargs):
        if shift_first_decode and kwargs.get("start_pos") == len(prompt):
            return args, {**kwargs, "start_pos": len(prompt) + 1}
        return None

    handles = [
        model.register_forward_pre_hook(shift, with_kwargs=True),
        model.register_forward_hook(lambda _m, _a, out: rows.append(out[0, -1].detach().double())),
    ]
    try:
        ids = generate(model, torch.tensor([prompt]), max_new_tokens=new)[0].tolist()
    finally:
        for h in handles:
            h.remove()
    return ids, torch.stack(rows)


def _runner_rows(model: Transformer, prompt: list[int], new: int, shift_first_decode: bool = False):
    """The export stage's eager runner (the model's KV cache, driven by position) on
    ``prompt`` and the greedy continuation that generate() makes: (ids, rows (new, V))."""
    from pipeline.export.runner import EagerRunner

    ids, _ = _generate_rows(model, prompt, new)
    runner = EagerRunner(model, len(prompt) + new + 1)
    rows = [runner.logits(prompt, 0)[-1]]
    for i, token in enumerate(ids[:-1]):
        pos = len(prompt) + i
        rows.append(runner.logits([token], pos + 1 if shift_first_decode and i == 0 else pos)[0])
    return ids, torch.stack(rows).double()


@pytest.mark.parametrize("path", [_generate_rows, _runner_rows], ids=["generate", "EagerRunner"])
def test_cached_decode_equals_a_full_forward_and_float64_step_by_step(path, context_model):
    """Every decode step's logits, not only its argmax, against a full forward of the same
    tokens (FP32, no cache) and the float64 reference, on a model whose next token
    depends on the context (the copy task: conftest ``context_model``). The tolerance is
    measured: the FP32 full forward's own distance to float64 on these tokens, times 8
    (a cache changes only the order of FP32 sums, not their size); a wrong cache
    position moves the rows by orders of magnitude more."""
    from shapes import LAG, copy_batch

    prompt = copy_batch(1, 8, torch.Generator().manual_seed(11))[0].tolist()
    new = 12
    ids, rows = path(context_model, prompt, new)
    seq = prompt + ids
    at = slice(len(prompt) - 1, len(seq) - 1)  # the row each new token was chosen from
    with torch.no_grad():
        full = context_model(torch.tensor([seq]))[0].double()[at]
    ref = naive_forward(context_model, seq)[at]
    tol = 8 * float((full - ref).abs().max())
    assert 0 < tol < 1e-2, tol
    assert float((rows - full).abs().max()) <= tol
    assert float((rows - ref).abs().max()) <= tol
    copied = list(prompt)
    for _ in range(new):
        copied.append(copied[-LAG])
    assert ids == copied[len(prompt) :]  # the copy task, continued: the context decides

    # The oracle can fail: the first decode step written one position too far.
    _, bad = path(context_model, prompt, new, shift_first_decode=True)
    assert float((bad - full).abs().max()) > 100 * tol
