"""A synthetic finished sweep (results.json + metrics.csv per run) for report tests: no training."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attn_lm.cli import CONF_DIR


def run_config(overrides: list[str]) -> dict:
    """The resolved config a training run with these overrides would record."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides), resolve=True)


def write_run(root: Path, config: dict, seed: int, metrics: dict, curve: list[tuple[int, float]]) -> Path:
    """One complete run directory: ``metrics`` (val_ppl, test_ppl, test_acc, tokens_per_s) and a
    validation curve of ``(step, loss)``."""
    name = config["attention"]["attention_type"]
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / f"run{len(list(root.iterdir())):04d}"
    (run_dir / "csv" / "version_0").mkdir(parents=True)
    config = {**config, "seed": seed}
    test = {"test/ppl": metrics["test_ppl"]} | ({"test/accuracy": metrics["test_acc"]} if "test_acc" in metrics else {})
    results = {"status": "complete", "attention": [name] * config["model"]["n_layer"], "params": 1000,
               "unit": "char", "val_ppl": metrics["test_ppl"], "test_metrics": test, "val_metrics": {},
               "tokens_per_s": metrics["tokens_per_s"], "budget": {"tokens_per_step": 1000},
               "config": config}
    (run_dir / "results.json").write_text(json.dumps(results))
    with (run_dir / "csv" / "version_0" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "val/loss", "perf/step_ms"])
        writer.writeheader()
        writer.writerows({"step": s, "val/loss": loss, "perf/step_ms": 10.0} for s, loss in curve)
    return run_dir
