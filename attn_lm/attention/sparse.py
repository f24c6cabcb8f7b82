"""Sparse family: exact softmax attention in which each query sees only a sparse set of keys.

Every mechanism here is :class:`~attn_lm.attention.base.SoftmaxAttention` with a fixed
:class:`~attn_lm.attention.masks.MaskPattern`: its output *is* ``softmax(QK^T / sqrt(d) + M) V``
for the pattern's mask ``M`` (tested against the dense reference), so what changes is cost:

* **GPU, full forward** — FlexAttention with the pattern's cached ``BlockMask``: the fused kernel
  skips every 128 x 128 tile of the score matrix in which the pattern allows nothing, so a pattern
  that keeps ``k`` keys per query costs about ``O(T k d)`` (plus the partially filled tiles) and
  never builds a ``T x T`` mask. The complexities below are for this path.
* **CPU, reference path, user masks** — SDPA with a dense mask: ``O(T^2 d)`` time and ``O(T^2)``
  memory whatever the sparsity (the mask changes the result, not the cost).
* **decoding** — explicit attention over the cache slots (:func:`~attn_lm.attention.base.cached_attention`):
  ``O(S d)`` per new token for ``S`` slots, so the bounded caches below also bound the per-token cost.

Decoding caches follow how far back a pattern can look. ``local``, ``block_sparse`` and
``longformer`` only look a bounded distance back (besides Longformer's global tokens), so they keep
a :class:`~attn_lm.cache.SlidingWindowCache` whose size does not grow with the generated length;
``strided`` and ``bigbird`` reach arbitrarily far back and keep the full KV cache.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..cache import SlidingWindowCache
from .base import SoftmaxAttention, cached_attention
from .config import option
from .factory import register
from .masks import (
    BigBirdPattern,
    BlockPattern,
    LongformerPattern,
    SlidingWindowPattern,
    StridedPattern,
    bigbird_layout,
)


class _BoundedLookbackAttention(SoftmaxAttention):
    """A sparse mechanism whose queries look at most ``window`` positions back, besides the first
    ``num_global`` tokens, which every query may see. It decodes with a bounded
    :class:`SlidingWindowCache` instead of a full KV cache."""

    family = "sparse"
    cache_kind = "window"

    @classmethod
    def covering_option(cls, config):
        return "window_size"  # a window as long as the sequence sees every earlier token

    def cache_span(self) -> tuple[int, int]:
        """``(window, num_global)``: how far back the pattern looks, and how many leading tokens
        stay visible from everywhere."""
        raise NotImplementedError

    def make_cache(self, batch, max_len, dtype, device):
        window, num_global = self.cache_span()
        return SlidingWindowCache(batch, self.n_kv_heads, window, self.head_dim, dtype, device, num_global)

    def attend_step(self, q, k, v, pos, cache, mask):
        if q.shape[2] == 1:  # its write replaces position pos - window, which the query does not see
            return super().attend_step(q, k, v, pos, cache, mask)
        # Several tokens: attend over the ring as it was, plus the new keys, then store them (a
        # write may replace a key that an earlier query of the step still sees).
        ring_pos = cache.key_positions()
        parts = [(cache.k, cache.v, self.step_bias(pos, ring_pos, mask, q.dtype)),
                 (k, v, self.step_bias(pos, pos, mask, q.dtype))]
        y = cached_attention(q, parts, mask is not None)
        cache.write(k, v, pos)
        return y


@register("local")
class LocalAttention(_BoundedLookbackAttention):
    """Sliding-window (local) attention: token ``i`` attends to the ``window_size`` latest tokens
    ``i - window_size < j <= i`` (causal), or to every ``j`` with ``|i - j| < window_size``
    (non-causal, ``2 * window_size - 1`` keys). Stacking ``L`` layers gives a receptive field of
    ``L * (window_size - 1)`` tokens. Used by Longformer (Beltagy et al., 2020) and Mistral.

    Time ``O(T w d)`` on the fused path, cache memory ``O(w d)`` per head (a ring buffer of ``w``
    slots: decoding memory and per-token cost stay constant however long the text).
    """

    description = "sliding-window softmax attention over the window_size latest tokens, O(T w d), bounded cache"
    bench_options = {"window_size": 1024}  # 1/16 of the keys at 16k, all of them at 1k

    @dataclass(frozen=True)
    class Options:
        window_size: int = option(64, 5, *range(1, 13))

    def build_pattern(self):
        return SlidingWindowPattern(causal=self.config.causal, window=self.options.window_size)

    def cache_span(self):
        return self.options.window_size, 0


@register("block_sparse")
class BlockSparseAttention(_BoundedLookbackAttention):
    """Block-sparse attention: the sequence is cut into blocks of ``sparse_block`` tokens and query
    block ``i`` attends to key blocks ``i + o`` for each offset ``o`` of ``layout``, a
    comma-separated list that must contain ``0``: ``"0"`` is block-diagonal attention (blocks are
    independent), ``"0,-1"`` adds the previous block, ``"0,-1,1"`` (non-causal) both neighbours.
    Causal layers see only earlier keys inside their own block and take no positive offsets.
    (Block layouts of this kind are the building block of the Sparse Transformer, Child et al.,
    2019, and of BigBird's blocked implementation.)

    Time ``O(T |layout| b d)``: a fixed number of blocks per query. Decoding keeps the last
    ``(1 + max back offset)`` blocks in a ring buffer — ``sparse_block`` slots for ``"0"`` — so the
    cache is bounded for every layout.
    """

    description = "block-sparse softmax attention with a block-offset layout ('0' = block-diagonal), O(T L b d)"
    renamed_options = {"block_size": "sparse_block"}
    bench_options = {"sparse_block": 128}  # FlexAttention's tile: each block is whole tiles

    @dataclass(frozen=True)
    class Options:
        sparse_block: int = option(64, 4, *range(1, 10))
        #: Comma-separated block offsets, must contain 0: "0" = block-diagonal, "0,-1" = + the
        #: previous block (on the Hydra command line quote the commas: attention.layout="'0,-1'").
        layout: str = option("0", "0", "0,-1", "-2,0")

    @classmethod
    def covering_option(cls, config):
        return "sparse_block"  # one block: a causal block attends to everything before it

    @classmethod
    def layout_offsets(cls, config) -> tuple[int, ...]:
        text = config.options.layout
        try:
            return tuple(int(part) for part in str(text).split(","))
        except ValueError:
            raise ValueError(
                f"block_sparse layout={text!r} is not a comma-separated list of integer block offsets; "
                "e.g. '0' (block-diagonal) or '0,-1' (own block and the previous one)"
            ) from None

    @classmethod
    def validate_options(cls, config, dims):
        offsets = cls.layout_offsets(config)
        if 0 not in offsets:
            raise ValueError(
                f"block_sparse layout={config.options.layout!r} must contain offset 0 (each query block sees its own "
                "block); without it some query blocks (the first one when causal) see no key at all. "
                f"Use e.g. '0,{','.join(map(str, offsets))}'"
            )
        if len(set(offsets)) != len(offsets):
            raise ValueError(f"block_sparse layout={config.options.layout!r} repeats an offset; list each offset once")
        ahead = [o for o in offsets if o > 0]
        if config.causal and ahead:
            raise ValueError(
                f"block_sparse layout={config.options.layout!r} has positive offsets {ahead}: later blocks, which a "
                "causal layer never sees. Remove them, or set causal=False"
            )

    def build_pattern(self):
        return BlockPattern(causal=self.config.causal, block=self.options.sparse_block,
                            offsets=self.layout_offsets(self.config))

    def cache_span(self):
        blocks_back = -min(self.layout_offsets(self.config))
        return (1 + blocks_back) * self.options.sparse_block, 0


@register("strided")
class StridedAttention(SoftmaxAttention):
    """Strided sparse attention (Child et al., 2019, "Generating Long Sequences with Sparse
    Transformers"). Token ``i`` attends to a local band of ``stride`` keys (every ``dilation``-th
    position, so the band spans ``stride * dilation`` tokens) and to every key at a distance that is
    a multiple of ``stride`` ("summary" columns). The paper splits the two sets over two heads or
    layers; here each head gets their union, so any earlier token is reached in at most two hops
    (when ``gcd(stride, dilation) == 1``, e.g. the paper's ``dilation=1``).

    Time ``O(T (stride + T / stride) d)``, i.e. ``O(T sqrt(T) d)`` with ``stride ~ sqrt(T)``, for a
    kernel whose tiles follow the pattern. FlexAttention's 128 x 128 tiles each span 255 distinct
    distances ``i - j``, so for ``stride < 256`` a summary column crosses every tile below the
    diagonal (every tile when non-causal) and the fused kernel saves nothing over full attention;
    only larger strides leave tiles empty. Decoding keeps the full KV cache: the summary columns
    of later queries reach every earlier position.
    """

    description = "Sparse Transformer strided attention: local band + every stride-th key, O(T sqrt(T) d)"
    family = "sparse"
    bench_options = {"stride": 128}  # ~sqrt(T) at the benchmark's 16k: the O(T sqrt(T)) regime

    @dataclass(frozen=True)
    class Options:
        stride: int = option(64, 3, *range(1, 8))  # ~sqrt(T): O(T sqrt(T)); FlexAttention skips tiles from 256
        dilation: int = option(1, 1, 2, 3)

    @classmethod
    def covering_option(cls, config):
        # With dilation 1 the local band is the stride latest tokens; dilated bands leave gaps.
        return "stride" if config.options.dilation == 1 else None

    def build_pattern(self):
        return StridedPattern(causal=self.config.causal, stride=self.options.stride, dilation=self.options.dilation)


@register("longformer")
class LongformerAttention(_BoundedLookbackAttention):
    """Longformer attention (Beltagy et al., 2020, "Longformer: The Long-Document Transformer"):
    a sliding window of ``window_size`` plus ``num_global_tokens`` global tokens, here the first
    tokens of the sequence (the paper picks them per task, e.g. ``[CLS]``). Every query sees the
    global tokens and the global tokens see every key; in the causal form a global token, being at
    the start, sees only the keys before it, so there "global" means "visible from everywhere".

    Time ``O(T (w + g) d)`` (plus ``O(g T d)`` for the global rows when non-causal). Decoding keeps
    the ``g`` global tokens and a ring buffer of the ``w`` latest ones: ``O((g + w) d)`` per head.
    """

    description = "Longformer: sliding window + global tokens at the start, O(T (w + g) d), bounded cache"
    bench_options = {"window_size": 1024}  # local's window, so the global tokens' cost shows

    @dataclass(frozen=True)
    class Options:
        window_size: int = option(64, 5, *range(1, 13))
        num_global_tokens: int = option(1, 2, 1, 3)

    def build_pattern(self):
        return LongformerPattern(causal=self.config.causal, window=self.options.window_size,
                                 num_global=self.options.num_global_tokens)

    def cache_span(self):
        return self.options.window_size, self.options.num_global_tokens


@register("bigbird")
class BigBirdAttention(SoftmaxAttention):
    """BigBird attention (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences"):
    Longformer's sliding window and global tokens plus ``num_random_blocks`` random key blocks per
    query block (blocks of ``sparse_block`` tokens; causal: chosen among earlier blocks).

    The random layout is drawn once, from ``layout_seed``, for ``ceil(max_seq_len / sparse_block)`` blocks
    and registered as the buffer ``random_layout``, so it is part of the checkpoint (a loaded
    layout replaces the drawn one). Layers built from the same config share a layout; give layers
    different seeds for different ones. A sequence longer than the layout covers is an error
    rather than a silent reuse of the last block's row: build the layer with a larger
    ``max_seq_len`` instead.

    Time ``O(T (w + g + r b) d)``. Decoding keeps the full KV cache (``O(T d)`` per head): the random
    blocks of later query blocks can point at any earlier block, so no key can be dropped early.
    """

    description = "BigBird: sliding window + global tokens + seeded random key blocks, O(T (w + g + r b) d)"
    family = "sparse"
    renamed_options = {"block_size": "sparse_block", "seed": "layout_seed"}
    bench_options = {"window_size": 1024, "sparse_block": 128}  # longformer's window, block_sparse's tiles

    @dataclass(frozen=True)
    class Options:
        window_size: int = option(32, 5, *range(1, 13))
        num_global_tokens: int = option(1, 2, 1, 3)
        num_random_blocks: int = option(2, 1, 2, 3)
        sparse_block: int = option(16, 4, *range(1, 10))
        #: Seed of the random block layout (a private generator: the same layout on every machine).
        layout_seed: int = option(0, 0, 1, 1000, minimum=0)

    @classmethod
    def covering_option(cls, config):
        return "window_size"

    def __init__(self, config, dims):
        super().__init__(config, dims)  # build_pattern() draws the layout
        self.register_buffer("random_layout", self.pattern.random_layout)

    def build_pattern(self):
        o = self.options
        layout = bigbird_layout(math.ceil(self.dims.max_seq_len / o.sparse_block), o.num_random_blocks,
                                self.config.causal, o.layout_seed)
        return BigBirdPattern(causal=self.config.causal, window=o.window_size, num_global=o.num_global_tokens,
                              block=o.sparse_block, random_layout=layout)

    @property
    def covered_len(self) -> int:
        """Longest sequence the random layout covers (``max_seq_len`` rounded up to whole blocks)."""
        return self.random_layout.shape[0] * self.options.sparse_block

    def check_length(self, end: int) -> None:
        if end > self.covered_len:
            raise ValueError(
                f"bigbird's random block layout covers {self.covered_len} positions (drawn for "
                f"max_seq_len={self.dims.max_seq_len}, sparse_block={self.options.sparse_block}) but this call "
                f"reaches position {end - 1}; build the layer with a larger max_seq_len (GPT: context_len)"
            )

    # The pattern must read the *current* buffer: ``.to()`` replaces it, loading a checkpoint may
    # overwrite or replace it, and block masks built from the old layout must then be dropped.
    def _reattach_layout(self) -> None:
        self.pattern = dataclasses.replace(self.pattern, random_layout=self.random_layout)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._reattach_layout()
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._reattach_layout()
