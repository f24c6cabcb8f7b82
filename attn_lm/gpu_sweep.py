"""Spread one comparison multirun over the GPUs of a host: one process per GPU.

    python scripts/sweep_gpus.py --gpus 0,1,2,3 -- experiment=compare_tinyshakespeare \\
        data.block_size=256,2048 hydra.sweep.dir=runs/ts

The values of one swept key (``--split``, default ``attention``; all registered mechanisms when
the overrides do not list any) are dealt round-robin to the GPUs; each GPU gets its own
``python -m attn_lm.train -m ... attention=<its share>`` with ``CUDA_VISIBLE_DEVICES`` set to
that GPU, and all of them write into the same sweep directory. Every run still has a whole GPU
to itself, so wall-clock budgets stay comparable, and N GPUs finish an N-times longer sweep.

Hydra's own launchers do not do this: joblib runs jobs in parallel but cannot pin each to a free
GPU, and submitit needs SLURM. Use a preset whose sweep directory and run folders are
deterministic (the ``compare_*`` experiments: ``multirun/<experiment_name>/<overrides>``), so
the processes never collide and re-running the command resumes the sweep (finished runs are
skipped). Each process's output is printed with a ``[gpu N]`` prefix; the exit status is the
first non-zero status of the processes. SIGINT/SIGTERM stop all of them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence


def split_values(overrides: Sequence[str], key: str) -> tuple[list[str], list[str]]:
    """(the values swept for ``key``, the other overrides). For ``attention`` when ``key`` is not
    among the overrides: every mechanism but the kernel variants (all with compare.kernel_variants=true)."""
    values: Optional[list[str]] = None
    rest = []
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name == key:
            if values is not None:
                raise ValueError(f"{key} is given twice: {item!r}")
            values = [v for v in value.split(",") if v]
        else:
            rest.append(item)
    if values is None:
        if key != "attention":
            raise ValueError(f"--split {key}: no '{key}=a,b,...' among the overrides")
        from .budgets import sweep_mechanisms

        values = sweep_mechanisms("compare.kernel_variants=true" in rest).split(",")
    if not values:
        raise ValueError(f"{key}= lists no values")
    return values, rest


def deal(values: Sequence[str], n: int) -> list[list[str]]:
    """Round-robin shares of ``values`` for ``n`` workers (empty shares dropped)."""
    return [share for share in (list(values[i::n]) for i in range(n)) if share]


def _pump(prefix: str, stream) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--gpus 0,1,...] [--split KEY] -- OVERRIDES...")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids (default: every GPU torch sees)")
    parser.add_argument("--split", default="attention", help="swept key whose values are dealt to the GPUs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of attn_lm.train (after --)")
    args = parser.parse_args(argv)
    if args.gpus is None:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not gpus:
            parser.error("no GPU visible: pass --gpus explicitly")
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    values, rest = split_values(args.overrides, args.split)
    # The processes import this very attn_lm, installed or not.
    python_path = [str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    procs: list[tuple[str, subprocess.Popen]] = []
    threads = []
    for gpu, share in zip(gpus, deal(values, len(gpus))):
        cmd = [sys.executable, "-m", "attn_lm.train", "-m", *rest, f"{args.split}={','.join(share)}"]
        print(f"[gpu {gpu}] {args.split}={','.join(share)}", flush=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": os.pathsep.join(python_path)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        procs.append((gpu, proc))
        thread = threading.Thread(target=_pump, args=(f"[gpu {gpu}]", proc.stdout), daemon=True)
        thread.start()
        threads.append(thread)

    def stop(signum, frame):
        for _, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [proc.wait() for _, proc in procs]
    for thread in threads:
        thread.join()
    for (gpu, _), code in zip(procs, codes):
        if code:
            print(f"[gpu {gpu}] failed with exit status {code}", flush=True)
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    raise SystemExit(main())
