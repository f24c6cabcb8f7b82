"""Benchmark the training step of a GPT-2-small-shaped model for each attention mechanism, the
real training loop around it, and the speed guard that keeps both at least as fast as nanoGPT.

What is measured
----------------
For each mechanism in ``--mechanisms`` (default ``full``; ``all`` = every registered one) and
each of ``--modes`` (``compiled``: ``attn_lm.lit_module.compile_for_training``, i.e. one graph
with ``fullgraph`` and static shapes, exactly as training compiles; ``eager``): a GPT built with
that attention in every layer (GPT-2 small by default: 12 layers, d_model 768, 12 heads,
T = 1024, vocab 50304, batch 16, learned positions, no biases, no dropout), trained on random
tokens (no data loading), one step = forward + loss under ``torch.autocast`` (bf16 on CUDA, fp32
off it), backward, fused AdamW step, ``zero_grad(set_to_none=True)``. ``--warmup-steps`` steps
(compilation happens there), then ``--steps`` steps each timed on its own (CUDA events on GPU),
reported as the median:

* ``step ms`` and ``tokens/s = B T / step``;
* ``MFU = tokens/s * flops_per_token / peak``, with ``flops_per_token = 6 N + 12 L d T``
  (``GPT.flops_per_token``: forward + backward of the ``N`` non-embedding parameters plus dense
  causal attention scores, PaLM appendix B / nanoGPT's ``estimate_mfu``; the same dense formula
  for every mechanism, so MFU is throughput in units of "full-attention model FLOPs") and
  ``peak`` the card's bf16 matmul throughput *measured in this run* (median of an
  ``n x n x n`` matmul, ``2 n^3`` FLOPs, ``--matmul-size``, default 8192), not the datasheet
  number (which no kernel reaches);
* peak allocated CUDA memory over the timed steps.

With both modes a mechanism that runs slower compiled than eager is flagged in the summary.
``--compile-mode reduce-overhead`` compiles the library's model (and the ``--loop`` run) into
CUDA graphs, as ``compile_mode=reduce-overhead`` does in training.

``--nanogpt-baseline`` adds a minimal nanoGPT-equivalent model written below (plain modules,
``F.scaled_dot_product_attention(is_causal=True)``, same shape, same step, compiled the way
nanoGPT's train.py compiles it) and prints ``full``'s tokens/s and peak memory as ratios of it.
``--min-ratio R`` makes the script exit 1 when ``full`` (compiled when compiled is measured)
runs below ``R`` x the reference's tokens/s, and ``--max-memory-ratio M`` when its peak memory
is above ``M`` x the reference's: the guard of benchmarks/CHECKS.md.

``--loop`` times the real training path, ``python -m attn_lm.train`` in a subprocess at the same
shape (``--loop-overrides`` picks the data, default Tiny Shakespeare at character level from
``$ATTN_LM_DATA_ROOT``), reads its measured step time from ``results.json`` (Lightning loop,
data loading, logging, gradient clipping, LR schedule; compilation and evaluation excluded by
the SpeedMonitor), and times the bare compiled step of the *same* model (its checkpoint's
config, same optimizer and clipping, on a batch of the loop's own data) in this process. The
loop's step time is a mean over its measured steps in a row, so the bare step is timed the same
way (as many steps in a row, mean) and their ratio is the loop's overhead
(``--max-loop-overhead``); the usual burst median of ``--steps`` steps is printed beside it (on
an H200 the same step measured 4% slower sustained than in a burst: benchmarks/RESULTS.md 3g).
``--nanogpt-dir DIR`` also runs nanoGPT's own ``train.py`` from ``DIR`` (prepared as
``../shared/tools/nanogpt-baseline.sh`` describes) at that shape in the same call and compares
tokens/s (``--min-loop-ratio``).

Output: a markdown table on stdout (streamed), a summary of ratios and checks, and JSON lines in
``--out``.

Example: ``python scripts/bench_train.py --mechanisms full,local,linear --nanogpt-baseline``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import _bench_common as common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_lm import GPT, AttentionFactory, GPTConfig
from attn_lm.config import attention_config_from_dict
from attn_lm.lit_module import COMPILE_MODES, compile_for_training

COLUMNS = ["name", "mode", "params (M)", "step ms", "tokens/s", "MFU %", "peak MB", "note"]
REFERENCE = "nanoGPT reference"


class ReferenceBlock(nn.Module):
    """nanoGPT's block: pre-norm causal self-attention through SDPA, then a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.n_heads = n_heads
        self.ln_1 = nn.LayerNorm(d_model, bias=bias)
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.attn_proj = nn.Linear(d_model, d_model, bias=bias)
        self.ln_2 = nn.LayerNorm(d_model, bias=bias)
        self.c_fc = nn.Linear(d_model, 4 * d_model, bias=bias)
        self.mlp_proj = nn.Linear(4 * d_model, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                   for t in self.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    """nanoGPT's model: token + learned position embeddings, blocks, final LayerNorm, tied head."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.blocks = nn.ModuleList(ReferenceBlock(d_model, n_heads, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model, bias=bias)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)


def gpt_config(mechanism: str, args) -> GPTConfig:
    attention = attention_config_from_dict({"attention_type": mechanism, **args.options.get(mechanism, {})})
    return GPTConfig(vocab_size=args.vocab_size, context_len=args.seq_len, n_layer=args.n_layer,
                     d_model=args.d_model, n_heads=args.n_heads, bias=args.bias, attention=attention)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul throughput: median time of ``[n, n] @ [n, n]`` (``2 n^3`` FLOPs)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = common.benchmark(lambda: a @ b, device, target_ms=500.0)
    return 2 * n**3 / (timing.ms * 1e-3) / 1e12


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: Tensor, targets: Tensor,
               amp_dtype: Optional[torch.dtype], clip: Optional[float] = None,
               forward_kwargs: Optional[dict[str, Any]] = None) -> Callable[[], None]:
    """One training step of ``model`` on ``idx, targets`` as a closure; ``forward_kwargs`` go to
    the model's forward (the library's model trains with ``return_logits=False``, as
    ``LitGPT.training_step`` does)."""
    forward_kwargs = forward_kwargs or {}
    device_type = idx.device.type
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> None:
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graph trees (else a no-op)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            _, loss = model(idx, targets, **forward_kwargs)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def compile_model(model: nn.Module, mode: str = "default") -> nn.Module:
    """The library's model compiles as training compiles it, in ``mode`` (or stays eager where a
    layer cannot be traced); the reference compiles as nanoGPT's train.py does."""
    if isinstance(model, GPT):
        compiled = compile_for_training(model, mode)
        return model if compiled is None else compiled
    return torch.compile(model)


def measure(model: nn.Module, flops_per_token: float, args, peak_tflops: float, compiled: bool,
            vocab_size: int, clip: Optional[float] = None, batch: Optional[tuple[Tensor, Tensor]] = None,
            sustained_steps: int = 0) -> dict[str, Any]:
    """Warm-up then timed training steps of ``model`` on one fixed batch (``batch``, else random
    tokens); returns the row's measurements. ``sustained_steps``: then also the mean step time
    over that many consecutive steps (``sustained_ms``), the statistic of a training run's
    speed windows (a burst's median can be faster than a run's mean of the same step)."""
    device = args.device
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    runner = compile_model(model, args.compile_mode) if compiled else model
    if batch is None:
        gen = torch.Generator(device=device).manual_seed(0)
        batch = tuple(torch.randint(vocab_size, (args.batch_size, args.seq_len), device=device, generator=gen)
                      for _ in range(2))
    step = train_step(runner, optimizer, *(t.to(device) for t in batch),
                      common.DTYPES[args.dtype] if args.dtype != "fp32" else None, clip,
                      {"return_logits": False} if isinstance(model, GPT) else None)
    for _ in range(args.warmup_steps):
        step()
    common.reset_peak_memory(device)
    ms = statistics.median(common.time_calls(step, args.steps, device))
    tokens_per_s = args.batch_size * args.seq_len / (ms * 1e-3)
    row = {
        "params_m": n_params / 1e6,
        "step_ms": ms,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12),
        "peak_mb": common.cuda_peak_mb(device),
    }
    if sustained_steps:
        row["sustained_ms"] = statistics.fmean(common.time_calls(step, sustained_steps, device))
        row["note"] = f"median of {args.steps}; mean of {sustained_steps} in a row: {row['sustained_ms']:.2f} ms"
    if args.profile:
        print_profile(step, device, args.profile)
    return row


def print_profile(step: Callable[[], None], device: torch.device, rows: int, steps: int = 3) -> None:
    """The ``rows`` kernels (operators on CPU) that take the most time over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        common.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\nprofile, {steps} steps:\n" + prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70),
          flush=True)


def run(name: str, mode: str, build: Callable[[], tuple[nn.Module, float]], args, peak_tflops: float,
        table: common.MarkdownTable, out: common.JsonLines, vocab_size: Optional[int] = None,
        clip: Optional[float] = None, batch: Optional[tuple[Tensor, Tensor]] = None,
        sustained_steps: int = 0) -> dict[str, Any]:
    """Build (``build`` returns the model and its FLOPs per token) and benchmark one model in one
    mode; an OOM or error is reported in the row and the next model still runs."""
    row: dict[str, Any] = {"name": name, "mode": mode, "batch_size": args.batch_size, "seq_len": args.seq_len,
                           "dtype": args.dtype, "peak_tflops": peak_tflops}
    model = None
    try:
        model, flops_per_token = build()
        row.update(measure(model, flops_per_token, args, peak_tflops, mode == "compiled",
                           vocab_size or args.vocab_size, clip, batch, sustained_steps),
                   flops_per_token=flops_per_token)
    except Exception as error:  # one failing mechanism must not end the sweep
        row["note"] = common.describe_error(error)
    finally:
        model = None
        torch._dynamo.reset()  # free this model's compiled graphs
        common.release_memory(args.device)
    out.write(row)
    mfu = row.get("mfu")
    table.row({**row, "params (M)": row.get("params_m"), "step ms": row.get("step_ms"),
               "tokens/s": row.get("tokens_per_s"), "MFU %": None if mfu is None else 100 * mfu,
               "peak MB": row.get("peak_mb")})
    return row


# ----------------------------------------------------------------------------- the real loop
def run_training_loop(args) -> dict[str, Any]:
    """``python -m attn_lm.train`` at the benchmark's shape in a subprocess; its results.json."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench_train_loop_"))
    overrides = [
        *args.loop_overrides,
        f"model.n_layer={args.n_layer}", f"model.d_model={args.d_model}", f"model.n_heads={args.n_heads}",
        f"model.bias={str(args.bias).lower()}", f"data.block_size={args.seq_len}", f"data.batch_size={args.batch_size}",
        "model.dropout=0.0", f"trainer.max_steps={args.loop_steps}", f"trainer.val_check_interval={args.loop_steps}",
        "trainer.log_every_n_steps=25", "test_after_training=false", "trainer.enable_model_summary=false",
        f"compile={str('compiled' in args.modes).lower()}", f"compile_mode={args.compile_mode}",
        f"hydra.run.dir={run_dir}",
    ]
    if args.device.type == "cuda":
        overrides.insert(0, "trainer=gpu")
    command = [sys.executable, "-m", "attn_lm.train", *overrides]
    print(f"\nloop: `{' '.join(command[1:])}`", flush=True)
    done = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the training loop failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "results.json").read_text())


def loop_model(results: dict[str, Any]) -> GPT:
    """The loop's own model (config from its checkpoint), for the bare step of the same work."""
    from attn_lm.config import gpt_config_from_dict

    hparams = torch.load(results["checkpoint"], map_location="cpu", weights_only=False)["hyper_parameters"]
    torch.manual_seed(0)
    return GPT(gpt_config_from_dict(hparams["model_config"]))


def loop_batch(results: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The loop's first training batch (its data module, built from the run's resolved config):
    the bare step trains on the loop's own data, so both do the same work."""
    from hydra.utils import instantiate

    datamodule = instantiate(results["config"]["data"])
    datamodule.prepare_data()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    return x, y


def run_nanogpt_train_py(nanogpt_dir: Path, args) -> float:
    """Median ms/iteration of nanoGPT's own train.py at this shape (iterations 30 on, as
    nanogpt-baseline.sh does), character-level Tiny Shakespeare prepared in ``nanogpt_dir``."""
    data = nanogpt_dir / "data" / "shakespeare_char"
    if not (data / "train.bin").exists():
        subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True)
    iters = max(60, args.loop_steps)
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", f"--n_layer={args.n_layer}",
               f"--n_head={args.n_heads}", f"--n_embd={args.d_model}", f"--block_size={args.seq_len}",
               f"--batch_size={args.batch_size}", "--gradient_accumulation_steps=1", "--dropout=0.0",
               f"--max_iters={iters}", f"--lr_decay_iters={iters}", "--warmup_iters=10", "--eval_interval=1000000",
               "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False",
               f"--out_dir={tempfile.mkdtemp(prefix='nanogpt_')}", f"--compile={'compiled' in args.modes}",
               f"--bias={args.bias}", "--dtype=bfloat16" if args.dtype == "bf16" else "--dtype=float32"]
    print(f"nanoGPT: `{' '.join(command[1:])}` in {nanogpt_dir}", flush=True)
    done = subprocess.run(command, cwd=nanogpt_dir, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    pattern = re.compile(r"iter (\d+): .*time ([0-9.]+)ms")
    times = [float(m.group(2)) for m in map(pattern.match, done.stdout.splitlines()) if m and int(m.group(1)) >= 30]
    return statistics.median(times)


def measure_loop(args, peak: float, table: common.MarkdownTable, out: common.JsonLines) -> dict[str, float]:
    """Loop vs bare step of the same model (and vs nanoGPT's train.py with ``--nanogpt-dir``)."""
    results = run_training_loop(args)
    loop_ms = float(results["step_ms"])
    tokens = args.batch_size * args.seq_len
    config = results["config"]
    clip = config["trainer"].get("gradient_clip_val")
    mode = "compiled" if "compiled" in args.modes else "eager"

    def build():
        model = loop_model(results)
        return model, model.flops_per_token(args.seq_len)

    bare = run("bare step of the loop's model", mode, build, args, peak, table, out,
               vocab_size=loop_model(results).config.vocab_size, clip=clip, batch=loop_batch(results),
               sustained_steps=int(results["measured_steps"]))
    loop_row = {"name": "python -m attn_lm.train", "mode": mode, "step_ms": loop_ms, "tokens_per_s": tokens / loop_ms * 1e3,
                "params (M)": results["params"] / 1e6, "note": f"{results['measured_steps']} steps timed"}
    table.row({**loop_row, "step ms": loop_ms, "tokens/s": loop_row["tokens_per_s"], "peak MB": results["peak_memory_mb"]})
    out.write({**loop_row, "peak_mb": results["peak_memory_mb"], "results": results["run_dir"]})
    if "step_ms" not in bare:
        raise SystemExit(f"the bare step of the loop's model failed: {bare.get('note')}")
    # Like against like: the loop's step time is a mean over its measured steps in a row, so the
    # bare step's is too (its burst median is printed for reference).
    ratios = {"loop_overhead": loop_ms / bare["sustained_ms"] - 1.0,
              "loop_overhead_vs_burst": loop_ms / bare["step_ms"] - 1.0}
    if args.nanogpt_dir:
        nanogpt_ms = run_nanogpt_train_py(Path(args.nanogpt_dir), args)
        row = {"name": "nanoGPT train.py", "mode": mode, "step_ms": nanogpt_ms, "tokens_per_s": tokens / nanogpt_ms * 1e3}
        table.row({**row, "step ms": nanogpt_ms, "tokens/s": row["tokens_per_s"]})
        out.write(row)
        ratios["loop_vs_nanogpt"] = nanogpt_ms / loop_ms
    return ratios


# ----------------------------------------------------------------------------- checks
def check(ok: bool, message: str, failures: list[str]) -> None:
    print(f"- {'ok' if ok else 'FAIL'}: {message}")
    if not ok:
        failures.append(message)


def summarize(rows: list[dict[str, Any]], loop: dict[str, float], args) -> list[str]:
    """Print the ratios the targets are stated in; return the failed guard checks."""
    print("\n## Summary\n")
    failures: list[str] = []
    by = {(r["name"], r["mode"]): r for r in rows if r.get("tokens_per_s")}
    for name in args.mechanisms:
        compiled, eager = by.get((name, "compiled")), by.get((name, "eager"))
        if compiled and eager:
            speedup = compiled["tokens_per_s"] / eager["tokens_per_s"]
            message = f"{name}: compiled / eager tokens/s = {speedup:.3f}"
            if args.require_compile_win:
                check(speedup >= 1.0, message, failures)
            else:
                print(f"- {message}")
    mode = "compiled" if "compiled" in args.modes else "eager"
    full, reference = by.get(("full", mode)), by.get((REFERENCE, mode))
    if full and reference:
        speed = full["tokens_per_s"] / reference["tokens_per_s"]
        memory = full["peak_mb"] / reference["peak_mb"] if full.get("peak_mb") and reference.get("peak_mb") else None
        print(f"- full / {REFERENCE} ({mode}): tokens/s {speed:.3f}x" +
              ("" if memory is None else f", peak memory {memory:.3f}x"))
        if args.min_ratio is not None:
            check(speed >= args.min_ratio, f"full tokens/s {speed:.3f}x the reference >= {args.min_ratio}", failures)
        if args.max_memory_ratio is not None and memory is not None:
            check(memory <= args.max_memory_ratio, f"full peak memory {memory:.3f}x the reference <= "
                  f"{args.max_memory_ratio}", failures)
    elif args.min_ratio is not None or args.max_memory_ratio is not None:
        check(False, "the guard needs a measured 'full' row and --nanogpt-baseline", failures)
    if "loop_overhead" in loop:
        print(f"- training loop step time {100 * loop['loop_overhead_vs_burst']:+.1f}% over the median of "
              f"{args.steps} bare steps")
        message = (f"training loop step time {100 * loop['loop_overhead']:+.1f}% over the bare step of the same "
                   "model (mean over as many steps in a row)")
        if args.max_loop_overhead is None:
            print(f"- {message}")
        else:
            check(loop["loop_overhead"] <= args.max_loop_overhead, f"{message} (<= {100 * args.max_loop_overhead:.0f}%)",
                  failures)
    if "loop_vs_nanogpt" in loop:
        message = f"python -m attn_lm.train tokens/s = {loop['loop_vs_nanogpt']:.3f}x nanoGPT's train.py"
        if args.min_loop_ratio is None:
            print(f"- {message}")
        else:
            check(loop["loop_vs_nanogpt"] >= args.min_loop_ratio, f"{message} (>= {args.min_loop_ratio})", failures)
    return failures


def parse_args(argv=None):
    device = common.default_device()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=common.csv_strs, default=["full"],
                   help="comma-separated attention types, or 'all' for every registered one")
    p.add_argument("--options", action="append", default=[], metavar="MECH.OPTION=VALUE",
                   help="mechanism option, repeatable (e.g. --options local.window_size=256)")
    p.add_argument("--modes", type=common.csv_strs, default=["compiled" if device.type == "cuda" else "eager"],
                   help="comma-separated: compiled, eager (default: compiled on CUDA, eager on CPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode of the library's model (and of the --loop run); the reference "
                        "always compiles as nanoGPT's train.py does")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bias", action="store_true", help="biases in linear layers and LayerNorms")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if device.type == "cuda" else "fp32",
                   help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--matmul-size", type=int, default=8192 if device.type == "cuda" else 1024,
                   help="n of the n x n x n matmul that measures the peak")
    p.add_argument("--nanogpt-baseline", action="store_true", help="also time the nanoGPT-equivalent reference")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="exit 1 when full's tokens/s is below this multiple of the reference's")
    p.add_argument("--max-memory-ratio", type=float, default=None,
                   help="exit 1 when full's peak memory is above this multiple of the reference's")
    p.add_argument("--require-compile-win", action="store_true",
                   help="with --modes compiled,eager: exit 1 when a mechanism is slower compiled than eager")
    p.add_argument("--loop", action="store_true", help="also time python -m attn_lm.train at this shape")
    p.add_argument("--loop-overrides", type=str, default="data=tinyshakespeare",
                   help="space-separated Hydra overrides choosing the loop's data (default: data=tinyshakespeare, "
                        "read from $ATTN_LM_DATA_ROOT)")
    p.add_argument("--loop-steps", type=int, default=150, help="optimizer steps of the loop run")
    p.add_argument("--max-loop-overhead", type=float, default=None,
                   help="exit 1 when the loop's step time exceeds the bare step's by more than this fraction")
    p.add_argument("--nanogpt-dir", type=str, default=None,
                   help="with --loop: a prepared nanoGPT checkout whose train.py runs at the same shape")
    p.add_argument("--min-loop-ratio", type=float, default=None,
                   help="exit 1 when the loop's tokens/s is below this multiple of nanoGPT train.py's")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing each row, print its N most expensive kernels (torch.profiler)")
    p.add_argument("--out", type=str, default=None, help="JSON-lines output file")
    args = p.parse_args(argv)
    names = AttentionFactory.names() if args.mechanisms == ["all"] else args.mechanisms
    args.mechanisms = [AttentionFactory.get_class(n).name for n in names]
    args.options = common.parse_mechanism_options(args.options)
    args.loop_overrides = args.loop_overrides.split()
    if set(args.modes) - {"compiled", "eager"} or not args.modes:
        p.error(f"--modes takes compiled and/or eager, got {','.join(args.modes)}")
    if args.warmup_steps < 0 or args.steps < 1:
        p.error("--warmup-steps must be >= 0 and --steps >= 1")
    if args.nanogpt_dir and not args.loop:
        p.error("--nanogpt-dir needs --loop")
    args.device = device
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = args.device
    common.raise_recompile_limits()
    torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls, as nanoGPT does
    peak_dtype = common.DTYPES[args.dtype]
    peak = matmul_peak_tflops(device, peak_dtype, args.matmul_size)
    print("# Training step benchmark\n")
    print(common.header(device, [
        (f"model: {args.n_layer} layers, d_model {args.d_model}, {args.n_heads} heads, T={args.seq_len}, "
         f"vocab {args.vocab_size}, batch {args.batch_size}, bias={args.bias}"),
        (f"autocast {args.dtype}, modes {','.join(args.modes)} (compile mode {args.compile_mode}), "
         f"fused AdamW={device.type == 'cuda'}, {args.warmup_steps} warm-up + {args.steps} timed steps (median)"),
        (f"peak (measured {args.matmul_size}^3 {args.dtype} matmul): {peak:.4g} TFLOP/s; "
         "MFU = tokens/s * (6 N + 12 L d T) / peak"),
    ]))
    print()
    table, out = common.MarkdownTable(COLUMNS), common.JsonLines(args.out)
    rows: list[dict[str, Any]] = []
    loop: dict[str, float] = {}
    try:
        for name in args.mechanisms:
            def build(name=name):
                torch.manual_seed(0)
                model = GPT(gpt_config(name, args))
                return model, model.flops_per_token(args.seq_len)

            rows += [run(name, mode, build, args, peak, table, out) for mode in args.modes]
        if args.nanogpt_baseline:
            def build_reference():
                torch.manual_seed(0)
                with torch.device("meta"):  # same shape as 'full': its FLOPs per token, no allocation
                    flops = GPT(gpt_config("full", args)).flops_per_token(args.seq_len)
                model = ReferenceGPT(args.vocab_size, args.seq_len, args.n_layer, args.d_model, args.n_heads, args.bias)
                return model, flops

            rows += [run(REFERENCE, mode, build_reference, args, peak, table, out) for mode in args.modes]
        if args.loop:
            loop = measure_loop(args, peak, table, out)
    finally:
        out.close()
    failures = summarize(rows, loop, args)
    if failures:
        raise SystemExit(f"{len(failures)} check(s) failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
