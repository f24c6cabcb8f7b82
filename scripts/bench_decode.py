"""Decoding speed and cache memory of every attention mechanism, per context length.

For each mechanism and context length ``L``: a GPT whose layers all use that mechanism prefills
``L`` random tokens into its decoding caches, then decodes ``--steps`` more tokens one at a time
(:class:`attn_lm.sampling.Decoder`, the path ``GPT.generate`` takes). Reported per row:

* ``decode tok/s``: ``batch / step time``, the median over ``--steps`` timed decode steps (after
  ``--warmup`` untimed ones; the median shrugs off a busy machine's hiccups);
* ``prefill ms``: the one forward over the ``L``-token prompt;
* ``cache``: bytes held by all layers' caches at the end (``LayerCache.nbytes()``), and
  ``bytes/token``: that divided by the ``L + warmup + steps`` tokens consumed.

What to look for: a KV cache grows linearly with ``L`` (constant bytes/token) and each step reads
all of it; GQA/MQA caches are ``n_heads / n_kv_heads`` times smaller; sliding-window caches stop
growing at the window; kernelized attention (linear/performer/cosformer) keeps an ``O(1)``
recurrent state, flat in ``L`` in both bytes and step time.

CPU (a few minutes)::

    python scripts/bench_decode.py --contexts 128 512 2048 --threads 1

GPU::

    python scripts/bench_decode.py --device cuda --dtype bfloat16 --contexts 1024 4096 16384 \\
        --d-model 768 --n-layer 12 --n-heads 12 --steps 64
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from attn_lm import GPT, AttentionConfig, AttentionFactory, GPTConfig
from attn_lm.config import ATTENTION_POSITIONS
from attn_lm.sampling import Decoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", nargs="+", default=None, help="attention types (default: every registered one)")
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 512, 2048], help="prefill lengths")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--position", default="rope", choices=ATTENTION_POSITIONS,
                   help="attention-level positions (alibi is skipped where unsupported)")
    p.add_argument("--set", nargs="*", default=[], metavar="OPTION=VALUE",
                   help="mechanism options (e.g. window_size=256 n_kv_heads=1), applied where accepted")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p.parse_args()


def mechanism_options(name: str, settings: list[str]) -> dict[str, Any]:
    """``OPTION=VALUE`` settings that ``name`` accepts, values parsed as int where possible."""
    accepted = AttentionFactory.get_class(name).options
    options = {}
    for item in settings:
        key, _, value = item.partition("=")
        if key in accepted:
            options[key] = int(value) if value.lstrip("-").isdigit() else value
    return options


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_row(model: GPT, context: int, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    total = context + args.warmup + args.steps
    decoder = Decoder(model, total, use_cache=True, max_context=total)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, context), device=device)
    token = prompt[:, -1:]
    prefill = timed(lambda: decoder.prefill(prompt), device)
    for _ in range(args.warmup):
        decoder.step(token)
    step_times = sorted(timed(lambda: decoder.step(token), device) for _ in range(args.steps))
    cache = decoder.cache_nbytes()
    return {"tok_s": args.batch / step_times[len(step_times) // 2], "prefill_ms": prefill * 1e3, "cache": cache,
            "per_token": cache / total}


def human_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.2f} GiB"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    names = args.mechanisms or AttentionFactory.names()
    block_size = max(args.contexts) + args.warmup + args.steps
    print(f"device={device} dtype={args.dtype} batch={args.batch} d_model={args.d_model} n_layer={args.n_layer} "
          f"n_heads={args.n_heads} position={args.position} steps={args.steps} torch={torch.__version__}\n")
    print("| mechanism | kv heads | context | decode tok/s | prefill ms | cache | bytes/token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        cls = AttentionFactory.get_class(name)
        position = "none" if args.position == "alibi" and cls.alibi_unsupported else args.position
        label = name if position == args.position else f"{name} (position={position})"
        attention = AttentionConfig(attention_type=name, **mechanism_options(name, args.set))
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=256, block_size=block_size, n_layer=args.n_layer, d_model=args.d_model,
                           n_heads=args.n_heads, position=position, attention=attention)
        model = GPT(config).to(device=device, dtype=dtype).eval()
        kv_heads = model.blocks[0].attn.n_kv_heads
        for context in args.contexts:
            row = bench_row(model, context, args, device)
            print(f"| {label} | {kv_heads} | {context} | {row['tok_s']:,.1f} | {row['prefill_ms']:,.1f} | "
                  f"{human_bytes(row['cache'])} | {human_bytes(row['per_token'])} |", flush=True)


if __name__ == "__main__":
    main()
