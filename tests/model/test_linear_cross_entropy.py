"""The fused head-and-loss (pipeline/model/loss.py) against the plain form, logits then
``F.cross_entropy``: values and gradients in FP64 at chunk sizes that do and do not
divide the rows, unlabelled rows and chunks, the upstream gradient, gradcheck, the
model's training forward for every head it has (tied, untied, QAT's fake-quantized and
the converted embedding), BF16 autocast, and what it refuses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from shapes import micro_cfg, trained_like

from pipeline.model.loss import IGNORE_INDEX, chunk_rows, linear_cross_entropy
from pipeline.quant import QuantConfig
from pipeline.quant.convert import convert
from pipeline.quant.fake import prepare


def _operands(n=37, v=29, d=12, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=dtype)
    W = torch.randn(v, d, generator=gen, dtype=dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::5] = IGNORE_INDEX  # unlabelled rows (prompt positions in SFT)
    labels[8:16] = IGNORE_INDEX  # a whole chunk of 8 without a label
    return h, W, labels


def _plain(h, W, labels, scale=1.0):
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = F.cross_entropy(h @ W.T, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    (loss * scale).backward()
    return loss.detach(), h.grad, W.grad


def _fused(h, W, labels, scale=1.0, rows=None):
    h, W = h.clone().requires_grad_(), W.clone().requires_grad_()
    loss = linear_cross_entropy(h, W, labels, rows=rows)
    (loss * scale).backward()
    return loss.detach(), h.grad, W.grad


@pytest.mark.parametrize("rows", [1, 7, 8, 36, 37, 500])
def test_values_and_gradients_equal_the_plain_form_at_every_chunking(rows):
    h, W, labels = _operands()
    scale = 0.37  # the loop's 1/targets: the backward must scale by the upstream gradient
    want, got = _plain(h, W, labels, scale), _fused(h, W, labels, scale, rows=rows)
    torch.testing.assert_close(got[0], want[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[2], want[2], rtol=1e-12, atol=1e-12)
    # rows without a label get no gradient, not a softmax's
    assert torch.equal(got[1][labels == IGNORE_INDEX], torch.zeros_like(got[1][labels == IGNORE_INDEX]))


def test_gradcheck_in_float64():
    h, W, labels = _operands(n=9, v=6, d=4)
    h.requires_grad_(), W.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, labels, rows=4).double(), (h, W))


def test_fp32_equals_the_plain_form_within_rounding():
    """FP32, the training dtype: the two sum in another order. Tolerance: the loss is a
    sum of N terms of about ln V each, so its rounding is about N·ε·ln V relative to
    nothing, i.e. a relative error near sqrt(N)·ε for random rounding; 1e-5 leaves
    margin at N = 512. Gradient entries are single softmax terms (and W's sums of
    N of them): 1e-5 absolute on entries of order 1."""
    h, W, labels = (t.float() if t.is_floating_point() else t for t in _operands(n=512, v=300, d=32))
    want, got = _plain(h, W, labels), _fused(h, W, labels, rows=64)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=1e-5)


def test_chunk_rows_keep_the_logits_within_the_device_budget():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chunk_rows(4096, 4096, cpu) == 128  # 128 x 4096 FP32 = 2 MiB
    assert chunk_rows(100, 4096, cpu) == 100  # never more rows than there are
    assert chunk_rows(4096, 200_000, cpu) == 128  # at least 128 rows: thin GEMMs are slow
    assert chunk_rows(100_000, 4096, cuda) == 16384  # 256 MiB on an accelerator


def test_bad_labels_and_shapes_are_named():
    h, W, labels = _operands(dtype=torch.float32)
    with pytest.raises(ValueError, match="label 29 is outside the vocabulary"):
        linear_cross_entropy(h, W, torch.cat([labels[:3], torch.tensor([29]), labels[4:]]))
    with pytest.raises(ValueError, match="label -5 is outside"):
        linear_cross_entropy(h, W, torch.cat([labels[:3], torch.tensor([-5]), labels[4:]]))
    with pytest.raises(ValueError, match=r"need \[N, D\] and \[V, D\]"):
        linear_cross_entropy(h, W[:, :5], labels)
    for bad in (labels.float(), labels > 3, labels.to(torch.uint8)):
        with pytest.raises(ValueError, match=r"need \[N\] int64/int32"):
            linear_cross_entropy(h, W, bad)
    with pytest.raises(ValueError, match="need one floating dtype"):
        linear_cross_entropy(h.bfloat16(), W, labels)  # F.linear refuses mixed dtypes too
    with pytest.raises(ValueError, match="rows per chunk"):
        linear_cross_entropy(h, W, labels, rows=0)


def _batch(cfg, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (3, 17), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (3, 17), generator=gen)
    labels[0, :6] = IGNORE_INDEX
    return tokens, labels


def _model_pair(model, tokens, labels):
    """(loss, aux, gradients) of the training forward and of logits + F.cross_entropy."""
    out = []
    for fused in (True, False):
        m = copy.deepcopy(model).train()
        if fused:
            loss, aux = m(tokens, labels_BS=labels)
        else:
            logits, aux = m(tokens, return_aux=True)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        (loss / 40 + aux).backward()
        out.append((loss.detach(), aux.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_the_models_training_forward_equals_its_logits_and_cross_entropy(tied):
    cfg = micro_cfg(tie_embeddings=tied)
    model = trained_like(cfg).double()
    tokens, labels = _batch(cfg)
    (loss, aux, grads), (ref_loss, ref_aux, ref_grads) = _model_pair(model, tokens, labels)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(aux, ref_aux)
    assert grads.keys() == ref_grads.keys() and ("head.weight" in grads) == (not tied)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-9, atol=1e-11, msg=name)


def test_qat_and_converted_heads_take_their_quantized_operands():
    """QAT's head fake-quantizes its input per token and its weight per group; the
    training forward must see the same operands (STE gradients included), and the
    converted model's dequantized weight likewise."""
    cfg = micro_cfg()
    q = QuantConfig(group_size=16)
    fake = prepare(trained_like(cfg), q)
    tokens, labels = _batch(cfg)
    (loss, _, grads), (ref_loss, _, ref_grads) = _model_pair(fake, tokens, labels)
    # FP32 (torchao's fake quantizers): rounding of the sums only
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["embed.weight"], ref_grads["embed.weight"], rtol=0, atol=1e-5)
    converted = convert(copy.deepcopy(fake), q)
    with torch.no_grad():
        got, _ = converted(tokens, labels_BS=labels)
        logits = converted(tokens)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_bf16_autocast_runs_the_head_in_bf16_and_the_loss_in_fp32():
    """Under autocast the plain form's GEMM gives BF16 logits, upcast for the loss; the
    fused form does the same per chunk. Both round the logits to BF16 (8 bits of
    mantissa), so they agree to a few BF16 ulps of the loss, and both differ from FP32
    by more than that (which shows the GEMM ran in BF16)."""
    h, W, labels = (t.float() if t.is_floating_point() else t for t in _operands(n=256, v=300, d=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, W, labels, rows=64)
        want = F.cross_entropy((h @ W.T).float(), labels, reduction="sum")
    fp32 = linear_cross_entropy(h, W, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=0)
    assert abs(float(got) - float(fp32)) / float(fp32) > 1e-5


def test_fp64_stays_fp64_under_autocast_and_no_grad_computes_the_loss_alone():
    """Autocast casts FP32 operands, never FP64 (as F.linear); without gradients wanted
    the loss is the same and no gradient is kept."""
    h, W, labels = _operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, W, labels)
    want = F.cross_entropy(h @ W.T, labels, reduction="sum")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    h.requires_grad_()
    with torch.no_grad():
        quiet = linear_cross_entropy(h, W, labels)
    assert quiet.grad_fn is None
    torch.testing.assert_close(quiet, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", ["fake", "converted"])
def test_an_untied_quantized_head_goes_through_its_logits(kind):
    """QAT's fake-quantized and torchao's converted untied heads quantize their input:
    the training forward must give what their logits give, not a plain product."""
    cfg = micro_cfg(tie_embeddings=False)
    q = QuantConfig(group_size=16)
    model = prepare(trained_like(cfg), q)
    if kind == "converted":
        model = convert(model, q)
    tokens, labels = _batch(cfg)
    with torch.no_grad():
        got, _ = model(tokens, labels_BS=labels)
        logits = model(tokens)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_the_training_forward_refuses_a_cache():
    cfg = micro_cfg()
    tokens, labels = _batch(cfg)
    with pytest.raises(ValueError, match="whole sequences"):
        trained_like(cfg)(tokens, start_pos=2, labels_BS=labels)
