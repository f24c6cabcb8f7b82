"""DeltaNet: linear attention with the delta rule (Schlag et al., 2021, "Linear Transformers Are
Secretly Fast Weight Programmers"), trained in the chunkwise WY form of Yang et al., 2024
("Parallelizing Linear Transformers with the Delta Rule over Sequence Length"); ``gated=true`` is
Gated DeltaNet (Yang, Kautz, Hatamizadeh, 2025, "Gated Delta Networks: Improving Mamba2 with Delta
Rule").

Linear attention only adds ``k_t^T v_t`` to its state, so keys pile up; the delta rule first
reads what the state holds under the key and writes back a blend of that and the new value:

    S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = q_t S_t

with row vectors and the state ``S [D, Dv]`` (keys index rows, ``o = q S``: the transpose of the
papers' column convention ``S_t = S_{t-1} alpha_t (I - beta_t k_t k_t^T) + beta_t v_t k_t^T``, and
fla's ``[K, V]`` layout). Queries and keys are L2-normalised per head, so ``I - beta k^T k`` has
eigenvalues ``1`` and ``1 - beta``: never expanding, and with ``beta = 1`` the value stored under
``k`` is *replaced* by ``v_t``. ``beta_t = sigmoid(x_t W_beta)`` per head. Plain DeltaNet has
``alpha = 1``; the gated one decays the whole state with the Mamba2 gate of the Gated DeltaNet
paper, ``log alpha_t = -exp(A_log) softplus(x_t W_a + dt_bias)`` per head (``A`` drawn in
``[1, 16]``, ``softplus(dt_bias)`` log-uniform in ``[1e-3, 1e-1]``, as Mamba2 and fla).
``project`` appends ``[beta, log alpha]`` to each head's key (RoPE rotates only its leading
channels); ``log alpha = 0`` when not gated.

* reference: the recurrence token by token, ``O(T D Dv)`` time, ``T`` sequential steps;
* fast path, chunkwise (``chunk_size = C``, the WY / UT-transform form): with ``b_i`` the
  cumulative log gate from the chunk start and ``G_ij = e^(b_i - b_j)`` for ``j <= i``, the writes
  of a chunk are ``k_j^T U_j`` where the pseudo-values solve the unit lower-triangular system
  ``(I + tril_-1(diag(beta) (K K^T * G))) U = diag(beta) (V - diag(e^b) K S_0)``, i.e.
  ``U = u - w S_0`` with ``u = T^-1 diag(beta) V`` and ``w = T^-1 diag(beta e^b) K`` (two
  ``torch.linalg.solve_triangular`` per chunk, all chunks at once). Then
  ``O = (diag(e^b) Q - P w) S_0 + P u`` with ``P = tril(Q K^T * G)`` and
  ``S_C = e^(b_C) S_0 + (K e^(b_C - b))^T (u - w S_0)``. Only that last line is sequential: a
  loop over the ``T / C`` chunks (a shape-derived count, so it traces as one graph). Time
  ``O(T C D + T D Dv)``, memory ``O(T C + (T / C) D Dv)`` per head;
* decoding: the recurrence, state ``S [B, H, D, Dv]`` (at least float32), ``O(D Dv)`` per token.

The output of each head is RMS-normalised (fla's DeltaNet layers; the papers' short convolutions,
SiLU feature map and output gate are block-level and not included, see :mod:`retention`). On CUDA,
``kernel=auto|fla`` runs fla's ``chunk_delta_rule`` / ``chunk_gated_delta_rule``
(:mod:`.fla_kernels`). Causal only; ALiBi unsupported (the gate is the positional decay); user
masks are rejected (the state is a non-linear function of every earlier key); ``exact = False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import option
from .factory import register
from .fla_kernels import run_fla
from .linear_scan import split_chunks
from .retention import MatrixStateAttention


def delta_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor,
               log_alpha: Tensor) -> tuple[Tensor, Tensor]:
    """One token: ``S <- alpha (S - beta k^T (k S)) + beta k^T v``, ``o = q S``. ``q, k [B, H, 1, D]``,
    ``v [B, H, 1, Dv]``, ``beta, log_alpha [B, H, 1]``, ``state [B, H, D, Dv]``."""
    kt, b, a = k.transpose(-2, -1), beta[..., None], log_alpha.exp()[..., None]
    state = a * (state - b * kt @ (k @ state)) + b * kt @ v
    return q @ state, state


def chunked_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, log_alpha: Tensor, chunk_size: int,
                       state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule of ``q, k [B, H, T, D]`` (unit rows), ``v [B, H, T, Dv]``, ``beta,
    log_alpha [B, H, T]`` after ``state [B, H, D, Dv]`` (zeros if ``None``). Returns the output
    and the state after the last token."""
    B, H, T, D = k.shape
    C = min(chunk_size, T)
    pad = -T % C  # in front: beta = 0 and alpha = 1 leave the state as it is
    qc, kc, vc = (split_chunks(t, C, front=True) for t in (q, k, v))  # [B, H, N, C, *]
    bc, gc = (split_chunks(t, C, front=True) for t in (beta, log_alpha))  # [B, H, N, C]
    b = gc.cumsum(dim=-1)
    i = torch.arange(C, device=q.device)
    # G_ij = prod_{t=j+1..i} alpha_t, 0 above the diagonal; e^(b_i - b_j) <= 1, so never overflows
    G = torch.where(i[:, None] >= i, b[..., :, None] - b[..., None, :], float("-inf")).exp()
    A = (bc[..., None] * (kc @ kc.transpose(-2, -1)) * G).to(bc.dtype)  # strictly lower part used
    u = torch.linalg.solve_triangular(A, (bc[..., None] * vc).to(bc.dtype), upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(A, ((bc * b.exp())[..., None] * kc).to(bc.dtype), upper=False,
                                      unitriangular=True)
    P = (qc @ kc.transpose(-2, -1)) * G
    q_state = qc * b.exp()[..., None] - P @ w  # what each query reads from the state before its chunk
    k_end = (kc * (b[..., -1:] - b).exp()[..., None]).transpose(-2, -1)  # keys decayed to the chunk end
    alpha_chunk = b[..., -1].exp()[..., None, None]
    S = torch.zeros(B, H, D, v.shape[-1], dtype=u.dtype, device=q.device) if state is None else state
    before = []
    for n in range(qc.shape[2]):  # the only sequential part: one D x Dv update per chunk
        before.append(S)
        S = alpha_chunk[:, :, n] * S + k_end[:, :, n] @ (u[:, :, n] - w[:, :, n] @ S)
    out = q_state @ torch.stack(before, dim=2) + P @ u
    return out.flatten(2, 3)[:, :, pad:], S


@register("deltanet")
class DeltaNetAttention(MatrixStateAttention):
    """(Gated) DeltaNet: linear attention that overwrites instead of accumulating, chunkwise WY
    training, ``O(D^2)`` recurrent state for decoding."""

    description = "DeltaNet / Gated DeltaNet (gated=true): delta-rule state updates, chunkwise WY O(T C D + T D^2)"
    family = "delta_rule"
    alibi_unsupported = "its state has no per-key score to bias; use position='rope' or 'none'"
    projected_inputs = True
    mask_unsupported = ("its state is a non-linear function of every earlier key (each write erases along its key), "
                        "so a [T, S] mask over keys has no recurrent form; use an exact mechanism (e.g. 'full') for "
                        "custom masks")

    @dataclass(frozen=True)
    class Options(MatrixStateAttention.Options):
        #: true: Gated DeltaNet (a data-dependent per-head decay, Mamba2's gate).
        gated: bool = option(False, False, True)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.beta_proj = nn.Linear(dims.d_model, self.n_heads, bias=False)
        self.gated = self.options.gated
        if self.gated:  # Mamba2's gate: A in [1, 16], softplus(dt_bias) log-uniform in [1e-3, 1e-1]
            self.gate_proj = nn.Linear(dims.d_model, self.n_heads, bias=False)
            self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def project(self, x, context):
        q, k, v = super().project(x, context)
        beta = torch.sigmoid(self.beta_proj(x))
        if self.gated:
            log_alpha = -self.A_log.exp() * F.softplus(self.gate_proj(x).float() + self.dt_bias)
        else:
            log_alpha = torch.zeros_like(beta)
        gates = torch.stack([beta.to(k.dtype), log_alpha.to(k.dtype)], dim=-1).transpose(1, 2)  # [B, H, T, 2]
        return q, torch.cat([k, gates], dim=-1), v

    def prepare(self, q, k, v):
        """Unit ``q, k``, ``v`` and the gates ``[..., (beta, log alpha)]``, at least float32."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        k, gates = k.to(dtype).split(self.head_dim, dim=-1)
        return F.normalize(q.to(dtype), dim=-1), F.normalize(k, dim=-1), v.to(dtype), gates

    def scan(self, q, k, v, decay, state=None):
        return chunked_delta_rule(q, k, v, decay[..., 0], decay[..., 1], self.options.chunk_size, state)

    def fla_scan(self, q, k, v, decay, fallback):
        beta, log_alpha = decay[..., 0].to(q.dtype), decay[..., 1]  # fla's layers: beta in q's dtype, g float32
        if self.gated:
            return run_fla("gated_delta_rule", "chunk_gated_delta_rule", fallback, q, k, v, log_alpha, beta,
                           scale=1.0)
        return run_fla("delta_rule", "chunk_delta_rule", fallback, q, k, v, beta, scale=1.0)

    def reject_mask(self, mask):
        if mask is not None:
            raise ValueError(f"attention_type {self.name!r}: {self.mask_unsupported}")

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Per head, at least float32: its chunk scores, chunk decays and triangular system
        ``3 T C``, the states ``2 (T / C) D^2`` and the pseudo-values ``u, w`` with the copies
        of ``q, k, v`` ``4 T D``; each twice at the peak with backward, 1.7 times in a forward
        (measured on CPU)."""
        T, C, D = seq_len, min(self.options.chunk_size, seq_len), self.head_dim
        copies = 2.0 if backward else 1.7
        return copies * batch * self.n_heads * (3 * T * C + 2 * T / C * D * D + 4 * T * D) * max(elem, 4)

    def core_flops(self, batch, seq_len, backward):
        """Per head ``10 T C D`` (``K K^T``, ``Q K^T``, two triangular solves for ``u`` and ``w``,
        ``P w``, ``P u``) + ``6 T D^2`` (the state read, its correction ``w S``, its update)."""
        T, C, D = seq_len, min(self.options.chunk_size, seq_len), self.head_dim
        return batch * self.n_heads * (10 * T * C * D + 6 * T * D * D) * (3.0 if backward else 1.0)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        """The recurrence written out, one token at a time."""
        self.reject_mask(mask)
        q32, k32, v32, gates = self.prepare(q, k, v)
        B, H, T, D = k32.shape
        state, out = torch.zeros(B, H, D, v32.shape[-1], dtype=v32.dtype, device=v32.device), []
        for t in range(T):
            o, state = delta_step(state, q32[:, :, t:t + 1], k32[:, :, t:t + 1], v32[:, :, t:t + 1],
                                  gates[:, :, t:t + 1, 0], gates[:, :, t:t + 1, 1])
            out.append(o)
        return self.finish(torch.cat(out, dim=2), v)

    def prefill(self, q, k, v, pos, cache, mask, lengths):
        """The chunkwise form over the prompt; right padding gets ``beta = 0, alpha = 1`` (no
        write, no decay), so the final state is each row's state after its last real token."""
        self.reject_mask(mask)
        q32, k32, v32, gates = self.prepare(q, k, v)
        gates = gates * (pos < lengths[:, None])[:, None, :, None]
        out, state = self.scan(q32, k32, v32, gates)
        cache.state.copy_(state)
        return self.finish(out, v)

    def attend_step(self, q, k, v, pos, cache, mask):
        """One token: the recurrence; several: the chunkwise form from the cached state."""
        self.reject_mask(mask)
        q32, k32, v32, gates = self.prepare(q, k, v)
        if q.shape[2] == 1:
            out, state = delta_step(cache.state, q32, k32, v32, gates[..., 0], gates[..., 1])
        else:
            out, state = self.scan(q32, k32, v32, gates, cache.state)
        cache.state.copy_(state)
        return self.finish(out, v)
