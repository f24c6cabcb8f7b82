"""Measure one attention layer: latency (forward, forward + backward), peak memory, throughput.

``AttentionProfiler.profile_attention("performer", batch_size=4, seq_len=2048)`` builds the layer
from the registry (any mechanism, any options, any dtype), feeds it random ``[B, T, d_model]``
inputs and returns a dict of measurements.

How it measures
---------------
* **Latency**: ``warmup`` untimed iterations first (kernel selection, lazy initialisation,
  ``torch.compile`` of FlexAttention on GPU), then ``num_iterations`` timed ones. On GPU each
  iteration is bracketed by CUDA events (device time, no host synchronisation inside the loop);
  on CPU by ``time.perf_counter``. The reported value is the **median** (robust to the odd slow
  iteration); ``*_p10_ms`` / ``*_p90_ms`` give the spread.
* **Memory** (``memory_mb``): the peak of memory allocated *during one step* beyond what was
  allocated before it (the layer's weights and its input are not counted; gradients of the
  weights are, when ``backward=True``). On GPU: ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``, minus ``memory_allocated`` before the step. On CPU PyTorch has no
  allocator statistics, so the step runs once under ``torch.profiler`` with ``profile_memory=True``,
  which records every CPU allocation and free of the step with its size; the running sum of those
  events in time order is the memory held by tensors created in the step, and its maximum is the
  peak. Both are allocator-level numbers of the same quantity (no process RSS noise).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .attention import AttentionFactory
from .attention.base import Attention
from .attention.config import AttentionDims, attention_config_from_dict
from .devices import peak_memory_mb, reset_peak_memory, resolve_device

#: Name of the profiler's allocation/free records (``torch.autograd.profiler`` uses the same).
_MEMORY_EVENT = "[memory]"


def build_layer(attention_type: str, d_model: int, n_heads: int, seq_len: int, **options: Any) -> Attention:
    """An attention layer from the registry, sized for sequences of ``seq_len`` tokens.

    ``options`` are flat, as in Hydra: :class:`~attn_lm.config.AttentionConfig` fields
    (``causal=False``, ``position="rope"``...), the mechanism's options (``window_size=128``)
    and ``dropout`` / ``bias`` of the layer; one the mechanism does not take raises with the valid list.
    """
    dims = {k: options.pop(k) for k in ("dropout", "bias") if k in options}
    config = attention_config_from_dict({"attention_type": attention_type, **options})
    return AttentionFactory.create_attention(config, AttentionDims(d_model, n_heads, max_seq_len=seq_len, **dims))


class LayerStep:
    """One forward (``backward=False``, under ``no_grad``) or forward + backward of a layer: the step
    the profiler times and measures (``bench_attention.py --check-memory-model`` measures it too).

    The step drops the gradients it made before it returns, so the next step starts from the
    weights and the input alone. Dropping them at the start instead would free the previous step's
    gradients inside the measured step: on CUDA, where the peak is taken against the memory
    allocated before the step, that subtracted the weight and input gradients from every
    measurement (the CPU profiler never sees those frees, so it counted them)."""

    def __init__(self, layer: Attention, x: Tensor, context: Optional[Tensor], backward: bool):
        self.layer, self.x, self.context, self.backward = layer, x, context, backward

    def __call__(self) -> None:
        if not self.backward:
            with torch.no_grad():
                self.layer(self.x, context=self.context)
            return
        y = self.layer(self.x, context=self.context)
        y.backward(torch.ones_like(y))
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None


def time_calls(step: Callable[[], None], iterations: int, device: torch.device) -> list[float]:
    """Per-iteration times in milliseconds (CUDA events on GPU, a host clock on CPU)."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(iterations)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        step()
        times.append(1000.0 * (time.perf_counter() - start))
    return times


def peak_step_memory_mb(step: Callable[[], None], device: torch.device) -> tuple[float, str]:
    """Peak extra memory of one call of ``step`` (see the module docstring) and how it was measured."""
    if device.type == "cuda":
        reset_peak_memory(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        step()
        peak, kind = peak_memory_mb(device)
        return peak - before, kind
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == _MEMORY_EVENT),
                     key=lambda e: e.start_ns())
    held = peak = 0
    for record in records:
        held += record.nbytes()  # positive: allocation, negative: free
        peak = max(peak, held)
    return peak / 2**20, "cpu_profiler_allocations"


def _layer_and_input(attention_type: str, batch_size: int, seq_len: int, d_model: int, n_heads: int,
                     dtype: torch.dtype, device: torch.device, backward: bool, seed: int, options: dict[str, Any]):
    """The layer a profile measures (in training mode when it runs backward), its input ``x`` and
    its context (for layers that read one), from ``seed``."""
    torch.manual_seed(seed)
    layer = build_layer(attention_type, d_model, n_heads, seq_len, **options).to(device=device, dtype=dtype)
    layer.train(backward)
    x = torch.randn(batch_size, seq_len, d_model, device=device, dtype=dtype, requires_grad=backward)
    return layer, x, torch.randn_like(x) if layer.uses_context else None


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class AttentionProfiler:
    """Latency, memory and throughput of single attention layers (see the module docstring)."""

    @staticmethod
    def profile_attention(
        attention_type: str = "flash",
        batch_size: int = 4,
        seq_len: int = 2048,
        num_iterations: int = 100,
        d_model: int = 512,
        n_heads: int = 8,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
        backward: bool = True,
        warmup: Optional[int] = None,
        seed: int = 0,
        **options: Any,
    ) -> dict[str, Any]:
        """Profile one layer of ``attention_type`` on ``[batch_size, seq_len, d_model]`` inputs.

        ``warmup`` defaults to ``max(2, num_iterations // 10)`` untimed iterations. ``options``
        are :class:`~attn_lm.config.AttentionConfig` fields for the layer. Returns
        ``forward_ms`` (median, no autograd), ``forward_backward_ms`` (median, ``None`` unless
        ``backward``), ``avg_latency_ms`` (the median of the workload: forward + backward when
        ``backward`` else forward), ``latency_p10_ms`` / ``latency_p90_ms`` of that workload,
        ``memory_mb`` (peak of that workload) with ``memory_kind``, ``tokens_per_s``
        (``batch_size * seq_len`` per workload step), and the settings (``device``, ``dtype``...).
        """
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        device = resolve_device(device)
        warmup = max(2, num_iterations // 10) if warmup is None else warmup
        layer, x, context = _layer_and_input(attention_type, batch_size, seq_len, d_model, n_heads, dtype, device,
                                             backward, seed, options)
        forward = LayerStep(layer, x, context, backward=False)
        workloads = {"forward": forward}
        if backward:
            workloads["forward_backward"] = LayerStep(layer, x, context, backward=True)
        times: dict[str, list[float]] = {}
        for name, step in workloads.items():
            time_calls(step, warmup, device)
            times[name] = time_calls(step, num_iterations, device)
        main = "forward_backward" if backward else "forward"
        memory_mb, memory_kind = peak_step_memory_mb(workloads[main], device)
        latency = statistics.median(times[main])
        return {
            "attention_type": layer.name,
            "family": layer.family,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "d_model": d_model,
            "n_heads": n_heads,
            "options": dict(options),
            "dtype": str(dtype).removeprefix("torch."),
            "device": str(device),
            "backward": backward,
            "iterations": num_iterations,
            "warmup": warmup,
            "forward_ms": statistics.median(times["forward"]),
            "forward_backward_ms": statistics.median(times["forward_backward"]) if backward else None,
            "avg_latency_ms": latency,
            "latency_p10_ms": _quantile(times[main], 0.1),
            "latency_p90_ms": _quantile(times[main], 0.9),
            "memory_mb": memory_mb,
            "memory_kind": memory_kind,
            "tokens_per_s": batch_size * seq_len / (latency / 1000.0),
            "parameters": sum(p.numel() for p in layer.parameters()),
        }

    @staticmethod
    def measure_memory(attention_type: str, batch_size: int, seq_len: int, d_model: int, n_heads: int,
                       dtype: torch.dtype = torch.float32, device: Optional[torch.device | str] = None,
                       backward: bool = True, seed: int = 0, **options: Any) -> float:
        """The ``memory_mb`` of :meth:`profile_attention` (same layer, input and measurement) without
        its timed iterations: one measured step, for checks that need only the peak."""
        device = resolve_device(device)
        layer, x, context = _layer_and_input(attention_type, batch_size, seq_len, d_model, n_heads, dtype, device,
                                             backward, seed, options)
        return peak_step_memory_mb(LayerStep(layer, x, context, backward), device)[0]
