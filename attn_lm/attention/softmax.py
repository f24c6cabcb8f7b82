"""Softmax family: exact scaled-dot-product attention (Vaswani et al., 2017, "Attention Is All
You Need").

``softmax(Q K^T / sqrt(d)) V`` for every head. Time ``O(T^2 d)`` per head; memory ``O(T)`` extra
with a fused kernel (flash / cuDNN / memory-efficient SDPA backends), ``O(T^2)`` on the explicit
reference path. All three mechanisms here share the projections, mask pattern, KV cache and
dispatch of :class:`~attn_lm.attention.base.SoftmaxAttention`; they differ in which kernel runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch.nn.attention import SDPBackend

from .base import SoftmaxAttention
from .config import option
from .factory import register

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


@register("full", aliases=("mha", "self", "flash"))
class FullAttention(SoftmaxAttention):
    """Multi-head (self-)attention. Causal by default; PyTorch SDPA picks the fused kernel.

    ``flash`` is an alias of this mechanism, not a kernel of its own: FlashAttention (Dao et al.,
    2022; Dao, 2023) is what SDPA runs here on GPU whenever it applies (order cuDNN, FlashAttention-2,
    memory-efficient; the math kernel where none does, e.g. float64 on CPU). Pin one backend with
    ``sdpa`` (``backend=flash``); ``flash_v1`` / ``flash_v2`` show the algorithm tile by tile.
    """

    description = "multi-head softmax attention, O(T^2); SDPA fast path (FlashAttention on GPU), explicit reference path"


@register("sdpa")
class SDPAAttention(SoftmaxAttention):
    """``torch.nn.functional.scaled_dot_product_attention`` with a selectable backend.

    ``backend``: ``auto`` (the library's order: cuDNN > flash > memory-efficient > math on GPU),
    ``flash``, ``efficient``, ``cudnn`` or ``math``. A backend that cannot run the given
    shape/dtype/device raises, so a benchmark never silently measures another kernel. Decoding
    steps do not call SDPA (one query against a fixed-size cache: explicit attention, see
    :func:`~attn_lm.attention.base.cached_attention`), so the backend applies to full forwards and
    prefill.
    """

    @dataclass(frozen=True)
    class Options:
        backend: str = option("auto", "auto", "math")  # auto | flash | efficient | cudnn | math

    description = "PyTorch fused scaled_dot_product_attention with a selectable backend"
    kernel_of = "full"

    @classmethod
    def validate_options(cls, config, dims):
        if config.options.backend not in ("auto", *_BACKENDS):
            raise ValueError(f"sdpa backend {config.options.backend!r} unknown; valid: auto, {', '.join(_BACKENDS)}")

    def __init__(self, config, dims):
        super().__init__(config, dims)
        name = self.options.backend
        self.sdpa_backends = None if name == "auto" else (_BACKENDS[name],)

    def attend(self, q, k, v, q_pos, kv_pos, mask):
        try:
            return super().attend(q, k, v, q_pos, kv_pos, mask)
        except RuntimeError as err:
            if "No viable backend" not in str(err):
                raise
            raise RuntimeError(
                f"sdpa backend {self.options.backend!r} cannot run this call ({q.device.type}, {q.dtype}, "
                f"head_dim {q.shape[-1]}, mask={'yes' if mask is not None else 'no'}); "
                "use backend=auto to let PyTorch choose"
            ) from err


@register("cross")
class CrossAttention(SoftmaxAttention):
    """Cross-attention: queries from ``x``, keys and values from ``context``.

    ``causal=False``: every query sees the whole ``context`` (encoder-decoder memory). With
    ``causal=True`` the context is a stream aligned with ``x`` and query ``i`` sees context
    positions ``<= i``; that is how a cross layer runs inside the decoder-only GPT, where its
    context is the token-embedding stream (so it stays causal and caches like self-attention).
    """

    description = "softmax cross-attention, queries from x, keys/values from a context tensor"
    uses_context = True
