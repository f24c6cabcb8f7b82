"""Multi-head Latent Attention (DeepSeek-AI, 2024, "DeepSeek-V2: A Strong, Economical, and
Efficient Mixture-of-Experts Language Model", section 2.1).

Keys and values of all heads come from one shared low-rank latent per token,
``c = RMSNorm(W_DKV x)`` of ``kv_rank`` channels: ``k_h^C = W_UK_h c`` (``n = qk_nope_dim``
channels per head, the paper's ``qk_nope_head_dim``; default ``D``) and ``v_h = W_UV_h c`` (``D``
channels). RoPE cannot be applied to ``k_h^C`` without breaking the low-rank structure, so
position is *decoupled*: each head's query has an extra ``rope_dim`` slice ``q_h^R`` and every
head shares one rotated key ``k^R = RoPE(W_KR x)`` of ``rope_dim`` channels. Scores:

    s_h(i, j) = (q_h^C . k_h^C(j) + q_h^R(i) . k^R(j)) / sqrt(n + rope_dim)

* training / prefill (``attend``): materialise ``K_h = [k^R, W_UK_h c]`` and ``V_h = W_UV_h c``
  and run fused SDPA (FlexAttention under a sparse pattern) -- ``O(T^2 (n + r + D))`` per head.
  Queries and keys are ``r + n`` wide and values ``D``: the paper's layout (``n = D``) makes the
  score products wider than multi-head attention's (at ``D = 128`` cuDNN took 1.40x ``full``'s
  time, benchmarks/RESULTS.md 2h); ``qk_nope_dim = D - rope_dim`` keeps q/k at ``D``;
* decoding (``attend_step``), *absorbed* form: the cache holds only ``[k^R | c]`` per token,
  ``rope_dim + kv_rank`` numbers for all heads together. ``q_h^C . W_UK_h c = (W_UK_h^T q_h^C) . c``,
  so a step folds ``W_UK`` into the query once and attends over the latent rows directly (all
  heads share them, like multi-query attention), then applies ``W_UV`` once to the attended
  latent: ``o_h = W_UV_h (sum_j p_j c_j)``. Nothing is up-projected per cached token.

Cache bytes per token per layer: ``(rope_dim + kv_rank) e`` against ``2 H D e`` for multi-head
attention, ``2 Hkv D e`` for GQA and ``2 D e`` for MQA. The paper also compresses the queries
(``q_lora_rank``, a training-memory saving); here queries come from a full projection.
``exact = False``: the output is softmax attention, but over keys/values that ``project`` does
not return (they are materialised from the latent inside ``attend``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cache import LayerCache
from ..positions import Rotary
from .base import SoftmaxAttention, cached_attention
from .config import option
from .factory import register
from .functional import reference_attention, softmax_attention


class LatentCache(LayerCache):
    """``[k^R | c]`` of positions ``0 .. max_len - 1``, ``[B, 1, max_len, rope_dim + kv_rank]``:
    one row per token shared by every head; position ``p`` in slot ``p``."""

    def __init__(self, batch: int, max_len: int, width: int, dtype: torch.dtype, device: torch.device | str):
        self.latent = torch.zeros(batch, 1, max_len, width, dtype=dtype, device=device)
        self.positions = torch.arange(max_len, device=device)

    def tensors(self) -> list[Tensor]:
        return [self.latent]

    def key_positions(self) -> Tensor:
        return self.positions.view(1, 1, -1)

    def prefill(self, k: Tensor, v: Tensor, lengths: Tensor) -> None:
        if k.shape[2] > self.latent.shape[2]:
            raise ValueError(f"latent cache holds {self.latent.shape[2]} positions; cannot prefill {k.shape[2]}")
        self.latent[:, :, : k.shape[2]] = k

    def write(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        self.latent.scatter_(2, pos[..., None].expand(k.shape[0], 1, pos.shape[-1], k.shape[-1]), k)


@register("mla")
class MultiHeadLatentAttention(SoftmaxAttention):
    """DeepSeek-V2 multi-head latent attention: K/V from a shared ``kv_rank`` latent, decoupled
    RoPE on a ``rope_dim`` slice; decodes in absorbed form from a cache of
    ``rope_dim + kv_rank`` numbers per token. Time ``O(T^2 (r + n + D))`` per head."""

    description = "DeepSeek-V2 multi-head latent attention: low-rank latent K/V + decoupled RoPE, tiny absorbed cache"
    family = "latent"
    exact = False
    projected_inputs = True  # queries of r + n channels, a latent row for keys
    cache_kind = "latent"
    uneven_heads = True  # scores over rope_dim + qk_nope_dim channels, values of D

    @dataclass(frozen=True)
    class Options:
        #: Channels of the shared key/value latent (the cache holds rope_dim + kv_rank per token).
        kv_rank: int = option(64, 12, 1, 4, 16)
        #: Channels of the decoupled rotary query/key slice (even).
        rope_dim: int = option(16, 4, 2, 6)
        #: Per-head channels of the position-free query/key part (DeepSeek-V2's qk_nope_head_dim);
        #: None = head_dim, the values' width. Queries and keys are rope_dim + qk_nope_dim wide.
        qk_nope_dim: Optional[int] = option(None, None, 4, 12)

    @classmethod
    def validate_options(cls, config, dims):
        if config.options.rope_dim % 2:
            raise ValueError(f"mla rope_dim must be even (RoPE rotates channel pairs), got {config.options.rope_dim}")
        if config.position in ("rope", "xpos") and config.rope_fraction != 1.0:
            raise ValueError("mla rotates exactly its rope_dim slice; set rope_dim instead of rope_fraction "
                             f"(got rope_fraction={config.rope_fraction})")

    def kv_heads(self, config, dims):
        return 1  # one latent row per token, shared by every head

    def __init__(self, config, dims):
        super().__init__(config, dims)
        H, D, d = self.n_heads, self.head_dim, dims.d_model
        self.rope_dim, self.kv_rank = self.options.rope_dim, self.options.kv_rank
        self.nope_dim = D if self.options.qk_nope_dim is None else self.options.qk_nope_dim
        # One fused projection: per-head queries [q^R | q^C], the shared rotary key and the latent.
        self.qkv = nn.Linear(d, H * (self.rope_dim + self.nope_dim) + self.rope_dim + self.kv_rank, bias=dims.bias)
        self.kv_norm = nn.Parameter(torch.ones(self.kv_rank))
        self.kv_up = nn.Linear(self.kv_rank, H * (self.nope_dim + D), bias=False)  # [W_UK; W_UV]
        if self.rotary is not None:  # rotate exactly the leading rope_dim channels of q and of the latent row
            self.rotary = Rotary(self.rope_dim, base=config.rope_base,
                                 xpos_scale_base=config.xpos_scale_base if config.position == "xpos" else None)

    def project(self, x, context):
        """``q [B, H, T, r + n]`` (rotary slice first) and the latent row ``[k^R | c]``
        ``[B, 1, T, r + kv_rank]``, returned as both keys and values (base.forward rotates its
        first ``r`` channels with the queries'; ``c`` is position-free)."""
        H, r = self.n_heads, self.rope_dim
        q, latent = self.qkv(x).split([H * (r + self.nope_dim), r + self.kv_rank], dim=-1)
        k_rope, c = latent.split([r, self.kv_rank], dim=-1)
        latent = torch.cat([k_rope, F.rms_norm(c, (self.kv_rank,), self.kv_norm.to(c.dtype))], dim=-1)
        latent = latent[:, None]
        return q.unflatten(-1, (H, -1)).transpose(1, 2), latent, latent

    @property
    def score_dim(self) -> int:
        return self.rope_dim + self.nope_dim

    @property
    def kernel_kv_heads(self) -> int:  # the latent is materialised per head before the kernel
        return self.n_heads

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Softmax attention under the pattern over keys/values materialised per head from the
        latent: the up-projection ``H (n + D)`` and the keys ``[k^R, W_UK c]`` ``(r + n)`` per token and head."""
        materialised = batch * self.n_heads * seq_len * (2 * self.nope_dim + self.head_dim + self.rope_dim) * elem
        return super().core_bytes(batch, seq_len, elem, backward, fused) + materialised

    def core_flops(self, batch, seq_len, backward):
        """Scores over ``r + n`` channels, values of ``D``: ``2 (r + n + D) T^2`` per head."""
        return (self.score_dim + self.head_dim) / (2 * self.head_dim) * super().core_flops(batch, seq_len, backward)

    def up_weights(self) -> tuple[Tensor, Tensor]:
        """``W_UK [H, n, kv_rank]``, ``W_UV [H, D, kv_rank]``."""
        w_uk, w_uv = self.kv_up.weight.split([self.n_heads * self.nope_dim, self.n_heads * self.head_dim])
        return w_uk.view(self.n_heads, self.nope_dim, self.kv_rank), w_uv.view(self.n_heads, self.head_dim, self.kv_rank)

    def materialise(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Explicit ``K [B, H, S, r + n]`` (shared rotary key, per-head ``W_UK c``), ``V [B, H, S, D]``."""
        k_rope, c = latent.split([self.rope_dim, self.kv_rank], dim=-1)
        k_nope, v = self.kv_up(c[:, 0]).split([self.n_heads * self.nope_dim, self.n_heads * self.head_dim], dim=-1)
        k_nope = k_nope.unflatten(-1, (self.n_heads, self.nope_dim)).transpose(1, 2)  # [B, H, S, n]
        v = v.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)
        return torch.cat([k_rope.expand(-1, self.n_heads, -1, -1), k_nope], dim=-1), v

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        keys, values = self.materialise(k)
        return softmax_attention(q, keys, values, self.pattern, q_pos, kv_pos, mask, self.alibi, self.attn_dropout,
                                 contiguous_positions=True, backends=self.sdpa_backends)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        keys, values = self.materialise(k)
        return reference_attention(q, keys, values, bias=self.score_bias(q_pos, kv_pos, mask, q.dtype),
                                   dropout_p=self.attn_dropout, training=self.training)

    def make_cache(self, batch, max_len, dtype, device):
        return LatentCache(batch, max_len, self.rope_dim + self.kv_rank, dtype, device)

    def absorbed_query(self, q: Tensor) -> Tensor:
        """``[q^R | W_UK^T q^C] [B, H, T, r + kv_rank]``, scaled so that dividing by
        ``sqrt(r + kv_rank)`` (cached_attention) divides the scores by ``sqrt(r + n)``."""
        q_rope, q_nope = q.split([self.rope_dim, self.nope_dim], dim=-1)
        w_uk, _ = self.up_weights()
        absorbed = torch.cat([q_rope, q_nope @ w_uk.to(q.dtype)], dim=-1)  # [H, n, R] per head
        return absorbed * math.sqrt((self.rope_dim + self.kv_rank) / self.score_dim)

    def attend_step(self, q, k, v, pos, cache, mask):
        """Absorbed decoding: scores against the cached latent rows, values ``W_UV (sum_j p_j c_j)``."""
        cache.write(k, v, pos)
        bias = self.step_bias(pos, cache.key_positions(), mask, q.dtype)
        latent = cache.latent
        attended = cached_attention(self.absorbed_query(q), [(latent, latent[..., self.rope_dim:], bias)],
                                    mask is not None)  # [B, H, T, kv_rank]
        _, w_uv = self.up_weights()
        return attended @ w_uv.to(q.dtype).transpose(-2, -1)
