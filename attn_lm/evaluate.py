"""``python -m attn_lm.evaluate ckpt=<run dir or .ckpt> [data=<preset>] [split=test|validation]``:
perplexity and throughput of a checkpoint on a whole split (deterministic pass, every token scored
once), written to ``evaluation.json``.

The checkpoint is enough: without ``data=`` the data settings of its training run are used, at its
training context (``block_size=null``); the tokenizer must be the checkpoint's (saved in it), so
evaluating on other data with another tokenizer is an error naming both.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from .checkpoint import Loaded, load_checkpoint
from .cli import hydra_entry
from .config import GPTConfig
from .data import LMDataModule
from .devices import device_name
from .rundir import check_writable, run_dir, run_facts, write_results

log = logging.getLogger(__name__)


def check_context(block_size: int, model: GPTConfig) -> None:
    """Learned positions exist only up to the trained ``block_size``."""
    if model.position == "learned" and block_size > model.context_len:
        raise ValueError(f"block_size={block_size} is longer than the checkpoint's model.context_len={model.context_len} "
                         f"(learned positions stop there); use block_size<={model.context_len}")


def evaluation_data(cfg: DictConfig, loaded: Loaded) -> Any:
    """The data module to evaluate on: ``data=`` or the training run's settings, at ``block_size``
    (default: the training run's), with the checkpoint's tokenizer checked."""
    block_size = int(cfg.block_size or loaded.data["block_size"])
    check_context(block_size, loaded.module.model_config)
    if cfg.get("data") is not None:
        datamodule = instantiate(cfg.data, block_size=block_size)
    else:
        datamodule = LMDataModule(**{**loaded.data, "block_size": block_size})
    datamodule.prepare_data()
    datamodule.setup("test" if cfg.split == "test" else "validate")
    datamodule.load_state_dict({"tokenizer": loaded.tokenizer.payload()})  # same tokenizer, or an error
    return datamodule


def evaluate(cfg: DictConfig) -> dict:
    if cfg.split not in ("test", "validation"):
        raise ValueError(f"split={cfg.split!r}; valid: test, validation")
    loaded = load_checkpoint(cfg.ckpt)
    out = run_dir()
    check_writable(out)
    L.seed_everything(int(cfg.seed))
    datamodule = evaluation_data(cfg, loaded)
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, default_root_dir=str(out), callbacks=[])
    run = trainer.test if cfg.split == "test" else trainer.validate
    start = time.perf_counter()
    metrics = run(loaded.module, datamodule=datamodule, verbose=False)[0]
    seconds = time.perf_counter() - start
    tokens = datamodule.split_stats[cfg.split]["tokens"]
    result = {"checkpoint": str(loaded.path), "split": cfg.split, "unit": datamodule.unit,
              "block_size": datamodule.block_size, **{k: float(v) for k, v in metrics.items()},
              "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
              **run_facts(loaded.module.model.layer_types, device_name(trainer.strategy.root_device))}
    write_results(out / "evaluation.json", result)
    log.info("%s", json.dumps(result, indent=2))
    return result


main = hydra_entry("evaluate", evaluate)


if __name__ == "__main__":
    main()
