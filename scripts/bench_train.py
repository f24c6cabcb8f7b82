"""Benchmark one training step of a GPT-2-small-shaped model for each attention mechanism.

What is measured
----------------
For each mechanism in ``--mechanisms`` (default ``full``): a GPT built with that attention in
every layer (GPT-2 small by default: 12 layers, d_model 768, 12 heads, T = 1024, vocab 50304,
batch 16, learned positions, no biases, no dropout), trained on random tokens (no data loading),
one step = forward + loss under ``torch.autocast`` (bf16 on CUDA, fp32 off it), backward,
fused AdamW step, ``zero_grad(set_to_none=True)``; the model is ``torch.compile``d by default
on CUDA (``--no-compile`` to disable). ``--warmup-steps`` steps (compilation happens there),
then ``--steps`` steps each timed on its own (CUDA events on GPU), reported as the median:

* ``step ms`` and ``tokens/s = B T / step``;
* ``MFU = tokens/s * flops_per_token / peak``, with ``flops_per_token = 6 N + 12 L d T``
  (``GPT.flops_per_token``: forward + backward of the ``N`` non-embedding parameters plus dense
  causal attention scores, PaLM appendix B / nanoGPT's ``estimate_mfu``; the same dense formula
  for every mechanism, so MFU is throughput in units of "full-attention model FLOPs") and
  ``peak`` the card's bf16 matmul throughput *measured in this run* (median of an
  ``n x n x n`` matmul, ``2 n^3`` FLOPs, ``--matmul-size``, default 8192), not the datasheet
  number (which no kernel reaches);
* peak allocated CUDA memory over the timed steps.

``--nanogpt-baseline`` adds a minimal nanoGPT-equivalent model written below (plain modules,
``F.scaled_dot_product_attention(is_causal=True)``, same shape, same step) to check that the
library's model has no overhead over the reference implementation. Output: a markdown table on
stdout (streamed), and JSON lines in ``--out``.

Example: ``python scripts/bench_train.py --mechanisms full,local,linear --nanogpt-baseline``.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, Optional

import _bench_common as common  # first: puts the repository root on sys.path
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attn_lm import GPT, AttentionConfig, AttentionFactory, GPTConfig

COLUMNS = ["name", "params (M)", "step ms", "tokens/s", "MFU %", "peak MB", "note"]


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
    attention = AttentionConfig(attention_type=mechanism, **args.options.get(mechanism, {}))
    return GPTConfig(vocab_size=args.vocab_size, block_size=args.seq_len, n_layer=args.n_layer,
                     d_model=args.d_model, n_heads=args.n_heads, bias=args.bias, attention=attention)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul throughput: median time of ``[n, n] @ [n, n]`` (``2 n^3`` FLOPs)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timing = common.benchmark(lambda: a @ b, device, target_ms=500.0)
    return 2 * n**3 / (timing.ms * 1e-3) / 1e12


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, idx: Tensor, targets: Tensor,
               amp_dtype: Optional[torch.dtype]) -> Callable[[], None]:
    device_type = idx.device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(model: nn.Module, flops_per_token: float, args, peak_tflops: float) -> dict[str, Any]:
    """Warm-up then timed training steps of ``model``; returns the row's measurements."""
    device = args.device
    model = model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=device.type == "cuda")
    compiled = torch.compile(model) if args.compile else model
    gen = torch.Generator(device=device).manual_seed(0)
    idx, targets = (torch.randint(args.vocab_size, (args.batch_size, args.seq_len), device=device, generator=gen)
                    for _ in range(2))
    step = train_step(compiled, optimizer, idx, targets, common.DTYPES[args.dtype] if args.dtype != "fp32" else None)
    for _ in range(args.warmup_steps):
        step()
    common.reset_peak_memory(device)
    ms = statistics.median(common.time_calls(step, args.steps, device))
    tokens_per_s = args.batch_size * args.seq_len / (ms * 1e-3)
    return {
        "params_m": n_params / 1e6,
        "step_ms": ms,
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / (peak_tflops * 1e12),
        "peak_mb": common.peak_memory_mb(device),
    }


def run(name: str, build: Callable[[], tuple[nn.Module, float]], args, peak_tflops: float,
        table: common.MarkdownTable, out: common.JsonLines) -> None:
    """Build (``build`` returns the model and its FLOPs per token) and benchmark one model; an
    OOM or error is reported in the row and the next model still runs."""
    row: dict[str, Any] = {"name": name, "batch_size": args.batch_size, "seq_len": args.seq_len,
                           "compile": args.compile, "dtype": args.dtype, "peak_tflops": peak_tflops}
    try:
        model, flops_per_token = build()
        row.update(measure(model, flops_per_token, args, peak_tflops), flops_per_token=flops_per_token)
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


def parse_args(argv=None):
    device = common.default_device()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", type=common.csv_strs, default=["full"], help="comma-separated attention types")
    p.add_argument("--options", action="append", default=[], metavar="MECH.OPTION=VALUE",
                   help="mechanism option, repeatable (e.g. --options local.window_size=256)")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bias", action="store_true", help="biases in linear layers and LayerNorms")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16" if device.type == "cuda" else "fp32",
                   help="autocast dtype (fp32 = no autocast)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=device.type == "cuda")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--matmul-size", type=int, default=8192 if device.type == "cuda" else 1024,
                   help="n of the n x n x n matmul that measures the peak")
    p.add_argument("--nanogpt-baseline", action="store_true", help="also time the nanoGPT-equivalent reference")
    p.add_argument("--out", type=str, default=None, help="JSON-lines output file")
    args = p.parse_args(argv)
    args.mechanisms = [AttentionFactory.get_class(n).name for n in args.mechanisms]
    args.options = common.parse_mechanism_options(args.options)
    if args.warmup_steps < 0 or args.steps < 1:
        p.error("--warmup-steps must be >= 0 and --steps >= 1")
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
        (f"autocast {args.dtype}, compile={args.compile}, fused AdamW={device.type == 'cuda'}, "
         f"{args.warmup_steps} warm-up + {args.steps} timed steps (median)"),
        (f"peak (measured {args.matmul_size}^3 {args.dtype} matmul): {peak:.4g} TFLOP/s; "
         "MFU = tokens/s * (6 N + 12 L d T) / peak"),
    ]))
    print()
    table, out = common.MarkdownTable(COLUMNS), common.JsonLines(args.out)
    try:
        for name in args.mechanisms:
            def build(name=name):
                torch.manual_seed(0)
                model = GPT(gpt_config(name, args))
                return model, model.flops_per_token(args.seq_len)

            run(name, build, args, peak, table, out)
        if args.nanogpt_baseline:
            def build_reference():
                torch.manual_seed(0)
                with torch.device("meta"):  # same shape as 'full': its FLOPs per token, no allocation
                    flops = GPT(gpt_config("full", args)).flops_per_token(args.seq_len)
                model = ReferenceGPT(args.vocab_size, args.seq_len, args.n_layer, args.d_model, args.n_heads, args.bias)
                return model, flops

            run("nanoGPT reference", build_reference, args, peak, table, out)
    finally:
        out.close()


if __name__ == "__main__":
    main()
