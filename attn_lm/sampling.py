"""From next-token logits to tokens, on the device: no host synchronisation per token.

:func:`sample_next` picks the next token: greedy ``argmax`` at ``temperature = 0``, otherwise a
draw from ``softmax(logits / temperature)`` restricted by :func:`filter_logits` to the ``top_k``
most likely tokens (Fan et al., 2018) and/or to the nucleus, the smallest set whose probability
reaches ``top_p`` (Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration").
Decoding loops live in :mod:`attn_lm.decoding`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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
    """Next token ids ``[B, 1]`` from the logits ``[B, V]`` of the last position.

    A draw is ``argmax(p / E)`` with ``E ~ Exponential(1)`` i.i.d. per token: token ``i`` wins
    with probability ``p_i`` (the exponential race), computed with elementwise ops and one
    argmax on the device, so nothing waits for the host (``torch.multinomial`` may).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)
