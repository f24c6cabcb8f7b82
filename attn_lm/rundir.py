"""Run plumbing that ``train``, ``evaluate`` and ``generate`` share: where a run writes, the
start-up checks on that directory, atomic writes, and the results file.

Run directories cannot be corrupted: one live run per directory, a finished run is never
overwritten by accident (or, in a resumable sweep, is skipped: :func:`completed_results`),
resuming needs something to resume, and a resumed run keeps one metrics history
(:func:`merge_metric_histories`). Whether the directory is writable and the disk can hold the
checkpoints is checked before any data is read.

:func:`claimed` is taken by :func:`attn_lm.train.train` (Python API, every job of a multirun) and,
for a single run, already by :class:`RunDirGuard`, a Hydra callback that runs before Hydra writes
``.hydra/`` and the log file into the directory, so a refused run leaves the directory untouched.
Only the process of global rank 0 claims: the other ranks of a DDP/FSDP job share its directory.

Every file that a reader may open while it is written (results, token caches, tokenizers,
downloads) goes through :func:`write_atomic`: a temporary file in the same folder, renamed over
the destination, so readers see the old file or the complete new one, never a part.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Union

import hydra
import lightning
import torch
from filelock import FileLock, Timeout
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .cli import one_line_errors

log = logging.getLogger(__name__)

#: What a training run writes into its directory (removed by ``overwrite=true``).
RUN_OUTPUTS = ("results.json", "checkpoints", "csv")
#: Where a run directory keeps the checkpoint to evaluate, generate from or resume.
LAST = Path("checkpoints") / "last.ckpt"


def run_dir() -> Path:
    """The run's output directory (Hydra's, or the working directory outside Hydra)."""
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path.cwd()


# ------------------------------------------------------------------ start-up checks
def check_writable(directory: Path) -> None:
    """Fail at start, not after training, when outputs cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise OSError(f"output directory {directory} is not writable ({err.strerror}); "
                      "set hydra.run.dir=... to a writable location") from err


def check_free_space(directory: Path, params: int, copies: int) -> None:
    """Fail at start when the disk cannot hold the run's checkpoints.

    A checkpoint holds the fp32 weights and AdamW's two fp32 moments (12 bytes per parameter);
    ``copies`` of them are on disk at once, and one more while a new one is being written
    (Lightning writes to a temporary file, then renames). 64 MiB of headroom for logs."""
    need = 12 * params * (copies + 1) + (64 << 20)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(f"only {free / 2**20:,.0f} MiB free under {directory}, and this run's checkpoints need about "
                      f"{need / 2**20:,.0f} MiB ({params:,} parameters x 12 bytes x {copies + 1} files + logs); "
                      "free some space or set hydra.run.dir=... to a larger disk")


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A checkpoint file as given, or the ``checkpoints/last.ckpt`` of a run directory (or
    ``last.ckpt`` of its ``checkpoints`` folder)."""
    path = Path(str(path)).expanduser()
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (pass ckpt=<run directory> or ckpt=<file.ckpt>)")
    for candidate in (path / LAST, path / LAST.name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} is a directory without {LAST} (pass ckpt=<run directory> or ckpt=<file.ckpt>)")


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


def completed_results(out: Path, cfg: DictConfig) -> Optional[dict[str, Any]]:
    """The ``results.json`` of a finished run of the same config in ``out``, when ``cfg.skip_completed``.

    ``None`` (run it) when skipping is off, there is no ``results.json``, it is unreadable or
    not ``status == "complete"``, or it was written for a different config.
    """
    if not cfg.get("skip_completed"):
        return None
    path = Path(out) / "results.json"
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        log.warning("re-running %s: its results.json is unreadable (%s)", out, err)
        return None
    if results.get("status") != "complete":
        log.warning("re-running %s: results.json has status %r", out, results.get("status"))
        return None
    if _run_defining(results.get("config")) != _run_defining(plain_config(cfg)):
        log.warning("re-running %s: results.json was written for a different config", out)
        return None
    log.info("skipping %s: complete results.json for the same config (skip_completed=false re-runs it)", out)
    return results


def plain_config(cfg: DictConfig) -> Any:
    """The resolved config as ``results.json`` stores it (JSON types only)."""
    return json.loads(json.dumps(OmegaConf.to_container(cfg, resolve=True), default=str))


def _run_defining(config: Any) -> Any:
    """A stored config without the keys that choose which jobs a sweep has, not what a job does
    (``compare.kernel_variants``: adding the kernel rows must not re-run the others)."""
    if not isinstance(config, dict) or not isinstance(config.get("compare"), dict):
        return config
    return {**config, "compare": {k: v for k, v in config["compare"].items() if k != "kernel_variants"}}


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


# ------------------------------------------------------------------ writing results
@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` when the ``with`` block exits without error; if
    the block fails, the temporary file is removed and ``path`` is untouched. (``os.replace`` is
    atomic on POSIX and Windows within one file system, hence the temporary file's folder.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: Union[bytes, str]) -> None:
    """Replace ``path`` by ``data`` (text as UTF-8) atomically."""
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_results(path: Path, results: dict[str, Any]) -> None:
    """``results`` as indented JSON (values JSON cannot hold as text), atomically."""
    write_atomic(path, json.dumps(results, indent=2, default=str))


def run_facts(layer_types: list[str], device: str) -> dict[str, Any]:
    """What every results file says about where and with what it ran."""
    return {"attention": layer_types, "device": device, "versions": library_versions()}


def library_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "hydra": hydra.__version__}


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
    with atomic_writer(versions[0] / "metrics.csv") as f, io.TextIOWrapper(f, newline="") as text:
        writer = csv.DictWriter(text, fieldnames=sorted(set().union(*rows)))
        writer.writeheader()
        writer.writerows(rows)
    for version in versions[1:]:
        shutil.rmtree(version)


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
