"""Kernel family: attention whose scores are a dot product of non-negative feature maps,
``A_ij = phi(q_i) . phi(k_j)``, so that ``out_i = sum_j A_ij v_j / sum_j A_ij`` can be computed in
time linear in the sequence length (see :mod:`attn_lm.attention.linear_scan`).

* ``linear``    — ``phi(x) = elu(x) + 1`` (Katharopoulos et al., 2020, "Transformers are RNNs");
* ``performer`` — FAVOR+ positive orthogonal random features, an unbiased estimate of the
  softmax kernel ``exp(q . k / sqrt(d))`` (Choromanski et al., 2021, "Rethinking Attention with
  Performers");
* ``cosformer`` — ``phi = relu`` with a ``cos`` distance re-weighting split into two linear terms
  (Qin et al., 2022, "cosFormer: Rethinking Softmax in Attention").

Shared by all three (:class:`KernelizedAttention`):

* causal form chunk-wise (``chunk_size``, default 128, the setting benchmarked in
  benchmarks/RESULTS.md), non-causal form with one global sum:
  time ``O(T F D)``, memory ``O(T F + (T / C) F D)`` per head for ``F`` features;
* decoding with a :class:`~attn_lm.cache.RecurrentStateCache` holding ``(S, z)``: ``O(F D)``
  per step and per layer, constant in the generated length;
* ``attend_reference``: the explicit ``T x S`` form ``A = phi(Q) phi(K)^T`` masked, then
  ``A V / A.sum(-1)``. A user mask cannot enter the linear form (it is an arbitrary ``T x S``
  matrix), so with a mask ``attend`` runs this quadratic form too: correct, never ignored;
* RoPE / xPos rotate ``q, k`` (at absolute positions, in ``Attention.forward``) *before* the
  feature map, so rotated features stay consistent between the full forward and decoding;
* no attention-probability dropout: no probability matrix exists on the linear path, so
  ``dropout`` acts on the residual output only (both paths, so they agree).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import RecurrentStateCache
from .base import Attention
from .config import option
from .factory import register
from .linear_scan import (causal_linear_attention, noncausal_linear_attention, quadratic_linear_attention,
                          upcast_copies)
from .masks import MaskPattern, combine_custom_mask


class KernelizedAttention(Attention):
    """Linear attention with a feature map ``phi``; subclasses define :meth:`feature_map` and
    :attr:`feature_dim`. Computations run in at least float32 (features are exponentials or
    sums over the whole prefix); the output is cast back to the input dtype."""

    family: ClassVar[str] = "kernel"
    exact: ClassVar[bool] = False
    quadratic: ClassVar[bool] = False
    cache_kind: ClassVar[str] = "state"
    alibi_unsupported: ClassVar[Optional[str]] = (
        "kernelized attention never forms the T x S score matrix that ALiBi biases; use position='rope' or "
        "'xpos' (or a softmax/sparse mechanism) instead"
    )

    @dataclass(frozen=True)
    class Options:
        #: Causal form: quadratic inside chunks of this many tokens, a running state across them.
        chunk_size: int = option(128, 4, *range(4, 10))

    #: The chunk of the benchmark runs recorded in benchmarks/RESULTS.md section 2a, so re-runs
    #: compare with them (the default, 128, came later; RESULTS passes it with --options).
    bench_options = {"chunk_size": 64}

    @property
    def feature_dim(self) -> int:
        return self.head_dim

    def chunk(self, seq_len: int) -> int:
        return min(self.options.chunk_size, seq_len)

    def core_bytes(self, batch, seq_len, elem, backward, fused):
        """Per head, in at least float32: chunk scores ``T C`` and chunk states ``(T / C) F D``
        (two live copies each: the tensor and its masked / summed temporary) and the query/key
        features ``2 T F`` (:meth:`feature_copies` copies)."""
        T, C, F_, D = seq_len, self.chunk(seq_len), self.feature_dim, self.head_dim
        per_head = 2 * T * C + self.feature_copies(backward) * 2 * T * F_ + 2 * T / C * F_ * D
        return batch * self.n_heads * (per_head + upcast_copies(elem, backward) * T * D) * max(elem, 4)

    def feature_copies(self, backward: bool) -> int:
        """Live copies of the features at the peak: the features (forward), and the map's input
        that autograd keeps with them (backward); measured on CPU."""
        return 2 if backward else 1

    def core_flops(self, batch, seq_len, backward):
        """Per head ``2 T C (F + D)`` (intra-chunk scores and values) + ``4 T F D`` (chunk states
        and their read-out) + the feature map's own; backward 2x more (no recomputation)."""
        T, C, F_, D = seq_len, self.chunk(seq_len), self.feature_dim, self.head_dim
        per_head = 2 * T * C * (F_ + D) + 4 * T * F_ * D + self.feature_map_flops(seq_len)
        return batch * self.n_heads * per_head * (3.0 if backward else 1.0)

    def feature_map_flops(self, seq_len: int) -> float:
        """FLOPs of the feature map per head (default: elementwise, not counted)."""
        return 0.0

    def feature_map(self, x: Tensor, pos: Tensor, is_query: bool) -> Tensor:
        """Non-negative features ``[B, H, T, feature_dim]`` of ``x [B, H, T, head_dim]`` at
        absolute positions ``pos [T]`` (per row when decoding: ``[B, 1, T]``)."""
        raise NotImplementedError

    def features(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``phi(q)``, ``phi(k)`` and ``v`` in the compute dtype (at least float32)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        return self.feature_map(q, q_pos, is_query=True), self.feature_map(k, kv_pos, is_query=False), v

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        if mask is not None:
            return self.attend_reference(q, k, v, q_pos, kv_pos, mask)
        qf, kf, vf = self.features(q, k, v, q_pos, kv_pos)
        if self.config.causal:
            out, _ = causal_linear_attention(qf, kf, vf, self.options.chunk_size)
        else:
            out, _ = noncausal_linear_attention(qf, kf, vf)
        return out.to(v.dtype)

    def attend_reference(self, q, k, v, q_pos, kv_pos, mask):
        qf, kf, vf = self.features(q, k, v, q_pos, kv_pos)
        allowed = MaskPattern(causal=self.config.causal).dense(q_pos, kv_pos)
        return quadratic_linear_attention(qf, kf, vf, combine_custom_mask(allowed, mask, qf.dtype)).to(v.dtype)

    def make_cache(self, batch, max_len, dtype, device):
        """Running sums ``(S, z)``; ``max_len`` is not needed (the state does not grow)."""
        return RecurrentStateCache(batch, self.n_heads, self.feature_dim, self.head_dim,
                                   torch.promote_types(dtype, torch.float32), device)

    def reject_mask(self, mask: Optional[Tensor]) -> None:
        if mask is not None:
            raise ValueError(
                f"attention_type {self.name!r} decodes from running sums over past keys, so a custom mask over "
                "those keys cannot be applied; decode without a mask, or run the full forward (which honours it)"
            )

    def prefill(self, q, k, v, pos, cache, mask, lengths):
        """The chunked scan over the prompt, whose final state is the cache; padding keys get zero
        features, so they add nothing to any sum."""
        self.reject_mask(mask)
        qf, kf, vf = self.features(q, k, v, pos, pos)
        kf = kf * (pos < lengths[:, None])[:, None, :, None]
        if self.config.causal:
            out, state = causal_linear_attention(qf, kf, vf, self.options.chunk_size)
        else:
            out, state = noncausal_linear_attention(qf, kf, vf)
        cache.update(state)
        return out.to(v.dtype)

    def attend_step(self, q, k, v, pos, cache, mask):
        """``O(F D)`` per token: add the new keys to the sums, read them with the queries. One
        token (or a non-causal layer) sees every key so far: the non-causal form with the state."""
        self.reject_mask(mask)
        qf, kf, vf = self.features(q, k, v, pos, pos)
        if self.config.causal and q.shape[2] > 1:
            out, state = causal_linear_attention(qf, kf, vf, self.options.chunk_size, cache.state())
        else:
            out, state = noncausal_linear_attention(qf, kf, vf, cache.state())
        cache.update(state)
        return out.to(v.dtype)


@register("linear", aliases=("linear_transformer",))
class LinearAttention(KernelizedAttention):
    """Linear Transformer (Katharopoulos et al., 2020, "Transformers are RNNs").

    ``phi(x) = elu(x) + 1`` (positive, ``F = D``), so
    ``out_i = phi(q_i)^T sum_{j<=i} phi(k_j) v_j^T / phi(q_i)^T sum_{j<=i} phi(k_j)``
    (sums over every ``j`` when non-causal). Time ``O(T D^2)``, memory ``O(T D + (T/C) D^2)``;
    decoding keeps a ``D x D`` state per head, like an RNN.
    """

    description = "linear attention, phi = elu + 1 (Katharopoulos 2020), O(T D^2), recurrent decoding"

    def feature_map(self, x, pos, is_query):
        return F.elu(x) + 1.0


@register("performer", aliases=("favor",))
class PerformerAttention(KernelizedAttention):
    """Performer / FAVOR+ (Choromanski et al., 2021, "Rethinking Attention with Performers").

    With ``x = q d^(-1/4)`` (likewise ``y`` for keys) and ``m = num_features`` random rows ``w_r``,
    ``phi(x)_r = exp(w_r . x - |x|^2 / 2) / sqrt(m)`` is positive and
    ``E[phi(x) . phi(y)] = exp(x . y) = exp(q . k / sqrt(d))``: the softmax kernel, so the output
    approximates softmax attention with an error falling like ``1 / sqrt(m)``. The rows are drawn in
    blocks of ``d`` exactly orthogonal Gaussian directions (QR), each rescaled to a
    ``chi(d)``-distributed norm so every row is still marginally ``N(0, I)`` (lower variance than
    i.i.d. rows). Time ``O(T m D)``, memory ``O(T m + (T/C) m D)``.

    Stabilisers (``exp`` overflows otherwise): a shift ``c`` of the exponent multiplies features
    by ``exp(-c)``. For a *query* a per-token shift (its max over features) is exact, since
    numerator and denominator of its row scale alike. For *keys* a per-token shift would re-weight
    the keys against each other, and a max over the sequence would read future keys in the causal
    form; so keys use one data-independent constant, ``max_r |w_r|^2 / 2``, an upper bound of
    ``w_r . y - |y|^2 / 2`` for every ``y``: key features lie in ``(0, 1/sqrt(m)]`` for any input.

    Options: ``num_features`` (``m``, default 256); ``redraw_interval`` (``0`` = fixed features,
    ``N > 0`` = redraw before every ``N``-th training forward without a cache, since a decoding
    state is tied to the features it was built with); ``feature_seed`` (``None`` = draw from torch's
    global generator, so ``torch.manual_seed`` reproduces it and layers differ; an int = a private
    generator). The matrix is the buffer ``projection`` (saved in checkpoints).
    """

    description = "Performer FAVOR+ positive orthogonal random features ~ softmax, O(T m D)"
    renamed_options = {"seed": "feature_seed"}

    @dataclass(frozen=True)
    class Options(KernelizedAttention.Options):
        #: Random features m; the error against softmax falls like 1/sqrt(m).
        num_features: int = option(256, 64, 4, 16, 48)
        #: 0 = fixed features; N > 0 = redraw before every N-th training forward.
        redraw_interval: int = option(0, 0, minimum=0)
        #: None = torch's global generator (torch.manual_seed reproduces it); an int = a private one.
        feature_seed: Optional[int] = option(None, None, 0, 7, minimum=0)

    def __init__(self, config, dims):
        super().__init__(config, dims)
        seed = self.options.feature_seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.register_buffer("projection", self.draw_features())
        self.training_calls = 0

    @property
    def feature_dim(self) -> int:
        return self.options.num_features

    def feature_map_flops(self, seq_len):
        return 4 * seq_len * self.head_dim * self.feature_dim  # the random projection of q and k

    def feature_copies(self, backward):
        return 3 if backward else 1  # autograd keeps the exponent and its exp of q and k (measured)

    def draw_features(self) -> Tensor:
        """``[m, d]`` orthogonal Gaussian rows (blocks of ``d``) with ``chi(d)`` norms."""
        m, d = self.options.num_features, self.head_dim
        blocks = []
        for _ in range(math.ceil(m / d)):
            gaussian = torch.randn(d, d, generator=self.generator, dtype=torch.float64)
            blocks.append(torch.linalg.qr(gaussian).Q.T)
        rows = torch.cat(blocks)[:m]
        norms = torch.randn(m, d, generator=self.generator, dtype=torch.float64).norm(dim=1, keepdim=True)
        return (rows * norms).to(torch.get_default_dtype())

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw a fresh projection (in place, keeping the buffer's device and dtype)."""
        self.projection.copy_(self.draw_features())

    def forward(self, x, context=None, mask=None, cache=None, input_pos=None, lengths=None):
        interval = self.options.redraw_interval
        if self.training and interval and cache is None:
            if self.training_calls and self.training_calls % interval == 0:
                self.redraw_features()
            self.training_calls += 1
        return super().forward(x, context, mask, cache, input_pos, lengths)

    def feature_map(self, x, pos, is_query):
        w = self.projection.to(x.dtype)
        x = x * self.head_dim ** -0.25
        exponent = x @ w.T - x.square().sum(dim=-1, keepdim=True) / 2
        if is_query:
            shift = exponent.detach().amax(dim=-1, keepdim=True)
        else:
            shift = w.square().sum(dim=-1).max() / 2
        return torch.exp(exponent - shift) / math.sqrt(w.shape[0])


@register("cosformer")
class CosFormerAttention(KernelizedAttention):
    """cosFormer (Qin et al., 2022, "cosFormer: Rethinking Softmax in Attention").

    ``A_ij = relu(q_i) . relu(k_j) * cos(pi/2 * (i - j) / M)``: non-negative scores with a locality
    bias that decays with distance. Since ``cos(a - b) = cos a cos b + sin a sin b`` it stays
    linear: ``phi(x)_p = [relu(x) cos(pi p / 2M), relu(x) sin(pi p / 2M)]`` (``F = 2D``) at the
    token's absolute position ``p``, so the decoding state carries the position-dependent
    features. ``M`` is ``max_seq_len`` (the paper uses the sequence length); positions ``>= M``
    raise, because beyond it the weight turns negative. Time ``O(T D^2)``, memory
    ``O(T D + (T/C) D^2)``.
    """

    description = "cosFormer: relu features with cos distance re-weighting, O(T D^2), recurrent decoding"

    @property
    def feature_dim(self) -> int:
        return 2 * self.head_dim

    def feature_copies(self, backward):
        return 1  # with backward too (measured on CPU): the map's input kept by autograd, relu(x), is half as wide

    def check_length(self, end: int) -> None:
        M = self.dims.max_seq_len
        if end > M:
            raise ValueError(
                f"cosformer re-weights by cos(pi/2 * (i - j) / M) with M = max_seq_len = {M}; position {end - 1} is "
                "beyond it (the weight would turn negative). Raise max_seq_len to the longest sequence you run"
            )

    def feature_map(self, x, pos, is_query):
        angle = (math.pi / (2 * self.dims.max_seq_len)) * pos.to(x.dtype)[..., None]
        x = F.relu(x)
        return torch.cat((x * angle.cos(), x * angle.sin()), dim=-1)
