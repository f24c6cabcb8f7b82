"""What every attention mechanism shares: projections, heads, positions, masks and caching.

A mechanism subclasses :class:`Attention` (or :class:`SoftmaxAttention` for the exact ones, which
then only describe their mask pattern) and implements up to four methods on head-split tensors
``q [B, H, T, D]``, ``k, v [B, Hkv, S, D]`` with absolute positions ``q_pos [T]``, ``kv_pos [S]``:

* ``attend``            — the full-sequence fast path (fused kernels where they exist);
* ``attend_reference``  — the explicit, readable form the fast path is tested against;
* ``new_cache`` / ``attend_cached`` — incremental decoding with the family's own cache.

``forward(x, context=None, mask=None, cache=None)`` does the rest: one fused QKV projection
(keys/values with ``n_kv_heads`` heads), RoPE/xPos rotation at absolute positions, the output
projection and residual dropout.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import KVCache, LayerCache
from ..config import AttentionConfig
from ..positions import ALiBi, Rotary
from .functional import reference_attention, softmax_attention
from .masks import MaskPattern, combine_custom_mask, validate_custom_mask


class Attention(nn.Module):
    """Base class of every mechanism. Subclasses set the class attributes below."""

    name: ClassVar[str] = "?"
    family: ClassVar[str] = "?"
    description: ClassVar[str] = ""
    #: Options this mechanism accepts, with their defaults (see ``AttentionConfig``).
    options: ClassVar[dict[str, Any]] = {}
    #: Equals dense softmax attention under its mask pattern (tested against the reference).
    exact: ClassVar[bool] = True
    #: Why ALiBi is impossible here (``None`` = supported).
    alibi_unsupported: ClassVar[Optional[str]] = None
    #: Why a non-causal form is impossible here (``None`` = supported).
    noncausal_unsupported: ClassVar[Optional[str]] = None
    #: Queries from ``x``, keys/values from ``context`` (cross-attention).
    uses_context: ClassVar[bool] = False

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.n_kv_heads = self.kv_heads(config)
        self.head_dim = config.head_dim
        width = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.d_model, width, bias=config.bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, config.d_model, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
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
    def check_config(cls, config: AttentionConfig) -> None:
        """Reject options that do not apply and combinations the mechanism cannot compute."""
        from .factory import AttentionFactory  # registry lookup for a helpful message

        for option, value in config.set_options().items():
            if option not in cls.options:
                users = [n for n in AttentionFactory.names() if option in AttentionFactory.get_class(n).options]
                raise ValueError(
                    f"option {option}={value!r} does not apply to attention_type {cls.name!r} "
                    f"(it accepts {sorted(cls.options) or 'no mechanism options'}); "
                    f"{option} is used by: {', '.join(users) or 'no mechanism'}"
                )
        if config.position == "alibi" and cls.alibi_unsupported:
            raise ValueError(f"position='alibi' is not supported by attention_type {cls.name!r}: {cls.alibi_unsupported}")
        if not config.causal and cls.noncausal_unsupported:
            raise ValueError(f"causal=False is not supported by attention_type {cls.name!r}: {cls.noncausal_unsupported}")
        if config.position == "xpos" and not config.causal:
            raise ValueError(
                "position='xpos' needs causal=True: its exponential decay is only a decay for keys that precede "
                "the query; use position='rope' for non-causal attention"
            )
        cls.validate_options(config)

    @classmethod
    def validate_options(cls, config: AttentionConfig) -> None:
        """Mechanism-specific value checks (sizes > 0, divisibility...). Default: positive ints."""
        for option in cls.options:
            value = getattr(config, option)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0 and option != "seed":
                raise ValueError(f"{option} must be a positive integer for attention_type {cls.name!r}, got {value}")

    def opt(self, name: str) -> Any:
        """The value of a declared option: the config's, else the mechanism's default."""
        return self.option_of(self.config, name)

    @classmethod
    def option_of(cls, config: AttentionConfig, name: str) -> Any:
        """``opt`` for a config, before any module is built."""
        value = getattr(config, name)
        return cls.options[name] if value is None else value

    @classmethod
    def covering_option(cls, config: AttentionConfig) -> Optional[str]:
        """The option (a window, block or chunk length) whose value, once it reaches the sequence
        length, leaves nothing out: the layer then computes plain full attention. ``None``: none."""
        return None

    @classmethod
    def covers_context(cls, config: AttentionConfig, context_len: int) -> Optional[str]:
        """Why this layer is plain full attention on sequences of ``context_len`` tokens (its
        pattern or chunk covers them all), or ``None``. Training warns; comparisons should refuse."""
        option = cls.covering_option(config)
        if option is None or cls.option_of(config, option) < context_len:
            return None
        return f"{cls.name}: {option} {cls.option_of(config, option)} ≥ context {context_len} — this is full attention"

    def kv_heads(self, config: AttentionConfig) -> int:
        """Number of key/value heads (``n_heads`` unless the mechanism shares them)."""
        return config.n_heads

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
                cache: Optional[LayerCache] = None) -> Tensor:
        """``x [B, T, d_model]`` -> ``[B, T, d_model]``.

        ``context [B, S, d_model]``: keys/values source (cross-attention only). ``mask``: boolean
        (``True`` = may attend) or additive float, broadcastable to ``[B, H, T, S]``; it is
        combined with the mechanism's own pattern. ``cache``: from :meth:`new_cache`, for
        incremental decoding (positions continue from ``cache.length``).
        """
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"expected x of shape [B, T, {self.config.d_model}], got {tuple(x.shape)}")
        if self.uses_context and context is None:
            raise ValueError(f"attention_type {self.name!r} needs a context tensor [B, S, d_model] for its keys/values")
        if context is not None and not self.uses_context:
            raise ValueError(
                f"attention_type {self.name!r} is self-attention and takes no context; use attention_type='cross'"
            )
        B, T, _ = x.shape
        q, k, v = self.project(x, context)
        # A causal cross layer reads an aligned stream (context position j is visible from query
        # i >= j), so it caches like self-attention; a non-causal one re-reads a fixed memory.
        cached = cache is not None and (context is None or self.config.causal)
        offset = cache.length if cached else 0
        q_pos = torch.arange(offset, offset + T, device=x.device)
        kv_pos = torch.arange(offset, offset + k.shape[2], device=x.device)
        if self.rotary is not None:
            q, k = self.rotary(q, k, q_pos, kv_pos)
        validate_custom_mask(mask, B, self.n_heads, T, offset + k.shape[2])
        if cached:
            y = self.attend_cached(q, k, v, q_pos, cache, mask)
        elif self.use_reference:
            y = self.attend_reference(q, k, v, q_pos, kv_pos, mask)
        else:
            y = self.attend(q, k, v, q_pos, kv_pos, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.out(y))

    @property
    def attn_dropout(self) -> float:
        return self.config.dropout if self.training else 0.0

    # ----------------------------------------------------------------- per-family hooks
    def attend(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor,
               mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def attend_reference(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor,
                         mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str) -> LayerCache:
        """A preallocated cache for decoding up to ``max_len`` tokens (default: full K/V)."""
        return KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)

    def attend_cached(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, cache: LayerCache,
                      mask: Optional[Tensor]) -> Tensor:
        raise NotImplementedError(f"attention_type {self.name!r} has no incremental decoding")


class SoftmaxAttention(Attention):
    """Exact softmax attention restricted by a :class:`MaskPattern`.

    Subclasses only override :meth:`build_pattern`; the fused dispatch, the dense reference and
    KV-cache decoding are shared.
    """

    family: ClassVar[str] = "softmax"

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        self.pattern = self.build_pattern()

    def build_pattern(self) -> MaskPattern:
        return MaskPattern(causal=self.config.causal)

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        return softmax_attention(q, k, v, self.pattern, q_pos, kv_pos, mask, self.alibi, self.attn_dropout,
                                 contiguous_positions=True)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        return reference_attention(q, k, v, bias=self.score_bias(q_pos, kv_pos, mask, q.dtype),
                                   dropout_p=self.attn_dropout, training=self.training)

    def score_bias(self, q_pos: Tensor, kv_pos: Tensor, mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """The pattern, the user mask and ALiBi as one additive bias (reference path)."""
        bias = combine_custom_mask(self.pattern.dense(q_pos, kv_pos), mask, dtype)
        return bias if self.alibi is None else bias + self.alibi.bias(q_pos, kv_pos, dtype)

    def attend_cached(self, q, k, v, q_pos, cache, mask):
        k_all, v_all, kv_pos = cache.append(k, v)
        return softmax_attention(q, k_all, v_all, self.pattern, q_pos, kv_pos, mask, self.alibi, self.attn_dropout)


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
