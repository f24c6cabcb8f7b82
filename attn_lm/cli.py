"""What the command-line entry points (train, evaluate, generate) share: the config directory
shipped in the package (``attn_lm/conf``; ``--config-dir`` adds one of your own, ``--config-path``
replaces it), the ``${attn_lm.*}`` resolvers registered before anything is resolved, a mistake in
the input as one line on stderr (``HYDRA_FULL_ERROR=1``: the traceback), ``+attention.<option>=...``
reaching the mechanism's own check, and run directories named ``attention=local,seed=2`` passed
unquoted.

An input error is one this package raises on purpose (``ValueError``/``OSError``/
``FloatingPointError`` from its own code), a Lightning ``MisconfigurationException`` or a required
key left unset; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from .attention.config import AttnLmDeprecationWarning
from .budgets import register_resolvers

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
#: The Hydra configs, package data (an installed wheel carries them; pyproject.toml).
CONF_DIR = PACKAGE_DIR / "conf"
#: Exception types that report bad input when this package raises them (bugs raise others).
INPUT_ERRORS = (ValueError, OSError, FloatingPointError)


class InputError(CompactHydraException):
    """A mistake in the command line, the data or the run directory: Hydra prints only this message."""


def raised_by_package(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is this package's code (a deliberate check,
    not a failure deep inside a library)."""
    tb: Optional[TracebackType] = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE_DIR)


class BelowWarning(logging.Filter):
    """Passes DEBUG and INFO records only (stdout; warnings and errors go to stderr)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def is_input_error(err: BaseException) -> bool:
    """This package's deliberate checks, Lightning's configuration errors and a required key left
    unset (``ckpt=???``)."""
    if isinstance(err, (MisconfigurationException, MissingMandatoryValue)):
        return True
    return isinstance(err, INPUT_ERRORS) and raised_by_package(err)


def report(err: BaseException) -> NoReturn:
    """Log ``err`` as one line (console and the job's log file), then end: a single run exits
    with status 1; a multirun job fails as :class:`InputError` so the sweep goes on."""
    line = "error: " + "; ".join(part.strip() for part in str(err).splitlines() if part.strip())
    log.error("%s", line)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise InputError(line) from err
    sys.exit(1)


def one_line_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an entry point (a Hydra task function) so that an input error is reported by :func:`report`, and any
    error as a traceback when ``HYDRA_FULL_ERROR=1``."""

    @functools.wraps(task)
    def run(*args: Any) -> Any:
        try:
            return task(*args)
        except Exception as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or not is_input_error(err):
                raise
            report(err)

    return run


#: Keys whose values are paths, which may be run directories of a comparison
#: (``multirun/compare_attention/attention=local,seed=2``).
PATH_KEYS = ("ckpt", "ckpt_path", "init_from", "hydra.run.dir")


def rewrite_arg(arg: str) -> str:
    """One command-line override as Hydra should read it:

    * ``+attention.<key>=v`` -> ``++attention.<key>=v``: every attention option exists in the
      composed ``attention`` node (``conf/attention_options``), so the plain form reaches
      :meth:`AttentionFactory.resolve`; Hydra would refuse to ``+``-add a key that exists;
    * ``ckpt=<path with = or ,>`` -> the path quoted, so a comparison's run directory can be passed
      as its folder is named (Hydra would read ``=`` as an error and ``,`` as a sweep)."""
    if arg.startswith("+attention."):
        return "+" + arg
    key, sep, value = arg.partition("=")
    if sep and key in PATH_KEYS and ("=" in value or "," in value) and value[:1] not in "'\"":
        return f"{key}='" + value.replace("'", "\\'") + "'"
    return arg


def hydra_entry(config_name: str, task: Callable[[DictConfig], Any]) -> Callable[[], Any]:
    """The console-script ``main`` that runs ``task`` on ``conf/<config_name>.yaml`` composed with
    the command line, after :func:`rewrite_arg` (Hydra reads ``sys.argv`` itself), with input
    errors as one line and library deprecation warnings off."""

    @functools.wraps(task)
    def job(cfg: DictConfig) -> Any:
        register_resolvers()  # also in launcher workers (joblib, submitit), which run only this function
        return task(cfg)

    run = hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(one_line_errors(job))

    def main() -> Any:
        register_resolvers()  # the sweeper expands ${attn_lm.mechanisms:...} in this process
        sys.argv = [sys.argv[0], *map(rewrite_arg, sys.argv[1:])]
        # Libraries' deprecation notices are for developers of this package, not its users.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        # ... but this package's own: an old key the user gave still works, and says its new name.
        warnings.filterwarnings("default", category=AttnLmDeprecationWarning)
        return run()

    return main
