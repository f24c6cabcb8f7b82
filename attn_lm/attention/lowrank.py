"""Low-rank family: attention through a small set of compressed keys/values.

* ``linformer`` — Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity".
* ``nystrom`` — Xiong et al., 2021, "Nyströmformer: A Nyström-Based Algorithm for Approximating
  Self-Attention".

**Published forms** (``causal=False``) compress along the whole sequence, so every output depends
on every token; they are kept as published (see each class). **Causal variant** (``causal=True``,
the language-model default) — a block-causal compressed memory in the spirit of Transformer-XL
(Dai et al., 2019) and the Compressive Transformer (Rae et al., 2020): the sequence is cut into
chunks of ``chunk_size = C`` tokens (by absolute position, the last one may be partial) and query
``i`` of chunk ``c`` attends, in ONE softmax, to

* the exact keys ``j <= i`` of its own chunk ``c``, and
* the ``p`` summary keys/values of every *completed* earlier chunk ``c' < c`` (each mechanism
  defines how a chunk of ``C`` keys/values is summarised, ``[C, D] -> [p, D]``).

No query ever sees a summary of a chunk that contains a later token, so the variant is causal;
with ``C >= T`` it is exact causal softmax attention. Cost per layer: time
``O(T (C + (T/C) p) d)``, memory ``O(T (C + (T/C) p))`` — sub-quadratic, ``O(T^1.5 sqrt(p) d)`` at
``C ~ sqrt(T p)``. Decoding keeps only the summaries plus the current chunk
(:class:`~attn_lm.cache.ChunkSummaryCache`, ``C + ceil(T/C) p`` positions).

Positions: RoPE/xPos rotate ``q, k`` at their absolute positions *before* compression (the
base class does it), so summaries mix rotated keys. ALiBi is unsupported (a summary stands for
several positions). User masks are rejected: a ``[T, S]`` mask has no entry for a summary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import ChunkSummaryCache
from .base import Attention, cached_attention, score_dtype
from .config import option
from .factory import register
from .functional import reference_attention


def segment_means(n: int, m: int, dtype: torch.dtype, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Nyströmformer's landmarks as a matrix: ``avg [m, n]`` averages ``n`` tokens over ``m <= n``
    contiguous segments (token ``i`` is in segment ``floor(i m / n)``; when ``m`` does not divide
    ``n`` the segments differ in size by at most one). Returns ``avg`` and the segment sizes ``[m]``."""
    member = (torch.arange(n, device=device) * m // n) == torch.arange(m, device=device)[:, None]
    sizes = member.sum(-1)
    return member.to(dtype) / sizes[:, None], sizes


class ChunkedLowRankAttention(Attention):
    """Shared machinery of the family: the causal chunked variant (fast, reference, cached) on top
    of a per-mechanism :meth:`summarize`; subclasses add their published non-causal form."""

    family = "low_rank"
    exact = False
    quadratic = False
    cache_kind = "summaries"
    mask_unsupported = ("its queries attend to compressed keys that each summarise several tokens, so a [T, S] mask "
                        "cannot be applied to them; use an exact mechanism (e.g. 'full') for custom masks")
    alibi_unsupported = (
        "a compressed key summarises several positions, so a per-distance bias has no single distance "
        "to use; use position='rope' (rotates q, k before compression) or an exact mechanism for ALiBi"
    )

    @dataclass(frozen=True)
    class Options:
        """The family's option: every mechanism of it has the causal chunked form. A mechanism's
        ``Options`` subclass this one and add the option named by :attr:`summary_option`."""

        #: Causal form: exact within chunks of this many tokens (unused by the non-causal form).
        chunk_size: int = option(64, 4, *range(4, 10))

    #: The option giving the number of summaries per chunk (``p``).
    summary_option: ClassVar[str] = ""
    #: Non-causal: the option that makes the published form exact once it reaches the length.
    noncausal_exact_option: ClassVar[Optional[str]] = None

    @classmethod
    def covering_option(cls, config):
        # Causal: a sequence within one chunk is attended exactly (no completed chunk to compress).
        return "chunk_size" if config.causal else cls.noncausal_exact_option

    @classmethod
    def structure_options(cls, config, size):
        """The summaries per chunk are capped at the new size: a chunk of ``size`` tokens has at
        most ``size`` summaries (:meth:`validate_options`)."""
        sizes = super().structure_options(config, size)
        if sizes and getattr(config.options, cls.summary_option) > size:
            sizes[cls.summary_option] = size
        return sizes

    @classmethod
    def validate_options(cls, config, dims):
        p, chunk = getattr(config.options, cls.summary_option), config.options.chunk_size
        if config.causal and p > chunk:
            raise ValueError(
                f"{cls.summary_option}={p} > chunk_size={chunk}: the causal {cls.name} compresses each chunk of "
                f"chunk_size tokens to {cls.summary_option} summaries, so it must be <= chunk_size"
            )

    def __init__(self, config, dims):
        super().__init__(config, dims)
        self.chunk_size = self.options.chunk_size
        self.summary_len = getattr(self.options, self.summary_option)

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Per head of the causal form, with ``n = ceil(T / C)`` chunks: the scores of each query
        over its chunk and every summary, ``S = T (C + n p)``; the summary keys and values
        broadcast over the ``n`` chunks that read them, which the batched matmuls (``Q K^T``,
        ``P V``) materialise, ``E = n (n p) D`` (as large as the summary scores when ``D = C``:
        a model in ``S`` alone is off by 1.3x at ``D = C / 2`` or ``2 C``); the chunked copies of
        ``q, k, v``, ``T D``. At a forward's peak ``2.5 S + 0.75 E + 4 T D``; with backward
        ``2 S + 3 E + T D`` (the saved expansions and one's gradient). Coefficients fitted to CPU
        measurements at ``D = 32 .. 128``, ``T = 1k .. 8k``."""
        T, C, p, D = seq_len, min(self.chunk_size, seq_len), self.summary_len, self.head_dim
        n = -(-T // C)
        scores, expanded = T * (C + n * p), n * n * p * D
        per_head = (2 * scores + 3 * expanded + T * D) if backward else (2.5 * scores + 0.75 * expanded + 4 * T * D)
        return batch * self.n_heads * per_head * elem

    def core_flops(self, batch, seq_len, backward):
        """Per head, ``n = ceil(T / C)`` chunks: ``4 n C^2 D`` (own chunk) + ``4 n C (n p) D``
        (every summary, masked ones included, as computed) + ``4 n p C D`` (summarising);
        backward 2x more."""
        C, p, D = self.chunk_size, self.summary_len, self.head_dim
        n = -(-seq_len // C)
        per_head = 4 * n * C * C * D + 4 * n * C * (n * p) * D + 4 * n * p * C * D
        return batch * self.n_heads * per_head * (3.0 if backward else 1.0)

    # ----------------------------------------------------------------- per-mechanism hooks
    def summarize(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Summaries of chunks: ``k, v [B, H, n, C, D] -> [B, H, n, p, D]``."""
        raise NotImplementedError

    def summary_bias(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Score bias ``[p]`` of each chunk's summary keys (default none)."""
        return torch.zeros(self.summary_len, dtype=dtype, device=device)

    def attend_global(self, q: Tensor, k: Tensor, v: Tensor, reference: bool) -> Tensor:
        """The published non-causal form (``reference=True``: its explicit form)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- hooks of Attention
    def attend(self, q, k, v, q_pos, kv_pos, mask):
        self.reject_mask(mask)
        if not self.config.causal:
            return self.attend_global(q, k, v, reference=False)
        return self.attend_chunks(q, k, v, k[:, :, :0], v[:, :, :0])[0]

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        self.reject_mask(mask)
        if not self.config.causal:
            return self.attend_global(q, k, v, reference=True)
        return self.attend_chunks_reference(q, k, v)

    def make_cache(self, batch, max_len, dtype, device):
        if not self.config.causal:
            raise ValueError(
                f"the published non-causal {self.name} has no incremental decoding (every output depends on the "
                "whole sequence through its compression); build the layer with causal=True to decode"
            )
        return ChunkSummaryCache(batch, self.n_kv_heads, max_len, self.head_dim, self.chunk_size,
                                 self.summary_len, dtype, device)

    def prefill(self, q, k, v, pos, cache, mask, lengths):
        self.reject_mask(mask)
        out, summary_k, summary_v = self.attend_chunks(q, k, v, k[:, :, :0], v[:, :, :0])
        cache.prefill(k, v, summary_k, summary_v, lengths)
        return out

    def attend_step(self, q, k, v, pos, cache, mask):
        self.reject_mask(mask)
        return torch.cat([self.attend_token(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos[..., t:t + 1],
                                            cache) for t in range(q.shape[2])], dim=2)

    def attend_token(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: ChunkSummaryCache) -> Tensor:
        """One token per row at ``pos [b, 1, 1]``: store it in the current chunk, attend to that
        chunk's keys up to it and to the summaries of earlier chunks, then rewrite the current
        chunk's summaries (complete once its last token is in). ``O((C + n p) D)`` for the
        attention plus ``O(C p D)`` for the summaries (Linformer; Nyström averages)."""
        C, p = self.chunk_size, self.summary_len
        cache.write(k, v, pos)
        chunk = torch.div(pos, C, rounding_mode="floor")
        own_pos = chunk * C + torch.arange(C, device=q.device)
        dtype = score_dtype(q.dtype)
        own = torch.zeros(own_pos.shape, dtype=dtype, device=q.device).masked_fill(own_pos > pos, float("-inf"))
        n = cache.summary_k.shape[2] // p
        owner = torch.arange(n, device=q.device).repeat_interleave(p)
        summary = torch.where(owner >= chunk, float("-inf"), self.summary_bias(dtype, q.device).repeat(n))
        y = cached_attention(q, [(cache.chunk_k, cache.chunk_v, own[..., None, :]),
                                 (cache.summary_k, cache.summary_v, summary[..., None, :])])
        summary_k, summary_v = self.summarize(cache.chunk_k[:, :, None], cache.chunk_v[:, :, None])
        cache.write_summary(summary_k[:, :, 0], summary_v[:, :, 0], pos)
        return y

    def reject_mask(self, mask: Optional[Tensor]) -> None:
        if mask is not None:
            raise ValueError(f"attention_type {self.name!r}: {self.mask_unsupported}")

    # ----------------------------------------------------------------- causal chunked variant
    def attend_chunks(self, q: Tensor, k: Tensor, v: Tensor, memory_k: Tensor,
                      memory_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Causal chunked attention, vectorised over chunks.

        ``k, v [B, H, N, D]`` start at a chunk boundary; ``q [B, H, T, D]`` are the last ``T`` of
        those ``N`` tokens (``T = N`` for a full forward; fewer when decoding after the cached part
        of the current chunk). ``memory_k/v [B, H, M, D]``: summaries of chunks completed before
        ``k`` (visible to every query). Returns the output ``[B, H, T, D]`` and the summaries of
        the complete chunks of ``k, v`` (for the cache).
        """
        C, p, (N, T) = self.chunk_size, self.summary_len, (k.shape[2], q.shape[2])
        n = -(-N // C)

        def chunks(x: Tensor, front: int = 0) -> Tensor:  # [B, H, N, D] -> [B, H, n, C, D], zero-padded
            return F.pad(x, (0, 0, front, n * C - N)).unflatten(2, (n, C))

        qc, kc, vc = chunks(q, N - T), chunks(k), chunks(v)
        summary_k, summary_v = self.summarize(kc, vc)
        keys = torch.cat([memory_k, summary_k.flatten(2, 3)], 2)[:, :, None]  # [B, H, 1, M + n p, D]
        values = torch.cat([memory_v, summary_v.flatten(2, 3)], 2)[:, :, None]
        # Chunk that produced each summary (memory chunks come before local chunk 0); chunk c sees c' < c.
        n_memory = memory_k.shape[2] // p
        owner = torch.arange(-n_memory, n, device=q.device).repeat_interleave(p)
        bias = self.summary_bias(q.dtype, q.device).repeat(n_memory + n)
        bias = bias.masked_fill(owner >= torch.arange(n, device=q.device)[:, None], float("-inf"))
        own = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores_own = (qc @ kc.transpose(-2, -1) * scale).masked_fill(~own, float("-inf"))
        scores_summary = qc @ keys.transpose(-2, -1) * scale + bias[:, None, :]
        probs = torch.softmax(torch.cat([scores_own, scores_summary], -1), dim=-1)
        probs = F.dropout(probs, self.attn_dropout, training=self.training)
        probs_own, probs_summary = probs.split([C, keys.shape[-2]], dim=-1)
        out = (probs_own @ vc + probs_summary @ values).flatten(2, 3)[:, :, N - T: N]
        complete = N // C
        return out, summary_k[:, :, :complete].flatten(2, 3), summary_v[:, :, :complete].flatten(2, 3)

    def attend_chunks_reference(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The same function chunk by chunk: for chunk ``c`` build the explicit key set
        ``[own keys ; summaries of chunks 0..c-1]`` and run dense masked softmax attention on it."""
        T, C, p = q.shape[2], self.chunk_size, self.summary_len
        bias = self.summary_bias(q.dtype, q.device)
        summaries_k, summaries_v, outputs = [], [], []
        for start in range(0, T, C):
            own = slice(start, min(start + C, T))
            L, S = own.stop - own.start, len(summaries_k) * p
            keys = torch.cat([k[:, :, own], *summaries_k], 2)
            values = torch.cat([v[:, :, own], *summaries_v], 2)
            allowed = torch.cat([torch.ones(L, L, dtype=torch.bool).tril(), torch.ones(L, S, dtype=torch.bool)], 1)
            key_bias = torch.cat([q.new_zeros(L), bias.repeat(len(summaries_k))])
            outputs.append(reference_attention(q[:, :, own], keys, values, allowed=allowed.to(q.device),
                                               bias=key_bias, dropout_p=self.attn_dropout, training=self.training))
            if L == C:
                chunk_k, chunk_v = self.summarize(k[:, :, None, own], v[:, :, None, own])
                summaries_k.append(chunk_k[:, :, 0])
                summaries_v.append(chunk_v[:, :, 0])
        return torch.cat(outputs, 2)


@register("linformer")
class LinformerAttention(ChunkedLowRankAttention):
    """Linformer (Wang et al., 2020): keys and values projected along the sequence axis.

    **Published, non-causal** (``causal=False``): learned ``E, F in R^{p x max_seq_len}``
    (``p = proj_len``); a sequence of ``T <= max_seq_len`` tokens uses their first ``T`` columns::

        out = softmax(Q (E K)^T / sqrt(d)) (F V)

    Time ``O(T p d)``, memory ``O(T p)``, ``2 p max_seq_len`` parameters per layer (separate
    ``E``, ``F``; no sharing across heads or layers). ``T > max_seq_len`` is an error.

    **Causal variant** (``causal=True``, see the module docstring): each completed chunk of ``C``
    tokens is compressed to ``p`` keys ``E_c K_chunk`` and values ``F_c V_chunk`` with learned
    ``E_c, F_c in R^{p x C}`` shared across chunks (Linformer's projection applied per chunk, as a
    Compressive-Transformer compression function). Requires ``proj_len <= chunk_size``.
    Projections start with variance ``1 / width`` entries, so a summary key has the scale of a key.
    """

    description = "Linformer: keys/values projected along the sequence to proj_len; causal = chunked memory"
    summary_option = "proj_len"

    @dataclass(frozen=True)
    class Options(ChunkedLowRankAttention.Options):
        proj_len: int = option(16, 4, 1, 2, 3)

    @classmethod
    def validate_options(cls, config, dims):
        super().validate_options(config, dims)
        p = config.options.proj_len
        if dims is not None and not config.causal and p > dims.max_seq_len:
            raise ValueError(f"proj_len={p} > max_seq_len={dims.max_seq_len}: Linformer must project to fewer keys")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        width = self.chunk_size if config.causal else dims.max_seq_len
        self.proj_k = nn.Parameter(torch.randn(self.summary_len, width) / math.sqrt(width))
        self.proj_v = nn.Parameter(torch.randn(self.summary_len, width) / math.sqrt(width))

    def summarize(self, k, v):
        return self.proj_k @ k, self.proj_v @ v

    def attend_global(self, q, k, v, reference):
        T = k.shape[2]
        if T > self.dims.max_seq_len:
            raise ValueError(
                f"sequence length {T} > max_seq_len={self.dims.max_seq_len}: Linformer's projections have "
                "max_seq_len columns; raise max_seq_len (the model's context_len) or use causal=True (chunked)"
            )
        k, v = self.proj_k[:, :T] @ k, self.proj_v[:, :T] @ v
        if reference:
            return reference_attention(q, k, v, dropout_p=self.attn_dropout, training=self.training)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout)


@register("nystrom", aliases=("nystromformer",))
class NystromAttention(ChunkedLowRankAttention):
    """Nyströmformer (Xiong et al., 2021): softmax attention through ``m = num_landmarks`` landmarks.

    **Published, non-causal** (``causal=False``): landmarks ``Q~, K~`` are segment means of the
    queries/keys over ``m`` contiguous segments (uneven sizes when ``m`` does not divide ``T``,
    see :func:`segment_means`; ``m = T`` if ``T < m``), then with ``s(X) = softmax(X / sqrt(d))``::

        out = s(Q K~^T) pinv(s(Q~ K~^T)) (s(Q~ K^T) V)

    The Moore-Penrose pseudo-inverse is ``torch.linalg.pinv`` in float64 (exact, instead of the
    paper's 6-step iterative approximation; ``O(m^3)``, tiny), so ``m = T`` reproduces softmax
    attention. The paper's optional depthwise-convolution skip on ``V`` is not included, and there
    is no attention-probability dropout (the product is not a probability matrix). Time
    ``O(T m d + m^3)``, memory ``O(T m)``.

    **Causal variant** (``causal=True``, see the module docstring): each completed chunk of ``C``
    tokens contributes its ``m`` landmark keys/values (segment means of its keys and values) with
    score bias ``log(segment size)`` — proportional attention (as in Token Merging, Bolya et al.,
    2023): a landmark stands for its segment's tokens, so when a segment's keys are equal the
    result equals exact attention to them. No pseudo-inverse: Nyström's factorisation normalises
    over landmarks of the whole sequence, which a causal query cannot see. Requires
    ``num_landmarks <= chunk_size``.
    """

    description = "Nystromformer: segment-mean landmarks + pseudo-inverse; causal = chunked landmark memory"
    summary_option = "num_landmarks"

    @dataclass(frozen=True)
    class Options(ChunkedLowRankAttention.Options):
        num_landmarks: int = option(16, 4, 1, 2, 3)

    noncausal_exact_option = "num_landmarks"  # as many landmarks as tokens: exact (tested)

    def summarize(self, k, v):
        avg, _ = segment_means(self.chunk_size, self.summary_len, k.dtype, k.device)
        return avg @ k, avg @ v

    def summary_bias(self, dtype, device):
        _, sizes = segment_means(self.chunk_size, self.summary_len, dtype, device)
        return sizes.to(dtype).log()

    def attend_global(self, q, k, v, reference):
        T, m = k.shape[2], min(self.summary_len, k.shape[2])
        if reference:  # landmarks by explicit slicing; segment j = tokens [ceil(j T / m), ceil((j + 1) T / m))
            bounds = [-(-j * T // m) for j in range(m + 1)]
            q_l, k_l = (torch.stack([x[:, :, a:b].mean(2) for a, b in zip(bounds, bounds[1:])], 2) for x in (q, k))
        else:
            avg, _ = segment_means(T, m, q.dtype, q.device)
            q_l, k_l = avg @ q, avg @ k
        scale = 1.0 / math.sqrt(q.shape[-1])
        kernel_q = torch.softmax(q @ k_l.transpose(-2, -1) * scale, dim=-1)  # [T, m]
        kernel_l = torch.softmax(q_l @ k_l.transpose(-2, -1) * scale, dim=-1)  # [m, m]
        kernel_k = torch.softmax(q_l @ k.transpose(-2, -1) * scale, dim=-1)  # [m, T]
        inverse = torch.linalg.pinv(kernel_l.double()).to(q.dtype)
        if reference:  # the approximate T x T attention matrix, written out
            return (kernel_q @ inverse @ kernel_k) @ v
        return kernel_q @ (inverse @ (kernel_k @ v))
