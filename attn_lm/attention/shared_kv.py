"""Shared-KV family: exact softmax attention in which groups of query heads share one key/value
head.

With ``H`` query heads and ``Hkv`` key/value heads (``Hkv`` divides ``H``), query head ``h`` reads
key/value head ``h // (H / Hkv)``. The scores are computed exactly as in multi-head attention, so
time stays ``O(T^2 d)``; what shrinks is the K/V projection (``2 d Hkv D`` instead of ``2 d H D``
weights) and, above all, the KV cache and the memory traffic of decoding, by ``H / Hkv``. The
fused SDPA / FlexAttention calls broadcast the shared heads (``enable_gqa=True``) instead of
materialising ``H`` copies; only the explicit reference path repeats them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import SoftmaxAttention
from .config import NoOptions, option
from .factory import register


@register("gqa")
class GroupedQueryAttention(SoftmaxAttention):
    """Grouped-query attention (Ainslie et al., 2023, "GQA: Training Generalized Multi-Query
    Transformer Models from Multi-Head Checkpoints"): ``n_kv_heads`` key/value heads, each shared
    by ``n_heads / n_kv_heads`` query heads. ``n_kv_heads = n_heads`` is multi-head attention and
    ``n_kv_heads = 1`` is multi-query attention; values in between trade quality for cache size.

    Time ``O(T^2 d)`` as full attention; KV cache ``O(T n_kv_heads D)`` per layer.
    """

    description = "grouped-query attention: n_kv_heads key/value heads shared by groups of query heads"
    family = "shared_kv"
    bench_options = {"n_kv_heads": 4}  # groups of 4 query heads at the benchmark's 16 heads

    @dataclass(frozen=True)
    class Options:
        n_kv_heads: int = option(2, 2, 1, 4)  # must divide the model's n_heads

    @classmethod
    def num_kv_heads(cls, config) -> int:
        return config.options.n_kv_heads

    @classmethod
    def validate_options(cls, config, dims):
        n_kv = cls.num_kv_heads(config)
        if dims is not None and dims.n_heads % n_kv != 0:
            valid = [d for d in range(1, dims.n_heads + 1) if dims.n_heads % d == 0]
            raise ValueError(
                f"{cls.name} needs n_kv_heads to divide n_heads (each key/value head serves an equal group "
                f"of query heads), got n_kv_heads={n_kv}, n_heads={dims.n_heads}; valid n_kv_heads: {valid}"
            )

    def kv_heads(self, config, dims):
        return self.num_kv_heads(config)


@register("mqa")
class MultiQueryAttention(GroupedQueryAttention):
    """Multi-query attention (Shazeer, 2019, "Fast Transformer Decoding: One Write-Head is All You
    Need"): every query head shares a single key/value head, i.e. grouped-query attention with
    ``n_kv_heads = 1`` (use ``gqa`` to choose another number). The KV cache is ``n_heads`` times
    smaller than multi-head attention's.

    Time ``O(T^2 d)``; KV cache ``O(T D)`` per layer.
    """

    description = "multi-query attention: all query heads share one key/value head (gqa with n_kv_heads=1)"
    Options = NoOptions
    bench_options = {}  # n_kv_heads is fixed at 1

    @classmethod
    def num_kv_heads(cls, config) -> int:
        return 1
