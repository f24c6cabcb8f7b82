"""What bounds a decoding step, row by row: the GPU's kernels or the host's work per token.

A batch-1 step at the GPT-2-small shape takes ~0.5 ms on an H200 and reads ~10% of what the card
could copy in that time, so neither bandwidth nor FLOPs bound it: either the latency of the ~200
small kernels inside its CUDA graph does, or the host's work per token (the replay and its checks,
sampling, the token bookkeeping). A row of ``bench_decode.py`` used to run 15-35% slower than the
same row in another call, for all its repeats: this script showed it was the host (0.4-1 ms per
token under Inductor's CUDA-graph trees, at an unchanged SM clock), which the explicitly captured
step removed (benchmarks/RESULTS.md 6g). This builds
``bench_decode``'s model and decoder for each mechanism ``--rows`` times in one process, each row
from a fresh compile state as ``bench_decode`` does, decodes greedily, and prints per row:

* ``wall ms/token``: ``--steps`` steps, synchronised at the end (no profiler);
* ``host ms/token``: the time the host took to *issue* those steps, read before the final
  synchronisation (a step needs no device value, so the host runs ahead of the GPU while CUDA's
  launch queue, about a thousand launches, has room; past that the host waits too, so host ~=
  wall alone does not prove a host-bound step);
* over ``--profile-steps`` more steps under ``torch.profiler``: ``GPU busy ms/token`` (the union
  of kernel intervals), ``kernel ms/token`` (their summed durations), ``kernels/token``;

and ``SM MHz``, the card's SM clock read through NVML (``pynvml``, when installed) as the timed
steps end. Then each mechanism's top kernels (first row) and, with two rows or more, the kernels
whose time per token differs most between its slowest and fastest row. GPU busy ~= wall: the
kernels bound the step; GPU busy well under wall: the GPU waited for the host. A slow row whose
kernels did not get slower was held up by the host; one whose kernels all grew alike ran at a
lower clock (compare ``SM MHz``); one where a few kernels grew got other kernels (compilation or
tuning). On CPU there are no kernels to count: the host and wall columns only.

    python scripts/profile_decode.py --mechanisms full mqa --rows 3
    python scripts/profile_decode.py --mechanisms full --untuned-step --rows 2
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from _bench_common import DTYPES, MarkdownTable, header, idle_gaps, parse_mechanism_options, synchronize
from bench_decode import add_model_arguments, build_model, fresh_compile_state, tuned_step

from attn_lm.decoding import Decoder


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mechanisms", nargs="+", default=["full"])
    p.add_argument("--rows", type=int, default=3, help="decoders per mechanism, each from a fresh compile state")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--warmup-steps", type=int, default=30, help="untimed steps first (compilation, recording)")
    p.add_argument("--steps", type=int, default=200, help="timed steps, without the profiler")
    p.add_argument("--profile-steps", type=int, default=50, help="steps under torch.profiler")
    p.add_argument("--top", type=int, default=12, help="kernels listed per mechanism")
    p.add_argument("--options", nargs="*", default=[], metavar="MECH.OPTION=VALUE")
    add_model_arguments(p)
    p.add_argument("--eager", action="store_true", help="the eager step (compile=false)")
    p.add_argument("--untuned-step", action="store_true", help="Decoder(tune_step=False)")
    args = p.parse_args()
    for name in ("rows", "batch", "prompt", "steps", "profile_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def positions(args: argparse.Namespace) -> int:
    """Tokens a row holds: the prompt and every step."""
    return args.prompt + args.warmup_steps + args.steps + args.profile_steps + 1


def sm_clock_mhz(device: torch.device) -> int | None:
    """The SM clock NVML reports now (its sample period is 1/6 to 1 s), or None without a CUDA
    device or without ``pynvml`` (package ``nvidia-ml-py``, not a dependency)."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.clock_rate(device)
    except ModuleNotFoundError:
        return None


def profile_row(model, args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Any], collections.Counter]:
    """One decoder's columns and its kernels' total microseconds by name."""
    fresh_compile_state()
    total = positions(args)
    decoder = Decoder(model, total, max_context=total, compile=not args.eager, tune_step=not args.untuned_step)
    token = decoder.prefill(torch.randint(0, args.vocab, (args.batch, args.prompt), device=device)).argmax(-1, keepdim=True)

    def decode(steps: int) -> None:
        nonlocal token
        for _ in range(steps):
            token = decoder.step(token).argmax(-1, keepdim=True)  # greedy, on the device

    decode(args.warmup_steps)
    synchronize(device)
    start = time.perf_counter()
    decode(args.steps)
    issued = time.perf_counter() - start
    clock = sm_clock_mhz(device)  # while the GPU still runs the issued steps
    synchronize(device)
    wall = time.perf_counter() - start
    row = {"wall ms/token": 1e3 * wall / args.steps, "tok/s": args.batch * args.steps / wall,
           "host ms/token": 1e3 * issued / args.steps}
    if clock is not None:
        row["SM MHz"] = clock
    kernels_by_name: collections.Counter = collections.Counter()
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode(args.profile_steps)
            synchronize(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy, _ = idle_gaps([(e.time_range.start, e.time_range.end) for e in kernels])
        n = args.profile_steps
        for e in kernels:
            kernels_by_name[e.name] += e.time_range.end - e.time_range.start
        row.update({"GPU busy ms/token": busy / 1e3 / n, "kernel ms/token": sum(kernels_by_name.values()) / 1e3 / n,
                    "kernels/token": len(kernels) / n})
    if not decoder.compile and not args.eager:
        row["note"] = "eager step (fallback: see the warning)"
    return row, kernels_by_name


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    step = "eager" if args.eager else "compiled" + (", kernels tuned" if tuned_step(args, device) else "")
    print(header(device, [f"dtype {dtype}, d_model {args.d_model}, {args.n_layer} layers, {args.n_heads} heads, "
                          f"vocab {args.vocab}, position {args.position}, batch {args.batch}, prompt {args.prompt}, "
                          f"options {' '.join(args.options) or '-'}; decoding step: {step}"]))
    options = parse_mechanism_options(args.options)
    print(f"\n### Greedy decoding: {args.steps} timed and {args.profile_steps} profiled steps per row\n")
    table = MarkdownTable(["mechanism", "row", "wall ms/token", "tok/s", "host ms/token", "GPU busy ms/token",
                           "kernel ms/token", "kernels/token", "SM MHz", "note"])
    rows: dict[str, list[tuple[dict[str, Any], collections.Counter]]] = {}
    for name in args.mechanisms:
        model = build_model(name, args, positions(args), options, dtype, device)
        for row_index in range(1, args.rows + 1):
            row, kernels = profile_row(model, args, device)
            rows.setdefault(name, []).append((row, kernels))
            table.row({"mechanism": name, "row": row_index, **row})
        del model
    for name, measured in rows.items():
        if measured[0][1]:
            print_kernels(name, measured, args)


def print_kernels(name: str, measured: list[tuple[dict[str, Any], collections.Counter]],
                  args: argparse.Namespace) -> None:
    """A mechanism's top kernels (row 1) and, with two rows or more, the kernels whose time per
    token differs most between its slowest and fastest row (by wall time)."""
    per_token = args.profile_steps
    print(f"\n### Top kernels of `{name}` (row 1), per token\n")
    kernel_table = MarkdownTable(["us/token", "kernel"])
    for kernel, us in measured[0][1].most_common(args.top):
        kernel_table.row({"us/token": us / per_token, "kernel": kernel[:100]})
    if len(measured) < 2:
        return
    order = sorted(range(len(measured)), key=lambda i: measured[i][0]["wall ms/token"])
    fast, slow = order[0], order[-1]
    fast_kernels, slow_kernels = measured[fast][1], measured[slow][1]
    change = {k: (slow_kernels[k] - fast_kernels[k]) / per_token for k in set(fast_kernels) | set(slow_kernels)}
    print(f"\n### `{name}`: kernels that differ most between row {slow + 1} (slowest) and row {fast + 1} "
          f"(fastest), per token\n")
    diff_table = MarkdownTable(["slow - fast us/token", "slow us/token", "fast us/token", "kernel"])
    for kernel in sorted(change, key=lambda k: -abs(change[k]))[:args.top]:
        diff_table.row({"slow - fast us/token": change[kernel], "slow us/token": slow_kernels[kernel] / per_token,
                        "fast us/token": fast_kernels[kernel] / per_token, "kernel": kernel[:100]})


if __name__ == "__main__":
    main()
