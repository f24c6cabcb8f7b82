"""Gated Linear Attention (Yang et al., 2024, "Gated Linear Attention Transformers with
Hardware-Efficient Training").

Linear attention with a data-dependent forget gate per key channel: with ``alpha_t in (0, 1)^D``

    S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,    o_t = q_t S_t

so ``o_i = sum_{j <= i} (q_i * prod_{t=j+1..i} alpha_t) . k_j  v_j``. The gate comes from the
token through a low-rank projection, ``alpha_t = sigmoid(x_t W1 W2 + b)^(1/16)`` (the paper's rank
16 and temperature 16, which keep gates near 1), floored at ``e^-5`` (a gate that forgets more than
99.3% of the state in one token forgets 99.3%; it bounds the chunkwise form's factors).
``project`` appends ``log alpha`` to each head's key (``[k | log alpha]``): RoPE, when set, rotates
only the leading key channels, and the mechanism receives the gate with its key.

* reference: the quadratic form with ``B = cumsum(log alpha)``: ``A_ij = sum_c q_ic k_jc
  exp(B_ic - B_jc)`` for ``j <= i`` -- ``O(T^2 D)`` time and memory (tests and user masks);
* fast path, chunkwise (``chunk_size = C``): inside a chunk the scores ``(q e^(b - b_r))(k
  e^(b_r - b))^T`` with ``b`` the cumulative log gate, factored about the start ``r`` of the
  query's sub-chunk of :data:`SUBCHUNK` tokens (fla's secondary chunking): a key before ``r``
  and a query after it each get a factor <= 1, and a key inside the query's own sub-chunk a
  factor of at most ``e^(15 * 5)``, since ``log alpha`` is floored at :data:`MIN_LOG_GATE`.
  Factored about the chunk start instead, ``e^-b`` overflowed float32 once a chunk's gates
  multiplied to below ``e^-88`` (``alpha < 0.25`` throughout a 64-token chunk: NaN outputs).
  Across chunks the decayed state; the states before every chunk come from one per-channel
  decayed prefix sum (no loop over chunks). ``O(T C D + T D^2)`` time, the keys held once per
  sub-chunk of a chunk (``C / 16`` copies);
* decoding: the recurrence itself, state ``S [B, H, D, D]`` (at least float32), ``O(D^2)``/token.

Each head's output is RMS-normalised (the paper's per-head norm); its swish output gate is not
included (it needs the layer input, see :mod:`retention`). Causal only; ALiBi unsupported (the
gates already are the positional decay); ``exact = False``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .factory import register
from .fla_kernels import run_fla
from .linear_scan import split_chunks
from .masks import MaskPattern, combine_custom_mask
from .retention import MatrixStateAttention

GATE_RANK, GATE_TEMPERATURE = 16, 16.0
#: Floor of ``log alpha`` per token: 15 gates of a sub-chunk then decay by at most ``e^-75``, whose
#: inverse (a key's factor inside its query's sub-chunk) stays inside float32 (``e^88``).
MIN_LOG_GATE = -5.0
#: Tokens per sub-chunk of the chunkwise scores (the reference points of their factorisation).
SUBCHUNK = 16


def intra_chunk_scores(qc: Tensor, kc: Tensor, b: Tensor) -> Tensor:
    """``A_ij = sum_c q_ic k_jc e^(b_ic - b_jc)`` for ``j <= i`` (zero above) of chunks ``qc, kc,
    b [B, H, N, C, D]`` (``b``: the cumulative log gate), as ``[B, H, N, C, C]``.

    Each query ``i`` factors its scores about the start ``r`` of its sub-chunk:
    ``(q_i e^(b_i - b_r)) . (k_j e^(b_r - b_j))``. For keys before ``r`` both factors are <= 1 (``b``
    decreases); for keys in the query's own sub-chunk the key's factor is at most ``e^(-15 *
    MIN_LOG_GATE)``; later keys meet no query of the sub-chunk and are zeroed in the exponent (an
    infinite factor times a zero gradient would still be NaN)."""
    C = qc.shape[3]
    n = -(-C // SUBCHUNK)
    start = torch.arange(n, device=qc.device) * SUBCHUNK  # [n]: each sub-chunk's reference point
    b_ref = b[:, :, :, start]  # [B, H, N, n, D]
    seen = torch.arange(C, device=qc.device) < (start + SUBCHUNK)[:, None]  # [n, C]: keys up to its end
    k_rel = kc[:, :, :, None] * torch.where(seen[..., None], b_ref[:, :, :, :, None] - b[:, :, :, None],
                                            float("-inf")).exp()  # [B, H, N, n, C, D]
    q_rel = qc * (b - b_ref.repeat_interleave(SUBCHUNK, dim=3)[:, :, :, :C]).exp()
    q_rel = F.pad(q_rel, (0, 0, 0, n * SUBCHUNK - C)).unflatten(3, (n, SUBCHUNK))  # [B, H, N, n, s, D]
    scores = (q_rel @ k_rel.transpose(-2, -1)).flatten(3, 4)[:, :, :, :C]  # [B, H, N, C, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=qc.device).tril()
    return scores.masked_fill(~causal, 0.0)


def chunked_gla(q: Tensor, k: Tensor, v: Tensor, log_alpha: Tensor, chunk_size: int,
                state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal GLA of ``q, k, log_alpha [B, H, T, D]``, ``v [B, H, T, Dv]`` after ``state
    [B, H, D, Dv]``. Returns the output and the state after the last token."""
    T = q.shape[2]
    C = min(chunk_size, T)
    pad = -T % C  # in front: zero keys add nothing and gate 1 (log 0) carries the state unchanged
    qc, kc, vc, gc = (split_chunks(t, C, front=True) for t in (q, k, v, log_alpha))
    N = qc.shape[2]
    b = gc.cumsum(dim=3)  # [B, H, N, C, D]: log decay from the chunk start to each token
    inner = intra_chunk_scores(qc, kc, b) @ vc
    last = b[:, :, :, -1:]  # [B, H, N, 1, D]
    chunk_state = (kc * (last - b).exp()).transpose(-2, -1) @ vc  # each chunk's keys at its end
    # before[n] = sum_{c < n} e^(L_n - L_{c+1}) * chunk_state[c] + e^(L_n) * state, per key channel,
    # with L_n the log decay of chunks 0 .. n-1.
    L = F.pad(last[:, :, :, 0].cumsum(dim=2), (0, 0, 1, 0))  # [B, H, N + 1, D]
    n = torch.arange(N + 1, device=q.device)
    earlier = (n[:N] < n[:, None])[..., None]  # [N + 1, N, 1]
    weights = torch.where(earlier, L[:, :, :, None] - L[:, :, None, 1:], float("-inf")).exp()
    before = torch.einsum("bhncd,bhcde->bhnde", weights, chunk_state)
    if state is not None:
        before = before + L.exp()[..., None] * state[:, :, None]
    cross = (qc * b.exp()) @ before[:, :, :N]
    return (inner + cross).flatten(2, 3)[:, :, pad:], before[:, :, N]


@register("gla")
class GatedLinearAttention(MatrixStateAttention):
    """Gated linear attention: data-dependent per-key-channel forget gates, chunkwise training,
    ``O(D^2)`` recurrent state for decoding."""

    description = "Gated Linear Attention: data-dependent per-channel gates, chunkwise O(T C D + T D^2), O(D^2) state"
    alibi_unsupported = "the data-dependent gates already are its distance decay; use position='rope' or 'none'"

    projected_inputs = True

    def head_copies(self, backward):
        # cumulative log gates, their exponentials and the gated queries/keys of every chunk
        return 12 if backward else 4

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """The family's model plus the per-channel decay weights between every pair of chunks,
        ``(n + 1) n D`` per head for ``n = T / C`` chunks (the prefix sum of :func:`chunked_gla`
        that replaces a loop over chunks): quadratic in ``T / C``, about a quarter of the layer's
        peak at 16k tokens with ``C = D = 64`` (without it the model was 20% low there). 1.5 live
        copies at a forward's peak (the exponent and its exponential), 2 with backward (measured
        on CPU at 8k and 16k). Backward also keeps the keys of every sub-chunk's factorisation
        (:func:`intra_chunk_scores`), ``C / 16`` key-sized tensors at 1.75 copies each (measured on
        CPU at 1k-16k: +7 head copies at ``C = 64``, 20-25% of the peak)."""
        C = min(self.options.chunk_size, seq_len)
        n = -(-seq_len // C)
        weights = (2.0 if backward else 1.5) * batch * self.n_heads * (n + 1) * n * self.head_dim * max(elem, 4)
        sub_keys = 1.75 * -(-C // SUBCHUNK) * batch * self.n_heads * seq_len * self.head_dim * max(elem, 4)
        return super().core_bytes(batch, seq_len, elem, backward, fused) + weights + (sub_keys if backward else 0.0)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.gate = nn.Sequential(nn.Linear(dims.d_model, GATE_RANK, bias=False),
                                  nn.Linear(GATE_RANK, self.n_heads * self.head_dim, bias=True))

    def project(self, x, context):
        q, k, v = super().project(x, context)
        log_alpha = F.logsigmoid(self.gate(x)).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        return q, torch.cat([k, (log_alpha / GATE_TEMPERATURE).clamp(min=MIN_LOG_GATE)], dim=-1), v

    def prepare(self, q, k, v):
        """``q, k / sqrt(D), v`` and ``log alpha`` (the key's appended half), at least float32."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        k, log_alpha = k.to(dtype).split(self.head_dim, dim=-1)
        return q.to(dtype), k / math.sqrt(self.head_dim), v.to(dtype), log_alpha

    def scan(self, q, k, v, decay, state=None):
        return chunked_gla(q, k, v, decay, self.options.chunk_size, state)

    def fla_scan(self, q, k, v, decay, fallback):
        # k is already scaled; fla takes the gates in log space, float32 like ours
        return run_fla("gla", "chunk_gla", fallback, q, k, v, decay, scale=1.0)

    def decay_state(self, state, decay):
        return decay.exp().transpose(-2, -1) * state  # alpha scales the key rows of S

    def weights_to_end(self, decay, pos, lengths):
        """``e^(B_{len-1} - B_m)`` per channel, ``B = cumsum(log alpha)``."""
        B = decay.cumsum(dim=2)
        index = (lengths - 1).view(-1, 1, 1, 1).expand(-1, B.shape[1], 1, B.shape[3])
        real = (pos < lengths[:, None])[:, None, :, None]
        return torch.where(real, B.gather(2, index) - B, float("-inf")).exp()

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        """``A_ij = sum_c q_ic k_jc exp(B_ic - B_jc)`` (``j <= i``, allowed by ``mask``), ``A V``."""
        q32, k32, v32, log_alpha = self.prepare(q, k, v)
        B = log_alpha.cumsum(dim=2)
        allowed = combine_custom_mask(MaskPattern(causal=True).dense(q_pos, kv_pos), mask, q32.dtype).isfinite()
        exponent = torch.where(allowed[..., None], B[:, :, :, None] - B[:, :, None], float("-inf"))
        scores = (q32[:, :, :, None] * k32[:, :, None] * exponent.exp()).sum(-1)
        return self.finish(scores @ v32, v)
