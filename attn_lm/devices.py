"""The device a job runs on: which one (``auto``), its name for reports, waiting for it, and its
peak memory. Training (:class:`~attn_lm.callbacks.SpeedMonitor`), generation, the layer profiler
and the benchmark scripts all measure through these, so their numbers mean the same thing.
"""
from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

#: Linux: writing "5" resets the process's peak resident set size (VmHWM in /proc/self/status).
CLEAR_REFS, PROC_STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def resolve_device(device: Optional[torch.device | str] = None) -> torch.device:
    """``None`` or ``"auto"``: the GPU when there is one, else the CPU; anything else as given."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a host clock read after it covers them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring a new peak: the CUDA allocator's, or on Linux the process's peak RSS, so a
    run in a reused worker process (``hydra/launcher=joblib``) reports its own peak. Neither waits
    for the device: the allocator books memory when work is queued, on the host."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        CLEAR_REFS.write_text("5")


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak memory since :func:`reset_peak_memory` and how it was measured: the CUDA allocator's
    peak on GPU (``cuda_max_allocated``), peak RSS on Linux (``cpu_peak_rss``), elsewhere the
    process's lifetime max RSS (``cpu_max_rss``)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    if PROC_STATUS.exists():
        line = next(line for line in PROC_STATUS.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 2**10, "cpu_peak_rss"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10), "cpu_max_rss"
