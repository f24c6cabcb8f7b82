"""Every positional encoding of the library.

Two kinds:

* **embedding-level** (added to the token embedding once, in :class:`attn_lm.model.GPT`):
  ``learned`` absolute positions (GPT-2) and fixed ``sinusoidal`` ones (Vaswani et al., 2017);
* **attention-level** (inside every layer, so they survive KV caching and work at any offset):
  ``rope`` rotary embeddings (Su et al., 2021, "RoFormer"), ``xpos`` (Sun et al., 2022,
  "A Length-Extrapolatable Transformer": RoPE with a per-dimension exponential decay so that
  ``q_n . k_m`` is scaled by ``zeta^((n - m) / scale_base)``), and ``alibi`` (Press et al., 2022,
  "Train Short, Test Long": a per-head linear bias ``-slope_h * (n - m)`` on the scores).

``GPTConfig.position = "none"`` uses no encoding at all (NoPE): a causal mask alone already lets
a model infer positions (Haviv et al., 2022; Kazemnejad et al., 2023).

All attention-level encodings take *absolute* positions as tensors, so a cached decoding step
at position ``p`` gets exactly the rotation / bias the full forward gives to token ``p``.

Length extrapolation (running a model on sequences longer than the ``context_len`` it was trained
on; ``tests/test_positions.py`` runs every scheme at twice the training length):

* ``learned``: a table of ``context_len`` vectors, undefined past it -> ``ValueError``. Generation
  keeps such a model inside its window by conditioning on the last ``context_len`` tokens.
* ``sinusoidal``: defined at every position, but the model never saw the vectors past
  ``context_len``; quality typically collapses right after the training length (Press et al.).
* ``rope``: runs at any length and scores depend on ``n - m`` only, but distances longer than any
  seen in training rotate pairs to unseen angles; perplexity degrades past ``context_len``.
* ``xpos``: RoPE plus a decay that damps the far, unseen distances; extrapolates better than
  ``rope``. The decay is folded into queries (``zeta^(n/scale_base)``) and keys
  (``zeta^(-m/scale_base)``) at absolute positions, so the factors leave the float32 range past
  about ``70 * scale_base`` positions (~36k for ``scale_base=512``; ~8 * scale_base in float16).
* ``alibi``: extrapolates best of these (Press et al., 2022): far keys are penalised linearly
  whatever the distance, so unseen distances behave like long seen ones.
* ``none``: runs at any length; extrapolation is typically between ``rope`` and ``alibi``.

The attention mechanism can bound the length too, whatever the encoding: ``bigbird`` draws its
random layout and ``cosformer`` its ``cos`` re-weighting horizon for ``max_seq_len`` (=
``context_len``), and both raise a clear error past it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn


class LearnedPositionalEmbedding(nn.Embedding):
    """Absolute learned positions (GPT-2). Defined for positions ``< max_len`` only."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__(max_len, d_model)
        self.max_len = max_len

    def check_range(self, end: int) -> None:
        """Raise unless positions ``0 .. end - 1`` are defined. Takes a Python int, so the check
        costs no device synchronisation (the model knows its offsets on the host)."""
        if end > self.max_len:
            raise ValueError(
                f"learned positions are defined up to {self.max_len - 1} (context_len={self.max_len}), got position "
                f"{end - 1}; feed at most the last {self.max_len} tokens, or train with "
                "position=alibi/rope/xpos/none to run past the training length"
            )


def inverse_frequencies(dim: int, base: float) -> Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. ceil(dim/2) - 1``: the frequencies of the sinusoidal
    embedding (``base = 10000``) and of RoPE's channel pairs."""
    return base ** -(torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of ``position * frequency`` (and ``slope * distance``): at least float32, since
    bf16/fp16 cannot even represent every integer past 256/2048."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SinusoidalPositionalEmbedding(nn.Module):
    """Fixed sin/cos absolute positions (Vaswani et al., 2017); defined at any position.

    ``PE[p, 2i] = sin(p / 10000^(2i/d))`` and ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``. The result
    has the dtype the module was cast to (``.double()``, ``.to(torch.bfloat16)``); the angles are
    computed in at least float32 whatever that dtype.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(d_model, 10000.0).float(), persistent=False)
        self.d_model = d_model

    def forward(self, positions: Tensor) -> Tensor:
        compute = _compute_dtype(self.inv_freq.dtype)
        angles = positions.to(compute)[..., None] * self.inv_freq.to(compute)
        interleaved = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return interleaved[:, : self.d_model].to(self.inv_freq.dtype)


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rot_dim`` channels of each head.

    Channel pairs ``(i, i + rot_dim/2)`` of a query/key at position ``p`` are rotated by the angle
    ``p * base^(-2i/rot_dim)`` ("rotate-half" layout, as GPT-NeoX). The dot product of a rotated
    query at ``n`` and key at ``m`` then depends on ``n - m`` only. ``fraction < 1`` leaves the
    remaining channels unrotated (partial rotary, GPT-J / NeoX). Time ``O(T d)``, no parameters.

    With ``xpos_scale_base`` set this becomes xPos: each rotated pair is additionally scaled by
    ``zeta_i^(p / scale_base)`` for queries and ``zeta_i^(-p / scale_base)`` for keys, where
    ``zeta_i = (2i/rot_dim + 0.4) / 1.4 < 1``, so the score decays as ``zeta^((n - m)/scale_base)``
    with distance ``n - m >= 0``. That is a decay only for causal attention (keys never lie after
    the query), which is why xPos is restricted to causal layers.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, fraction: float = 1.0,
                 xpos_scale_base: Optional[float] = None):
        super().__init__()
        rot_dim = int(head_dim * fraction) // 2 * 2
        if rot_dim < 2:
            raise ValueError(f"rope_fraction={fraction} of head_dim={head_dim} leaves fewer than 2 rotated channels")
        self.rot_dim = rot_dim
        self.register_buffer("inv_freq", inverse_frequencies(rot_dim, base).float(), persistent=False)
        self.xpos_scale_base = xpos_scale_base
        if xpos_scale_base is not None:
            half = torch.arange(0, rot_dim, 2).float() / rot_dim
            self.register_buffer("zeta", (half + 0.4) / 1.4, persistent=False)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim:]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return torch.cat((rotated, rest), dim=-1)

    def forward(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate ``q [.., Tq, D]`` at positions ``q_pos [Tq]`` and ``k [.., S, D]`` at ``k_pos [S]``
        (or per-row positions ``[B, 1, T]``, broadcast over heads)."""
        q_cos, q_sin = self._angles(q_pos, q.dtype)
        k_cos, k_sin = self._angles(k_pos, k.dtype)
        if self.xpos_scale_base is not None:
            q_scale, k_scale = self.xpos_scales(q_pos, q.dtype), 1.0 / self.xpos_scales(k_pos, k.dtype)
            q_cos, q_sin, k_cos, k_sin = q_cos * q_scale, q_sin * q_scale, k_cos * k_scale, k_sin * k_scale
        return self._rotate(q, q_cos, q_sin), self._rotate(k, k_cos, k_sin)

    def _angles(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        compute = _compute_dtype(dtype)
        angles = pos.to(compute)[..., None] * self.inv_freq.to(compute)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def xpos_scales(self, pos: Tensor, dtype: torch.dtype) -> Tensor:
        """``zeta^(pos / scale_base)`` per rotated pair, shape ``[len(pos), rot_dim/2]``."""
        exponent = pos.to(_compute_dtype(dtype))[..., None] / self.xpos_scale_base
        return (self.zeta.to(exponent) ** exponent).to(dtype)


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al., 2022): the geometric sequence ``2^(-8 i / n)``,
    ``i = 1..n`` for a power-of-two ``n``; otherwise the slopes of the next-lower power of two
    followed by every other slope of the next-higher one (the paper's recipe)."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes)


class ALiBi(nn.Module):
    """Per-head linear distance bias ``-slope_h * |n - m|`` added to attention scores.

    Time ``O(T S)`` to materialise on the reference path; on the fused path it is a FlexAttention
    ``score_mod`` (no tensor is built). Only defined for mechanisms that form softmax scores.
    """

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def bias(self, q_pos: Tensor, k_pos: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive bias ``[H, Tq, S]`` (products in at least float32, then cast to ``dtype``);
        ``[B, H, Tq, S]`` for per-row positions ``[B, 1, Tq]``."""
        compute = _compute_dtype(dtype)
        dist = (q_pos[..., :, None] - k_pos[..., None, :]).abs().to(compute)
        return (-self.slopes.to(compute)[:, None, None] * dist).to(dtype)

    def score_mod(self):
        """FlexAttention ``score_mod`` adding the same bias inside the fused kernel."""
        slopes = self.slopes

        def alibi_score(score, b, h, q_idx, kv_idx):  # noqa: ARG001 - FlexAttention's signature
            return score - slopes[h] * (q_idx - kv_idx).abs()

        return alibi_score
