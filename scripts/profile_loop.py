"""Where the training loop loses time: host syncs and idle GPU gaps of ``python -m attn_lm.train``.

The loop can only be slower than its bare step (``bench_train.py --loop``) where the GPU waits:
for a host read of a device value (which drains the GPU's queue), or for the host to launch the
next kernels. This runs the real training job with its Hydra overrides and, inside it:

* over ``--sync-steps A B``: ``torch.cuda.set_sync_debug_mode("warn")``, and the call stacks of
  every synchronizing call, most frequent first (CUDA only);
* over ``--profile-steps A B``: ``torch.profiler`` with host and CUDA activity, then the step's
  wall time against the GPU's busy time, the largest idle gaps of the GPU with the host ops that
  cover them (what the GPU waited for), and the top CUDA kernels and host ops.

Steps are optimizer steps. On CPU there is no GPU to wait: it prints the host-op table only.
Benchmarks/RESULTS.md 3f is the run that found the loop's interval syncs with it.

    python scripts/profile_loop.py --out loop.txt -- trainer=gpu data=tinyshakespeare \\
        model.n_layer=12 model.d_model=768 model.n_heads=12 data.block_size=1024 data.batch_size=16 \\
        trainer.max_steps=90 trainer.val_check_interval=90 compile=true test_after_training=false
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from attn_lm.lit_module import LitGPT  # noqa: E402
from _bench_common import idle_gaps, report_stream, run_training_job  # noqa: E402


class LoopProbe:
    """Turns the sync hunt and the profiler on and off at the given optimizer steps."""

    def __init__(self, sync_steps: tuple[int, int], profile_steps: tuple[int, int], out: TextIO):
        self.sync_steps, self.profile_steps, self.out = sync_steps, profile_steps, out
        self.cuda = torch.cuda.is_available()
        self.syncs: collections.Counter = collections.Counter()
        self.profiler: Any = None
        self.started = 0.0

    def write(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def record_sync(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message):
            self.syncs["".join(traceback.format_stack(limit=9)[:-2])] += 1

    def on_step(self, step: int) -> None:
        if self.cuda and step == self.sync_steps[0]:
            torch.cuda.set_sync_debug_mode("warn")  # first: switching it on issues a notice of its own
            warnings.simplefilter("always")
            warnings.showwarning = self.record_sync
        if self.cuda and step == self.sync_steps[1]:
            torch.cuda.set_sync_debug_mode(0)
            self.write(f"## Host syncs over steps {self.sync_steps[0]}-{self.sync_steps[1]}: {sum(self.syncs.values())}\n")
            for stack, n in self.syncs.most_common(8):
                self.write(f"{n} at:\n{stack}")
        if step == self.profile_steps[0]:
            self.synchronize()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
            self.started = time.perf_counter()
        if step == self.profile_steps[1] and self.profiler is not None:
            self.synchronize()
            wall = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
            self.report(self.profiler, wall, self.profile_steps[1] - self.profile_steps[0])
            self.profiler = None

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def report(self, prof: Any, wall_s: float, steps: int) -> None:
        events = prof.events()
        kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
        self.write(f"## Profile over {steps} steps: wall {1e3 * wall_s / steps:.2f} ms/step (slowed by the profiler)")
        averages = prof.key_averages()
        if kernels:
            busy, gaps = idle_gaps(kernels)
            first = min(s for s, _ in kernels)
            self.write(f"GPU busy {busy / 1e3 / steps:.2f} ms/step, idle between kernels "
                       f"{sum(g for g, _ in gaps) / 1e3 / steps:.2f} ms/step, {len(kernels) / steps:.0f} kernels/step")
            host = [e for e in events if e.device_type == DeviceType.CPU]
            self.write("\nLargest GPU idle gaps, with the host ops running through them (what the GPU waited for):")
            for gap, at in gaps[:8]:
                covering = sorted((e for e in host if e.time_range.start <= at and e.time_range.end >= at + gap),
                                  key=lambda e: e.time_range.end - e.time_range.start)
                names = ", ".join(e.name[:60] for e in covering[:3]) or "-"
                self.write(f"- {gap:,.0f} µs at +{(at - first) / 1e3:.1f} ms: {names}")
            self.write("\n" + averages.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
        else:
            self.write("no CUDA kernels (a CPU run): the host ops only")
        self.write(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] -- TRAIN_OVERRIDES...")
    p.add_argument("--sync-steps", type=int, nargs=2, default=(40, 60), metavar=("FROM", "TO"))
    p.add_argument("--profile-steps", type=int, nargs=2, default=(70, 80), metavar=("FROM", "TO"))
    p.add_argument("--out", type=str, default=None, help="write the report here (default: stdout)")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    for name in ("sync_steps", "profile_steps"):
        first, last = getattr(args, name)
        if not 0 <= first < last:
            p.error(f"--{name.replace('_', '-')} takes FROM < TO, got {first} {last}")
    with report_stream(args.out) as out:
        probe = LoopProbe(tuple(args.sync_steps), tuple(args.profile_steps), out)
        LitGPT.on_train_batch_start = lambda module, batch, batch_idx: probe.on_step(module.global_step)
        run_training_job(overrides)


if __name__ == "__main__":
    main()
