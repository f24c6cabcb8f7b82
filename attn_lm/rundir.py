"""Run directories that cannot be corrupted: one live run per directory, a finished run is never
overwritten by accident, resuming needs something to resume, and a resumed run keeps one metrics
history (:func:`merge_metric_histories`).

:func:`claimed` is taken by :func:`attn_lm.train.train` (Python API, every job of a multirun) and,
for a single run, already by :class:`RunDirGuard`, a Hydra callback that runs before Hydra writes
``.hydra/`` and the log file into the directory, so a refused run leaves the directory untouched.
Only the process of global rank 0 claims: the other ranks of a DDP/FSDP job share its directory.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .checkpoint import LAST, resolve_checkpoint
from .cli import one_line_errors

log = logging.getLogger(__name__)

#: What a training run writes into its directory (removed by ``overwrite=true``).
RUN_OUTPUTS = ("results.json", "checkpoints", "csv")


def resume_checkpoint(cfg: DictConfig, out: Path) -> Optional[Path]:
    """The checkpoint that ``ckpt_path`` names: ``last`` = this run directory's, else a file or a
    run directory; ``None`` when training starts from scratch."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        if not (out / LAST).is_file():
            raise FileNotFoundError(f"ckpt_path=last, but {out / LAST} does not exist: there is nothing to resume in "
                                    f"{out}; leave ckpt_path out to train from scratch")
        return out / LAST
    return resolve_checkpoint(ckpt_path)


def previous_outputs(out: Path) -> list[str]:
    return [name for name in RUN_OUTPUTS if (out / name).exists()]


def check_fresh(out: Path, cfg: DictConfig, clear: bool) -> None:
    """A run from scratch needs a directory without another run's outputs, unless ``overwrite=true``
    (or a resumable sweep re-runs a failed or changed job): then, with ``clear``, those outputs are
    removed, so metrics and checkpoints of two runs never mix. (Without ``clear`` only the refusal:
    a sweep's complete job is skipped later, by ``train``, and must keep its outputs.)"""
    found = previous_outputs(out)
    if not found or cfg.get("ckpt_path") is not None:
        return
    if not (cfg.get("overwrite") or cfg.get("skip_completed")):
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): resume it with ckpt_path=last, "
                              "replace it with overwrite=true, or set hydra.run.dir=... to a new directory")
    if not clear:
        return
    log.warning("removing the previous run's %s from %s", ", ".join(found), out)
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def claimed(out: Path, cfg: DictConfig, clear: bool = True) -> Iterator[None]:
    """Hold ``out/.lock`` while the block runs (re-entrant in one process; the OS frees it when the
    process dies, so a killed run can be resumed at once), after :func:`check_fresh`."""
    if rank_zero_only.rank != 0:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    # One lock object per path in this process (is_singleton), so claiming twice is re-entrant.
    lock = FileLock(os.path.abspath(out / ".lock"), timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise BlockingIOError(f"another run is writing to {out} (it holds {out / '.lock'}); wait for it to end or "
                              "set hydra.run.dir=... to another directory") from None
    try:
        check_fresh(out, cfg, clear)
        resume_checkpoint(cfg, out)
        yield
    finally:
        lock.release()


class RunDirGuard(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): claim a single run's directory
    before Hydra writes anything into it, and keep it claimed until the run ends."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        out = Path(str(OmegaConf.select(config, "hydra.run.dir"))).resolve()
        one_line_errors(lambda cfg: self._stack.enter_context(claimed(out, cfg, clear=False)))(config)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._stack.close()


def merge_metric_histories(csv_dir: Path) -> None:
    """One metrics history per run: Lightning's CSV logger starts ``version_<n+1>`` when a run is
    resumed; fold every version into ``version_0/metrics.csv`` (rows of steps that a later segment
    logged again, i.e. redone after the checkpoint, are dropped) and remove the later versions."""
    versions = sorted(csv_dir.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if len(versions) < 2:
        return
    rows: list[dict[str, str]] = []
    for version in versions:  # a killed segment may have no metrics.csv yet (the logger buffers)
        segment = read_csv(version / "metrics.csv")
        if segment:
            first = min(int(row["step"]) for row in segment)
            rows = [row for row in rows if int(row["step"]) < first] + segment
    tmp = versions[0] / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted(set().union(*rows)))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, versions[0] / "metrics.csv")
    for version in versions[1:]:
        shutil.rmtree(version)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
