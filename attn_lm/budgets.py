"""Training budgets of a comparison, and the resolvers its presets compute with.

Budgets (``conf/experiment/compare_attention.yaml``): every run of a comparison gets the same
budget, one of

* steps — ``budget.steps`` (``trainer.max_steps``);
* tokens — ``budget.tokens``: converted to ``trainer.max_steps = ceil(tokens / (batch_size *
  block_size * accumulate_grad_batches * devices * num_nodes))`` by the ``attn_lm.budget_steps``
  resolver, so runs at different block or batch sizes, or on more GPUs, see the same number of
  training tokens;
* wall clock — ``budget.time`` (``trainer.max_time``, ``"DD:HH:MM:SS"``); runs stop at whichever
  of the step and time limits comes first.

:func:`budget_summary` reads back which limit applied from a resolved config (it goes into
``results.json`` and the comparison report).

The presets compute with the ``${attn_lm.*}`` resolvers defined here (token budget in steps,
integer division, the list of mechanisms to sweep); :func:`register_resolvers` registers them.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .attention import AttentionFactory


def process_count(devices: Any = 1, num_nodes: Any = 1) -> int:
    """Training processes of a ``lightning.Trainer(devices=..., num_nodes=...)``: devices per node
    (an int, a list of ids, ``"0,1"``, or ``-1``/``"auto"`` = every visible GPU) times nodes."""
    if isinstance(devices, str):
        devices = devices.strip()
        if "," in devices:
            devices = [d for d in devices.split(",") if d.strip()]
        elif devices.lstrip("-").isdigit():
            devices = int(devices)
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        per_node = len(devices)
    elif devices in (-1, "auto"):
        import torch

        per_node = max(1, torch.cuda.device_count())
    else:
        per_node = int(devices)
    if per_node <= 0:
        raise ValueError(f"trainer.devices={devices!r} gives no device")
    return per_node * int(num_nodes or 1)


def steps_for_tokens(tokens: int, batch_size: int, block_size: int, accumulate: Optional[int] = 1,
                     processes: int = 1) -> int:
    """Optimizer steps that consume at least ``tokens`` training tokens over all ``processes``."""
    per_step = int(batch_size) * int(block_size) * int(accumulate or 1) * int(processes)
    if int(tokens) <= 0 or per_step <= 0:
        raise ValueError(f"budget.tokens={tokens} and tokens per step={per_step} must be positive")
    return math.ceil(int(tokens) / per_step)


def _budget_steps(steps: Optional[int], tokens: Optional[int], batch_size: int, block_size: int,
                  accumulate: Optional[int], devices: Any = 1, num_nodes: Any = 1) -> int:
    """Resolver ``${attn_lm.budget_steps:steps,tokens,batch,block,accum,devices,nodes}``: the token
    budget in steps when ``tokens`` is set, else ``steps`` (``-1`` = no step limit, for time budgets)."""
    if tokens is not None:
        return steps_for_tokens(tokens, batch_size, block_size, accumulate, process_count(devices, num_nodes))
    return -1 if steps is None else int(steps)


def _div(a: Any, b: Any) -> int:
    """Resolver ``${attn_lm.div:a,b}``: integer ``a // b`` (at least 1), e.g. a batch size that
    keeps tokens per step constant."""
    return max(1, int(a) // int(b))


def kernel_variants() -> list[str]:
    """Mechanisms that compute another one's function with another kernel (``kernel_of``): rows
    of the speed tables (scripts/bench_*), not of the quality sweeps, where they would repeat
    its numbers."""
    return [n for n in AttentionFactory.names() if AttentionFactory.get_class(n).kernel_of]


def sweep_mechanisms(with_kernel_variants: bool = False) -> str:
    """Resolver ``${attn_lm.mechanisms:${compare.kernel_variants}}``: every registered mechanism as
    a sweep value list (``full,local,...``), without :func:`kernel_variants` unless asked."""
    skip = set() if with_kernel_variants else set(kernel_variants())
    return ",".join(n for n in AttentionFactory.names() if n not in skip)


def register_resolvers() -> None:
    """Make the ``${attn_lm.*}`` resolvers of the presets known to OmegaConf. Called by every
    entry point (and in every process that runs a job) before a config is resolved; importing
    this package registers nothing. Idempotent."""
    for name, resolver in (("budget_steps", _budget_steps), ("div", _div), ("mechanisms", sweep_mechanisms)):
        OmegaConf.register_new_resolver(f"attn_lm.{name}", resolver, replace=True)


def budget_summary(config: Mapping[str, Any], processes: Optional[int] = None) -> dict[str, Any]:
    """Which budget a run used, from its resolved config (a dict or DictConfig) and its number of
    training processes (``None``: read from ``trainer.devices`` and ``trainer.num_nodes``).

    ``kind`` is ``"steps"``, ``"tokens"``, ``"time"`` or ``"steps+time"`` / ``"tokens+time"``
    (stop at whichever comes first); ``text`` says it in words for reports.
    """
    if isinstance(config, DictConfig):  # only these nodes (a composed config's hydra node may not resolve)
        config = {k: OmegaConf.to_container(config[k], resolve=True) for k in ("trainer", "data", "budget") if k in config}
    trainer, data = config["trainer"], config["data"]
    if processes is None:
        processes = process_count(trainer.get("devices", 1), trainer.get("num_nodes", 1))
    accumulate = trainer.get("accumulate_grad_batches")
    tokens_per_step = int(data["batch_size"]) * int(data["block_size"]) * int(accumulate or 1) * processes
    max_steps = trainer.get("max_steps")
    max_steps = None if max_steps is None or int(max_steps) < 0 else int(max_steps)
    max_time = trainer.get("max_time")
    tokens = (config.get("budget") or {}).get("tokens")
    limits, words = [], []
    if max_steps is not None:
        if tokens is not None and max_steps == steps_for_tokens(tokens, data["batch_size"], data["block_size"],
                                                                 accumulate, processes):
            limits.append("tokens")
            words.append(f"{si(tokens)} tokens ({max_steps} steps)")
        else:
            limits.append("steps")
            words.append(f"{max_steps} steps ({si(max_steps * tokens_per_step)} tokens)")
    if max_time:
        limits.append("time")
        words.append(f"wall clock {max_time}")
    return {
        "kind": "+".join(limits) or "none",
        "max_steps": max_steps,
        "max_time": max_time,
        "tokens": tokens,
        "tokens_per_step": tokens_per_step,
        "processes": processes,
        "text": " or ".join(words) or "no limit",
    }


def si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"
