"""Shared helpers of the benchmark scripts: timing, peak memory, environment header, output.

Timing follows Triton's ``do_bench``: one call to compile / warm caches, one timed call to
estimate the cost, enough warm-up calls to fill a quarter of ``target_ms``, then ``reps`` calls (enough to fill
``target_ms``, clamped to ``[min_reps, max_reps]``) each timed on its own; the reported time is
the median. On CUDA every call is bracketed by ``torch.cuda.Event`` s (GPU time, no host sync
inside the loop); on CPU by ``time.perf_counter``. The L2 cache is not flushed between calls
(the benchmarked tensors are tens of MB, larger than L2 on an H100).

Peak memory is ``torch.cuda.max_memory_allocated`` during the estimate call, after
``reset_peak_memory_stats`` (so compilation is not counted): it includes the inputs, which are
the same for every row of a shape, so rows stay comparable. It is not measured on CPU.
"""
from __future__ import annotations

import contextlib
import json
import math
import platform
import runpy
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

import torch

# Make ``attn_lm`` importable when the scripts run from a checkout that is not pip-installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# One timing loop and one memory measurement for training, the profiler and the benchmarks.
from attn_lm.devices import peak_memory_mb, reset_peak_memory, synchronize  # noqa: E402
from attn_lm.profiler import time_calls  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Timing:
    """Median milliseconds per call over ``reps`` timed calls and peak memory (MB, CUDA only).
    ``over_budget``: a single call took longer than the caller's budget, so only it was timed."""

    ms: float
    reps: int
    peak_mb: Optional[float] = None
    over_budget: bool = False


def benchmark(fn: Callable[[], Any], device: torch.device, target_ms: float = 200.0, min_reps: int = 3,
              max_reps: int = 200, budget_ms: float = math.inf) -> Timing:
    """Median time of ``fn()`` (see the module docstring; ``warmup_ms = target_ms / 4``) and the
    peak memory of the estimate call. A call slower than ``budget_ms`` is reported alone
    (``over_budget=True``) instead of being repeated."""
    fn()  # compilation, autotuning, allocator warm-up
    synchronize(device)
    reset_peak_memory(device)
    estimate = time_calls(fn, 1, device)[0]
    peak = cuda_peak_mb(device)
    if estimate > budget_ms:
        return Timing(estimate, 1, peak, over_budget=True)
    per_call = max(estimate, 1e-3)
    time_calls(fn, min(max_reps, int(target_ms / 4 / per_call)), device)
    reps = max(min_reps, min(max_reps, int(target_ms / per_call)))
    return Timing(statistics.median(time_calls(fn, reps, device)), reps, peak)


def cuda_peak_mb(device: torch.device) -> Optional[float]:
    """Peak allocated CUDA memory (MB) since :func:`reset_peak_memory`; ``None`` off CUDA, where
    the process's peak RSS would count every earlier cell too."""
    return peak_memory_mb(device)[0] if device.type == "cuda" else None


def free_memory_bytes(device: torch.device) -> int:
    """Free device memory (CUDA) or physical RAM (CPU), for "would it fit" estimates."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def release_memory(device: torch.device) -> None:
    """Return cached blocks after a cell (and after an OOM) so the next one starts clean."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def raise_recompile_limits(limit: int = 1024) -> None:
    """Long sweeps compile the same code for many shapes and modules; the default recompile
    limit (8) would make Dynamo silently fall back to eager mode after a few shapes."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, limit)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> str:
    """bf16 on GPUs that support it, fp32 on CPU (bf16 matmuls on CPU are not representative)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def header(device: torch.device, extra: Sequence[str] = ()) -> str:
    """Markdown header: the card, library versions and the exact command line."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        card = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        card, cuda = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)", "no CUDA"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [
        f"- device: {card}",
        f"- torch {torch.__version__}, triton {triton_version}, {cuda}, Python {platform.python_version()}",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        *(f"- {line}" for line in extra),
    ]
    return "\n".join(lines)


class MarkdownTable:
    """A markdown table printed row by row (flushed), so a sweep cut short still shows its rows."""

    def __init__(self, columns: Sequence[str], stream: TextIO = sys.stdout):
        self.columns, self.stream = list(columns), stream
        self._print("| " + " | ".join(self.columns) + " |")
        self._print("|" + "|".join("---" for _ in self.columns) + "|")

    def row(self, values: dict[str, Any]) -> None:
        self._print("| " + " | ".join(fmt(values.get(c)) for c in self.columns) + " |")

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def fmt(value: Any) -> str:
    """Table cell: ``-`` for missing values, 3 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-2 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


class JsonLines:
    """Appends one JSON object per result to ``path`` (flushed per line); no-op without a path."""

    def __init__(self, path: Optional[str]):
        self.file = open(path, "w") if path else None

    def write(self, record: dict[str, Any]) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def idle_gaps(kernels: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Busy time and idle gaps ``(length, start)`` of the union of kernel intervals (µs)."""
    busy, gaps, start, end = 0.0, [], None, None
    for s, e in sorted(kernels):
        if end is None or s > end:
            if end is not None:
                busy += end - start
                gaps.append((s - end, end))
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        busy += end - start
    return busy, sorted(gaps, reverse=True)


def is_oom(error: BaseException) -> bool:
    """CUDA (or host) out-of-memory, including OOMs re-raised by compiled code."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)


def describe_error(error: BaseException) -> str:
    """One short table cell for a failed benchmark cell."""
    if is_oom(error):
        return "OOM"
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"error: {type(error).__name__}: {message[:70]}"


def parse_mechanism_options(values: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["local.window_size=512", ...]`` -> ``{"local": {"window_size": 512}}`` (canonical
    mechanism names; integers and true/false converted). Whether the option applies is checked when the
    layer is built, by :class:`~attn_lm.attention.AttentionFactory`."""
    from attn_lm import AttentionFactory

    options: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, value = item.partition("=")
        mech, dot, option = key.partition(".")
        if not (sep and dot and mech and option):
            raise SystemExit(f"--options expects MECHANISM.OPTION=VALUE (e.g. local.window_size=512), got {item!r}")
        name = AttentionFactory.get_class(mech).name
        flag = {"true": True, "false": False}.get(value.lower(), value)
        options.setdefault(name, {})[option] = int(value) if value.lstrip("-").isdigit() else flag
    return options


def csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def csv_strs(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


@contextlib.contextmanager
def report_stream(path: Optional[str]) -> Iterator[TextIO]:
    """The file at ``path`` (closed afterwards), or stdout when ``path`` is None."""
    if path is None:
        yield sys.stdout
        return
    with open(path, "w") as out:
        yield out


def run_training_job(overrides: Sequence[str]) -> None:
    """``python -m attn_lm.train OVERRIDES`` in this process, so that a script's patches of
    ``LitGPT`` apply to the real job; a clean exit returns, a failing one raises."""
    sys.argv = ["attn_lm.train", *overrides]
    try:
        runpy.run_module("attn_lm.train", run_name="__main__")
    except SystemExit as done:
        if done.code:
            raise
