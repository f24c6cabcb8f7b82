"""The training loss: the language-model head and the cross-entropy fused, a chunk of rows at a time.

The plain form, ``F.cross_entropy(x @ W^T, y)``, keeps the whole ``[N, V]`` logits for its backward
and makes a gradient of the same size: 1.6 GB each in bf16 at the GPT-2-small shape
(``N = 16k`` tokens, ``V = 50304``), the largest tensors of the training step.

:func:`linear_cross_entropy` takes its gradients in the forward instead. The gradient of the mean
cross-entropy with respect to the logits is known as soon as they are,
``dL/dz = (softmax(z) - onehot(y)) / n``, so each chunk of rows computes its logits, its share of
the loss and of ``dL/dx = dL/dz W`` and ``dL/dW = dL/dz^T x``, and frees its logits; the backward
only scales the saved gradients by the incoming one. Same FLOPs as the plain form (one logits
matmul, two gradient matmuls), one pass less over the logits (the softmax serves the loss and the
gradient), and ``O(chunk V)`` memory instead of ``O(N V)``. The same idea as Liger Kernel's fused
linear cross-entropy (Hsu et al., 2024, "Liger Kernel: Efficient Triton Kernels for LLM
Training"), written in PyTorch ops for ``torch.compile`` to fuse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Logits entries one chunk may hold (256M: 512 MB in bf16). Four chunks at the GPT-2-small shape.
CHUNK_ENTRIES = 2**28


def chunk_rows(rows: int, vocab: int, entries: int = CHUNK_ENTRIES) -> int:
    """Rows per chunk: the fewest chunks of at most ``entries`` logits, cut evenly."""
    chunks = math.ceil(rows / max(1, entries // vocab))
    return math.ceil(rows / max(1, chunks))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-softmax and sums run in at least float32 (a bf16 log-sum-exp over 50k logits loses the
    digits that matter)."""
    return torch.promote_types(dtype, torch.float32)


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1,
                         rows: int | None = None) -> Tensor:
    """Mean cross-entropy of the logits ``x @ weight^T`` against ``targets``, over the targets that
    are not ``ignore_index``, without ever holding all the logits (module docstring).

    ``x [N, C]``, ``weight [V, C]``, ``targets [N]``; ``rows`` per chunk (default
    :func:`chunk_rows`). Equals ``F.cross_entropy(x @ weight.T, targets, ignore_index=...)`` with
    the log-softmax in at least float32. When autograd records, the gradients are computed in the forward
    (no double backward); otherwise only the loss is.
    """
    rows = rows or chunk_rows(x.shape[0], weight.shape[0])
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, rows)
    return _loss_and_grads(x, weight, targets, ignore_index, rows, grads=False)[0]


def _loss_and_grads(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, rows: int, grads: bool):
    """The loop of :func:`linear_cross_entropy`: the mean loss, and with ``grads`` also ``dL/dx``
    (in the matmul's dtype) and ``dL/dW``; softmax and sums in :func:`softmax_dtype`."""
    dtype = compute_dtype(x)
    acc = softmax_dtype(dtype)
    w = weight.to(dtype)  # cast once, not once per chunk and matmul
    scored = targets != ignore_index
    count = scored.sum().clamp(min=1).to(acc)
    total = x.new_zeros((), dtype=acc)
    grad_x = torch.empty(x.shape, dtype=dtype, device=x.device) if grads else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if grads else None
    for a in range(0, x.shape[0], rows):
        xc, keep = x[a:a + rows].to(dtype), scored[a:a + rows]
        target = torch.where(keep, targets[a:a + rows], 0)[:, None]  # any valid index; unscored rows weigh 0
        logits = (xc @ w.T).to(acc)
        lse = logits.logsumexp(dim=-1, keepdim=True)
        total = total + ((lse - logits.gather(1, target)).squeeze(1) * keep).sum()
        if grads:
            # d(mean loss)/d(logits) = (softmax - onehot) / count on scored rows, 0 elsewhere
            grad = (logits - lse).exp().scatter_add(1, target, torch.full_like(lse, -1.0))
            grad = (grad * (keep[:, None] / count)).to(dtype)
            grad_x[a:a + rows] = grad @ w
            grad_w += (grad.T @ xc).to(acc)
    return total / count, grad_x, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss and both gradients, chunk by chunk; backward: scale them."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, rows):
        loss, grad_x, grad_w = _loss_and_grads(x, weight, targets, ignore_index, rows, grads=True)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        return (grad_x * grad_loss).to(x_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None


def reference_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """The plain form :func:`linear_cross_entropy` must equal: all logits, then the loss."""
    logits = x @ weight.T
    return F.cross_entropy(logits.to(softmax_dtype(logits.dtype)), targets, ignore_index=ignore_index)
