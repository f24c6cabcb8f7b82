"""Optional GPU kernels from flash-linear-attention (``fla``, MIT; ``pip install attn-lm[fla]``) for
the matrix-state mechanisms (retention, gla, deltanet).

The pure-PyTorch chunkwise forms are the default and run anywhere. A layer's ``kernel`` option
picks the path of its full-sequence forward: ``torch`` (always PyTorch), ``fla`` (fla whenever the
tensors are on CUDA) or ``auto`` (fla on CUDA when it is installed, except while ``torch.compile``
traces: fla's entry points are ``torch.compiler.disable``-d, so calling them would break the
model's one graph). Decoding always uses the PyTorch forms (one token is a ``D x D`` update).

fla takes ``[B, T, H, D]`` tensors (ours are ``[B, H, T, D]``), its states are ``[B, H, K, V]``
like ours (``o = q S``), and it scales queries by ``scale`` (default ``1/sqrt(K)``): callers pass
the scale their own form uses. If fla refuses a call (a dtype it does not take, a card or Triton
version it does not support), the PyTorch form computes it instead and a one-line warning says
why, once per kernel. Some refusals come only from fla's backward, after its forward has run
(fla 0.6.0's gated kernels on Hopper with Triton >= 3.4, < 3.7.1, fla issue #640): the first call
that will be differentiated therefore runs fla's forward and backward once on detached copies,
so that the PyTorch form can still take over.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

#: Values of the ``kernel`` option.
KERNELS = ("auto", "torch", "fla")
_FAILED: set[str] = set()  # kernels (per dtype) that raised once: not retried, warned about once
_BACKWARD_OK: set[str] = set()  # kernels (per dtype) whose backward ran once in this process


def fla_function(module: str, name: str) -> Optional[Callable]:
    """``fla.ops.<module>.<name>``, or ``None`` when fla (or that kernel) is not installed."""
    try:
        return getattr(importlib.import_module(f"fla.ops.{module}"), name)
    except (ImportError, AttributeError):
        return None


def wants_fla(kernel: str, x: Tensor) -> bool:
    """Whether a full-sequence forward of ``x`` should try fla under the ``kernel`` option."""
    if kernel == "torch" or not x.is_cuda:
        return False
    return kernel == "fla" or not torch.compiler.is_compiling()


def run_fla(module: str, name: str, fallback: Callable[[], Tensor], q: Tensor, k: Tensor, v: Tensor,
            *extra: Tensor, **kwargs: Any) -> Tensor:
    """``fla.ops.<module>.<name>(q, k, v, *extra, **kwargs)`` on head-split ``[B, H, T, D]`` inputs
    (``extra``: per-token gates ``[B, H, T]`` or ``[B, H, T, D]``), returned as ``[B, H, T, Dv]``;
    ``fallback()`` (the PyTorch form) when fla is missing or raises."""
    key = f"fla.ops.{module}.{name}"
    failed = f"{key} {q.dtype}"
    fn = None if failed in _FAILED else fla_function(module, name)
    if fn is None:
        if failed not in _FAILED:
            _FAILED.add(failed)
            warnings.warn(f"{key} is not installed; using the PyTorch chunkwise form", stacklevel=3)
        return fallback()
    try:
        heads_last = [t.transpose(1, 2) for t in (q, k, v, *extra)]  # fla's [B, T, H, ...] layout
        if failed not in _BACKWARD_OK and torch.is_grad_enabled() and any(t.requires_grad for t in heads_last):
            probe_backward(fn, heads_last, kwargs)
            _BACKWARD_OK.add(failed)
        out, _ = fn(*heads_last, **kwargs)
        return out.transpose(1, 2)
    except Exception as err:  # noqa: BLE001 -- any refusal (dtype, card, Triton) falls back
        _FAILED.add(failed)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        warnings.warn(f"{key} refused {q.dtype} ({type(err).__name__}: {reason[:200]}); "
                      "using the PyTorch chunkwise form", stacklevel=3)
        return fallback()


def probe_backward(fn: Callable, inputs: list[Tensor], kwargs: dict[str, Any]) -> None:
    """Run ``fn``'s forward and backward on detached copies of ``inputs`` (raising what fla's
    backward raises): a refusal from the backward of the real call would come after the forward
    has been used, too late for the PyTorch form to take over."""
    copies = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    out, _ = fn(*copies, **kwargs)
    torch.autograd.grad(out, [t for t in copies if t.requires_grad], torch.ones_like(out))
