"""Every attention pattern of the library, defined once.

A pattern is a predicate ``allowed(q_pos, kv_pos)`` on *absolute* token positions, written with
tensor operations only, so the same code serves three uses:

* :meth:`MaskPattern.dense` evaluates it on broadcast position vectors and returns a boolean
  ``[Tq, S]`` mask (the CPU / reference path, and decoding with a cache whose key slots have
  arbitrary positions, e.g. a ring buffer, where an empty slot has position ``-1``);
* :attr:`MaskPattern.mask_mod` is a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``;
* :meth:`MaskPattern.block_mask` builds (once per length and device, then cached) the
  FlexAttention ``BlockMask`` that lets the fused kernel skip empty tiles, so a pattern of density
  ``d`` costs about ``d`` of full attention. No dense ``T x T`` mask is built on that path.

``True`` means "may attend". Causality is part of every pattern (``causal=True`` intersects the
pattern with ``kv_pos <= q_pos``), so no mechanism can forget it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor


@dataclass(eq=False)
class MaskPattern:
    """Base pattern: full attention (causal or not)."""

    causal: bool = True
    _block_masks: dict = field(default_factory=dict, init=False, repr=False)
    _densities: dict = field(default_factory=dict, init=False, repr=False)

    #: ``True`` when the pattern is exactly "causal" or exactly "everything" (SDPA's own flags).
    @property
    def is_full(self) -> bool:
        return type(self) is MaskPattern

    def allowed(self, q: Tensor, kv: Tensor) -> Tensor:
        """Pattern without the causal constraint; subclasses override."""
        return torch.ones_like(q - kv, dtype=torch.bool)

    def __call__(self, q: Tensor, kv: Tensor) -> Tensor:
        ok = kv >= 0
        if self.causal:
            ok = ok & (kv <= q)
        # The full pattern allows everything: skipping it saves ops in every decoding step.
        return ok if self.is_full else ok & self.allowed(q, kv)

    def dense(self, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        """Boolean ``[..., Tq, S]`` mask for query positions ``q_pos [..., Tq]`` and key positions
        ``kv_pos [..., S]`` (leading dims broadcast: per-row positions when decoding a batch)."""
        q, kv = q_pos[..., :, None], kv_pos[..., None, :]
        return self(q, kv).expand(torch.broadcast_shapes(q.shape, kv.shape))

    @property
    def mask_mod(self):
        """This pattern as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``. A plain 4-argument
        function, not a method: FlexAttention tells a mask_mod from a score_mod by counting
        positional arguments, and a bound method's code counts ``self`` too."""

        def mask_mod(b, h, q_idx, kv_idx):
            return self(q_idx, kv_idx)

        return mask_mod

    def block_mask(self, q_len: int, kv_len: int, device: torch.device | str):
        """FlexAttention ``BlockMask`` for a full (non-cached) forward, cached per shape/device."""
        key = (q_len, kv_len, str(device))
        if key not in self._block_masks:
            from torch.nn.attention.flex_attention import create_block_mask

            self._block_masks[key] = create_block_mask(
                self.mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device
            )
        return self._block_masks[key]

    def density(self, seq_len: int, device: torch.device | str = "cpu") -> float:
        """Exact fraction of the ``T x T`` score matrix this pattern allows (causal full =
        ``(T + 1) / 2T``), counted in row chunks of ~16M entries (never one ``T x T`` tensor) and
        cached per length."""
        if seq_len not in self._densities:
            pos = torch.arange(seq_len, device=device)
            rows = max(1, 2**24 // seq_len)
            allowed = sum(int(self.dense(pos[a:a + rows], pos).sum()) for a in range(0, seq_len, rows))
            self._densities[seq_len] = allowed / seq_len**2
        return self._densities[seq_len]


@dataclass(eq=False)
class SlidingWindowPattern(MaskPattern):
    """Sliding window ("local" attention): query ``i`` sees key ``j`` when ``|i - j| < window``.

    Causal: the ``window`` most recent keys including itself, ``i - window < j <= i``.
    Non-causal: ``window - 1`` keys on either side, so ``2 * window - 1`` keys in all.
    """

    window: int = 256

    def allowed(self, q, kv):
        return (q - kv).abs() < self.window


@dataclass(eq=False)
class SinkPattern(SlidingWindowPattern):
    """Sliding window plus ``num_sink`` attention sinks (Xiao et al., 2023, "Efficient Streaming
    Language Models with Attention Sinks"): the first ``num_sink`` tokens are visible from every
    query, the rest only inside the window. Causal, this is :class:`LongformerPattern`; unlike
    it, a sink query does not see every key when non-causal (sinks receive, they do not gather)."""

    num_sink: int = 4

    def allowed(self, q, kv):
        return super().allowed(q, kv) | (kv < self.num_sink)


@dataclass(eq=False)
class BlockPattern(MaskPattern):
    """Block-sparse layout: tokens are grouped in blocks of ``block`` tokens; query block ``i``
    sees key blocks ``i + o`` for every offset ``o`` in ``offsets`` (``(0,)`` = block-diagonal,
    ``(0, -1)`` = own block plus the previous one). Causal: within the own block only earlier keys.
    """

    block: int = 64
    offsets: tuple[int, ...] = (0,)

    def allowed(self, q, kv):
        rel = kv // self.block - q // self.block
        ok = rel == self.offsets[0]
        for o in self.offsets[1:]:
            ok = ok | (rel == o)
        return ok


@dataclass(eq=False)
class StridedPattern(MaskPattern):
    """Strided pattern of the Sparse Transformer (Child et al., 2019, "Generating Long Sequences
    with Sparse Transformers"), both of its heads' sets in one mask.

    Query ``i`` sees key ``j`` (distance ``d = |i - j|``) when

    * ``d < stride * dilation`` and ``d % dilation == 0``: a local band of ``stride`` keys taken
      every ``dilation`` positions (``dilation=1``: the ``stride`` nearest keys, as in the paper);
    * or ``d % stride == 0``: "summary" keys every ``stride`` positions, reaching arbitrarily far.

    With ``dilation=1`` (more generally ``gcd(stride, dilation) == 1``) every earlier key is
    reachable in two hops: a local step to the key's residue mod ``stride``, then summary steps.
    """

    stride: int = 64
    dilation: int = 1

    def allowed(self, q, kv):
        dist = (q - kv).abs()
        local = (dist < self.stride * self.dilation) & (dist % self.dilation == 0)
        return local | (dist % self.stride == 0)


@dataclass(eq=False)
class LongformerPattern(SlidingWindowPattern):
    """Sliding window plus ``num_global`` global tokens at the start of the sequence
    (Beltagy et al., 2020, "Longformer: The Long-Document Transformer"): every query sees the
    global tokens and global tokens see every key. In the causal form a global query still sees
    only earlier keys, so there "global" means "visible from everywhere"."""

    num_global: int = 1

    def allowed(self, q, kv):
        return super().allowed(q, kv) | (kv < self.num_global) | (q < self.num_global)


@dataclass(eq=False)
class BigBirdPattern(LongformerPattern):
    """Sliding window + global tokens + random key blocks (Zaheer et al., 2020, "Big Bird:
    Transformers for Longer Sequences").

    ``random_layout`` is a boolean ``[n_blocks, n_blocks]`` table over blocks of ``block`` tokens:
    query block ``i`` also sees every key of block ``j`` where it is ``True``. It is drawn once
    (seeded) by :func:`bigbird_layout` and owned by the layer as a buffer, so the pattern is fixed
    per layer and saved in checkpoints. Block indices are clamped into the table only so that
    the lookup stays in bounds for positions the pattern masks anyway (empty cache slots at
    ``-1``, padding of fused-kernel tiles); the layer rejects sequences longer than the table.
    """

    block: int = 64
    random_layout: Optional[Tensor] = None

    def allowed(self, q, kv):
        ok = super().allowed(q, kv)
        if self.random_layout is not None:
            layout = self.random_layout.to(q.device)
            n = layout.shape[0]
            qb = (q // self.block).clamp(0, n - 1)
            kb = (kv // self.block).clamp(0, n - 1)
            ok = ok | layout[qb, kb]
        return ok


def bigbird_layout(n_blocks: int, num_random: int, causal: bool, seed: int) -> Tensor:
    """Draw BigBird's random block layout: for each query block, ``num_random`` other key blocks
    chosen uniformly without replacement (earlier blocks only when causal; all of them when fewer
    are available), reproducibly from ``seed`` (a private CPU generator, so the global RNG is
    untouched and the result is the same on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    blocks = torch.arange(n_blocks)
    for i in range(n_blocks):
        candidates = blocks[:i] if causal else blocks[blocks != i]
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:num_random]]
        layout[i, pick] = True
    return layout


def combine_custom_mask(allowed: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """Merge a pattern's boolean mask with a user mask into one additive float bias.

    ``mask`` may be boolean (``True`` = may attend) or additive float (``0`` / ``-inf`` or any
    bias), broadcastable to ``[B, H, Tq, S]``. Returns an additive bias of ``dtype``.
    """
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.to(dtype)


def validate_custom_mask(mask: Optional[Tensor], batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """Raise a clear error if a user mask cannot broadcast to ``[B, H, Tq, S]``."""
    if mask is None:
        return
    target = (batch, heads, q_len, kv_len)
    try:
        torch.broadcast_shapes(tuple(mask.shape), target)
    except RuntimeError:
        raise ValueError(
            f"custom attention mask of shape {tuple(mask.shape)} does not broadcast to [B, H, T, S] = {list(target)}"
        ) from None
    if mask.dim() > 4:
        raise ValueError(f"custom attention mask must have at most 4 dims, got shape {tuple(mask.shape)}")
