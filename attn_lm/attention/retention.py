"""Retention (Sun et al., 2023, "Retentive Network: A Successor to Transformer for Large Language
Models"): attention without softmax, with a fixed exponential decay per head.

Head ``h`` has the decay ``gamma_h = 1 - 2^(-5 - h)`` (``h = 0 .. H-1``, the paper's multi-scale
choice: from a ~32-token memory to almost none forgotten). With ``k`` scaled by ``1/sqrt(D)``,
the three forms compute the same thing:

* **parallel** (the reference): ``Retention(X) = (Q K^T * D) V`` with the decay mask
  ``D_nm = gamma^(n - m)`` for ``m <= n`` and ``0`` otherwise. Time ``O(T^2 D)``.
* **recurrent** (decoding): ``S_n = gamma S_{n-1} + k_n^T v_n``, ``o_n = q_n S_n``. The cache is
  the state ``S [B, H, D, D]``: ``O(D^2)`` per head and per token, whatever the length.
* **chunkwise recurrent** (the fast path, chunks of ``C = chunk_size``): inside a chunk the
  parallel form; across chunks the state of all earlier chunks, decayed:
  ``o_i = (Q K^T * D_C) V + (Q * xi) S_before``, ``xi_i = gamma^(i + 1)``,
  ``S_after = gamma^C S_before + sum_j gamma^(C - 1 - j) k_j^T v_j``. The states before every
  chunk come from one decayed prefix sum (an ``[N, N]`` weight table), no loop, so it traces as
  one graph. Time ``O(T C D + T D^2)``.

Each head's output is then normalised (RMSNorm over ``D``, one weight shared by the heads: the
paper's GroupNorm, which also makes its scale-only stabilisations of ``D`` unnecessary). The
paper's swish output gate ``swish(X W_G) * Y`` is *not* included: it needs the layer input, and
mechanisms here receive head-split ``q, k, v`` only; add it at the block level if wanted. Use
``position='rope'`` or ``'xpos'`` for the paper's rotation of ``q, k`` (its xPos-like ``e^{in theta}``).

Causal only (the decay is a recurrence over earlier tokens); ALiBi is not supported (the decay
already is a distance bias, multiplicative). User masks: the parallel form in a full forward;
rejected while decoding (a state cannot forget chosen past keys). ``exact = False``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ..cache import LayerCache
from .base import Attention
from .config import option
from .factory import register
from .fla_kernels import KERNELS, run_fla, wants_fla
from .functional import head_rms_norm
from .linear_scan import split_chunks, upcast_copies
from .masks import MaskPattern, combine_custom_mask


def retention_decays(n_heads: int) -> Tensor:
    """``log gamma_h = log(1 - 2^(-5 - h))`` per head (float64: ``gamma`` is close to 1)."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64))))


def decay_powers(log_gamma: Tensor, exponent: Tensor) -> Tensor:
    """``gamma_h^exponent`` for ``exponent >= 0``, ``0`` where ``exponent < 0`` (a later key).
    ``log_gamma [H]`` against ``exponent [...]`` gives ``[H, ...]``."""
    power = torch.exp(log_gamma.view(-1, *([1] * exponent.dim())) * exponent.clamp(min=0))
    return power.masked_fill(exponent < 0, 0.0)


def chunked_retention(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, chunk_size: int,
                      state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Causal retention of ``q, k [B, H, T, D]``, ``v [B, H, T, Dv]`` at consecutive positions,
    after the keys summarised in ``state [B, H, D, Dv]`` (the position before the first token).
    Returns the output and the state after the last token."""
    T = q.shape[2]
    C = min(chunk_size, T)
    pad = -T % C  # in front: zero keys add nothing, and the last chunk ends at the last token
    qc, kc, vc = (split_chunks(t, C, front=True) for t in (q, k, v))  # [B, H, N, C, *]
    N, i = qc.shape[2], torch.arange(C, device=q.device)
    inner = ((qc @ kc.transpose(-2, -1)) * decay_powers(log_gamma, i[:, None] - i)[:, None]) @ vc
    chunk_state = (kc * decay_powers(log_gamma, C - 1 - i)[:, None, :, None]).transpose(-2, -1) @ vc
    n = torch.arange(N + 1, device=q.device)
    # before[n] = sum_{c < n} gamma^(C (n - 1 - c)) chunk_state[c]; before[N] is the final state
    weights = decay_powers(log_gamma, C * (n[:, None] - 1 - n[:N]))  # [H, N + 1, N], 0 for c >= n
    before = torch.einsum("hnc,bhcde->bhnde", weights, chunk_state)
    cross = (qc * decay_powers(log_gamma, i + 1)[:, None, :, None]) @ before[:, :, :N]
    out, final = (inner + cross).flatten(2, 3)[:, :, pad:], before[:, :, N]
    if state is not None:  # the earlier keys, seen from position t through gamma^(t + 1)
        t = torch.arange(T, device=q.device)
        out = out + (q * decay_powers(log_gamma, t + 1)[..., None]) @ state
        final = final + decay_powers(log_gamma, torch.tensor(T, device=q.device))[..., None, None] * state
    return out, final


class RetentionStateCache(LayerCache):
    """The recurrent state ``S [B, H, D, Dv]`` (at least float32): constant memory."""

    def __init__(self, batch: int, n_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str):
        self.state = torch.zeros(batch, n_heads, head_dim, head_dim, dtype=dtype, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.state]


class MatrixStateAttention(Attention):
    """Causal softmax-free attention whose decoding cache is one ``D x D`` state per head and
    whose heads are RMS-normalised (retention, gla, deltanet). Subclasses give ``prepare`` (float32
    tensors and their decay), the chunkwise ``scan`` and its fla kernel (``fla_scan``), the
    one-token decay of the state and the weights that decay each prompt key to its row's last
    token; the dispatch is shared. ``kernel``: ``auto`` / ``torch`` / ``fla`` (:mod:`.fla_kernels`)."""

    family = "recurrent_state"
    exact = False
    quadratic = False
    cache_kind = "state"
    noncausal_unsupported = ("it is a recurrence over earlier tokens: a decayed state (the parallel form's mask "
                             "is lower-triangular); use full or linear attention for a non-causal layer")

    @dataclass(frozen=True)
    class Options:
        #: Chunkwise form: the parallel form inside chunks of this many tokens, the state across.
        chunk_size: int = option(64, 4, *range(4, 10))
        #: auto (fla's kernel when installed and on GPU) | torch | fla (see fla_kernels).
        kernel: str = option("auto", "auto", "torch")

    @classmethod
    def validate_options(cls, config, dims):
        if config.options.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)} for attention_type {cls.name!r}, "
                             f"got {config.options.kernel!r}")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    def head_copies(self, backward: bool) -> int:
        """Head-sized (``T x D``) float32 tensors live at the peak of a step in float32: the
        scaled keys and the decayed queries and keys of each chunk (measured on CPU)."""
        return 2

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Per head, in at least float32: chunk scores ``T C`` and the states of and before each
        chunk ``2 (T / C) D^2`` (1.5 copies each at the peak, measured) and
        :meth:`head_copies` head-sized tensors, plus the float32 copies of narrower inputs
        (:func:`.linear_scan.upcast_copies`)."""
        T, C, D = seq_len, min(self.options.chunk_size, seq_len), self.head_dim
        copies = self.head_copies(backward) + upcast_copies(elem, backward)
        per_head = 1.5 * (T * C + 2 * T / C * D * D) + copies * T * D
        return batch * self.n_heads * per_head * max(elem, 4)

    def core_flops(self, batch, seq_len, backward):
        """Per head ``4 T C D`` (chunk-local scores and values) + ``4 T D^2`` (states); backward 2x more."""
        T, C, D = seq_len, min(self.options.chunk_size, seq_len), self.head_dim
        return batch * self.n_heads * (4 * T * C * D + 4 * T * D * D) * (3.0 if backward else 1.0)

    def prepare(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``q, k / sqrt(D), v`` in at least float32 (long decayed sums) and the decay."""
        raise NotImplementedError

    def scan(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor,
             state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """The chunkwise form: output and the state after the last token."""
        raise NotImplementedError

    def fla_scan(self, q: Tensor, k: Tensor, v: Tensor, decay: Tensor, fallback) -> Tensor:
        """The output of ``scan`` through fla's kernel (inputs in the layer's dtype), or ``fallback()``."""
        raise NotImplementedError

    def decay_state(self, state: Tensor, decay: Tensor) -> Tensor:
        """The state carried over one token."""
        raise NotImplementedError

    def weights_to_end(self, decay: Tensor, pos: Tensor, lengths: Tensor) -> Tensor:
        """``[B, H, T, 1 or D]``: how much of key ``m`` is left in its row's state after the row's
        last real token (``0`` for padding)."""
        raise NotImplementedError

    def finish(self, out: Tensor, like: Tensor) -> Tensor:
        return head_rms_norm(out, self.norm_weight).to(like.dtype)

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        if mask is not None:  # the quadratic form masks any key; the scan cannot
            return self.attend_reference(q, k, v, q_pos, kv_pos, mask)
        q32, k32, v32, decay = self.prepare(q, k, v)
        scan = lambda: self.scan(q32, k32, v32, decay)[0]  # noqa: E731
        if wants_fla(self.options.kernel, q):
            return self.finish(self.fla_scan(*(t.to(v.dtype) for t in (q32, k32, v32)), decay, scan), v)
        return self.finish(scan(), v)

    def make_cache(self, batch, max_len, dtype, device):
        return RetentionStateCache(batch, self.n_heads, self.head_dim, torch.promote_types(dtype, torch.float32),
                                   device)

    def reject_mask(self, mask: Optional[Tensor]) -> None:
        if mask is not None:
            raise ValueError(f"{self.name} decodes from a recurrent state that sums every past key, so a custom mask "
                             "over those keys cannot be applied; decode without a mask, or run the full forward")

    def prefill(self, q, k, v, pos, cache, mask, lengths):
        """The chunkwise form over the prompt; the cache is each row's state after its last real
        token (padding keys weigh 0)."""
        self.reject_mask(mask)
        y = self.attend(q, k, v, pos, pos, None)
        _, k32, v32, decay = self.prepare(q, k, v)
        cache.state.copy_((k32 * self.weights_to_end(decay, pos, lengths)).transpose(-2, -1) @ v32)
        return y

    def attend_step(self, q, k, v, pos, cache, mask):
        """The recurrent form for one token, ``S <- decay(S) + k^T v``, ``o = q S``; several
        tokens take the chunkwise form from the state."""
        self.reject_mask(mask)
        q32, k32, v32, decay = self.prepare(q, k, v)
        if q.shape[2] == 1:
            state = self.decay_state(cache.state, decay) + k32.transpose(-2, -1) @ v32
            out = q32 @ state
        else:
            out, state = self.scan(q32, k32, v32, decay, cache.state)
        cache.state.copy_(state)
        return self.finish(out, v)


@register("retention", aliases=("retnet",))
class RetentionAttention(MatrixStateAttention):
    """RetNet's multi-scale retention: ``(Q K^T * D) V`` with a fixed per-head decay, computed
    chunkwise (``chunk_size``); decodes from an ``O(D^2)`` recurrent state per head."""

    description = "RetNet retention: softmax-free, per-head exponential decay; chunkwise O(T C D + T D^2), O(D^2) state"
    alibi_unsupported = "the per-head decay already is retention's distance bias; use position='rope' or 'xpos'"

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.register_buffer("log_gamma", retention_decays(self.n_heads).float(), persistent=False)

    def prepare(self, q, k, v):
        dtype = torch.promote_types(q.dtype, torch.float32)
        return q.to(dtype), k.to(dtype) / math.sqrt(self.head_dim), v.to(dtype), self.log_gamma.to(dtype)

    def scan(self, q, k, v, decay, state=None):
        return chunked_retention(q, k, v, decay, self.options.chunk_size, state)

    def fla_scan(self, q, k, v, decay, fallback):
        # fla's chunk_retention uses the same per-head decays 1 - 2^(-5-h); k is already scaled
        return run_fla("retention", "chunk_retention", fallback, q, k, v, scale=1.0)

    def decay_state(self, state, decay):
        return decay.exp()[:, None, None] * state

    def weights_to_end(self, decay, pos, lengths):
        """``gamma^(len - 1 - m)``."""
        return decay_powers(decay, lengths[:, None] - 1 - pos).transpose(0, 1)[..., None]

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        """The parallel form: ``(Q K^T * D) V`` with ``D_nm = gamma^(n - m)``, masked keys zero."""
        q32, k32, v32, log_gamma = self.prepare(q, k, v)
        decay = decay_powers(log_gamma, q_pos[..., :, None] - kv_pos[..., None, :])  # [H, T, S]
        allowed = combine_custom_mask(MaskPattern(causal=True).dense(q_pos, kv_pos), mask, q32.dtype).isfinite()
        return self.finish(((q32 @ k32.transpose(-2, -1)) * decay * allowed) @ v32, v)
