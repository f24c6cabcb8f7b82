"""Comparing mechanisms end to end: a real tiny multirun through ``python -m attn_lm.train -m
experiment=compare_attention``, a failed job, a resumed re-run that skips finished jobs, the report
on those runs (table, CSVs, plots, failed runs, wandb offline), budgets, and the launcher /
sweeper presets (composition only: no SLURM needed)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from attn_lm import AttentionFactory
from attn_lm.compare import build_report, load_runs, t_halfwidth
from attn_lm.budgets import budget_summary, kernel_variants, process_count, register_resolvers, steps_for_tokens
from attn_lm.cli import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_cli(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "attn_lm.train", "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}")
    return proc


def results_mtimes(sweep: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, token_cache) -> SimpleNamespace:
    """Seed 1 of two mechanisms; a job that fails; then the same sweep over seeds 1 and 2, which
    must skip the two finished jobs and run the two new ones."""
    root = tmp_path_factory.mktemp("sweep")
    common = ["experiment=compare_attention", "debug=smoke", f"data.cache_dir={token_cache}", "data.max_chars=200000",
              "trainer.enable_progress_bar=false", f"hydra.sweep.dir={root}"]
    train_cli([*common, "attention=full,local", "seed=1"])
    first = results_mtimes(root)
    failed = train_cli([*common, "attention=local", "attention.window_size=0", "seed=1"], check=False)
    rerun = train_cli([*common, "attention=full,local", "seed=1,2"])
    return SimpleNamespace(dir=root, first=first, failed=failed, rerun=rerun, final=results_mtimes(root))


def results_of(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]


def test_rerun_skips_finished_jobs_and_runs_the_rest(sweep):
    assert len(sweep.first) == 2 and all("seed=1" in name for name in sweep.first)
    assert sweep.failed.returncode != 0 and "window_size" in sweep.failed.stderr
    log = sweep.rerun.stdout + sweep.rerun.stderr
    assert log.count("skipping") == 2, log[-3000:]
    assert {n: sweep.final[n] for n in sweep.first} == sweep.first  # finished runs untouched
    assert len(sweep.final) == 4  # the seed=2 jobs ran
    for results in results_of(sweep.dir):
        assert results["status"] == "complete" and results["steps"] == 6
        if results["attention"][0] == "local":  # compare.structure_fraction: the window is T/8
            assert results["config"]["attention"]["window_size"] == 32 // 8


def test_sweep_runs_share_everything_but_mechanism_and_seed(sweep):
    configs = [r["config"] for r in results_of(sweep.dir)]
    for config in configs:
        config.pop("attention")
        config.pop("seed")
        config["data"].pop("seed")  # follows the run seed in the preset
        config["logger"] = None
    assert all(c == configs[0] for c in configs)
    assert configs[0]["experiment_name"] == "compare_attention"


def test_report_on_the_real_sweep(sweep, tmp_path):
    report = build_report([sweep.dir], tmp_path)
    labels = {(g.mechanism, g.block_size): g for g in report.groups}
    assert set(labels) == {("full", 32), ("local", 32)}
    runs = results_of(sweep.dir)
    with open(report.files["summary.csv"]) as f:
        summary = {row["mechanism"]: row for row in csv.DictReader(f)}
    markdown = report.files["report.md"].read_text()
    for mechanism in ("full", "local"):
        mine = [r for r in runs if r["attention"][0] == mechanism]
        assert len(mine) == 2 and len(labels[(mechanism, 32)].runs) == 2  # seeds 1 and 2 aggregated
        row = summary[mechanism]
        for key, values in (("val_ppl", [r["val_ppl"] for r in mine]),
                            ("test_ppl", [r["test_metrics"]["test/ppl"] for r in mine]),
                            ("tokens_per_s", [r["tokens_per_s"] for r in mine]),
                            ("peak_memory_mb", [r["peak_memory_mb"] for r in mine])):
            assert float(row[f"{key}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{key}_std"]) == pytest.approx(statistics.stdev(values))
        assert int(row["seeds"]) == 2 and int(row["params"]) == mine[0]["params"]
        assert row["budget"] == "6 steps (768 tokens)"
        val = [r["val_ppl"] for r in mine]
        assert f"{statistics.fmean(val):.2f} ± {t_halfwidth(val):.2f}" in markdown  # 95% t-interval
    for header in ("unit", "val ppl", "test ppl", "test bits/unit", "train tokens/s", "step ms", "peak MB",
                   "wall s", "budget", "Pareto"):
        assert header in markdown
    # The failed job is listed, not dropped.
    assert len(report.failed) == 1 and "window_size=0" in str(report.failed[0].path)
    assert "Failed or missing runs (1)" in markdown and "attention.window_size=0" in markdown
    with open(report.files["runs.csv"]) as f:
        statuses = sorted(row["status"] for row in csv.DictReader(f))
    assert statuses == ["complete"] * 4 + ["failed"]
    for name in ("pareto.png", "val_loss.png", "seq_len.png"):
        data = report.files[name].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
        assert f"({name})" in markdown
    assert any(g.pareto for g in report.groups)


def test_report_with_several_sequence_lengths(sweep, tmp_path):
    """Copies of real runs relabelled as T=64 exercise the memory/throughput vs length plot."""
    runs = tmp_path / "runs"
    for source in sorted(p.parent for p in sweep.dir.glob("*seed=1*/results.json")):
        for block_size in (32, 64):
            target = runs / f"{source.name},T={block_size}"
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints"))
            results = json.loads((target / "results.json").read_text())
            results["config"]["data"]["block_size"] = block_size
            results["peak_memory_mb"] *= block_size / 32
            results["tokens_per_s"] *= 32 / block_size  # T=64 runs are all slower than T=32 ones
            (target / "results.json").write_text(json.dumps(results))
    report = build_report([runs], tmp_path / "report")
    assert sorted({g.block_size for g in report.groups}) == [32, 64] and len(report.groups) == 4
    # The Pareto front is per sequence length: the slower T=64 runs still have one.
    assert {g.block_size for g in report.groups if g.pareto} == {32, 64}
    assert report.files["seq_len.png"].stat().st_size > 5000


def test_missing_jobs_of_an_interrupted_sweep_are_listed(sweep, tmp_path):
    """A sweep that asked for more jobs than have a directory (interrupted) lists the rest."""
    shutil.copytree(sweep.dir, tmp_path / "sweep", ignore=shutil.ignore_patterns("checkpoints"))
    saved = OmegaConf.load(tmp_path / "sweep" / "multirun.yaml")
    saved.hydra.overrides.task = [o.replace("attention=full,local", "attention=full,local,gqa")
                                  for o in saved.hydra.overrides.task]
    OmegaConf.save(saved, tmp_path / "sweep" / "multirun.yaml")
    runs, failed = load_runs([tmp_path / "sweep"])
    missing = sorted(" ".join(f.overrides) for f in failed if f.path is None)
    assert len(runs) == 4 and len(missing) == 2
    assert all("attention=gqa" in m for m in missing) and "seed=1" in missing[0] and "seed=2" in missing[1]


def test_missing_jobs_resolve_the_presets_interpolated_sweep_values(sweep, tmp_path):
    """compare_all/compare_recall save ``attention: ${attn_lm.mechanisms:...}`` in multirun.yaml;
    reading it in a fresh process (no resolver registered yet) must not fail."""
    shutil.copytree(sweep.dir, tmp_path / "sweep", ignore=shutil.ignore_patterns("checkpoints"))
    saved = OmegaConf.load(tmp_path / "sweep" / "multirun.yaml")
    saved.hydra.sweeper.params.attention = "${attn_lm.mechanisms:false}"  # the command line's attention wins
    OmegaConf.save(saved, tmp_path / "sweep" / "multirun.yaml")
    OmegaConf.clear_resolver("attn_lm.mechanisms")
    try:
        runs, failed = load_runs([tmp_path / "sweep"])
    finally:
        register_resolvers()
    assert len(runs) == 4 and not [f for f in failed if f.path is None]


def test_compare_script_with_wandb_offline(sweep, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    proc = subprocess.run([sys.executable, "scripts/compare.py", str(sweep.dir), "--out", str(tmp_path), "--wandb"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| full | 32 | - | 2 |" in proc.stdout and "failed:" in proc.stdout  # mechanism, T, sizes, seeds
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_compare_rejects_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        build_report([tmp_path / "nope"], tmp_path / "out")


# ----------------------------------------------------------------------------- presets (composition)
def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_budget_by_steps_tokens_and_time():
    steps = compose_cfg(["experiment=compare_attention"])
    assert steps.trainer.max_steps == 600 and budget_summary(steps)["kind"] == "steps"
    tokens = compose_cfg(["experiment=compare_attention", "budget.tokens=100000", "data.batch_size=8",
                          "data.block_size=64", "trainer.accumulate_grad_batches=2"])
    assert tokens.trainer.max_steps == steps_for_tokens(100000, 8, 64, 2) == math.ceil(100000 / 1024)
    summary = budget_summary(tokens)
    assert summary["kind"] == "tokens" and summary["tokens"] == 100000 and "100k tokens" in summary["text"]
    timed = compose_cfg(["experiment=compare_attention", "budget.steps=null", "budget.time=00:00:05:00"])
    assert timed.trainer.max_steps == -1 and timed.trainer.max_time == "00:00:05:00"
    assert budget_summary(timed)["kind"] == "time"
    both = budget_summary(compose_cfg(["experiment=compare_attention", "budget.time=00:01:00:00"]))
    assert both["kind"] == "steps+time" and " or wall clock 00:01:00:00" in both["text"]
    with pytest.raises(ValueError, match="must be positive"):
        steps_for_tokens(0, 8, 64)


def test_token_budget_counts_every_process():
    """Under DDP every process trains on its own batch: a token budget gives fewer steps."""
    ddp = compose_cfg(["experiment=compare_attention", "budget.tokens=100000", "data.batch_size=8",
                       "data.block_size=64", "trainer=ddp", "trainer.devices=2", "trainer.num_nodes=2"])
    assert ddp.trainer.max_steps == steps_for_tokens(100000, 8, 64, 1, 4) == math.ceil(100000 / 2048)
    summary = budget_summary(ddp)
    assert summary["processes"] == 4 and summary["tokens_per_step"] == 2048 and summary["kind"] == "tokens"
    assert budget_summary(ddp, processes=2)["tokens_per_step"] == 1024
    assert process_count([0, 1, 2]) == 3 and process_count("0,1") == 2 and process_count("3", 2) == 6
    with pytest.raises(ValueError, match="no device"):
        process_count(0)


def test_compare_preset_sweep_dir_is_deterministic():
    cfg = compose_cfg(["experiment=compare_attention"])
    assert cfg.hydra.sweep.dir == "multirun/compare_attention"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"
    excluded = cfg.hydra.job.config.override_dirname.exclude_keys
    assert "experiment" in excluded and "data.cache_dir" in excluded
    assert cfg.skip_completed is True and cfg.data.seed == cfg.seed


def test_compare_all_sweeps_every_registered_mechanism():
    cfg = compose_cfg(["experiment=compare_all", "compare.kernel_variants=true"])
    assert cfg.hydra.sweeper.params.attention.split(",") == AttentionFactory.names()
    assert cfg.hydra.sweep.dir == "multirun/compare_all" and cfg.trainer.max_steps == 600
    for name in AttentionFactory.names():
        assert (CONF_DIR / "attention" / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("launcher, schema, checks", [
    ("joblib", "hydra_plugins.hydra_joblib_launcher.config:JobLibLauncherConf", {"n_jobs": 2, "prefer": "processes"}),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.config:SlurmQueueConf",
     {"partition": "gpu", "gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 240}),
])
def test_launcher_presets_compose_against_the_plugin_schema(launcher, schema, checks):
    import importlib

    cfg = compose_cfg([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"] if launcher == "slurm"
                      else [f"hydra/launcher={launcher}"])
    module, name = schema.split(":")
    conf = getattr(importlib.import_module(module), name)
    merged = OmegaConf.merge(OmegaConf.structured(conf), cfg.hydra.launcher)  # unknown keys / bad types raise
    assert merged._target_ == conf._target_
    for key, value in checks.items():
        assert merged[key] == value


def test_optuna_lr_sweeper_preset_composes():
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf

    cfg = compose_cfg(["hydra/sweeper=optuna_lr", "experiment=compare_attention", "attention=local"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    # model.position=rope: the comparison preset's fixed axis (Optuna keeps it as a fixed parameter)
    assert sorted(sweeper.params) == ["model.position", "optim.lr"] and "log" in sweeper.params["optim.lr"]
    assert sweeper.study_name == "lr_local"
    fields = {k: v for k, v in OmegaConf.to_container(sweeper).items() if k != "sampler"}
    OmegaConf.merge(OmegaConf.structured(OptunaSweeperConf), fields)  # unknown keys / bad types raise


def sweep_gpus_in_process(args: list[str], capsys) -> tuple[int, str]:
    """``python scripts/sweep_gpus.py ARGS`` in this process (the script is ``attn_lm.gpu_sweep.main``;
    its training processes are still started): its exit status and output, without a Python that
    imports Lightning first; the SIGTERM/SIGINT handlers it installs are put back."""
    import signal

    from attn_lm.gpu_sweep import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    capsys.readouterr()
    try:
        code = main(args)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return code, capsys.readouterr().out


def test_sweep_over_gpus_deals_mechanisms_and_resumes(tmp_path, token_cache, capsys, monkeypatch):
    """scripts/sweep_gpus.py: one process per (here pretend) GPU, each with its share of the
    mechanisms and its own CUDA_VISIBLE_DEVICES, one shared sweep directory; re-running it skips
    the finished runs."""
    root = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "scripts" / "sweep_gpus.py"), "--gpus", "0,1", "--",
           "experiment=compare_attention", "debug=smoke", f"data.cache_dir={token_cache}", "data.max_chars=200000",
           "trainer.enable_progress_bar=false", "trainer=cpu", f"hydra.sweep.dir={root}", "attention=full,local,gqa"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    assert "[gpu 0] attention=full,gqa" in first.stdout and "[gpu 1] attention=local" in first.stdout
    runs = {p.parent.name.split(",")[0]: json.loads(p.read_text()) for p in root.glob("*/results.json")}
    assert set(runs) == {"attention=full", "attention=local", "attention=gqa"}
    assert all(r["status"] == "complete" for r in runs.values())
    monkeypatch.chdir(tmp_path)
    code, again = sweep_gpus_in_process(cmd[2:], capsys)  # the re-run: the script's main in this process
    assert code == 0 and again.count("skipping") == 3, again[-3000:]


def test_sweep_over_gpus_splits_values_and_rejects_bad_input():
    from attn_lm.gpu_sweep import deal, split_values

    assert deal(list("abcde"), 2) == [["a", "c", "e"], ["b", "d"]]
    assert deal(["a"], 4) == [["a"]]
    values, rest = split_values(["experiment=compare_all", "seed=1,2"], "attention")
    assert values == [n for n in AttentionFactory.names() if n not in kernel_variants()]
    assert rest == ["experiment=compare_all", "seed=1,2"]
    assert split_values(["compare.kernel_variants=true"], "attention")[0] == AttentionFactory.names()
    assert split_values(["seed=1,2", "x=y"], "seed") == (["1", "2"], ["x=y"])
    with pytest.raises(ValueError, match="no 'seed="):
        split_values(["x=y"], "seed")
    with pytest.raises(ValueError, match="twice"):
        split_values(["seed=1", "seed=2"], "seed")


def test_sweep_over_gpus_packs_runs_and_plans_what_remains(tmp_path, token_cache, capsys, monkeypatch):
    """--per-gpu 2: two processes on one (pretend) GPU, each with its share; --plan then counts the
    finished runs per cell, with their measured minutes, and the runs a new seed adds."""
    from attn_lm.gpu_sweep import main

    root = tmp_path / "sweep"
    common = ["experiment=compare_attention", "debug=smoke", f"data.cache_dir={token_cache}", "data.max_chars=200000",
              "trainer.enable_progress_bar=false", "trainer=cpu", f"hydra.sweep.dir={root}"]
    monkeypatch.chdir(tmp_path)
    code, packed = sweep_gpus_in_process(["--gpus", "0", "--per-gpu", "2", "--", *common, "attention=full,local",
                                          "seed=1"], capsys)
    assert code == 0, packed[-3000:]
    assert "[gpu 0.0] attention=full" in packed and "[gpu 0.1] attention=local" in packed
    walls = {p.parent.name.split(",")[0]: json.loads(p.read_text())["wall_time_s"] for p in root.glob("*/results.json")}
    assert set(walls) == {"attention=full", "attention=local"}

    assert main(["--gpus", "0", "--per-gpu", "2", "--plan", "--run-minutes", "5", "--", *common,
                 "seed=1,2", "attention=full,local,gqa"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"plan of {root}: 6 runs in 3 cells, in the order each process runs them"
    full, local, gqa = lines[2:5]
    assert full.split() == ["1/2", f"{walls['attention=full'] / 60:.2f}", "m", "[gpu", "0.0]", "attention=full"]
    assert local.split()[:3] == ["1/2", f"{walls['attention=local'] / 60:.2f}", "m"] and "[gpu 0.1]" in local
    assert gqa.split()[:3] == ["0/2", "5.00", "a"] and "[gpu 0.0]" in gqa  # dealt round-robin: full, gqa | local
    busiest = walls["attention=full"] / 60 + 2 * 5  # gpu 0.0: full's seed 2 and both of gqa's
    assert lines[5] == "done: 2 of 6 runs, 0 of 3 cells"
    assert lines[6].startswith(f"left: 4 runs, {busiest + walls['attention=local'] / 60:.0f} run-minutes, "
                               f"about {busiest:.0f} min of wall clock with 2 processes")


def test_sweep_over_gpus_runs_whole_cells_and_refuses_packed_time_budgets(capsys):
    """Every seed of a cell runs before the next cell, wherever the seed stood on the command line;
    packing runs with a wall-clock budget onto one GPU is refused."""
    from attn_lm.compare import sweep_jobs
    from attn_lm.gpu_sweep import main, process_overrides, sweep_config

    rest = ["seed=1,2,3", "experiment=compare_recall", "data.block_size=64,128"]
    overrides = process_overrides(rest, "attention", ["full", "local"])
    assert overrides[-2:] == ["attention=full,local", "seed=1,2,3"]
    jobs = sweep_jobs(sweep_config(overrides).hydra.sweeper.params, overrides)
    assert len(jobs) == 2 * 2 * 3 * 3  # mechanisms x lengths x widths x seeds
    cells = [[o for o in job if not o.startswith("seed=")] for job in jobs]
    assert all(cells[i] == cells[i + 1] == cells[i + 2] for i in range(0, len(jobs), 3))
    assert [job[-1] for job in jobs[:3]] == ["seed=1", "seed=2", "seed=3"]
    with pytest.raises(SystemExit) as refused:
        main(["--gpus", "0", "--per-gpu", "2", "--", "experiment=compare_tinyshakespeare", "seed=1,2,3"])
    assert refused.value.code == 2 and "wall-clock budget" in capsys.readouterr().err
