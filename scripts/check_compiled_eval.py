"""Compiled evaluation against eager and against float32, at every evaluation of a real run.

``LitGPT`` checks the first batch of each evaluation: if the compiled loss is off the eager one
by more than ``EVAL_RTOL``/``EVAL_ATOL`` it warns and evaluates eagerly from then on. That says
*that* they disagree, not which one is wrong. This runs ``python -m attn_lm.train`` with its Hydra
overrides and, on the first batch of every evaluation, writes the loss four ways on the same
weights and batch:

* compiled, in the run's precision (what the run reports);
* eager, in the run's precision;
* eager with autocast off (float32 under the mixed precisions, whose weights are float32);
* the explicit reference path with autocast off (``reference_mode``: dense masks, quadratic
  forms; O(T^2) memory).

The run keeps evaluating compiled after a disagreement (``LitGPT``'s fallback is undone here), so
every evaluation is compared. If compiled and eager sit on either side of float32, a disagreement
is rounding; if compiled is the one far from float32, a compiled kernel is wrong (RESULTS.md 2l
was such a case). The last column names the one nearer the reference.

    python scripts/check_compiled_eval.py --out eval.txt -- experiment=compare_recall \\
        data.block_size=64 model.d_model=128 attention=linear model.position=rope \\
        budget.steps=1000 trainer.val_check_interval=250
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attn_lm.attention.base import reference_mode  # noqa: E402
from attn_lm.lit_module import EVAL_ATOL, EVAL_RTOL, LitGPT  # noqa: E402
from _bench_common import report_stream, run_training_job  # noqa: E402

HEADER = "| step | split | compiled | eager | eager, autocast off | reference, autocast off | compiled vs eager | nearer the reference |"


def compare_row(module: LitGPT, x: torch.Tensor, y: torch.Tensor, compiled_loss: torch.Tensor, split: str) -> str:
    """One table row: the four losses of this batch and the verdict."""
    _, eager = module.model(x, y)
    with torch.autocast(device_type=x.device.type, enabled=False):
        _, plain = module.model(x, y)
        with reference_mode(module.model):
            _, reference = module.model(x, y)
    compiled, eager, plain, reference = (float(t) for t in (compiled_loss, eager, plain, reference))
    agree = abs(compiled - eager) <= EVAL_ATOL + EVAL_RTOL * abs(eager)
    off_compiled, off_eager = abs(compiled - reference), abs(eager - reference)
    nearer = "equal" if abs(off_compiled - off_eager) <= 1e-6 else "compiled" if off_compiled < off_eager else "eager"
    return (f"| {module.global_step} | {split} | {compiled:.4f} | {eager:.4f} | {plain:.4f} | {reference:.4f} | "
            f"{'agree' if agree else 'DISAGREE'} | {nearer} |")


def install(out: TextIO) -> list[str]:
    """Wrap ``LitGPT._check_compiled_eval``: write the row, run the check, undo its fallback.
    Returns the list the rows are appended to."""
    check = LitGPT._check_compiled_eval
    rows: list[str] = []

    def probed(module, x, y, logits, loss, split):
        rows.append(compare_row(module, x, y, loss, split))
        print(rows[-1], file=out, flush=True)
        result = check(module, x, y, logits, loss, split)
        module._compiled_eval_agrees = True  # keep evaluating compiled: every evaluation is compared
        return result

    LitGPT._check_compiled_eval = probed
    print(HEADER, file=out)
    print("|" + "---|" * (HEADER.count(" | ") + 1), file=out, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [--out FILE] -- TRAIN_OVERRIDES...")
    p.add_argument("--out", type=str, default=None, help="write the table here (default: stdout)")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    with report_stream(args.out) as out:
        rows = install(out)
        run_training_job(overrides)
    if not rows:
        raise SystemExit("no compiled evaluation ran: the model was not compiled (compile=auto compiles on the GPU "
                         "only; pass compile=true) or the run never evaluated")


if __name__ == "__main__":
    main()
