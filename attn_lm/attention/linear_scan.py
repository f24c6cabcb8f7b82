"""Linear attention given feature-mapped queries and keys: the shared engine of every mechanism
that writes its scores as a dot product of non-negative features, ``A_ij = phi(q_i) . phi(k_j)``.

Because ``A`` factorises, ``out_i = sum_j A_ij v_j / sum_j A_ij`` never needs the ``T x S``
matrix (Katharopoulos et al., 2020, "Transformers are RNNs"):

* non-causal: ``out_i = phi(q_i)^T S / phi(q_i)^T z`` with the global sums
  ``S = sum_j phi(k_j) v_j^T [F, D]`` and ``z = sum_j phi(k_j) [F]``;
* causal: the same with prefix sums ``S_i = sum_{j<=i}``. Computed chunk-wise: inside a chunk of
  ``C`` tokens the quadratic masked form ``(phi(Q) phi(K)^T * tril) V``; across chunks the state
  ``(S, z)`` of all earlier chunks (an exclusive cumulative sum of per-chunk states). No
  per-position ``[F, D]`` state is ever materialised.

Time ``O(T F D + T C (F + D))``; memory ``O(T C + T F + (T / C) F D)`` per head. The state
``(S, z)`` is also the recurrent decoding cache: a step costs ``O(F D)`` whatever the length.

Tensors: ``qf [B, H, T, F]``, ``kf [B, H, S, F]`` (non-negative features), ``v [B, H, S, D]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

#: Running sums ``(S [B, H, F, D], z [B, H, F])`` of the keys seen so far.
State = tuple[Tensor, Tensor]


def normalise(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``den`` clamped at the dtype's smallest normal number.

    The clamp only turns rows that see no key (``0 / 0``) into zeros; it never rescales a real
    denominator. (The paper adds ``eps = 1e-6``; that biases rows whose features are legitimately
    tiny, e.g. Performer's stabilised key features, so it is not used here.)
    """
    return num / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)


def upcast_copies(elem: int, backward: bool) -> int:
    """Head-sized float32 tensors that a scan computing in float32 holds only because its inputs
    are narrower (in float32 the casts return their inputs, which the layer's model counts
    already, and the families' coefficients were measured so): the float32 copies of ``q, k, v``,
    saved by the feature maps or decays and the scan's matmuls, and with backward their float32
    gradients, which accumulate over the whole scan's backward before each is cast back."""
    return 0 if elem >= 4 else 6 if backward else 3


def split_chunks(x: Tensor, size: int, front: bool) -> Tensor:
    """``x [B, H, T, ...]`` as ``[B, H, N, size, ...]``, zero-padded to ``N * size`` tokens in front
    (``front``) or behind. A view when ``size`` divides ``T``: ``F.pad`` copies its input even with
    nothing to pad, which held one more head-sized copy of every input at a chunked scan's peak."""
    pad = -x.shape[2] % size
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 3) + ([pad, 0] if front else [0, pad]))
    return x.unflatten(2, (-1, size))


def noncausal_linear_attention(qf: Tensor, kf: Tensor, v: Tensor, state: Optional[State] = None) -> tuple[Tensor, State]:
    """Every query sees every key (plus the keys summarised in ``state``). Returns the output
    ``[B, H, T, D]`` and the state including these keys."""
    kv, k_sum = kf.transpose(-2, -1) @ v, kf.sum(dim=-2)
    if state is not None:
        kv, k_sum = kv + state[0], k_sum + state[1]
    return normalise(qf @ kv, (qf @ k_sum.unsqueeze(-1)).squeeze(-1)), (kv, k_sum)


def causal_linear_attention(qf: Tensor, kf: Tensor, v: Tensor, chunk_size: int,
                            state: Optional[State] = None) -> tuple[Tensor, State]:
    """Query ``i`` sees keys ``j <= i`` (same positions: ``qf`` and ``kf`` have the same length)
    plus the earlier keys summarised in ``state``. Returns the output ``[B, H, T, D]`` and the
    state after the last token."""
    B, H, T, _ = qf.shape
    C = min(chunk_size, T)
    # Zero key features add nothing to any sum; padded query rows are dropped below.
    qc, kc, vc = (split_chunks(t, C, front=False) for t in (qf, kf, v))  # [B, H, N, C, *]

    causal = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril()
    scores = (qc @ kc.transpose(-2, -1)).masked_fill(~causal, 0.0)  # [B, H, N, C, C]
    num, den = scores @ vc, scores.sum(dim=-1)

    chunk_kv, chunk_k_sum = kc.transpose(-2, -1) @ vc, kc.sum(dim=-2)  # [B, H, N, F, D], [B, H, N, F]
    kv_before = F.pad(chunk_kv.cumsum(dim=2), (0, 0, 0, 0, 1, 0))  # state before chunk n: chunks < n
    k_sum_before = F.pad(chunk_k_sum.cumsum(dim=2), (0, 0, 1, 0))
    if state is not None:
        kv_before = kv_before + state[0].unsqueeze(2)
        k_sum_before = k_sum_before + state[1].unsqueeze(2)
    num = num + qc @ kv_before[:, :, :-1]
    den = den + (qc @ k_sum_before[:, :, :-1].unsqueeze(-1)).squeeze(-1)

    out = normalise(num, den).flatten(2, 3)[:, :, :T]
    return out, (kv_before[:, :, -1], k_sum_before[:, :, -1])


def quadratic_linear_attention(qf: Tensor, kf: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """The explicit form: ``A = phi(Q) phi(K)^T * exp(bias)``, ``out = A V / A.sum(-1)``.

    ``bias`` is an additive score bias broadcastable to ``[B, H, T, S]`` (``-inf`` = masked), the
    same object softmax mechanisms add to their logits: for a kernel that stands for
    ``exp(q . k)`` adding ``b`` to the logit multiplies the kernel by ``exp(b)``. Time and memory
    ``O(T S F)`` / ``O(T S)``; used as the reference and whenever a user mask is given.
    """
    scores = (qf @ kf.transpose(-2, -1)) * bias.exp()
    return normalise(scores @ v, scores.sum(dim=-1))
