"""Spread one comparison multirun over the GPUs of a host: one process per GPU (or several).

    python scripts/sweep_gpus.py --gpus 0,1,2,3 -- experiment=compare_tinyshakespeare \\
        data.block_size=256,2048 hydra.sweep.dir=runs/ts
    python scripts/sweep_gpus.py --per-gpu 4 -- experiment=compare_recall seed=1,2,3   # small runs, packed
    python scripts/sweep_gpus.py --plan [--per-gpu 4] -- <the same overrides>          # what remains

The values of one swept key (``--split``, default ``attention``; all registered mechanisms when
the overrides do not list any) are dealt round-robin to the GPUs; each GPU gets its own
``python -m attn_lm.train -m ... attention=<its share>`` with ``CUDA_VISIBLE_DEVICES`` set to
that GPU, and all of them write into the same sweep directory. Every run still has a whole GPU
to itself, so wall-clock budgets stay comparable, and N GPUs finish an N-times longer sweep.

Hydra's own launchers do not do this: joblib runs jobs in parallel but cannot pin each to a free
GPU, and submitit needs SLURM. Use a preset whose sweep directory and run folders are
deterministic (the ``compare_*`` experiments: ``multirun/<experiment_name>/<overrides>``), so
the processes never collide and re-running the command resumes the sweep (finished runs are
skipped). Each process's output is printed with a ``[gpu N]`` prefix (``[gpu N.slot]`` when
packed); the exit status is the first non-zero status of the processes. SIGINT/SIGTERM stop all
of them.

Every process gets the seed as its last override: Hydra varies the last swept key fastest, so all
seeds of a cell (everything else fixed) run one after the other, and a sweep stopped at the end of
a GPU session leaves whole cells behind, not one seed of each.

``--per-gpu N`` starts N processes per GPU (the values are dealt to GPU x slot), for runs too
small to fill a GPU (MQAR). It is refused with a wall-clock budget (``budget.time``): equal-time
runs are comparable only when each has a whole GPU.

``--plan`` starts nothing: it prints the sweep's cells in the order they run, with the runs done
and to do (a complete ``results.json`` in the run's folder counts as done), and estimates the time
left from the measured ``wall_time_s`` of each cell's finished runs (``--run-minutes`` for cells
with none): the run-minutes left, and the wall clock of the busiest process.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from .cli import rewrite_arg
from .compare import parse_overrides, sweep_jobs


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


def process_overrides(rest: Sequence[str], key: str, share: Sequence[str]) -> list[str]:
    """The overrides of one multirun process: ``key`` over its ``share``, the seed last (Hydra
    varies the last swept key fastest: every seed of a cell before the next cell)."""
    seeds = [o for o in rest if o.partition("=")[0] == "seed"]
    return [*(o for o in rest if o not in seeds), f"{key}={','.join(share)}", *seeds]


def sweep_config(overrides: Sequence[str]) -> DictConfig:
    """The composed config, Hydra's node included, of the sweep's first job (every swept key at its
    first value): the preset's budget, sweep parameters and folders."""
    from hydra import compose, initialize_config_dir

    from .budgets import register_resolvers
    from .cli import CONF_DIR

    register_resolvers()
    first = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override()
             else o.input_line for o in parse_overrides(overrides)]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", first, return_hydra_config=True)


def timed(cfg: DictConfig, jobs: Sequence[Sequence[str]]) -> bool:
    """Whether a run of the sweep has a wall-clock budget (the preset's, or one a job sets)."""
    given = {o.partition("=")[2] for job in jobs for o in job
             if o.partition("=")[0] in ("budget.time", "trainer.max_time")}
    return cfg.trainer.get("max_time") is not None or bool(given - {"null"})


def plan_lines(cfg: DictConfig, jobs: Sequence[Sequence[str]], processes: Sequence[tuple[str, Sequence[str]]],
               key: str, run_minutes: float) -> list[str]:
    """The cells of the sweep, each with the process that runs it (``processes``: its label and its
    values of ``key``), in the order each process runs them: done / all runs, minutes per run (``m``
    measured, ``a`` assumed); then the time left: run-minutes, and the wall clock of the busiest
    process (processes run side by side; packed runs' measured times include the sharing)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname  # how Hydra names run folders

    if OmegaConf.to_container(cfg.hydra.sweep)["subdir"] != "${hydra.job.override_dirname}":
        raise ValueError("--plan needs run folders named by their overrides "
                         "(hydra.sweep.subdir=${hydra.job.override_dirname}, as in the compare_* presets)")
    naming = cfg.hydra.job.config.override_dirname
    sweep_dir = Path(cfg.hydra.sweep.dir)
    values_of: dict[str, set[str]] = {}
    for key_value in {o for job in jobs for o in job}:
        values_of.setdefault(key_value.partition("=")[0], set()).add(key_value)
    swept = {k for k, values in values_of.items() if len(values) > 1} - {"seed"}  # a cell: all its seeds
    cells: dict[tuple, list[Optional[float]]] = {}  # cell -> wall seconds of each run (None: to do)
    for job in jobs:
        folder = sweep_dir / get_overrides_dirname(parse_overrides(job), list(naming.exclude_keys), naming.item_sep,
                                                   naming.kv_sep)
        try:
            results = json.loads((folder / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            results = {}
        wall = results.get("wall_time_s") if results.get("status") == "complete" else None
        cells.setdefault(tuple(o for o in job if o.partition("=")[0] in swept), []).append(wall)
    process_of = {value: i for i, (_, share) in enumerate(processes) for value in share}
    left = [0.0] * len(processes)  # run-minutes left per process
    lines = [f"plan of {sweep_dir}: {len(jobs)} runs in {len(cells)} cells, in the order each process runs them",
             "  done  min/run  process  cell"]
    for cell, walls in cells.items():
        measured = [w for w in walls if w is not None]
        minutes, source = (sum(measured) / len(measured) / 60, "m") if measured else (run_minutes, "a")
        value = next((o.partition("=")[2] for o in cell if o.partition("=")[0] == key), None)
        process = process_of.get(value, 0)  # a key with one value: one process
        left[process] += minutes * (len(walls) - len(measured))
        lines.append(f"  {len(measured):>2}/{len(walls):<2} {minutes:6.2f} {source}  {processes[process][0]:<8} "
                     f"{' '.join(cell) or '(one cell)'}")
    todo = sum(w is None for walls in cells.values() for w in walls)
    lines += [f"done: {len(jobs) - todo} of {len(jobs)} runs, "
              f"{sum(None not in walls for walls in cells.values())} of {len(cells)} cells",
              f"left: {todo} runs, {sum(left):.0f} run-minutes, about {max(left):.0f} min of wall clock with "
              f"{len(processes)} process{'es' if len(processes) > 1 else ''} (m: the mean wall_time_s of the cell's "
              "finished runs, a: --run-minutes; process start-up and data setup come on top)"]
    return lines


def _pump(prefix: str, stream) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix} {line}")
        sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--gpus 0,1,...] [--per-gpu N] [--split KEY] [--plan "
                                           "[--run-minutes M]] -- OVERRIDES...")
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU ids (default: every GPU torch sees)")
    parser.add_argument("--per-gpu", type=int, default=1,
                        help="processes per GPU, for small runs (refused with a wall-clock budget)")
    parser.add_argument("--split", default="attention", help="swept key whose values are dealt to the processes")
    parser.add_argument("--plan", action="store_true",
                        help="start nothing: print the cells in run order, the runs done, and the time left")
    parser.add_argument("--run-minutes", type=float, default=1.0,
                        help="--plan: minutes per run for cells without a finished run to measure")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of attn_lm.train (after --)")
    args = parser.parse_args(argv)
    if args.per_gpu < 1:
        parser.error("--per-gpu must be at least 1")
    if args.gpus is None:
        import torch

        gpus = [str(i) for i in range(torch.cuda.device_count())]
        if not gpus and not args.plan:
            parser.error("no GPU visible: pass --gpus explicitly")
        gpus = gpus or ["0"]
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    # As the processes will read them (cli.rewrite_arg is idempotent): run folders are named after them.
    values, rest = split_values([rewrite_arg(o) for o in args.overrides], args.split)
    # GPU-major order: the first values go to different GPUs before a GPU gets a second process.
    slots = [(gpu, f"[gpu {gpu}]" if args.per_gpu == 1 else f"[gpu {gpu}.{slot}]")
             for slot in range(args.per_gpu) for gpu in gpus]
    shares = deal(values, len(slots))
    if args.plan or args.per_gpu > 1:
        cfg = sweep_config(rest + [f"{args.split}={','.join(values)}"])
        jobs = sweep_jobs(cfg.hydra.sweeper.params, process_overrides(rest, args.split, values))
        if args.per_gpu > 1 and timed(cfg, jobs):
            parser.error("--per-gpu > 1 with a wall-clock budget (budget.time): runs that share a GPU get less "
                         "of it, so equal-time results would not compare; give each run a whole GPU")
        if args.plan:
            processes = [(prefix, share) for (_, prefix), share in zip(slots, shares)]
            print("\n".join(plan_lines(cfg, jobs, processes, args.split, args.run_minutes)))
            return 0
    # The processes import this very attn_lm, installed or not.
    python_path = [str(Path(__file__).resolve().parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    procs: list[tuple[str, subprocess.Popen]] = []
    threads = []
    for (gpu, prefix), share in zip(slots, shares):
        cmd = [sys.executable, "-m", "attn_lm.train", "-m", *process_overrides(rest, args.split, share)]
        print(f"{prefix} {args.split}={','.join(share)}", flush=True)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONPATH": os.pathsep.join(python_path)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        procs.append((prefix, proc))
        thread = threading.Thread(target=_pump, args=(prefix, proc.stdout), daemon=True)
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
    for (prefix, _), code in zip(procs, codes):
        if code:
            print(f"{prefix} failed with exit status {code}", flush=True)
    return next((code for code in codes if code), 0)


if __name__ == "__main__":
    raise SystemExit(main())
