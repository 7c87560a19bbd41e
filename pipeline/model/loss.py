"""The output head and the cross-entropy as one operation, never holding all the logits.

Training needs the summed cross-entropy of ``logits = h Wᵀ`` over every position with a
label, and its gradients by h and W. Computed the plain way, the ``[N, V]`` logits are
written, read by log-softmax, written again as log-probabilities, a zero-filled
gradient of the same size is scattered into and log-softmax's backward reads two of
them and writes a third: six passes over N·V floats (67 MB per pass for 4096 tokens and
the tiny model's 4096-word vocabulary) around two GEMMs that only read h and W. On the
tiny model that traffic cost as much as the GEMMs themselves (142.7 ms against 72.1 ms
for the head and its loss, forward and backward, in one run on 2 cores).

Here the rows go through in chunks small enough that a chunk's logits stay in cache:
for each chunk, its logits (one GEMM), their log-sum-exp, and in the same pass the
softmax, which two more GEMMs turn into the chunk's part of the gradients by h and by W
(accumulated in place). The one-hot part of the gradient, ``softmax - onehot(label)``,
is the label's row of W (for h) and the input row (for W): gathered and scattered once
for all rows after the loop, as is the loss, log-sum-exp minus the label's logit (a
row-wise dot product with the label's row of W). Rows without a label enter as zeros
and are masked out. The gradients are computed in the forward (the summed loss is linear
in the upstream gradient, so the backward only scales them): the way fused
linear-cross-entropy kernels for GPUs work (e.g. Liger-Kernel's), written here with
ATen ops, six per chunk (many small parallel ops are what a busy CPU makes slow).

Numerics: the same maths as ``F.cross_entropy(h @ W.T, labels, reduction="sum")``; the
sums run in another order (per chunk, then over chunks), so FP32 results differ by
rounding (tests pin values and gradients against the plain form in FP64, and in FP32
within a tolerance set by FP32 rounding of sums of N terms). Under autocast the GEMMs
of FP32 operands run in autocast's dtype and the log-sum-exp and the loss in FP32, as
the plain form's ``logits.float()`` did. On an accelerator a chunk is 256 MiB of
logits, so a small batch is one chunk (no less memory than the plain form, no more).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions that carry no loss (cross_entropy's default)

# Logits per chunk: on CPU 2 MiB of FP32, which stays in a core's L2 (measured at V
# 4096 on 2 cores: chunks of 128 rows took 72 ms, 512 rows 77 ms, 4096 rows 108 ms);
# on an accelerator the point is memory, not cache, and a chunk is 256 MiB. At least
# 128 rows: with a large vocabulary a chunk of a few rows makes GEMMs too thin to run
# at speed (at V 32000, D 512: 16-row chunks took 5x the plain form's time).
CHUNK_BYTES = {"cpu": 2 << 20}
CHUNK_BYTES_OTHER = 256 << 20
MIN_ROWS = 128


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk for ``n_rows`` positions and a ``vocab``-word head on ``device``:
    the chunk's FP32 logits within the device's budget, at least MIN_ROWS, at most all."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER)
    return max(1, min(n_rows, max(MIN_ROWS, budget // (4 * vocab))))


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's for FP32 operands under autocast (as
    ``F.linear`` would; autocast leaves FP64 alone), else the operands'."""
    if dtype == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, W_VD, labels_N, ignore_index: int, rows: int, with_grad: bool):
        dtype = _compute_dtype(h_ND.device, h_ND.dtype)
        acc = torch.promote_types(dtype, torch.float32)  # the loss's dtype: FP32, or FP64 for FP64 operands
        with torch.autocast(h_ND.device.type, enabled=False):
            labelled_N = labels_N != ignore_index
            target_N = torch.where(labelled_N, labels_N, 0).long()
            # Rows without a label enter as zeros: their softmax then adds nothing to the
            # gradient by W, and their rows of the gradient by h are zeroed at the end.
            h_c = torch.where(labelled_N[:, None], h_ND.detach(), 0).to(dtype)
            W_c = W_VD.detach().to(dtype)
            W_target_ND = W_c.index_select(0, target_N)  # each row's label's head vector
            lse_N = torch.empty(h_ND.shape[0], dtype=acc, device=h_ND.device)
            grad_h_ND = torch.empty(h_ND.shape, dtype=dtype, device=h_ND.device) if with_grad else None
            grad_W_VD = torch.zeros(W_VD.shape, dtype=acc, device=W_VD.device) if with_grad else None
            for start in range(0, h_ND.shape[0], rows):
                h_RD = h_c[start : start + rows]
                logits_RV = (h_RD @ W_c.t()).to(acc)
                lse_R = torch.logsumexp(logits_RV, dim=-1)
                lse_N[start : start + rows] = lse_R
                if with_grad:  # the softmax, in place; the one-hot part is added after the loop
                    probs_RV = logits_RV.sub_(lse_R[:, None]).exp_().to(dtype)
                    torch.mm(probs_RV, W_c, out=grad_h_ND[start : start + rows])
                    if probs_RV.dtype == acc:
                        grad_W_VD.addmm_(probs_RV.t(), h_RD)
                    else:  # BF16/FP16 GEMM, accumulated in FP32
                        grad_W_VD += (probs_RV.t() @ h_RD).to(acc)
            # the loss: log-sum-exp minus the label's logit, on labelled rows
            picked_N = (h_c.to(acc) * W_target_ND.to(acc)).sum(-1)
            loss = torch.where(labelled_N, lse_N - picked_N, 0).sum()
            if with_grad:  # d loss / d logits = softmax - onehot(label) on labelled rows, 0 elsewhere
                grad_h_ND = torch.where(labelled_N[:, None], grad_h_ND - W_target_ND, 0).to(h_ND.dtype)
                grad_W_VD.index_add_(0, target_N, h_c.to(acc), alpha=-1)
                ctx.save_for_backward(grad_h_ND, grad_W_VD.to(W_VD.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_ND, grad_W_VD = ctx.saved_tensors
        return (grad_h_ND * grad_loss.to(grad_h_ND.dtype), grad_W_VD * grad_loss.to(grad_W_VD.dtype),
                None, None, None, None)  # fmt: skip


def linear_cross_entropy(
    h_ND: torch.Tensor,
    W_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy (nats; an FP32 scalar, FP64 for FP64 operands) of
    ``logits = h_ND @ W_VD.T`` against ``labels_N`` over the rows whose label is not
    ``ignore_index``; differentiable by h and W (not twice). Equal to
    ``F.cross_entropy(h @ W.T, labels, ignore_index=..., reduction="sum")`` up to rounding,
    with at most one chunk's logits held at a time (module doc). Without gradients
    (``torch.no_grad`` or operands that need none) only the loss is computed.

    Shapes: h ``[N, D]``, W ``[V, D]`` of one floating dtype, labels ``[N]`` int64 or
    int32. ``rows``: rows per chunk (default :func:`chunk_rows`). Raises ValueError for
    mismatched shapes or dtypes, a label outside ``[0, V)`` other than ``ignore_index``,
    or ``rows`` < 1."""
    if h_ND.dim() != 2 or W_VD.dim() != 2 or h_ND.shape[1] != W_VD.shape[1]:
        shapes = f"h {tuple(h_ND.shape)} and W {tuple(W_VD.shape)}"
        raise ValueError(f"linear_cross_entropy: {shapes} need [N, D] and [V, D]")
    if h_ND.dtype != W_VD.dtype or not h_ND.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: h is {h_ND.dtype} and W {W_VD.dtype}: need one floating dtype")
    if labels_N.shape != h_ND.shape[:1] or labels_N.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels_N.shape)} {labels_N.dtype}: need [N] int64/int32")
    vocab = W_VD.shape[0]
    bad = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= vocab))
    if bool(bad.any()):
        value = int(labels_N[bad][0])
        raise ValueError(f"linear_cross_entropy: label {value} is outside the vocabulary [0, {vocab})")
    rows = chunk_rows(h_ND.shape[0], vocab, h_ND.device) if rows is None else rows
    if rows < 1:
        raise ValueError(f"linear_cross_entropy: rows per chunk must be >= 1, got {rows}")
    with_grad = torch.is_grad_enabled() and (h_ND.requires_grad or W_VD.requires_grad)
    return _LinearCrossEntropy.apply(h_ND, W_VD, labels_N, ignore_index, rows, with_grad)
