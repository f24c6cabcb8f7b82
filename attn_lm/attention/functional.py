"""Functional softmax attention: the dense reference and the fused dispatch every exact mechanism
shares.

``reference_attention`` is the textbook ``softmax(Q K^T / sqrt(d) + bias) V`` with an explicit
boolean mask, written out so tests (float64) and readers can see every step. Time and memory
``O(Tq S d)`` / ``O(Tq S)``.

``softmax_attention`` computes the same function through the fastest kernel that can:

* PyTorch SDPA with ``is_causal`` / no mask when the pattern is plain causal or full (fused
  flash / cuDNN / memory-efficient kernels on GPU, the fused CPU kernel on CPU);
* FlexAttention with the pattern's cached ``BlockMask`` (and ALiBi as a ``score_mod``) on GPU
  for sparse patterns, so empty tiles are skipped and no ``T x T`` mask is built;
* SDPA with a dense additive bias otherwise (CPU, user masks, padded prompts); without a user
  mask or ALiBi the bias is filled row block by row block (:func:`pattern_bias`), so the only
  ``T x S`` tensor is the bias itself. Decoding steps do
  not come here: they attend over a fixed-size cache explicitly
  (:func:`~attn_lm.attention.base.cached_attention`).

Rows in which no key is allowed (possible with user masks) produce zeros on every path.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .masks import MaskPattern, combine_custom_mask


def repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """Expand ``[B, Hkv, S, D]`` keys/values to ``[B, H, S, D]`` for grouped-query attention."""
    groups = n_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Dense softmax attention, step by step.

    ``q [B, H, Tq, D]``, ``k, v [B, Hkv, S, D]`` (``Hkv`` divides ``H``), ``allowed`` a boolean
    mask broadcastable to ``[B, H, Tq, S]``, ``bias`` an additive bias (ALiBi, user masks).
    """
    k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    empty_row = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty_row, 0.0), dim=-1).masked_fill(empty_row, 0.0)
    if dropout_p > 0.0 and training:
        probs = F.dropout(probs, dropout_p)
    return probs @ v


#: SDPA backends in the order tried on GPU. cuDNN's fused attention is the fastest on Hopper
#: (about 1.6x the flash backend for causal bf16 fwd+bwd); PyTorch falls through to the next
#: backend when one cannot take the shape, dtype or arguments.
GPU_SDPA_PRIORITY = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH)


#: With an explicit mask (user masks, padded prompts) cuDNN builds a new execution plan for every
#: new key length (it made the old cached decoding ~20x slower, measured on H200); the
#: memory-efficient kernel takes masks of any length without that cost.
GPU_MASKED_SDPA_PRIORITY = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


#: Take the GPU branch of the dispatch for tensors on any device. The dispatch code is the same
#: on every device (only the kernels behind SDPA/FlexAttention differ), so CPU tests set this to
#: trace exactly the code a GPU runs, e.g. to prove it compiles without graph breaks.
FORCE_GPU_DISPATCH = False


def gpu_dispatch(q: Tensor) -> bool:
    """Whether the dispatch takes its GPU branch for ``q`` (a CUDA tensor, or forced for tests)."""
    return q.is_cuda or FORCE_GPU_DISPATCH


def gpu_branch(device: torch.device | str) -> bool:
    """:func:`gpu_dispatch` for tensors that will live on ``device``, outside any traced call (state
    built ahead of it, without allocating a probe tensor per step)."""
    return torch.device(device).type == "cuda" or FORCE_GPU_DISPATCH


def sdpa_backends(q: Tensor, pinned: Optional[Sequence[SDPBackend]] = None, masked: bool = False):
    """Context selecting SDPA backends: ``pinned`` (the ``sdpa`` mechanism's choice) on any
    device, else the fastest-first priority on GPU, else PyTorch's default.

    The choice is a pure function of its arguments (no query of PyTorch's global backend flags),
    so ``torch.compile`` traces it into the graph instead of breaking the graph there.
    """
    if pinned is not None:
        return sdpa_kernel(list(pinned))
    if not gpu_dispatch(q):
        return contextlib.nullcontext()
    return sdpa_kernel(list(GPU_MASKED_SDPA_PRIORITY if masked else GPU_SDPA_PRIORITY), set_priority=True)


#: FlexAttention's fused (Triton) kernel needs heads at least this wide; Inductor refuses narrower
#: ones ("embedding dimension ... must be at least 16") when it compiles the call on a GPU.
FLEX_MIN_HEAD_DIM = 16


def flex_supports(score_dim: int, value_dim: int) -> bool:
    """Whether FlexAttention's fused kernel takes query/key heads ``score_dim`` and value heads
    ``value_dim`` wide (shared by the dispatch and the memory model)."""
    return min(score_dim, value_dim) >= FLEX_MIN_HEAD_DIM


def flex_dispatch(q: Tensor, v: Tensor) -> bool:
    """Whether a contiguous masked call goes to FlexAttention: on the GPU branch, with heads its
    fused kernel supports. Narrower heads take the dense-bias SDPA path, which computes the same
    attention in O(T^2) memory; such toy widths are only ever small models."""
    return gpu_dispatch(q) and flex_supports(q.shape[-1], v.shape[-1])


#: Never Inductor's flex *decoding* kernel, which it picks for queries shorter than 128 when no
#: gradient is needed (``_use_flex_decoding``): on an H200 (torch 2.11) it returned wrong outputs
#: for some q/k/v layouts, e.g. a 2-layer RoPE model at T=64 compiled for evaluation (2.5e-2 of the
#: logits' range off in fp32, where eager is off by 3e-7; RESULTS.md 2l), which made compiled
#: validation of every sparse pattern with RoPE wrong at MQAR's T=64. The main kernel is right
#: there; training (which needs the backward) never used the decoding kernel.
FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}

_compiled_flex = None


def _flex_attention():
    """FlexAttention, fused. Inside a compiled model the plain function is traced into the model's
    graph (the compiler fuses it there); in eager mode a ``torch.compile``d copy is built once
    per process (compiling is what makes it fused)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling():
        return flex_attention
    if _compiled_flex is None:
        import torch._dynamo.config as dynamo_config

        # Each distinct mask pattern / score_mod / shape is its own compiled kernel; past Dynamo's
        # default limit of 8 recompilations FlexAttention would silently run unfused (dense).
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))

        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: MaskPattern,
    q_pos: Tensor,
    kv_pos: Tensor,
    mask: Optional[Tensor] = None,
    alibi=None,
    dropout_p: float = 0.0,
    contiguous_positions: bool = False,
    backends: Optional[Sequence[SDPBackend]] = None,
) -> Tensor:
    """Exact softmax attention under ``pattern`` (plus optional ALiBi and user ``mask``).

    ``contiguous_positions`` says ``q_pos == kv_pos == arange(T)`` (a plain full forward), which
    lets SDPA use ``is_causal`` and FlexAttention use a cached ``BlockMask``. ``backends`` pins
    the SDPA backends (see :func:`sdpa_backends`).
    """
    gqa = k.shape[1] != q.shape[1]
    if contiguous_positions and mask is None and alibi is None and pattern.is_full:
        with sdpa_backends(q, backends):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=pattern.causal,
                                                  enable_gqa=gqa)
    if contiguous_positions and mask is None and flex_dispatch(q, v):
        if dropout_p > 0.0:
            _warn_flex_dropout()
        score_mod = alibi.score_mod() if alibi is not None else None
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            # Inductor's CPU lowering of FlexAttention without autograd (torch 2.13) read ``v``
            # wrongly when it was a strided slice of the fused q/k/v projection and RoPE had made
            # q and k new buffers (test_compile.py's RoPE evaluation test fails without this). A
            # contiguous ``v`` is read right. The GPU's error there was the decoding kernel's
            # (FLEX_KERNEL_OPTIONS), which a contiguous ``v`` did not fix.
            v = v.contiguous()
        block_mask = pattern.block_mask(q.shape[-2], k.shape[-2], q.device)
        return _flex_attention()(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa,
                                 kernel_options=FLEX_KERNEL_OPTIONS)
    if mask is None and alibi is None and q_pos.dim() == kv_pos.dim() == 1:
        bias, empty_row = pattern_bias(pattern, q_pos, kv_pos, q.dtype)
    else:
        allowed = pattern.dense(q_pos, kv_pos)
        bias = combine_custom_mask(allowed, mask, q.dtype)
        if alibi is not None:
            bias = bias + alibi.bias(q_pos, kv_pos, q.dtype)
        empty_row = torch.isneginf(bias).all(dim=-1, keepdim=True)
        bias = bias.masked_fill(empty_row, 0.0)  # an all -inf row would give NaN; it is zeroed below
    with sdpa_backends(q, backends, masked=True):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, enable_gqa=gqa)
    return out.masked_fill(empty_row, 0.0)


#: Entries of the ``rows x S`` block in which :func:`pattern_bias` evaluates a pattern.
BIAS_BLOCK = 2**16


def pattern_bias(pattern: MaskPattern, q_pos: Tensor, kv_pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The pattern as an additive ``[Tq, S]`` bias (``0`` / ``-inf``; ``0`` in a row without any
    allowed key, which the caller zeroes) and those rows (``[Tq, 1]``), evaluated in blocks of about :data:`BIAS_BLOCK` entries: a
    pattern's predicate makes integer temporaries (distances, block indices) several times the
    size of the boolean result, which would otherwise all be ``T x S`` at once."""
    bias = torch.empty(len(q_pos), len(kv_pos), dtype=dtype, device=q_pos.device)
    empty = torch.empty(len(q_pos), 1, dtype=torch.bool, device=q_pos.device)
    rows = max(1, BIAS_BLOCK // max(1, len(kv_pos)))
    for a in range(0, len(q_pos), rows):
        allowed = pattern.dense(q_pos[a:a + rows], kv_pos)
        empty[a:a + rows] = ~allowed.any(dim=-1, keepdim=True)
        bias[a:a + rows] = torch.where(allowed | empty[a:a + rows], 0.0, float("-inf"))
    return bias, empty


@functools.cache
def _warn_flex_dropout() -> None:
    warnings.warn(
        "FlexAttention has no attention-probability dropout: sparse/ALiBi layers on GPU skip it "
        "(residual and MLP dropout still apply). Set attention dropout to 0 to silence this.",
        stacklevel=3,
    )


def head_rms_norm(y: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm of each head's output ``y [B, H, T, D]`` over ``D`` with one weight ``[D]`` shared by
    the heads: the per-head "GroupNorm" of RetNet and the Differential Transformer (their outputs
    are not convex combinations of values, so each head is renormalised before the projection)."""
    return F.rms_norm(y, (y.shape[-1],), weight.to(y.dtype), eps=eps)

