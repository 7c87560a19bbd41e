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
for each chunk, its logits (one GEMM), their log-sum-exp, the loss of its labelled
rows, and, in the same pass, the gradient of that loss by the logits,
``softmax(logits) - onehot(label)`` (zero on unlabelled rows), which two more GEMMs turn
into the chunk's gradient by h and its share of the gradient by W. The gradients are
computed in the forward (the summed loss is linear in the upstream gradient, so the
backward only scales them): the way fused linear-cross-entropy kernels for GPUs work
(e.g. Liger-Kernel's), written here with ATen ops.

Numerics: the same maths as ``F.cross_entropy(h @ W.T, labels, reduction="sum")``; the
sums run in another order (per chunk, then over chunks), so FP32 results differ by
rounding (tests pin values and gradients against the plain form in FP64, and in FP32
within a tolerance set by FP32 rounding of sums of N terms). Under autocast the GEMMs
run in autocast's dtype and the log-sum-exp and the loss in FP32, as the plain form's
``logits.float()`` did.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label of positions that carry no loss (cross_entropy's default)

# Logits per chunk: on CPU 2 MiB of FP32, which stays in a core's L2 (measured at V
# 4096 on 2 cores: chunks of 128 rows took 72 ms, 512 rows 77 ms, 4096 rows 108 ms);
# on an accelerator the point is memory, not cache, and a chunk is 256 MiB.
CHUNK_BYTES = {"cpu": 2 << 20}
CHUNK_BYTES_OTHER = 256 << 20


def chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk for ``n_rows`` positions and a ``vocab``-word head on ``device``:
    the chunk's FP32 logits within the device's budget, at least 16 rows, at most all."""
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES_OTHER)
    return max(1, min(n_rows, max(16, budget // (4 * vocab))))


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's where autocast is on, else the input's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, W_VD: torch.Tensor, labels_N: torch.Tensor, ignore_index: int, rows: int):
        dtype = _compute_dtype(h_ND.device, h_ND.dtype)
        acc = torch.promote_types(dtype, torch.float32)  # the loss's dtype: FP32, or FP64 for FP64 operands
        with torch.autocast(h_ND.device.type, enabled=False):
            h_c, W_c = h_ND.detach().to(dtype), W_VD.detach().to(dtype)
            grad_h_ND = torch.empty_like(h_ND)
            grad_W_VD = torch.zeros(W_VD.shape, dtype=acc, device=W_VD.device)
            loss = torch.zeros((), dtype=acc, device=h_ND.device)
            for start in range(0, h_ND.shape[0], rows):
                h_RD, labels_R = h_c[start : start + rows], labels_N[start : start + rows]
                labelled_R = labels_R != ignore_index
                target_R = torch.where(labelled_R, labels_R, 0)
                logits_RV = (h_RD @ W_c.t()).to(acc)
                lse_R = torch.logsumexp(logits_RV, dim=-1)
                picked_R = logits_RV.gather(1, target_R[:, None])[:, 0]
                loss += torch.where(labelled_R, lse_R - picked_R, 0.0).sum()
                # d loss / d logits = softmax - onehot on labelled rows, 0 elsewhere; in place
                grad_RV = logits_RV.sub_(lse_R[:, None]).exp_().mul_(labelled_R[:, None])
                grad_RV[torch.arange(len(target_R), device=grad_RV.device), target_R] -= labelled_R.to(acc)
                grad_RV = grad_RV.to(dtype)
                grad_h_ND[start : start + rows] = grad_RV @ W_c
                grad_W_VD += (grad_RV.t() @ h_RD).to(acc)
        ctx.save_for_backward(grad_h_ND, grad_W_VD.to(W_VD.dtype))
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h_ND, grad_W_VD = ctx.saved_tensors
        return grad_h_ND * grad_loss.to(grad_h_ND.dtype), grad_W_VD * grad_loss.to(grad_W_VD.dtype), None, None, None


def linear_cross_entropy(
    h_ND: torch.Tensor,
    W_VD: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    rows: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy (nats; an FP32 scalar, FP64 for FP64 operands) of ``logits = h_ND @ W_VD.T`` against
    ``labels_N`` over the rows whose label is not ``ignore_index``; differentiable by h and
    W (not twice). Equal to ``F.cross_entropy(h @ W.T, labels, ignore_index=..., reduction="sum")``
    up to rounding, without materialising the ``[N, V]`` logits (module doc).

    Shapes: h ``[N, D]``, W ``[V, D]``, labels ``[N]`` integer. ``rows``: rows per chunk
    (default :func:`chunk_rows`). Raises ValueError for mismatched shapes, a label outside
    ``[0, V)`` other than ``ignore_index``, or ``rows`` < 1."""
    if h_ND.dim() != 2 or W_VD.dim() != 2 or h_ND.shape[1] != W_VD.shape[1]:
        shapes = f"h {tuple(h_ND.shape)} and W {tuple(W_VD.shape)}"
        raise ValueError(f"linear_cross_entropy: {shapes} need [N, D] and [V, D]")
    if labels_N.shape != h_ND.shape[:1] or labels_N.dtype.is_floating_point:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels_N.shape)} {labels_N.dtype}: need [N] integers")
    vocab = W_VD.shape[0]
    bad = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= vocab))
    if bool(bad.any()):
        value = int(labels_N[bad][0])
        raise ValueError(f"linear_cross_entropy: label {value} is outside the vocabulary [0, {vocab})")
    rows = chunk_rows(h_ND.shape[0], vocab, h_ND.device) if rows is None else rows
    if rows < 1:
        raise ValueError(f"linear_cross_entropy: rows per chunk must be >= 1, got {rows}")
    return _LinearCrossEntropy.apply(h_ND, W_VD, labels_N, ignore_index, rows)
