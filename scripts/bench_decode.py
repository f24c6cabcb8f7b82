"""Decoding speed, cache memory and achieved bandwidth of every attention mechanism, with
Hugging Face GPT-2 ``generate`` as the peer, in one run.

A GPT (random weights, GPT-2 vocabulary) whose layers all use one mechanism decodes greedily
through :class:`attn_lm.decoding.Decoder` -- the path ``GPT.generate`` and the CLI take, with the
step compiled (CUDA graphs on GPU) unless ``--eager``, and with ``--compile-prefill`` the prefill
too (Inductor at the prompt's width bucket; off by default, as in the CLI; ``--eager`` turns
both off). One decoder per row, reused across the warm-up and the timed call, so CUDA graphs are
recorded and the prefill compiled once. Three tables:

1. **Generation** (per mechanism and ``--batches``; ``--prompt`` random tokens, ``--new-tokens``
   greedy tokens): ``tok/s`` = ``batch x new tokens / wall time`` of the whole generation,
   prefill included (the issue's definition); ``decode tok/s`` from the steps alone (the median of ``--repeats``
   windows of up to 64 steps);
   ``prefill ms`` (compiled or eager as the header says; after the warm-up generation, so
   compilation is never timed); ``cache B/token`` = cache bytes / (batch x positions);
   ``KV MB/step`` = the cache bytes one step reads (a static step reads every slot of its buffers); ``KV GB/s`` =
   that / step time, and ``+weights GB/s`` with the parameter bytes a step also reads; ``% copy``
   = the latter against the device-to-device copy rate measured at the start; ``vs HF`` =
   ``tok/s`` / HF's ``tok/s`` at the same batch.
2. **Hugging Face** ``GPT2LMHeadModel.generate`` at the same shape (``GPT2Config``, random
   weights, no download; ``transformers`` is optional: skipped with a note when missing), for
   each ``--hf-attn`` implementation, greedy, ``min_new_tokens = max_new_tokens``.
3. **Context scaling** (batch 1, per mechanism and ``--contexts``): prefill ``L`` tokens, time
   ``--steps`` decode steps; ``vs first`` = decode tok/s relative to the first context, next to
   the bytes a step reads (KV caches lose what their extra bytes explain; recurrent and windowed
   caches read the same bytes at every ``L``). Only steps are timed here, so the prefill stays
   eager (``--compile-prefill`` would compile one prefill per context for nothing).

Timings: CUDA is synchronised around each timed region; the median of ``--repeats`` runs. Each
row starts from a fresh compile state (:func:`fresh_compile_state`: in one process, a decoder
recorded after another of the same step shapes replays ~15% slower), so the step is compiled once per
row, and with ``--compile-prefill`` the prefill too: tens of seconds each on GPU, so split a long sweep over
several calls. A row whose step or prefill fell back to eager (a warning says why) says so in
its ``note``.

GPU (the issue's numbers, H200, GPT-2-small shape, bf16; defaults: prompt 512, 256 new tokens,
batches 1 8 64, contexts 1024 4096 16384; each mechanism's default options: local window 64,
gqa 2 kv heads; issue 14's table used local window 256: ``--options local.window_size=256``).
Batch 1 against HF (HF is timed in every generation call, for the ratio; 5 steps + 5 prefills
compiled)::

    python scripts/bench_decode.py --hf --compile-prefill --mechanisms full gqa mqa local linear --batches 1 --contexts

Batch 8 and 64; the bandwidth moonshot (``full``, batch 64, a 4k context: prompt 3840 + 256 new
tokens; ``% copy`` comes from the steps, so the prefill stays eager); context scaling from 1k to
16k (one step compiled per context, no prefill timed)::

    python scripts/bench_decode.py --compile-prefill --mechanisms full --batches 8 64 --contexts
    python scripts/bench_decode.py --mechanisms full --batches 64 --prompt 3840 --contexts
    python scripts/bench_decode.py --mechanisms linear local full --batches --contexts 1024 16384

CPU (the setting of RESULTS.md section 6: eager steps, context scaling only)::

    python scripts/bench_decode.py --device cpu --eager --threads 1 --d-model 128 --n-layer 2 --n-heads 4 \\
        --vocab 256 --position rope --batches --contexts 128 512 2048 --steps 32
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable, Optional

import torch

from _bench_common import DTYPES, MarkdownTable, describe_error, header, parse_mechanism_options, synchronize
from attn_lm import GPT, AttentionFactory, GPTConfig
from attn_lm.config import attention_config_from_dict
from attn_lm.decoding import Decoder

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", nargs="+", default=None, help="attention types (default: every registered one)")
    p.add_argument("--options", nargs="*", default=[], metavar="MECH.OPTION=VALUE",
                   help="mechanism options (default: each mechanism's own, e.g. local window 64, gqa 2 kv heads)")
    p.add_argument("--batches", nargs="*", type=int, default=[1, 8, 64], help="generation-table batches (none: skip it)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens of the generation table")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--contexts", nargs="*", type=int, default=[1024, 4096, 16384], help="context-scaling lengths")
    p.add_argument("--steps", type=int, default=64, help="timed decode steps per context-scaling row")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    add_model_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--eager", action="store_true",
                   help="compile nothing: neither the step nor the prefill (compile=false)")
    p.add_argument("--untuned-step", action="store_true",
                   help="compile the step without Inductor's coordinate-descent tuning (Decoder(tune_step=False)): "
                        "the plain compiled step, for an A/B in one call")
    p.add_argument("--compile-prefill", action="store_true",
                   help="compile the generation table's prefill too (Inductor, static width buckets; "
                        "compile_prefill=true)")
    p.add_argument("--hf", action="store_true", help="also time Hugging Face GPT-2 generate (needs transformers)")
    p.add_argument("--hf-attn", nargs="+", default=["eager", "sdpa"], help="HF attn_implementation(s) to time")
    args = p.parse_args()
    if args.eager and args.compile_prefill:
        p.error("--eager compiles nothing (the CLI's compile=false); drop it to use --compile-prefill")
    return args


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model :func:`build_model` builds (GPT-2 small by default), its device and dtype."""
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--position", default="learned", help="model.position (learned = GPT-2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")


def tuned_step(args: argparse.Namespace, device: torch.device) -> bool:
    """Whether the compiled step's kernels are tuned (``Decoder(tune_step=)``: on GPU only)."""
    return device.type == "cuda" and not (args.eager or args.untuned_step)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds ``fn()`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # compilation, CUDA-graph recording, allocator warm-up
    return statistics.median(timed(fn, device) for _ in range(repeats))


def copy_rate(device: torch.device) -> float:
    """Device-to-device copy rate in bytes/s, counting the read and the write (a 1 GiB buffer on
    GPU, 256 MiB on CPU): the practical ceiling of a memory-bound step."""
    n = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / median_time(lambda: dst.copy_(src), device, 10)


def build_model(name: str, args: argparse.Namespace, block_size: int, options: dict, dtype, device) -> GPT:
    torch.manual_seed(0)
    attention = attention_config_from_dict({"attention_type": name,
                                            **options.get(AttentionFactory.get_class(name).name, {})})
    config = GPTConfig(vocab_size=args.vocab, context_len=block_size, n_layer=args.n_layer, d_model=args.d_model,
                       n_heads=args.n_heads, position=args.position, attention=attention)
    return GPT(config).to(device=device, dtype=dtype).eval()


def param_bytes(model: GPT) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fresh_compile_state() -> None:
    """Forget every compiled graph before a row, so each row compiles and is timed as the first
    decoder of a process (the CLI's case). Under Inductor's CUDA-graph trees (the step before
    ``CUDAGraphStep``) a decoder whose step had the same shapes as an earlier one's ran ~15% slower
    (``linear``: 1,958 tok/s as the first such decoder, 1,644-1,675 as the second to fourth;
    RESULTS.md 6e); each decoder's captured graph is now its own, so this keeps rows independent
    of the order they run in."""
    torch._dynamo.reset()


def generation_row(model: GPT, batch: int, args: argparse.Namespace, device: torch.device,
                   copy: float) -> dict[str, Any]:
    """End-to-end greedy generation, then its prefill and steps timed apart on the same decoder."""
    fresh_compile_state()
    total = args.prompt + args.new_tokens
    decoder = Decoder(model, total, max_context=total, compile=not args.eager, compile_prefill=args.compile_prefill,
                      tune_step=not args.untuned_step)
    idx = torch.randint(0, args.vocab, (batch, args.prompt), device=device)

    def generate():
        torch.cat(list(decoder.stream(idx, args.new_tokens, temperature=0)), dim=1)

    seconds = median_time(generate, device, args.repeats)  # its warm-up compiles the step and the prefill
    prefill = statistics.median(timed(lambda: decoder.prefill(idx), device) for _ in range(args.repeats))
    token = idx[:, -1:]
    steps = min(args.new_tokens - 1, 64)

    def window() -> float:  # from a fresh prefill, so every window fits the decoder's positions
        decoder.prefill(idx)
        return timed(lambda: [decoder.step(token) for _ in range(steps)], device) / steps

    step = statistics.median(window() for _ in range(args.repeats))  # generate() above was the warm-up
    fallbacks = [what for what, asked, kept in (("step", not args.eager, decoder.compile),
                                                ("prefill", args.compile_prefill, decoder.compile_prefill))
                 if asked and not kept]
    return {"tok/s": batch * args.new_tokens / seconds, "prefill ms": prefill * 1e3,
            **step_columns(model, decoder, batch, total, step, copy),
            **({"note": f"eager {' and '.join(fallbacks)} (fallback: see the warning)"} if fallbacks else {})}


def step_columns(model: GPT, decoder: Decoder, batch: int, positions: int, step: float, copy: float) -> dict:
    cache = decoder.cache_nbytes()
    return {"decode tok/s": batch / step, "cache B/token": cache / (batch * positions), "KV MB/step": cache / 1e6,
            "KV GB/s": cache / step / 1e9, "+weights GB/s": (cache + param_bytes(model)) / step / 1e9,
            "% copy": 100 * (cache + param_bytes(model)) / step / copy}


def context_row(model: GPT, context: int, args: argparse.Namespace, device: torch.device, copy: float) -> dict:
    fresh_compile_state()
    total = context + args.steps + 1
    decoder = Decoder(model, total, max_context=total, compile=not args.eager, tune_step=not args.untuned_step)
    idx = torch.randint(0, args.vocab, (1, context), device=device)
    token = idx[:, -1:]

    def run():
        decoder.prefill(idx)
        decoder.step(token)  # warm: the first step after a prefill is timed with the others below
        return timed(lambda: [decoder.step(token) for _ in range(args.steps)], device) / args.steps

    run()  # compilation, CUDA-graph recording
    step = statistics.median(run() for _ in range(args.repeats))
    return step_columns(model, decoder, 1, total, step, copy)


def hf_rows(args: argparse.Namespace, dtype, device: torch.device) -> tuple[list[dict], Optional[str]]:
    """Hugging Face GPT-2 generate at the same shape, or a note why it was skipped."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as error:
        return [], f"Hugging Face skipped: {error} (pip install transformers)"
    rows = []
    for attn in args.hf_attn:
        label = f"HF GPT-2 generate, attn={attn}"
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=args.vocab, n_positions=args.prompt + args.new_tokens, n_embd=args.d_model,
                            n_layer=args.n_layer, n_head=args.n_heads)
        try:
            model = GPT2LMHeadModel._from_config(config, attn_implementation=attn).to(device=device, dtype=dtype)
        except Exception as error:  # noqa: BLE001 - one failed cell must not end the run
            rows.append({"implementation": label, "note": describe_error(error)})
            continue
        model.eval()
        for batch in args.batches:
            idx = torch.randint(0, args.vocab, (batch, args.prompt), device=device)

            def generate():
                with torch.no_grad():
                    model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=args.new_tokens,
                                   min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

            try:
                rows.append({"implementation": label, "batch": batch,
                             "tok/s": batch * args.new_tokens / median_time(generate, device, args.repeats)})
            except Exception as error:  # noqa: BLE001
                rows.append({"implementation": label, "batch": batch, "note": describe_error(error)})
        del model
    return rows, None


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    options = parse_mechanism_options(args.options)
    names = args.mechanisms or AttentionFactory.names()
    block_size = max([args.prompt + args.new_tokens] + [c + args.steps + 1 for c in args.contexts])
    copy = copy_rate(device)
    print(header(device, [f"dtype {dtype}, d_model {args.d_model}, {args.n_layer} layers, {args.n_heads} heads, "
                          f"vocab {args.vocab}, position {args.position}, options {' '.join(args.options) or '-'}",
                          f"decoding step: {'eager' if args.eager else 'compiled'}"
                          f"{', kernels tuned' if tuned_step(args, device) else ''}; "
                          "generation prefill: "
                          f"{'compiled (Inductor, width buckets)' if args.compile_prefill else 'eager'}; "
                          f"device-to-device copy {copy / 1e9:,.0f} GB/s (read + write)"]))
    hf, note = hf_rows(args, dtype, device) if args.hf else ([], None)
    hf_speed: dict[int, float] = {}  # the fastest HF implementation per batch
    for row in (r for r in hf if "tok/s" in r):
        hf_speed[row["batch"]] = max(hf_speed.get(row["batch"], 0.0), row["tok/s"])

    print(f"\n### Generation: prompt {args.prompt}, {args.new_tokens} new tokens, greedy (tok/s include prefill)\n")
    columns = ["mechanism", "batch", "tok/s", "vs HF", "decode tok/s", "prefill ms", "cache B/token", "KV MB/step",
               "KV GB/s", "+weights GB/s", "% copy", "note"]
    table = MarkdownTable(columns)
    models = {}
    for name in names:
        try:
            models[name] = build_model(name, args, block_size, options, dtype, device)
        except Exception as error:  # noqa: BLE001
            table.row({"mechanism": name, "note": describe_error(error)})
            continue
        for batch in args.batches:
            try:
                row = generation_row(models[name], batch, args, device, copy)
                if batch in hf_speed:
                    row["vs HF"] = row["tok/s"] / hf_speed[batch]
            except Exception as error:  # noqa: BLE001
                row = {"note": describe_error(error)}
            table.row({"mechanism": name, "batch": batch, **row})

    if args.hf:
        print("\n### Hugging Face peer, same shape and dtype\n")
        if note:
            print(note)
        hf_table = MarkdownTable(["implementation", "batch", "tok/s", "note"])
        for row in hf:
            hf_table.row(row)

    if args.contexts:
        print(f"\n### Context scaling: batch 1, {args.steps} decode steps after a prefill of L tokens\n")
        scaling = MarkdownTable(["mechanism", "context", "decode tok/s", "vs first", "KV MB/step", "KV GB/s",
                                 "+weights GB/s", "% copy", "note"])
        for name, model in models.items():
            first = None
            for context in args.contexts:
                try:
                    row = context_row(model, context, args, device, copy)
                    first = first or row["decode tok/s"]
                    row["vs first"] = row["decode tok/s"] / first
                except Exception as error:  # noqa: BLE001
                    row = {"note": describe_error(error)}
                scaling.row({"mechanism": name, "context": context, **row})


if __name__ == "__main__":
    main()
