"""The MoE training kernel (pipeline/model/kernels, C++) against the eager layer: values,
every gradient (and torch's finite-difference gradcheck in float64), the slot sort, when
the layer takes it, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
from shapes import small_moe

from pipeline.model import MoE
from pipeline.model.kernels import routed_experts, sort_slots
from pipeline.model.moe import fused_applies


def _layer(num_experts=6, top_k=3, d=24, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(d, small_moe(num_experts=num_experts, top_k=top_k, **kw))
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return moe


def _grads(moe: MoE, x: torch.Tensor, weight: torch.Tensor):
    x = x.clone().requires_grad_()
    y, aux = moe(x)
    ((y * weight).sum() + aux).backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("num_experts", "top_k", "tokens"), [(6, 3, 11), (16, 1, 40), (5, 5, 7)])
def test_fused_equals_the_loop_reference_values_and_every_gradient(num_experts, top_k, tokens):
    fused = _layer(num_experts, top_k)
    fused.dispatch = "fused"
    ref = copy.deepcopy(fused)
    ref.dispatch = "loop"
    x = torch.randn(1, tokens, 24)
    weight = torch.randn(1, tokens, 24)  # a non-uniform upstream gradient
    y1, dx1, g1 = _grads(fused, x, weight)
    y2, dx2, g2 = _grads(ref, x, weight)
    # FP32 sums in another order (per-expert GEMMs, the combine over k): a few ulps of
    # values of order 1.
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx1, dx2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and "experts.w2_EDF" in g1 and "router.weight_ED" in g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_kernel_passes_gradcheck_in_float64():
    torch.manual_seed(3)
    T, K, E, D, F = 7, 2, 4, 5, 3
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(E, F, D, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(E, F, D, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(E, D, F, dtype=torch.float64, requires_grad=True)
    experts = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    experts[:, 0] = torch.where(experts[:, 0] == 3, 0, experts[:, 0])  # expert 3 kept rare
    order, offsets = sort_slots(experts, E)
    assert torch.autograd.gradcheck(
        lambda *a: routed_experts(*a, order, offsets), (x, gates, w1, w3, w2), eps=1e-6, atol=1e-7
    )


def test_an_expert_without_slots_gets_a_zero_gradient():
    torch.manual_seed(0)
    T, K, E, D, F = 5, 1, 4, 6, 3
    x = torch.randn(T, D)
    gates = torch.rand(T, K)
    w = [torch.randn(E, F, D, requires_grad=True), torch.randn(E, F, D, requires_grad=True)]
    w2 = torch.randn(E, D, F, requires_grad=True)
    # Gradients are written in place per expert; an expert nobody chose must read 0, not
    # whatever memory the output was allocated on.
    order, offsets = sort_slots(torch.tensor([[0], [2], [0], [2], [0]]), E)
    routed_experts(x, gates, w[0], w[1], w2, order, offsets).sum().backward()
    for grad in (w[0].grad, w[1].grad, w2.grad):
        assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0


def test_sort_slots_is_the_stable_argsort_and_names_a_bad_expert():
    torch.manual_seed(0)
    experts = torch.randint(0, 9, (50, 3))
    order, offsets = sort_slots(experts, 9)
    assert torch.equal(order, torch.argsort(experts.view(-1), stable=True))
    counts = torch.bincount(experts.view(-1), minlength=9)
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    with pytest.raises(RuntimeError, match="expert id 9 out of range"):
        sort_slots(torch.tensor([[1, 9]]), 9)


def test_auto_takes_the_kernel_only_where_it_computes_the_same_thing():
    from shapes import tiny_config

    from pipeline.model import Transformer
    from pipeline.quant import QuantConfig
    from pipeline.quant.fake import prepare

    moe = _layer()
    x = torch.randn(4, 24)
    assert fused_applies(moe.experts, x)
    assert not fused_applies(moe.experts, x.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applies(moe.experts, x)
    # QAT fake-quantizes each expert's input rows, which the kernel does not: grouped.
    qat = prepare(Transformer(tiny_config()), QuantConfig(group_size=16))
    (layer,) = [m for m in qat.modules() if isinstance(m, MoE)][:1]
    assert not fused_applies(layer.experts, x)
    layer.dispatch = "fused"
    with pytest.raises(ValueError, match="dispatch 'fused' needs"):
        layer(torch.randn(1, 3, tiny_config().d_model))


def test_the_kernel_refuses_mixed_dtypes():
    order, offsets = sort_slots(torch.tensor([[0], [1]]), 2)
    x, gates = torch.randn(2, 4), torch.rand(2, 1, dtype=torch.float64)
    w1, w3, w2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="share one dtype"):
        routed_experts(x, gates, w1, w3, w2, order, offsets)


def test_two_threads_and_inference_mode_give_the_reference():
    # The suite runs one thread per xdist worker, where parallel_for is serial: the
    # parallel loop over experts (and thread-local state that does not reach its other
    # threads, e.g. inference mode) is exercised here.
    fused = _layer(8, 2)
    fused.dispatch = "fused"
    ref = copy.deepcopy(fused)
    ref.dispatch = "loop"
    x = torch.randn(2, 33, 24)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(fused(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
        weight = torch.randn(2, 33, 24)
        y1, dx1, g1 = _grads(fused, x, weight)
        y2, dx2, g2 = _grads(ref, x, weight)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(dx1, dx2, rtol=1e-5, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("threads", [3, 5])  # 5 > E: some threads get no expert
def test_uneven_routing_over_several_threads_gives_the_one_thread_result(threads):
    # Experts are shared out by slot count (largest first, to the least loaded thread),
    # not in contiguous ranges: with this routing the two differ, and each expert's
    # result must not depend on the thread that runs it.
    torch.manual_seed(5)
    T, K, E, D, F = 40, 2, 4, 6, 5
    x, gates = torch.randn(T, D), torch.rand(T, K)
    weights = [torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)]
    experts = torch.stack([torch.tensor([0, 3]) if t % 5 else torch.tensor([1, 2]) for t in range(T)])
    order, offsets = sort_slots(experts, E)
    upstream = torch.randn(T, D)

    def run(n_threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(n_threads)
        try:
            leaves = [t.clone().requires_grad_() for t in (x, gates, *weights)]
            (routed_experts(*leaves, order, offsets) * upstream).sum().backward()
            return [routed_experts(*[t.detach() for t in leaves], order, offsets)] + [t.grad for t in leaves]
        finally:
            torch.set_num_threads(before)

    for one, many in zip(run(1), run(threads), strict=True):
        torch.testing.assert_close(many, one, rtol=1e-6, atol=1e-6)


def test_auto_calls_the_kernel_on_cpu_fp32(monkeypatch):
    from pipeline.model import kernels

    calls = []
    real = kernels.routed_experts
    monkeypatch.setattr(kernels, "routed_experts", lambda *a: calls.append(1) or real(*a))
    moe = _layer()
    assert moe.dispatch == "auto"
    moe(torch.randn(1, 5, 24))
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(torch.randn(1, 5, 24))
    assert calls == [1]  # autocast: the grouped GEMM


def test_bad_offsets_order_and_dtype_are_refused_before_any_work():
    x, gates = torch.randn(3, 4), torch.rand(3, 1)
    w1, w3, w2 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4, 3)
    order, offsets = sort_slots(torch.tensor([[0], [1], [1]]), 2)
    with pytest.raises(RuntimeError, match="offsets must run 0..N"):
        routed_experts(x, gates, w1, w3, w2, order, torch.tensor([0, 1, 5]))
    with pytest.raises(RuntimeError, match="must not decrease"):
        routed_experts(x, gates, w1, w3, w2, order, torch.tensor([0, 4, 3]))
    with pytest.raises(RuntimeError, match="permutation"):
        routed_experts(x, gates, w1, w3, w2, torch.tensor([0, 0, 2]), offsets)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        routed_experts(*(t.to(torch.bfloat16) for t in (x, gates, w1, w3, w2)), order, offsets)
    with pytest.raises(RuntimeError, match="w3 must have w1's shape"):
        routed_experts(x, gates, w1, torch.randn(2, 2, 4), w2, order, offsets)
