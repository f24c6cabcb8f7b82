"""Differential attention (Ye et al., 2024, "Differential Transformer").

Each head splits its query and key into two halves ``q1, q2, k1, k2`` of ``D/2`` channels and
computes two softmax maps over the same values ``v`` (``D`` channels):

    DiffAttn(x) = (softmax(q1 k1^T / sqrt(D/2)) - lambda * softmax(q2 k2^T / sqrt(D/2))) v

The difference cancels the attention that both maps give to irrelevant context ("attention
noise"), like a differential amplifier. ``lambda`` is learned, re-parametrised per layer as

    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init

with four ``D/2``-vectors shared by the layer's heads (init ``N(0, 0.1)``, as the official
code). Each head's output is normalised with RMSNorm (the paper's "GroupNorm": a norm per head,
one learned weight shared by the heads) and scaled by ``1 - lambda_init`` so the layer starts with
the gradient scale of plain attention. The paper sets ``lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))``
for layer ``l = 1..L`` (:func:`lambda_init_for_layer`); a layer does not know its index here, so
the option ``lambda_init`` is fixed per layer config (default 0.8, the schedule's limit; give
per-layer values through ``model.layer_attention`` to follow the schedule).

Same parameters as multi-head attention with ``H`` heads of ``D`` (the paper halves the head
count and doubles ``D`` to match; here ``H`` and ``D`` are the config's). The halves are taken
along RoPE's rotation pairs (channel ``i`` rotates with ``i + D/2``), so each half-score depends on
relative positions only; this needs ``rope_fraction = 1`` and ``D`` divisible by 4.

Time ``O(T^2 D)`` as full attention (two maps of half width); fast path: two fused SDPA calls
(FlexAttention under a sparse pattern) whose outputs are subtracted; reference: the differential
map written out. Decoding: the full K/V cache. ``exact = False``: no single softmax map equals it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import SoftmaxAttention, cached_attention
from .config import option
from .factory import register
from .functional import head_rms_norm, softmax_attention


def lambda_init_for_layer(layer: int) -> float:
    """The paper's ``lambda_init`` for layer ``layer = 1..L``."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """Split ``[..., D]`` into the two ``D/2`` halves of differential attention, each closed under
    RoPE's rotate-half pairs ``(i, i + D/2)``: ``[0, D/4) + [D/2, 3D/4)`` and the rest."""
    first, second = t.unflatten(-1, (2, 2, -1)).unbind(-2)
    return first.flatten(-2), second.flatten(-2)


@register("diff")
class DiffAttention(SoftmaxAttention):
    """Differential attention: the difference of two softmax maps, with a learned ``lambda``
    and a per-head RMSNorm. Time ``O(T^2 D)``; KV cache ``O(T D)`` per head."""

    description = "Differential Transformer: difference of two softmax maps (learned lambda) + per-head RMSNorm"
    family = "diff"
    exact = False
    uneven_heads = True  # D/2-wide scores over D-wide values
    #: Head-sized tensors the fast path holds besides the maps' own cost: the four half-width
    #: query/key copies, both maps' outputs and their combination.
    head_copies = 5

    @dataclass(frozen=True)
    class Options:
        #: The paper's schedule is 0.8 - 0.6 exp(-0.3 (l - 1)) for layer l; the output is scaled by 1 - lambda_init.
        lambda_init: float = option(0.8, 0.8, 0.1, 0.5, 0.9)
    alibi_unsupported = "each of the two maps would need its own bias, which is not implemented; use position='rope'"

    @classmethod
    def validate_options(cls, config, dims):
        value = config.options.lambda_init
        if not 0.0 < value < 1.0:
            raise ValueError(f"diff lambda_init must be in (0, 1) (the paper's schedule spans [0.2, 0.8); the output "
                             f"is scaled by 1 - lambda_init), got {value}")
        if dims is not None and dims.head_dim % 4:
            raise ValueError(f"diff splits each head into two halves along RoPE's rotation pairs, so head_dim must be "
                             f"divisible by 4, got {dims.head_dim} (d_model={dims.d_model}, n_heads={dims.n_heads})")
        if config.position in ("rope", "xpos") and config.rope_fraction != 1.0:
            raise ValueError("diff needs rope_fraction=1 with rotary positions: its two halves are taken along the "
                             f"rotation pairs of the whole head, got rope_fraction={config.rope_fraction}")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        half = self.head_dim // 2
        self.lambda_init = float(self.options.lambda_init)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(half) * 0.1) for _ in range(4))
        self.norm_weight = nn.Parameter(torch.ones(self.head_dim))

    @property
    def score_dim(self) -> int:
        return self.head_dim // 2

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Two softmax maps under the pattern and :attr:`head_copies` head-sized tensors. On
        the CPU's math kernel a forward holds one map's scores at a time (the default model's
        three copies); with backward both maps' probabilities are saved, a fourth copy. On the
        GPU the two fused calls run one after the other, forward and backward: one call's
        backward workspace at a time, next to the other map's saved logsumexp."""
        heads = self.head_copies * batch * self.n_heads * seq_len * self.head_dim * elem
        if not fused:
            return heads + (4 / 3 if backward else 1) * super().core_bytes(batch, seq_len, elem, backward, fused)
        return (heads + self.fused_core_bytes(batch, seq_len, elem, backward)
                + self.fused_core_bytes(batch, seq_len, elem, False))

    def core_flops(self, batch, seq_len, backward):
        """Two maps of ``D/2``-wide scores, each times ``D``-wide values: 1.5x softmax attention."""
        return 1.5 * super().core_flops(batch, seq_len, backward)

    def lam(self) -> Tensor:
        """``lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` (a 0-dim tensor)."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def normalise(self, y: Tensor) -> Tensor:
        """Per-head RMSNorm (the paper's GroupNorm) and the ``1 - lambda_init`` scale."""
        return head_rms_norm(y, self.norm_weight) * (1 - self.lambda_init)

    def combine(self, y1: Tensor, y2: Tensor) -> Tensor:
        """``A1 v - lambda A2 v``, normalised: the fast paths' two attention outputs combined."""
        return self.normalise(y1 - self.lam().to(y1.dtype) * y2)

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        (q1, q2), (k1, k2) = halves(q), halves(k)
        y1, y2 = (softmax_attention(qi, ki, v, self.pattern, q_pos, kv_pos, mask, None, self.attn_dropout,
                                    contiguous_positions=True, backends=self.sdpa_backends)
                  for qi, ki in ((q1, k1), (q2, k2)))
        return self.combine(y1, y2)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        bias = self.score_bias(q_pos, kv_pos, mask, q.dtype)
        (q1, q2), (k1, k2) = halves(q), halves(k)

        def softmax_map(qi, ki):
            probs = torch.softmax(qi @ ki.transpose(-2, -1) / math.sqrt(qi.shape[-1]) + bias, dim=-1)
            probs = probs.nan_to_num(0.0)  # a row with no allowed key (user masks) attends to nothing
            return F.dropout(probs, self.attn_dropout) if self.attn_dropout else probs

        lam = self.lam().to(q.dtype)
        return self.normalise((softmax_map(q1, k1) - lam * softmax_map(q2, k2)) @ v)

    def attend_step(self, q, k, v, pos, cache, mask):
        cache.write(k, v, pos)
        bias = self.step_bias(pos, cache.key_positions(), mask, q.dtype)
        (q1, q2), (k1, k2) = halves(q), halves(cache.k)
        y1, y2 = (cached_attention(qi, [(ki, cache.v, bias)], mask is not None) for qi, ki in ((q1, k1), (q2, k2)))
        return self.combine(y1, y2)
