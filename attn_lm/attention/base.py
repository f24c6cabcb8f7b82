"""What every attention mechanism shares: projections, heads, positions, masks and caching.

A mechanism subclasses :class:`Attention` (or :class:`SoftmaxAttention` for the exact ones, which
then only describe their mask pattern) and implements up to four methods on head-split tensors
``q [B, H, T, D]``, ``k, v [B, Hkv, S, D]`` with absolute positions ``q_pos [T]``, ``kv_pos [S]``:

* ``attend``            — the full-sequence fast path (fused kernels where they exist);
* ``attend_reference``  — the explicit, readable form the fast path is tested against;
* ``make_cache`` / ``prefill`` / ``attend_step`` — incremental decoding with the family's own
  fixed-size cache (:mod:`attn_lm.cache`): ``prefill`` runs a prompt through the fast path and
  stores it; ``attend_step`` decodes at explicit positions ``pos [b, 1, T]`` (a device tensor,
  per row when a batch holds prompts of different lengths) with fixed shapes, so the step can be
  captured as one graph.

``forward(x, context=None, mask=None, cache=None, input_pos=None, lengths=None)`` does the rest: one fused QKV projection
(keys/values with ``n_kv_heads`` heads), RoPE/xPos rotation at absolute positions, the output
projection and residual dropout.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, ClassVar, Iterator, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache, LayerCache
from ..positions import ALiBi, Rotary
from .config import AttentionConfig, AttentionDims, NoOptions
from .functional import flex_supports, gpu_branch, reference_attention, softmax_attention
from .masks import MaskPattern, combine_custom_mask, validate_custom_mask


#: Live copies of a materialised score-like tensor at the peak of a step: the tensor, its
#: normalised / multiplied temporaries and, with backward, its gradient (matches CPU measurements).
MATERIALISED_COPIES = 3


class Attention(nn.Module):
    """Base class of every mechanism. A *family* (a direct subclass: softmax, kernelized,
    low-rank, recurrent state...) sets the capability attributes and the cost model below; a
    mechanism adds its ``Options`` and its pattern or feature map."""

    name: ClassVar[str] = "?"
    #: The family this mechanism belongs to: the one taxonomy the selector, profiler and
    #: benchmarks report (set once on each family's base class).
    family: ClassVar[str] = "?"
    description: ClassVar[str] = ""
    #: The mechanism's options, a frozen dataclass of typed fields with their defaults
    #: (:func:`~attn_lm.attention.config.option`): the only place those defaults live.
    Options: ClassVar[type] = NoOptions
    #: Old option names still accepted for one release, with a deprecation warning: ``{old: new}``.
    renamed_options: ClassVar[dict[str, str]] = {}

    # ----------------------------------------------------------------- capabilities (per family)
    #: Equals dense softmax attention under its mask pattern (tested against the reference).
    exact: ClassVar[bool] = True
    #: Why ALiBi is impossible here (``None`` = supported).
    alibi_unsupported: ClassVar[Optional[str]] = None
    #: Why a non-causal form is impossible here (``None`` = supported).
    noncausal_unsupported: ClassVar[Optional[str]] = None
    #: Why a user mask cannot be applied in a full forward (``None`` = it is honoured).
    mask_unsupported: ClassVar[Optional[str]] = None
    #: What the decoding cache holds: ``"kv"`` (every key/value), ``"window"`` (a bounded ring),
    #: ``"state"`` (a fixed-size recurrent state), ``"summaries"``, ``"latent"``...
    cache_kind: ClassVar[str] = "kv"
    #: Time and memory of a full forward grow with ``T^2`` (``False``: sub-quadratic on the
    #: family's fast path). The selector's long-context rule reads it.
    quadratic: ClassVar[bool] = True
    #: Queries from ``x``, keys/values from ``context`` (cross-attention).
    uses_context: ClassVar[bool] = False
    #: ``attend`` needs the ``q, k, v`` that ``project`` makes, not any ``[B, H, T, D]`` tensors:
    #: keys that carry per-token gates (gla, deltanet), a latent row in place of keys and queries
    #: wider than ``head_dim`` (mla). Benchmarks feed such a mechanism its own projection.
    projected_inputs: ClassVar[bool] = False
    #: The mechanism whose function this one computes with another kernel (``sdpa`` and the
    #: tile-by-tile teaching code compute ``full``): a row of the speed tables, not of quality
    #: comparisons (``None``: a function of its own).
    kernel_of: ClassVar[Optional[str]] = None
    #: Why ``torch.compile`` cannot trace this mechanism into the model's graph (``None`` = it
    #: can, with no graph break on any device's dispatch path; ``tests/test_compile.py`` holds
    #: every mechanism to this). A model with such a layer compiles with graph breaks around it.
    compile_unsupported: ClassVar[Optional[str]] = None
    #: ``attend`` runs plain PyTorch ops (chunked scans, feature maps, summaries) that only
    #: ``torch.compile`` fuses, so the attention benchmark compiles the layer on its own
    #: (``--compile auto``) to time what a compiled model runs. ``False`` where ``attend`` already
    #: dispatches to fused kernels (:class:`SoftmaxAttention`).
    wants_compile: ClassVar[bool] = True

    # ----------------------------------------------------------------- benchmark settings
    #: Option values of the attention benchmark (``scripts/bench_attention.py``, sequences of
    #: 1k-32k tokens) where they differ from the defaults, which are sized for the short contexts
    #: of the quality comparisons (a window of 64 at 32k tokens would be another workload). Only
    #: options of the class's ``Options`` (the registry test resolves them); ``--options`` of the
    #: benchmark overrides them.
    bench_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, config: AttentionConfig, dims: AttentionDims):
        super().__init__()
        self.config, self.dims = config, dims
        self.options = config.options
        self.n_heads = dims.n_heads
        self.n_kv_heads = self.kv_heads(config, dims)
        self.head_dim = dims.head_dim
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(dims.d_model, width, bias=dims.bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, dims.d_model, bias=dims.bias)
        self.resid_dropout = nn.Dropout(dims.dropout)
        self.rotary: Optional[Rotary] = None
        if config.position in ("rope", "xpos"):
            self.rotary = Rotary(
                self.head_dim,
                base=config.rope_base,
                fraction=config.rope_fraction,
                xpos_scale_base=config.xpos_scale_base if config.position == "xpos" else None,
            )
        self.alibi = ALiBi(self.n_heads) if config.position == "alibi" else None
        self.use_reference = False

    # ----------------------------------------------------------------- config validation
    @classmethod
    def check_config(cls, config: AttentionConfig, dims: Optional[AttentionDims] = None) -> None:
        """Reject settings the mechanism cannot compute (``config.options`` is typed already;
        ``dims``: also combinations with the model's dimensions)."""
        if config.position == "alibi" and cls.alibi_unsupported:
            raise ValueError(f"position='alibi' is not supported by attention_type {cls.name!r}: {cls.alibi_unsupported}")
        if not config.causal and cls.noncausal_unsupported:
            raise ValueError(f"causal=False is not supported by attention_type {cls.name!r}: {cls.noncausal_unsupported}")
        if config.position == "xpos" and not config.causal:
            raise ValueError(
                "position='xpos' needs causal=True: its exponential decay is only a decay for keys that precede "
                "the query; use position='rope' for non-causal attention"
            )
        cls.validate_options(config, dims)

    @classmethod
    def validate_options(cls, config: AttentionConfig, dims: Optional[AttentionDims]) -> None:
        """Mechanism-specific checks beyond each option's type and range (which the factory
        checks from the declaration): combinations of options, and with ``dims`` when given."""

    @classmethod
    def covering_option(cls, config: AttentionConfig) -> Optional[str]:
        """The option (a window, block or chunk length) whose value, once it reaches the sequence
        length, leaves nothing out: the layer then computes plain full attention. ``None``: none."""
        return None

    @classmethod
    def structure_options(cls, config: AttentionConfig, size: int) -> dict[str, int]:
        """The option values that set the layer's structural size to ``size`` tokens (the
        comparison harness's ``compare.structure_fraction``): its :meth:`covering_option`, plus
        any option that must shrink with it (``{}``: the layer has no such size)."""
        option = cls.covering_option(config)
        return {} if option is None else {option: size}

    @classmethod
    def covers_context(cls, config: AttentionConfig, context_len: int) -> Optional[str]:
        """Why this layer is plain full attention on sequences of ``context_len`` tokens (its
        pattern or chunk covers them all), or ``None``. Training warns; comparisons should refuse."""
        option = cls.covering_option(config)
        if option is None or getattr(config.options, option) < context_len:
            return None
        return f"{cls.name}: {option} {getattr(config.options, option)} ≥ context {context_len} — this is full attention"

    # ----------------------------------------------------------------- cost model (per family)
    def core_bytes(self, batch: int, seq_len: int, elem: int, backward: bool, fused: bool) -> float:
        """Peak extra bytes of the attention core (what ``attend`` allocates beyond ``q, k, v``
        and the output) for one causal forward (``backward``: and its backward) of ``batch``
        sequences of ``seq_len`` tokens in ``elem``-byte elements; ``fused``: on the fused GPU
        path (FlexAttention / fused SDPA) rather than the CPU one. Default, for a family that
        materialises its ``T x T`` scores: the scores and their temporaries (the normalised /
        multiplied copies, with backward the saved probabilities and their gradient; 2.5 copies
        at a forward's peak, measured)."""
        return (MATERIALISED_COPIES if backward else 2.5) * batch * self.n_heads * seq_len**2 * elem

    def core_flops(self, batch: int, seq_len: int, backward: bool) -> Optional[float]:
        """Useful FLOPs of one causal ``attend`` on ``batch x seq_len`` tokens (``None``: no
        formula for this family)."""
        return None

    def kv_heads(self, config: AttentionConfig, dims: AttentionDims) -> int:
        """Number of key/value heads (``n_heads`` unless the mechanism shares them)."""
        return dims.n_heads

    # ----------------------------------------------------------------- forward
    def project(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Project to head-split ``q [B,H,T,D]``, ``k, v [B,Hkv,S,D]`` with one fused matmul
        (self-attention) or two slices of the same weight (cross-attention)."""
        hd, nq, nkv = self.head_dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.qkv(x).split([nq, nkv, nkv], dim=-1)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x, w[:nq], None if b is None else b[:nq])
            k, v = F.linear(context, w[nq:], None if b is None else b[nq:]).split([nkv, nkv], dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.unflatten(-1, (-1, hd)).transpose(1, 2)

        return heads(q), heads(k), heads(v)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                cache: Optional[LayerCache] = None, input_pos: Optional[Tensor] = None,
                lengths: Optional[Tensor] = None) -> Tensor:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]``.

        ``context [B, S, d_model]``: keys/values source (cross-attention only). ``mask``: boolean
        (``True`` = may attend) or additive float, broadcastable to ``[B, H, T, S]``; it is
        combined with the mechanism's own pattern (in a decoding step its last dim indexes absolute
        key positions). ``cache`` (from :meth:`new_cache`) decodes incrementally:

        * without ``input_pos``: *prefill* the prompt at positions ``0 .. T-1`` through the
          full-sequence path, then store it in the cache; ``lengths [B]`` counts the real tokens
          of each row (the rest is right padding; default ``T``);
        * with ``input_pos`` (int64 ``[T]``, or ``[B, T]`` per row): one decoding *step* at those
          positions, reading and updating the cache. Positions are never read back to the host,
          so a step has fixed shapes (capturable as one graph).
        """
        if x.dim() != 3 or x.shape[-1] != self.dims.d_model:
            raise ValueError(f"expected x of shape [B, T, {self.dims.d_model}], got {tuple(x.shape)}")
        if self.uses_context and context is None:
            raise ValueError(f"attention_type {self.name!r} needs a context tensor [B, S, d_model] for its keys/values")
        if context is not None and not self.uses_context:
            raise ValueError(
                f"attention_type {self.name!r} is self-attention and takes no context; use attention_type='cross'"
            )
        B, T, _ = x.shape
        if input_pos is None:  # a decoding step's positions were checked when its cache was sized
            self.check_length(T)
        q, k, v = self.project(x, context)
        # A causal cross layer reads an aligned stream (context position j is visible from query
        # i >= j), so it caches like self-attention; a non-causal one re-reads a fixed memory.
        if context is not None and not self.config.causal:
            cache = None
        if cache is not None and input_pos is not None:
            pos = input_pos.view(-1, 1, T)  # [b, 1, T]: broadcasts over heads
            if self.rotary is not None:
                q, k = self.rotary(q, k, pos, pos)
            return self.project_out(self.attend_step(q, k, v, pos, cache, mask))
        q_pos = torch.arange(T, device=x.device)
        kv_pos = torch.arange(k.shape[2], device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos, kv_pos)
        validate_custom_mask(mask, B, self.n_heads, T, k.shape[2])
        if cache is not None:
            lengths = torch.full((B,), T, device=x.device) if lengths is None else lengths
            y = self.prefill(q, k, v, q_pos, cache, mask, lengths)  # each family handles the padding
        else:
            mask = self.hide_padding(kv_pos, lengths, mask, q.dtype)
            attend = self.attend_reference if self.use_reference else self.attend
            y = attend(q, k, v, q_pos, kv_pos, mask)
        return self.project_out(y)

    def hide_padding(self, kv_pos: Tensor, lengths: Optional[Tensor], mask: Optional[Tensor],
                     dtype: torch.dtype) -> Optional[Tensor]:
        """``mask`` plus, for a non-causal layer, the right padding of rows shorter than ``lengths``
        (causal queries never reach it: it comes after every real token)."""
        if lengths is None or self.config.causal:
            return mask
        return combine_custom_mask((kv_pos < lengths[:, None])[:, None, None, :], mask, dtype)

    def project_out(self, y: Tensor) -> Tensor:
        """Heads ``[B, H, T, D]`` -> output projection and residual dropout ``[B, T, d_model]``."""
        return self.resid_dropout(self.out(y.transpose(1, 2).flatten(2)))

    @property
    def attn_dropout(self) -> float:
        return self.dims.dropout if self.training else 0.0

    # ----------------------------------------------------------------- per-family hooks
    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor,
               mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor,
                         mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def prepare_fused(self, seq_len: int, device: torch.device) -> None:
        """Build, outside any compiled graph, what a full forward of ``seq_len`` tokens on
        ``device`` reads besides its inputs (default: nothing). Compiled training calls it before
        every step (:class:`~attn_lm.lit_module.LitGPT`): state built *inside* a graph and kept
        for later steps would be that graph's output, which CUDA graphs overwrite at the next
        replay."""

    def check_length(self, end: int) -> None:
        """Raise unless positions ``0 .. end - 1`` are defined for this mechanism (default: all).
        Called with host ints -- a sequence's length, a decoding cache's size -- so no step has to
        read positions back from the device."""

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> LayerCache:
        """A preallocated cache for decoding positions ``0 .. max_len - 1`` (:meth:`make_cache`)."""
        self.check_length(max_len)
        return self.make_cache(batch, max_len, dtype, device)

    def make_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> LayerCache:
        """The family's cache (default: full K/V)."""
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: LayerCache, mask: Optional[Tensor],
                lengths: Tensor) -> Tensor:
        """A prompt at positions ``pos = arange(T)``: the full-sequence path, then into the cache."""
        mask = self.hide_padding(pos, lengths, mask, q.dtype)
        attend = self.attend_reference if self.use_reference else self.attend
        y = attend(q, k, v, pos, pos, mask)
        cache.prefill(k, v, lengths)
        return y

    def attend_step(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cache: LayerCache,
                    mask: Optional[Tensor]) -> Tensor:
        """A decoding step at positions ``pos [b, 1, T]`` (after prefill): read and update ``cache``."""
        raise NotImplementedError(f"attention_type {self.name!r} has no incremental decoding")


class SoftmaxAttention(Attention):
    """Exact softmax attention restricted by a :class:`MaskPattern`.

    Subclasses only override :meth:`build_pattern`; the fused dispatch, the dense reference and
    KV-cache decoding are shared.
    """

    family: ClassVar[str] = "softmax"
    #: ``attend`` dispatches to fused SDPA / FlexAttention kernels (FlexAttention compiled inside
    #: :mod:`~attn_lm.attention.functional`): nothing left for ``torch.compile`` to fuse.
    wants_compile: ClassVar[bool] = False

    def __init__(self, config: AttentionConfig, dims: AttentionDims):
        super().__init__(config, dims)
        self.pattern = self.build_pattern()
        #: SDPA backends this layer pins (``None``: the library's fastest-first order on GPU).
        self.sdpa_backends: Optional[tuple] = None

    def prepare_fused(self, seq_len, device):
        """The FlexAttention ``BlockMask`` of the pattern (cached on it), where the GPU dispatch
        would build one: a sparse pattern or ALiBi. Built lazily inside a compiled step, it became
        an output of the step's CUDA graph, overwritten by the next replay (``compile_mode=
        reduce-overhead`` failed for ``sink``)."""
        if (not self.pattern.is_full or self.alibi is not None) and gpu_branch(device):
            self.pattern.block_mask(seq_len, seq_len, device)

    #: The scores' head width differs from the values' (diff's halves, mla's rotary slice):
    #: PyTorch's CPU SDPA then runs its math kernel, which materialises the scores.
    uneven_heads: ClassVar[bool] = False

    @property
    def quadratic(self) -> bool:  # the fused path skips the tiles a sparse pattern leaves empty
        return self.pattern.is_full

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """CPU: the fused CPU kernel keeps per-row statistics, ``B H T`` elements; a sparse pattern
        runs SDPA with its dense additive bias, ``T x T`` shared by batch and heads (filled block
        by block, see :func:`~attn_lm.attention.functional.pattern_bias`); uneven heads
        materialise the scores (the default model).

        GPU (:meth:`fused_core_bytes`): what the fused kernels hold besides ``q, k, v``, the
        output and the gradients that the layer's model counts. A call that would go to
        FlexAttention (a pattern or ALiBi) with heads narrower than it takes runs the dense bias on
        the GPU too (:func:`~attn_lm.attention.functional.flex_dispatch`), so it is charged so."""
        wants_flex = not self.pattern.is_full or self.alibi is not None
        if fused and (not wants_flex or flex_supports(self.score_dim, self.head_dim)):
            return self.fused_core_bytes(batch, seq_len, elem, backward)
        if self.uneven_heads:
            return super().core_bytes(batch, seq_len, elem, backward, fused)
        stats = float(batch * self.n_heads * seq_len * elem)
        return stats if self.pattern.is_full else stats + seq_len**2 * elem

    #: Width of the query/key heads the fused kernel reads (``head_dim`` unless the scores'
    #: heads differ from the values', see :attr:`uneven_heads`).
    @property
    def score_dim(self) -> int:
        return self.head_dim

    #: Key/value heads the fused kernel receives (fewer than ``n_heads``: it broadcasts them).
    @property
    def kernel_kv_heads(self) -> int:
        return self.n_kv_heads

    def fused_core_bytes(self, batch: int, seq_len: int, elem: int, backward: bool) -> float:
        """One fused call on the GPU, scores :attr:`score_dim` (``Dqk``) wide.

        * Forward: the fp32 logsumexp ``[B, H, T]`` that SDPA (cuDNN, FlashAttention-2) and
          FlexAttention write (and, with backward, save).
        * Backward, full pattern (cuDNN's SDPA backward, FlashAttention-2's ``mha_bwd``: both
          FlashAttention-2's algorithm): the fp32 ``dQ`` accumulator ``[B, H, T, Dqk]`` (each
          key tile adds its share to every query row), and the fp32 row sums ``rowsum(dO * O)``
          ``[B, H, T]``; with shared key/value heads also ``dK, dV`` per *query* head in the
          input dtype, ``2 [B, H, T, D]``, summed over each group afterwards (FlashAttention-2's
          ``dk_expanded`` / ``dv_expanded``, cuDNN's full-head ``dK, dV``).
        * Backward, sparse pattern (FlexAttention's Triton backward): the same row sums; each
          program owns its ``dQ`` tile and loops over the block mask's key tiles (and over the
          query heads of a shared key/value head for ``dK, dV``), so no accumulator in memory."""
        rows = batch * self.n_heads * seq_len
        stats = rows * 4.0  # fp32 logsumexp
        if not backward:
            return stats
        stats += rows * 4.0  # fp32 rowsum(dO * O)
        if not self.pattern.is_full:
            return stats
        shared = 2 * rows * self.head_dim * elem if self.kernel_kv_heads < self.n_heads else 0
        return stats + rows * self.score_dim * 4.0 + shared

    def core_flops(self, batch, seq_len, backward):
        """``4 B H T^2 D x density`` (``Q K^T`` and ``P V`` over the scores the pattern allows);
        the backward adds 2.5x (FlashAttention's convention: it recomputes ``Q K^T``)."""
        fwd = 4 * batch * self.n_heads * seq_len**2 * self.head_dim * self.pattern.density(seq_len)
        return fwd * (3.5 if backward else 1.0)

    def build_pattern(self) -> MaskPattern:
        return MaskPattern(causal=self.config.causal)

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        return softmax_attention(q, k, v, self.pattern, q_pos, kv_pos, mask, self.alibi, self.attn_dropout,
                                 contiguous_positions=True, backends=self.sdpa_backends)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        return reference_attention(q, k, v, bias=self.score_bias(q_pos, kv_pos, mask, q.dtype),
                                   dropout_p=self.attn_dropout, training=self.training)

    def score_bias(self, q_pos: Tensor, kv_pos: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """The pattern, the user mask and ALiBi as one additive bias (reference path)."""
        bias = combine_custom_mask(self.pattern.dense(q_pos, kv_pos), mask, dtype)
        return bias if self.alibi is None else bias + self.alibi.bias(q_pos, kv_pos, dtype)

    def step_bias(self, q_pos: Tensor, kv_pos: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """Additive bias of a decoding step over cache slots at positions ``kv_pos [b, 1, S]``, in
        the scores' dtype for queries of ``dtype``: :meth:`score_bias`, and only slots already
        written (positions up to the step's last; a non-causal layer too sees only the tokens
        that exist so far)."""
        allowed = self.pattern.dense(q_pos, kv_pos)
        if not self.config.causal:  # a causal pattern already stops at each query
            allowed = allowed & (kv_pos[..., None, :] <= q_pos[..., -1:, None])
        if mask is None:  # 0 / -inf: exact in any dtype, so no cast either
            bias = torch.where(allowed, 0.0, float("-inf"))
        else:
            bias = combine_custom_mask(allowed, mask_columns(mask, kv_pos), score_dtype(dtype))
        return bias if self.alibi is None else bias + self.alibi.bias(q_pos, kv_pos, score_dtype(dtype))

    def attend_step(self, q, k, v, pos, cache, mask):
        """Write the new keys at ``pos``, then attend over every slot of the cache."""
        cache.write(k, v, pos)
        bias = self.step_bias(pos, cache.key_positions(), mask, q.dtype)
        return cached_attention(q, [(cache.k, cache.v, bias)], mask is not None)


def mask_columns(mask: Tensor, kv_pos: Tensor) -> Tensor:
    """A user mask ``[..., T, W]`` whose last dim indexes absolute key positions, read at the
    positions ``kv_pos [b, 1, S]`` of cache slots (empty slots, ``-1``, and positions past ``W``
    read some column; the step masks them anyway)."""
    mask = mask[(None,) * (4 - mask.dim())]
    index = kv_pos.clamp(0, mask.shape[-1] - 1)[:, :, None, :]
    batch = max(mask.shape[0], index.shape[0])
    mask = mask.expand(batch, *mask.shape[1:])
    return mask.gather(-1, index.expand(batch, mask.shape[1], mask.shape[2], index.shape[-1]))


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of decoding scores and their biases: at least float32 (a bf16 ALiBi bias of a distant
    key, or a bf16 softmax over thousands of keys, would lose the digits that matter)."""
    return torch.promote_types(dtype, torch.float32)


def cached_attention(q: Tensor, parts: list[tuple[Tensor, Tensor, Tensor]], empty_rows: bool = False) -> Tensor:
    """Softmax attention of ``q [B, H, T, D]`` over several key sets as if concatenated: each part
    is ``k, v [B, Hkv, S_i, D]`` with an additive bias broadcastable to ``[B, H, T, S_i]``
    (``-inf`` = masked). Parts avoid copying a cache into a concatenation (ring buffer + new keys,
    current chunk + summaries). Shared key/value heads are grouped with their query heads, never
    repeated, so a step reads each cached byte once. Scores and softmax in at least float32. Time
    ``O(T S D)`` per head. ``empty_rows``: rows with no allowed key (possible with user masks)
    give zeros instead of NaN.
    """
    B, H, T, D = q.shape
    n_kv = parts[0][0].shape[1]
    rows = q.reshape(B, n_kv, H // n_kv * T, D)  # the queries of one key/value head, as rows
    pieces = [torch.add(bias, (rows @ k.transpose(-2, -1)).view(B, H, T, -1).to(score_dtype(q.dtype)),
                        alpha=1 / math.sqrt(D)) for k, _, bias in parts]
    scores = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
    empty = torch.isneginf(scores).all(-1, keepdim=True) if empty_rows else None
    if empty is not None:
        scores = scores.masked_fill(empty, 0.0)
    probs = scores.softmax(dim=-1).to(q.dtype).view(B, n_kv, H // n_kv * T, -1)
    out, start = None, 0
    for k, v, _ in parts:
        piece = probs[..., start: start + k.shape[2]] @ v
        out, start = piece if out is None else out + piece, start + k.shape[2]
    if empty is not None:
        out = out.masked_fill(empty.view(B, n_kv, -1, 1), 0.0)
    return out.view(B, H, T, -1)  # values may be wider than keys (diff attention's half-width maps)


def iter_attention(module: nn.Module) -> Iterator[Attention]:
    return (m for m in module.modules() if isinstance(m, Attention))


@contextlib.contextmanager
def reference_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run every attention layer inside ``module`` through its explicit reference path."""
    layers = list(iter_attention(module))
    previous = [layer.use_reference for layer in layers]
    for layer in layers:
        layer.use_reference = True
    try:
        yield module
    finally:
        for layer, flag in zip(layers, previous):
            layer.use_reference = flag
