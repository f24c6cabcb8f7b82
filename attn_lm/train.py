"""Main job: ``python -m attn_lm.train [overrides]`` (console script ``attn-lm-train``).

Composes ``conf/train.yaml``, builds the data module, the model (every layer's attention
validated before anything runs), the Lightning trainer with its loggers and callbacks, trains,
evaluates, and writes ``results.json`` into the run directory.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .budgets import budget_summary, register_resolvers
from .callbacks import (KernelWarmup, NonFiniteLossGuard, RunClock, SpeedMonitor, StepLogger, StepProgressBar,
                        TextSampler)
from .checkpoint import check_same_model, read_checkpoint, saved_model_config
from .cli import hydra_entry
from .config import GPTConfig
from .export import init_weights
from .from_hydra import check_run_config, gpt_config, scale_structure
from .lit_module import LitGPT
from .model import GPT
from .parallel import evaluate_trained, is_sharded
from .rundir import (check_free_space, check_writable, claimed, completed_results, merge_metric_histories,
                     resume_checkpoint, run_dir, run_facts, write_results)

log = logging.getLogger(__name__)


def build_loggers(cfg: DictConfig, out: Path) -> list:
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if "wandb" in str(node.get("_target_", "")).lower() and not os.environ.get("WANDB_API_KEY"):
            # No key: log offline so the run never waits on the network; `wandb sync` uploads later.
            os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(instantiate(node, save_dir=str(out)))
    return loggers


def use_compile(cfg: DictConfig) -> bool:
    """``compile: auto`` compiles when the run trains on a GPU."""
    if str(cfg.compile) == "auto":
        return torch.cuda.is_available() and str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return bool(cfg.compile)


def use_kernel_warmup(cfg: DictConfig) -> bool:
    """``kernel_warmup: auto`` warms up (compiles) before training when a wall-clock budget is set."""
    if str(cfg.get("kernel_warmup", "auto")) == "auto":
        return bool(cfg.trainer.get("max_time"))
    return bool(cfg.kernel_warmup)


def _metric(metrics: dict, key: str) -> Optional[float]:
    value = metrics.get(key)
    return None if value is None else float(value)


def evaluate_after_fit(cfg: DictConfig, trainer: L.Trainer, module: LitGPT, datamodule: Any,
                       out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Validation (and, with ``test_after_training``, test) metrics of the trained weights; a
    sharded run keeps them in ``checkpoints/final.ckpt`` (:func:`~attn_lm.parallel.evaluate_trained`)."""
    stages = ["validate"] + (["test"] if cfg.get("test_after_training") else [])
    results = evaluate_trained(trainer, module, datamodule, stages, out / "checkpoints" / "final.ckpt",
                               lambda: instantiate(cfg.trainer, default_root_dir=str(out), logger=False, callbacks=[],
                                                   enable_checkpointing=False, enable_model_summary=False))
    return results[0], (results[1] if len(results) > 1 else {})


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the ``results.json`` content."""
    register_resolvers()  # the Python API is an entry point too: cfg may come from hydra.compose
    out = run_dir()
    scale_structure(cfg)  # before the finished-run check: results.json holds the scaled sizes
    finished = completed_results(out, cfg)  # resumable sweeps: skip_completed=true
    if finished is not None:
        return finished
    check_writable(out)
    with claimed(out, cfg):
        return fit_and_evaluate(cfg, out)


@rank_zero_only
def announce(*lines: str) -> None:
    """Log the run's opening lines once: from global rank 0 (DDP starts one process per rank)."""
    for line in lines:
        log.info("%s", line)


def run_summary(cfg: DictConfig, gpt: GPT, datamodule: Any) -> str:
    """The resolved settings that define the run, in one line (the whole config is in .hydra/)."""
    model = gpt.config
    layers = Counter(layer.attention_type for layer in model.layer_attention)
    return (f"model: {gpt.num_parameters():,} parameters, {model.n_layer} layers, d_model {model.d_model}, "
            f"{model.n_heads} heads, attention "
            f"{' + '.join(f'{n}x{name}' for name, n in layers.items())} | data: {datamodule.source}, "
            f"{getattr(datamodule.tokenizer, 'kind', 'no')} tokenizer ({datamodule.vocab_size} tokens), "
            f"block {datamodule.block_size}, "
            f"batch {datamodule.batch_size} | budget: {budget_summary(cfg)['text']}, lr {cfg.optim.lr}")


def check_resumable(path: Path, model_config: GPTConfig) -> int:
    """The checkpoint to resume has this run's model (one line, not Lightning's size mismatches);
    returns the optimizer step it was written at."""
    ckpt = read_checkpoint(path)
    check_same_model(path, saved_model_config(ckpt), model_config)
    return int(ckpt["global_step"])


def fit_and_evaluate(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Train (or resume) in the claimed directory ``out``, evaluate, write ``results.json``."""
    check_run_config(cfg)  # before the data is read and tokenized
    resume = resume_checkpoint(cfg, out)
    if resume is not None and cfg.get("init_from"):
        raise ValueError("init_from= starts a new run from trained weights and ckpt_path= resumes a run; give one")
    L.seed_everything(int(cfg.seed), workers=True)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the remaining fp32 matmuls
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model_config = gpt_config(cfg, vocab_size=datamodule.vocab_size)
    resumed_step = None if resume is None else check_resumable(resume, model_config)
    if use_compile(cfg):
        # A multirun trains many models in one process: drop the previous jobs' compiled graphs,
        # which would otherwise count towards dynamo's recompile limit (a hard error under fullgraph).
        torch._dynamo.reset()
    module = LitGPT(model_config, OmegaConf.to_container(cfg.optim, resolve=True), compile=use_compile(cfg),
                    on_nonfinite=str(cfg.get("on_nonfinite", "stop")),
                    accuracy=bool(getattr(datamodule, "reports_accuracy", False)),
                    compile_mode=str(cfg.get("compile_mode", "default")))
    announce(f"run directory: {out}" + (f" (resuming {resume})" if resume else ""),
             run_summary(cfg, module.model, datamodule))
    if cfg.get("init_from"):  # fine-tuning: the weights only; optimizer and schedule start anew
        init_weights(module.model, str(cfg.init_from), datamodule.tokenizer)
    speed = SpeedMonitor(peak_flops=cfg.get("peak_flops"))
    every = cfg.get("checkpoint_every_n_steps")
    # Best-by-validation checkpoint; last.ckpt after every validation, or every N steps when set.
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", filename="step{step}", monitor="val/loss",
                                 mode="min", save_last=not every, auto_insert_metric_name=False)
    periodic = [ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True,
                                every_n_train_steps=int(every))] if every else []
    loggers = build_loggers(cfg, out)
    warmup = [KernelWarmup(datamodule.vocab_size, (datamodule.batch_size, datamodule.block_size),
                           (datamodule.eval_batch_size, datamodule.block_size))] if use_kernel_warmup(cfg) else []
    clock = RunClock()
    # Samples of generated text; synthetic tasks (MQAR) have no tokenizer and no text to sample.
    sampler = [TextSampler(datamodule.tokenizer, int(cfg.sample_every), int(cfg.sample_tokens))] if cfg.get(
        "sample_every") and datamodule.tokenizer is not None else []
    callbacks = [*warmup, checkpoint, *periodic, speed, clock, *sampler, NonFiniteLossGuard()] + (
        [StepLogger()] if loggers else [])
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(StepProgressBar(refresh_rate=int(cfg.get("progress_refresh", 1))))
    trainer: L.Trainer = instantiate(cfg.trainer, default_root_dir=str(out), logger=loggers or False,
                                     callbacks=callbacks)
    # best + last (+ final: a sharded run is evaluated from a checkpoint, see evaluate_after_fit)
    check_free_space(out, module.model.num_parameters(), copies=3 if is_sharded(trainer.strategy) else 2)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    val, test = evaluate_after_fit(cfg, trainer, module, datamodule, out)
    wall = clock.previous_s + time.perf_counter() - start  # earlier segments of a resumed run included
    peak, peak_kind = speed.peak_memory
    best = checkpoint.best_model_score
    budget = budget_summary(cfg, trainer.world_size)
    results = {
        "status": "complete",
        "run_dir": str(out),
        "params": module.model.num_parameters(),
        "steps": trainer.global_step,
        "budget": budget,
        "processes": trainer.world_size,
        "nonfinite_steps": int(module.nonfinite_count),
        "tokens_seen": trainer.global_step * budget["tokens_per_step"],
        "unit": datamodule.unit,  # perplexities and bits are per this unit (the tokenizer's token)
        "val_loss": _metric(val, "val/loss"),
        "val_ppl": _metric(val, "val/ppl"),
        "best_val_loss": None if best is None else float(best),
        "val_metrics": {k: float(v) for k, v in val.items()},
        "test_metrics": {k: float(v) for k, v in test.items()},
        **speed.summary,
        "peak_memory_mb": peak,
        "peak_memory_kind": peak_kind,
        "wall_time_s": wall,
        "resumed_from_step": resumed_step,
        "warmup_s": warmup[0].seconds if warmup else 0.0,
        "sample_s": sampler[0].seconds if sampler else 0.0,
        **run_facts(module.model.layer_types, speed.device_name),
        "precision": str(trainer.precision),
        "dataset": datamodule.fingerprint,
        "checkpoint": str((periodic[0] if periodic else checkpoint).last_model_path or ""),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:  # one results.json per run, however many ranks
        merge_metric_histories(out / "csv")
        write_results(out / "results.json", results)
        log.info("%s", final_line(results, out))
    return results


def final_line(results: dict[str, Any], out: Path) -> str:
    """The run's outcome in one line, perplexities labelled with their unit."""
    unit, test = results["unit"], results["test_metrics"]
    parts = [f"val loss {results['val_loss']:.4f}", f"val ppl/{unit} {results['val_ppl']:.2f}"]
    if test:
        parts.append(f"test ppl/{unit} {test['test/ppl']:.2f} ({test[f'test/bits_per_{unit}']:.3f} bits/{unit})")
    if "test/accuracy" in test:
        parts.append(f"test accuracy {test['test/accuracy']:.3f}")
    parts += [f"{results.get('tokens_per_s', float('nan')):,.0f} tokens/s", f"results: {out / 'results.json'}"]
    return " | ".join(parts)


def _job(cfg: DictConfig) -> Optional[float]:
    return train(cfg)["val_loss"]  # the objective for Hydra sweepers (e.g. Optuna)


main = hydra_entry("train", _job)


if __name__ == "__main__":
    main()
