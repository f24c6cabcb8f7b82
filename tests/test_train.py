"""The main job end to end: Hydra composition, training, evaluation, results.json, resume,
per-layer attention, multirun and bad input."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from attn_lm.cli import CONF_DIR
from attn_lm.train import train

REPO = Path(__file__).resolve().parents[1]


def compose_cfg(overrides):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def run_cli(args, cwd, check=True):
    proc = subprocess.run([sys.executable, "-m", "attn_lm.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}")
    return proc


def train_losses(run: Path) -> list[float]:
    rows = []
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            rows += [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return rows


def test_cli_trains_on_real_text_and_writes_results(tmp_path, smoke_overrides):
    run = tmp_path / "run"
    proc = run_cli([*smoke_overrides, "trainer.max_steps=40", "trainer.val_check_interval=20",
                    f"hydra.run.dir={run}"], cwd=tmp_path)
    assert "val loss" in proc.stdout and "tokens/s" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 40
    losses = train_losses(run)
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    assert results["val_loss"] < math.log(256) - 0.5
    assert results["val_ppl"] == pytest.approx(math.exp(results["val_loss"]), rel=1e-4)
    for key in ("params", "tokens_per_s", "peak_memory_mb", "wall_time_s", "device", "versions", "dataset",
                "best_val_loss", "test_metrics", "config", "attention"):
        assert results[key] is not None, key
    assert results["tokens_per_s"] > 0 and results["params"] > 0
    assert results["dataset"]["source"] == "stdlib" and results["dataset"]["splits"]
    assert results["test_metrics"]["test/bits_per_byte"] > 0
    assert (run / ".hydra" / "config.yaml").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # The console starts with the run directory and a summary, ends with the metrics per unit;
    # train.log has the same lines plus Lightning's messages, which the console leaves out.
    assert proc.stdout.startswith(f"run directory: {run}\nmodel: {results['params']:,} parameters, 4 layers, d_model 32")
    assert "test ppl/byte" in proc.stdout and "bits/byte" in proc.stdout and "GPU available" not in proc.stdout
    log = (run / "train.log").read_text()
    assert "run directory:" in log and "val ppl/byte" in log and "GPU available" in log
    assert log.count("sample at step") == 2 and "sample at step 40:" in log  # sample_every=1: each validation


def test_per_layer_attention_list_and_layer_options(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg([*smoke_overrides, "model.n_layer=3",
                       "model.layer_attention=[sdpa,{attention_type:sdpa,backend:math},full]",
                       "attention=sdpa", "attention.backend=flash"])
    results = train(cfg)
    assert results["attention"] == ["sdpa", "sdpa", "full"]
    ckpt = __import__("torch").load(results["checkpoint"], map_location="cpu", weights_only=False)
    layers = ckpt["hyper_parameters"]["model_config"]["attention"]
    # a bare name matching the selected group takes its command-line overrides; a mapping sets that layer's
    assert [layer["options"].get("backend") for layer in layers] == ["flash", "math", None]


def test_resume_continues_at_the_right_step(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(compose_cfg([*smoke_overrides, "trainer.max_steps=6"]))
    assert first["steps"] == 6
    resumed = train(compose_cfg([*smoke_overrides, "trainer.max_steps=10", f"ckpt_path={first['checkpoint']}"]))
    assert resumed["steps"] == 10


def test_multirun_sweeps_overrides(tmp_path, smoke_overrides):
    sweep = tmp_path / "sweep"
    run_cli(["-m", *smoke_overrides, "attention=full", "model.n_layer=1,2", "trainer.max_steps=2",
             "trainer.val_check_interval=2", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [len(r["attention"]) for r in results] == [1, 2]


@pytest.mark.parametrize("override,match", [
    ("model.n_heads=3", "n_heads=3 does not divide d_model=32"),
    ("data.block_size=64 model.context_len=32", "data.block_size=64 is larger than model.context_len=32"),
    ("data.block_size=64 model.block_size=32", "data.block_size=64 is larger than model.context_len=32"),
    ("attention.window_size=8", "option window_size=8 does not apply to attention_type 'full'"),
    ("model.layer_attention=[full]", "model.layer_attention has 1 entries but model.n_layer=4"),
])
def test_bad_input_fails_at_start_with_a_clear_message(tmp_path, smoke_overrides, monkeypatch, override, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        train(compose_cfg([*smoke_overrides, *override.split()]))
    assert not list(tmp_path.glob("**/*.ckpt"))  # nothing was trained


def test_unknown_config_key_or_group_option_is_rejected():
    with pytest.raises(ConfigCompositionException, match="model.colour"):
        compose_cfg(["model.colour=red"])
    with pytest.raises(ConfigCompositionException, match="attention.*nope"):
        compose_cfg(["attention=nope"])


def test_missing_data_file_is_reported_by_the_cli(tmp_path, smoke_overrides):
    proc = run_cli([*smoke_overrides, "data=text_files", f"data.train={tmp_path / 'missing.txt'}",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "missing.txt" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_unwritable_output_dir_fails_before_training(tmp_path, smoke_overrides, monkeypatch):
    blocked = tmp_path / "file_not_dir"
    blocked.write_text("x")
    proc = run_cli([*smoke_overrides, f"hydra.run.dir={blocked / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode != 0


def test_wandb_logger_runs_offline_without_a_key(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    results = train(compose_cfg([*smoke_overrides, "logger=wandb", "trainer.max_steps=2",
                                 "trainer.val_check_interval=2"]))
    assert results["status"] == "complete"
    assert list(Path(results["run_dir"]).glob("wandb/offline-run-*"))


def test_fused_adamw_with_gradient_clipping(tmp_path, smoke_overrides, monkeypatch):
    """Fused AdamW (the GPU default) and gradient clipping work together."""
    monkeypatch.chdir(tmp_path)
    results = train(compose_cfg([*smoke_overrides, "optim.fused=true", "trainer.gradient_clip_val=0.5",
                                 "trainer.max_steps=3"]))
    assert results["status"] == "complete" and results["steps"] == 3


def test_wall_clock_budget_runs_a_time_based_schedule(tmp_path, smoke_overrides, monkeypatch):
    """trainer.max_time without a step limit (equal-time comparisons): the LR follows the time."""
    monkeypatch.chdir(tmp_path)
    results = train(compose_cfg([*smoke_overrides, "trainer.max_steps=-1", "trainer.max_time=00:00:00:04",
                                 "trainer.val_check_interval=5", "trainer.log_every_n_steps=1"]))
    assert results["status"] == "complete" and results["steps"] > 0
    assert results["wall_time_s"] < 60 and results["device"].startswith("cpu")
    assert results["warmup_s"] > 0  # kernel_warmup=auto warms up before a wall-clock budget


def test_full_disk_fails_at_start(tmp_path, smoke_overrides, monkeypatch):
    """Too little free space for the checkpoints: a clear error before any training step."""
    import shutil as shutil_module

    from attn_lm import rundir

    monkeypatch.chdir(tmp_path)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(OSError, match="MiB free under .*checkpoints need about"):
        train(compose_cfg(smoke_overrides))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


def test_kernel_warmup_leaves_the_run_unchanged(tmp_path, smoke_overrides, monkeypatch):
    """The warm-up step forks the RNGs and drops its gradients: with dropout, the training losses
    are the same with and without it."""
    common = [*smoke_overrides, "trainer.deterministic=true", "trainer.log_every_n_steps=1", "model.dropout=0.2",
              "test_after_training=false", "trainer.max_steps=5"]
    losses = {}
    for flag in ("true", "false"):
        (tmp_path / flag).mkdir()
        monkeypatch.chdir(tmp_path / flag)
        results = train(compose_cfg([*common, f"kernel_warmup={flag}"]))
        assert (results["warmup_s"] > 0) == (flag == "true")
        losses[flag] = train_losses(Path(results["run_dir"]))
    assert len(losses["true"]) == 5 and losses["true"] == losses["false"]


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, smoke_overrides, monkeypatch):
    """Stop at step 4, resume to step 8: the same training losses as one run to step 8 (CPU,
    deterministic): step count, optimizer, scheduler and the data position are all restored."""
    # A flat LR after warm-up, so the schedule does not depend on max_steps (a killed run's would not).
    common = [*smoke_overrides, "trainer.deterministic=true", "trainer.val_check_interval=100",
              "trainer.log_every_n_steps=1", "test_after_training=false", "optim.min_lr_ratio=1.0"]
    for name in ("whole", "split"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "whole")
    train(compose_cfg([*common, "trainer.max_steps=8"]))
    monkeypatch.chdir(tmp_path / "split")
    first = train(compose_cfg([*common, "trainer.max_steps=4"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(compose_cfg([*common, "trainer.max_steps=8", f"ckpt_path={first['checkpoint']}"]))
    assert resumed["steps"] == 8
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the loader's position is the step
    whole, split = train_losses(tmp_path / "whole"), train_losses(tmp_path / "split")
    assert len(whole) == 8 and len(split) == 8
    assert split == whole


def _poison_loss_at(monkeypatch, step: int):
    """Make the training loss NaN at one optimizer step."""
    from attn_lm.lit_module import LitGPT

    original = LitGPT.forward

    def forward(self, idx, targets=None, return_logits=True):
        out = original(self, idx, targets, return_logits)
        if targets is not None and self.training and self.global_step == step:
            logits, loss = out
            return logits, loss * float("nan")
        return out

    monkeypatch.setattr(LitGPT, "forward", forward)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _poison_loss_at(monkeypatch, 3)
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 3"):
        train(compose_cfg([*smoke_overrides, "trainer.max_steps=8", "trainer.val_check_interval=2",
                           "trainer.log_every_n_steps=2"]))
    import torch

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (tmp_path / "results.json").exists()


def test_nonfinite_loss_skip_zeroes_that_steps_gradients(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _poison_loss_at(monkeypatch, 3)
    results = train(compose_cfg([*smoke_overrides, "on_nonfinite=skip", "trainer.max_steps=6"]))
    assert results["status"] == "complete" and results["nonfinite_steps"] == 1
    assert math.isfinite(results["val_loss"])


def _losses_by_step(metrics_csv: Path) -> dict[int, float]:
    with open(metrics_csv) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, smoke_overrides):
    """Kill a training process with SIGKILL mid-run, resume with ckpt_path=last: the losses of
    every step equal those of an uninterrupted run (CPU, deterministic)."""
    import os
    import signal
    import time

    import torch

    args = [*smoke_overrides, "trainer.max_steps=14", "trainer.val_check_interval=100", "trainer.log_every_n_steps=1",
            "trainer.deterministic=true", "checkpoint_every_n_steps=2", "test_after_training=false"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "attn_lm.train", *args, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last.exists(), "no checkpoint was written before the kill"
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    resumed_from = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    run_cli([*args, f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)
    whole = _losses_by_step(tmp_path / "whole" / "csv" / "version_0" / "metrics.csv")
    # One metrics history (issue 13.10): the resumed segment is folded into version_0; the killed
    # segment contributes what its logger had flushed before the kill.
    assert [p.name for p in killed.glob("csv/version_*")] == ["version_0"]
    history = _losses_by_step(killed / "csv" / "version_0" / "metrics.csv")
    assert sorted(whole) == list(range(14)) and set(range(resumed_from, 14)) <= set(history)
    assert history == {step: whole[step] for step in history}
    results = json.loads((killed / "results.json").read_text())
    assert results["resumed_from_step"] == resumed_from and results["steps"] == 14


def test_text_sampler_samples_every_nth_validation_and_the_final_evaluation():
    """sample_every=N samples at every N-th validation inside fit and once at the final evaluation
    (not twice at one step); trainer.training is False in every validation, so it cannot tell them apart."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    from attn_lm.callbacks import TextSampler

    sampler = TextSampler(tokenizer=None, every=3, max_new_tokens=4)
    sampled = []
    sampler.sample = lambda module: sampled.append(trainer.global_step) or "text"
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, training=False, loggers=[],
                              state=SimpleNamespace(fn=TrainerFn.FITTING), global_step=0)
    for step in (10, 20, 30, 40, 50, 60, 70):
        trainer.global_step = step
        sampler.on_validation_end(trainer, None)
    trainer.state.fn = TrainerFn.VALIDATING  # evaluate_after_fit: validate() on the trained weights
    sampler.on_validation_end(trainer, None)
    assert sampled == [30, 60, 70]
    sampler.on_validation_end(trainer, None)  # a second evaluation at the same step: no second sample
    assert sampled == [30, 60, 70] and sampler.seconds >= 0
