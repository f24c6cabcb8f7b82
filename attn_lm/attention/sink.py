"""Attention sinks: sliding-window attention that always keeps the first tokens (StreamingLLM;
Xiao et al., 2023, "Efficient Streaming Language Models with Attention Sinks").

Query ``i`` sees the ``window_size`` latest keys ``i - w < j <= i`` and the ``num_sink_tokens``
first keys ``j < n``: softmax needs somewhere to put attention that no recent key deserves, and
trained models put it on the first tokens; dropping them (plain sliding window) is what makes
window attention collapse past its cache. The output *is* softmax attention under
:class:`~attn_lm.attention.masks.SinkPattern` (``exact``): FlexAttention with the pattern's
``BlockMask`` on GPU, ``O(T (w + n) d)``; dense masked SDPA on CPU.

Streaming. Decoding keeps the ``n`` sinks and a ring buffer of the ``w`` latest tokens
(:class:`~attn_lm.cache.SlidingWindowCache`): ``O((n + w) d)`` memory and time per token however
long the text, so this layer accepts decoding caches for any number of positions, also past the
training length ``max_seq_len`` (``GPT.generate(..., max_context=N)`` with ``N > block_size``
streams at constant cache memory).

Positions past the training length (the rule). With RoPE/xPos, a window key is always less than
``w`` positions behind its query, a distance training saw. A sink key is not: at position
``p >= max_seq_len`` it would sit ``p - j`` back, a distance no training sequence had. StreamingLLM
gives tokens their positions *within the cache* for that reason, so no distance exceeds the
cache. Here a sink is seen from position ``min(p, max_seq_len - 1)``: distances to sinks are
capped at the longest one this layer was trained on, window distances stay exact. Inside the
training length (every training and evaluation forward) nothing changes, so the layer stays exact
softmax attention with its pattern and cached decoding equals the full forward; past it, only
the sinks' distance stops growing. Keys are cached already rotated at their absolute positions
(like every other cache), so a step rotates its ``n`` sink keys forward by the excess
``p - min(p, max_seq_len - 1)`` (rotations compose; xPos scales too), ``O(n d)`` per token. A full
(uncached) forward past ``max_seq_len`` with rotary positions is refused: it would need that
capped distance per query, which only the decoding path implements. ALiBi is not supported for
the same reason (its bias would need the same cap).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import cached_attention
from .config import option
from .factory import register
from .masks import SinkPattern
from .sparse import _BoundedLookbackAttention


@register("sink")
class SinkAttention(_BoundedLookbackAttention):
    """Sliding window of ``window_size`` plus ``num_sink_tokens`` attention sinks (the first
    tokens, visible from everywhere); streams past the training length at constant cache memory.
    Time ``O(T (w + n) d)`` on the fused path; cache ``O((w + n) d)`` per head."""

    description = "StreamingLLM: sliding window + first num_sink_tokens attention sinks, streams with a bounded cache"

    @dataclass(frozen=True)
    class Options:
        window_size: int = option(64, 5, *range(1, 13))
        num_sink_tokens: int = option(4, 2, 1, 3)

    alibi_unsupported = ("streaming caps the distance to the sink tokens past the training length, which is "
                         "implemented for RoPE/xPos rotations only; use position='rope' (or 'none')")

    def build_pattern(self):
        return SinkPattern(causal=self.config.causal, window=self.options.window_size,
                           num_sink=self.options.num_sink_tokens)

    def cache_span(self):
        return self.options.window_size, self.options.num_sink_tokens

    def check_length(self, end: int) -> None:
        if self.rotary is not None and end > self.dims.max_seq_len:
            raise ValueError(
                f"sink attention with rotary positions runs full forwards of at most max_seq_len="
                f"{self.dims.max_seq_len} tokens, got {end}: past it the distance to the sink tokens is capped, "
                "which only cached decoding implements; decode with a cache (it streams at constant memory)"
            )

    def new_cache(self, batch, max_len, dtype, device):
        return self.make_cache(batch, max_len, dtype, device)  # bounded: any number of positions streams

    def sink_keys(self, k, pos):
        """Cached sink keys (rotated at their positions) as seen from ``pos [b, 1, 1]``: rotated
        forward by the excess over the last trained position, so the query-sink distance is
        ``min(pos, max_seq_len - 1) - j`` (module docstring)."""
        if self.rotary is None:
            return k
        excess = pos - pos.clamp(max=self.dims.max_seq_len - 1)
        return self.rotary(k, k, excess, excess)[1]  # the second output is rotated (and xPos-scaled) as a key

    def attend_step(self, q, k, v, pos, cache, mask):
        if q.shape[2] > 1:  # each query sees the sinks from its own position: one token at a time
            return torch.cat([
                self.attend_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], pos[..., t:t + 1], cache,
                                 None if mask is None else mask[..., t:t + 1, :])
                for t in range(q.shape[2])], dim=2)
        cache.write(k, v, pos)  # replaces position pos - window, which this query does not see
        n = cache.num_global
        bias = self.step_bias(pos, cache.key_positions(), mask, q.dtype)
        parts = [(self.sink_keys(cache.k[:, :, :n], pos), cache.v[:, :, :n], bias[..., :n]),
                 (cache.k[:, :, n:], cache.v[:, :, n:], bias[..., n:])]
        return cached_attention(q, parts, mask is not None)
