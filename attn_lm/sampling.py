"""Autoregressive decoding: from next-token logits to tokens, and feeding a GPT one token at a time.

* :func:`sample_next` picks the next token: greedy ``argmax`` at ``temperature = 0``, otherwise a
  draw from ``softmax(logits / temperature)`` restricted by :func:`filter_logits` to the ``top_k``
  most likely tokens (Fan et al., 2018) and/or to the nucleus, the smallest set whose probability
  reaches ``top_p`` (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration").
* :class:`Decoder` holds what one generation needs: the tokens so far, the model's context window
  and, with ``use_cache``, one decoding cache per layer (``GPT.new_caches``). The prompt is
  *prefilled* in one forward; each later *step* feeds only the newest token, so a step costs what
  the mechanism's cache costs (``O(context)`` for a KV cache, ``O(1)`` for a recurrent state)
  instead of a forward over the whole context. ``use_cache=False`` re-runs the whole window every
  step: the slow, obviously correct baseline the cached path is tested against.

The context window: the model conditions on at most the last ``max_context`` tokens (default
``block_size``, the training length). ``max_context > block_size`` lets a model whose positions
extrapolate (see :mod:`attn_lm.positions`) read longer contexts; learned positions cannot.
When a cache already holds ``max_context`` tokens, the next token pushes the oldest one out of the
window. Cached keys/values (or recurrent sums) of the tokens that stay were computed with the
dropped token in their context, so the cache cannot be trimmed: it is rebuilt by prefilling the
last ``max_context`` tokens into fresh caches. From then on every step is one full forward over
the window -- the same cost and the same tokens as ``use_cache=False``; exact, not fast.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import Tensor, nn


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Reject sampling settings that have no meaning, with the valid range."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy argmax), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (no top-k filter), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None (no nucleus filter), got {top_p}")


def filter_logits(logits: Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> Tensor:
    """Set to ``-inf`` the logits ``[..., V]`` of tokens outside the ``top_k`` largest (ties at the
    ``k``-th value are kept) and outside the nucleus: the most likely tokens whose probabilities
    sum to ``>= top_p``. The most likely token always survives."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # A token is outside the nucleus when the more likely tokens already reach top_p.
        outside_sorted = probs.cumsum(dim=-1) - probs >= top_p
        outside = torch.empty_like(outside_sorted).scatter_(-1, order, outside_sorted)
        logits = logits.masked_fill(outside, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Next token ids ``[B, 1]`` from the logits ``[B, V]`` of the last position."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def context_window(model: nn.Module, max_context: Optional[int] = None) -> int:
    """How many of the latest tokens ``model`` conditions on: ``max_context``, default ``block_size``."""
    block_size, position = model.config.block_size, model.config.position
    window = block_size if max_context is None else max_context
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"max_context must be a positive number of tokens or None (= block_size), got {max_context!r}")
    if position == "learned" and window > block_size:
        raise ValueError(
            f"max_context={window} is longer than block_size={block_size}, and learned positions are not "
            f"defined past it; use max_context <= {block_size} or a model trained with position=alibi/rope/xpos/none"
        )
    return window


class Decoder:
    """One generation with a GPT: the tokens so far, the context window and the caches.

    ``max_len``: how many tokens (prompt + generated) the caller will feed at most; caches are
    allocated for ``min(max_len, max_context)`` positions. ``max_context``: tokens the model
    conditions on (default: the model's ``block_size``).
    """

    def __init__(self, model: nn.Module, max_len: int, use_cache: bool = True, max_context: Optional[int] = None):
        window = context_window(model, max_context)
        self.model, self.use_cache, self.window = model, use_cache, window
        self.capacity = min(max_len, window)
        self.caches: list = []
        self.tokens: Optional[Tensor] = None

    @torch.no_grad()
    def prefill(self, idx: Tensor) -> Tensor:
        """Start from the prompt ``idx [B, T]`` (``T >= 1``); returns the next-token logits ``[B, V]``."""
        if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype != torch.long:
            raise ValueError(f"expected a non-empty prompt of token ids, int64 [B, T >= 1]; got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        self.tokens = idx
        return self._prefill_window()

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """Append ``token [B, 1]`` and return the logits ``[B, V]`` for the token after it."""
        if self.tokens is None:
            raise RuntimeError("Decoder.step() before prefill(): give the prompt first")
        self.tokens = torch.cat([self.tokens, token], dim=1)
        if self.use_cache and self.caches[0].length < self.capacity:
            return self.model(token, caches=self.caches)[:, -1]
        # No cache: re-run the window. Full cache: the window moves (or more than max_len tokens
        # came); rebuild the caches from the window (module docstring).
        self.capacity = self.window
        return self._prefill_window()

    def _prefill_window(self) -> Tensor:
        context = self.tokens[:, -self.window:]
        if not self.use_cache:
            return self.model(context)[:, -1]
        self.caches = self.model.new_caches(context.shape[0], max(self.capacity, context.shape[1]))
        return self.model(context, caches=self.caches)[:, -1]

    def cache_nbytes(self) -> int:
        """Bytes held by the decoding caches of all layers (0 without caches)."""
        return sum(cache.nbytes() for cache in self.caches)

    def stream(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Iterator[Tensor]:
        """Yield ``max_new_tokens`` sampled tokens ``[B, 1]`` one at a time, continuing ``idx``.

        The model runs in eval mode (no dropout) while the generator is alive; its previous mode
        is restored when the generator finishes or is closed.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.prefill(idx) if max_new_tokens else None
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)
                yield token
                if i + 1 < max_new_tokens:
                    logits = self.step(token)
        finally:
            self.model.train(was_training)
