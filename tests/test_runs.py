"""Runs and checkpoints a user can trust (issue 13): one-line errors naming the key, run
directories that cannot be corrupted, checkpoints that are enough to evaluate and generate."""
from __future__ import annotations

import json
import mmap
import os
import pickletools
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from attn_lm.cli import rewrite_arg
from attn_lm import GPT
from attn_lm.cli import CONF_DIR
from attn_lm.data.tokenizers import CharTokenizer, WordTokenizer
from attn_lm.evaluate import evaluate
from attn_lm.export import export, from_pretrained, init_weights
from attn_lm.generate import check_known, generate
from attn_lm.rundir import claimed
from attn_lm.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer.max_steps=2", "trainer.val_check_interval=2", "test_after_training=false"]


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def cli(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-m", f"attn_lm.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=environ)


def cli_in_process(module: str, args: list[str], monkeypatch, capsys, **env: str) -> subprocess.CompletedProcess:
    """``python -m attn_lm.<module> ARGS`` in this process (in the working directory the test set):
    the console script's ``main`` (Hydra reads ``sys.argv``, as in the process), its exit status
    (an exception that escapes: status 1 and its traceback on stderr, as the interpreter does),
    stdout and stderr; no new Python importing torch and Lightning (~10 s). What a run leaves
    behind in the process is put back: the logging setup (Hydra's job logging: handlers, levels,
    propagation), the job's HydraConfig (which run directories read), GlobalHydra. The tests whose
    point is the process itself (one line on stderr and nothing else; a run directory another
    process holds, a lock this process could take again) keep :func:`cli`."""
    import importlib
    import logging
    import traceback

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    main = importlib.import_module(f"attn_lm.{module}").main
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", HydraConfig.instance().cfg)
    monkeypatch.setattr(sys, "argv", [f"attn_lm.{module}", *args])
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    saved = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers]
    capsys.readouterr()
    code, trace = 0, ""
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except Exception:  # noqa: BLE001 - what the interpreter would print, and its exit status
        code, trace = 1, traceback.format_exc()
    finally:
        GlobalHydra.instance().clear()
        for lg in logging.root.manager.loggerDict.values():
            if isinstance(lg, logging.Logger) and all(lg is not s[0] for s in saved):
                saved.append((lg, lg.level, [], lg.propagate, lg.disabled))
        for lg, level, handlers, propagate, disabled in saved:  # saved[0]: the root logger
            for handler in lg.handlers:
                if handler not in handlers:
                    handler.close()
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate, lg.disabled = propagate, disabled
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out, err + trace)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, smoke_overrides) -> Path:
    """A finished two-step run at block size 24, trained once for this module."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run)  # outside Hydra the working directory is the run directory
        train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24"]))
    return run


@pytest.fixture
def finished_run(trained_run, tmp_path, monkeypatch) -> Path:
    """A copy of ``trained_run`` in ``tmp_path/run``, the working directory (tests may change it)."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    monkeypatch.chdir(run)
    return run


# ------------------------------------------------------------------------------ errors (12, 13)
@pytest.mark.parametrize("override,message", [
    ("model.n_layer=four", "model.n_layer='four' must be int"),
    ("trainer.max_steps=abc", "trainer.max_steps='abc' must be an integer >= -1"),
    ("optim.lr=-1", "optim.lr=-1 must be a positive number"),
    ("attention=local attention.window_size=x", "window_size='x' must be int for attention_type 'local'"),
])
def test_wrong_types_name_the_key_before_the_data_is_read(tmp_path, smoke_overrides, monkeypatch, override, message):
    """The missing data file would be the error if the config were checked after reading the data."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        train(compose_cfg("train", [*smoke_overrides, "data=text_files", f"data.train={tmp_path / 'missing.txt'}",
                                    *override.split()]))


@pytest.mark.parametrize("args,line", [
    (["model.n_layer=four"], "error: model.n_layer='four' must be int"),
    (["attention=full", "attention.window_size=64"], "error: option window_size=64 does not apply to attention_type 'full'"),
    (["attention=full", "+attention.window_size=64"], "error: option window_size=64 does not apply to attention_type 'full'"),
])
def test_cli_reports_an_input_error_in_one_line(tmp_path, smoke_overrides, args, line):
    proc = cli("train", [*smoke_overrides, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert line in (tmp_path / "run" / "train.log").read_text()  # the log file says why the run ended


def test_full_traceback_with_hydra_full_error(tmp_path, smoke_overrides, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    proc = cli_in_process("train", [*smoke_overrides, "model.n_layer=four", f"hydra.run.dir={tmp_path / 'run'}"],
                          monkeypatch, capsys, HYDRA_FULL_ERROR="1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "must be int" in proc.stderr


def test_resuming_into_another_model_shape_names_both(finished_run, smoke_overrides):
    with pytest.raises(ValueError, match=r"has n_layer=4, d_model=32, .*; this run asks for n_layer=2, d_model=48"):
        train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24", "model.n_layer=2",
                                    "model.d_model=48", "trainer.max_steps=4", "ckpt_path=last"]))


def test_a_file_that_is_not_a_checkpoint(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.ckpt").write_text("hello")
    with pytest.raises(ValueError, match="notes.ckpt is not a checkpoint"):
        train(compose_cfg("train", [*smoke_overrides, f"ckpt_path={tmp_path / 'notes.ckpt'}"]))


# ------------------------------------------------------------------------------ run directories (7, 8, 9)
def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path, smoke_overrides, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt_path=last, but .* does not exist: there is nothing to resume"):
        train(compose_cfg("train", [*smoke_overrides, "ckpt_path=last"]))


def test_a_finished_run_is_not_overwritten(finished_run, smoke_overrides):
    before = (finished_run / "results.json").read_text()
    ckpt = torch.load(finished_run / "checkpoints" / "last.ckpt", weights_only=False)
    earlier_s = ckpt["callbacks"]["RunClock"]["seconds"]  # training time up to that checkpoint
    with pytest.raises(FileExistsError, match="already holds a run .*ckpt_path=last.*overwrite=true"):
        train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24"]))
    assert (finished_run / "results.json").read_text() == before
    # Resuming continues it; overwrite=true starts over with one metrics history.
    resumed = train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24", "trainer.max_steps=3",
                                          "ckpt_path=last"]))
    assert resumed["steps"] == 3 and resumed["resumed_from_step"] == 2
    assert resumed["wall_time_s"] > earlier_s > 0  # the whole run's time (13.10)
    assert [p.parent.name for p in finished_run.glob("csv/*/metrics.csv")] == ["version_0"]
    assert train(compose_cfg("train", [*smoke_overrides, *TINY, "overwrite=true"]))["steps"] == 2
    assert [p.parent.name for p in finished_run.glob("csv/*/metrics.csv")] == ["version_0"]


def test_a_sweep_reruns_a_changed_job_in_its_directory(finished_run, smoke_overrides):
    """skip_completed (resumable sweeps) re-runs a job whose results.json is for another config."""
    results = train(compose_cfg("train", [*smoke_overrides, *TINY, "skip_completed=true"]))
    assert results["config"]["data"]["block_size"] == 32
    skipped = train(compose_cfg("train", [*smoke_overrides, *TINY, "skip_completed=true"]))
    assert skipped["wall_time_s"] == results["wall_time_s"]  # read back, not trained again


def test_a_live_run_directory_is_refused_at_start(tmp_path, smoke_overrides):
    run = tmp_path / "run"
    with claimed(run, compose_cfg("train", [])):  # another run holds it
        proc = cli("train", [*smoke_overrides, f"hydra.run.dir={run}"], tmp_path)
    assert proc.returncode == 1 and "another run is writing to" in proc.stderr, proc.stderr
    assert not (run / ".hydra").exists()  # refused before Hydra wrote anything


# ------------------------------------------------------------------------------ checkpoints (5, 4)
def test_checkpoints_name_no_module_of_this_package(trained_run):
    """A checkpoint pickles plain values only (settings as dicts, tensors), so moving or renaming a
    module of the package never makes an earlier checkpoint unreadable."""
    with zipfile.ZipFile(trained_run / "checkpoints" / "last.ckpt") as ckpt:
        pickled = ckpt.read(next(name for name in ckpt.namelist() if name.endswith("data.pkl")))
    strings = [arg for op, arg, _ in pickletools.genops(pickled) if isinstance(arg, str)]
    assert any(s.startswith("torch") for s in strings)  # the globals are read: tensors are rebuilt by torch
    assert not [s for s in strings if s.startswith("attn_lm")]


def test_a_run_directory_is_enough_to_evaluate_and_generate(finished_run, tmp_path, monkeypatch, capsys):
    """Trained at block size 24 (the evaluate preset's default is 128): evaluation runs at 24 from
    the checkpoint alone, and generation needs no data preset."""
    monkeypatch.chdir(tmp_path)
    result = evaluate(compose_cfg("evaluate", [f"ckpt={finished_run}", "trainer.enable_progress_bar=false",
                                               "split=validation"]))
    assert result["block_size"] == 24 and result["unit"] == "byte" and result["val/loss"] > 0
    with pytest.raises(ValueError, match="block_size=64 is longer than the checkpoint's model.context_len=24"):
        evaluate(compose_cfg("evaluate", [f"ckpt={finished_run}", "block_size=64"]))
    text = generate(compose_cfg("generate", [f"ckpt={finished_run}", "prompt=abc", "max_new_tokens=5", "device=cpu"]))
    assert text["new_tokens"] == 5 and capsys.readouterr().out.startswith("abc")


def test_evaluating_with_another_tokenizer_names_both(finished_run, tmp_path, token_cache):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be\n" * 400)
    with pytest.raises(ValueError, match="checkpoint has a byte tokenizer with 256 tokens but the data .* has a char "
                                         "tokenizer with 9 tokens"):
        evaluate(compose_cfg("evaluate", [f"ckpt={finished_run}", "data=text_files", f"data.train={corpus}",
                                          "data.tokenizer=char", f"data.cache_dir={token_cache}"]))


def test_prompt_characters_outside_the_vocabulary_are_named(caplog):
    tokenizer = CharTokenizer("Caf ")
    with pytest.raises(ValueError, match=r"2 char\(s\) .* does not know: 'é' '😀'; .*allow_unknown=true"):
        check_known(tokenizer, "Café 😀", allow_unknown=False)
    check_known(tokenizer, "Café 😀", allow_unknown=True)
    assert "become <unk>" in caplog.text
    assert WordTokenizer.train("to be or not").unknown("to see or be seen") == ["see", "seen"]
    check_known(tokenizer, "a Caf", allow_unknown=False)  # all known: nothing to say


def test_a_pattern_covering_the_context_is_warned_at_start(tmp_path, smoke_overrides, monkeypatch, caplog):
    """Issue 13.1: smoke runs at context 32; a local window of 32 is full attention there."""
    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg("train", [*smoke_overrides, "model.layer_attention=[local,local,full,full]",
                                "attention=local", "attention.window_size=32", "data=text_files", f"data.train={tmp_path / 'none'}"])
    with pytest.raises(FileNotFoundError):  # warned before the data is read
        train(cfg)
    assert "layers 0, 1: local: window_size 32 ≥ context 32 — this is full attention" in caplog.text


def test_a_comparison_run_directory_is_passed_as_named(finished_run, tmp_path, monkeypatch, capsys):
    """Issue 13.14: folders named by their overrides (``attention=local,seed=2``) work unquoted."""
    named = tmp_path / "multirun" / "attention=local,seed=2"
    shutil.copytree(finished_run, named)
    monkeypatch.chdir(tmp_path)
    proc = cli_in_process("generate", [f"ckpt={named}", "prompt=ab", "max_new_tokens=3", "device=cpu"], monkeypatch,
                          capsys)
    assert proc.returncode == 0 and proc.stdout.startswith("ab"), proc.stderr
    assert rewrite_arg("ckpt=it's/a=b") == "ckpt='it\\'s/a=b'" and rewrite_arg("ckpt_path=last") == "ckpt_path=last"


# ------------------------------------------------------------------------------ weights out and in (6)
def test_export_and_load_back_in_one_call(finished_run, tmp_path):
    out = export(finished_run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    model, tokenizer = from_pretrained(out)
    reference, same_tokenizer = from_pretrained(finished_run)  # a run directory loads the same way
    assert tokenizer.payload() == same_tokenizer.payload()
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()  # still tied
    idx = torch.tensor([tokenizer.encode("def f(x):").tolist()])
    torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)


def test_readme_from_pretrained_example_runs(finished_run, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    example = next(b for b in blocks if "from_pretrained" in b).replace("outputs/run1", str(finished_run))
    exec(compile(example, "README.md", "exec"), {})  # noqa: S102 - the documented example itself
    assert capsys.readouterr().out.startswith("def main(")


def test_init_from_copies_the_weights_and_checks_the_model(finished_run, tmp_path, smoke_overrides, monkeypatch):
    model, tokenizer = from_pretrained(finished_run)
    fresh = GPT(model.config)
    init_weights(fresh, finished_run, tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="has n_layer=4, .*; this run asks for n_layer=2"):
        train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24", "model.n_layer=2",
                                    f"init_from={finished_run}"]))
    results = train(compose_cfg("train", [*smoke_overrides, *TINY, "data.block_size=24", f"init_from={finished_run}"]))
    assert results["steps"] == 2  # a new run: its own step count, optimizer and schedule


# ------------------------------------------------------------------------------ CPU peak memory (3)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset is Linux-only")
def test_cpu_peak_memory_is_each_runs_own():
    """A run in a reused worker process (joblib) must not report an earlier run's peak."""
    from attn_lm.devices import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    # 64 MiB made resident, then returned to the system. An anonymous map, not a tensor: a
    # long-lived test worker's allocator may serve a tensor from memory that is resident already.
    big = mmap.mmap(-1, 64 * 2**20)
    big.write(b"x" * len(big))
    big.close()
    before, kind = peak_memory_mb(cpu)
    reset_peak_memory(cpu)
    after, _ = peak_memory_mb(cpu)
    assert kind == "cpu_peak_rss" and after < before - 32


def test_generate_help_lists_only_its_own_options(tmp_path, monkeypatch, capsys):
    """Issue 13.18: no training groups that generate would then reject."""
    monkeypatch.chdir(tmp_path)
    proc = cli_in_process("generate", ["--help"], monkeypatch, capsys)
    assert proc.returncode == 0 and "allow_unknown" in proc.stdout
    assert "attention" not in proc.stdout and "optim" not in proc.stdout


def test_cli_skip_completed_keeps_a_complete_run(tmp_path, smoke_overrides, monkeypatch, capsys):
    """The run-directory guard runs before the job; it must not clear a run that skip_completed
    then skips."""
    args = [*smoke_overrides, *TINY, "skip_completed=true", f"hydra.run.dir={tmp_path / 'run'}"]
    monkeypatch.chdir(tmp_path)
    first = cli_in_process("train", args, monkeypatch, capsys)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    proc = cli_in_process("train", args, monkeypatch, capsys)
    assert proc.returncode == 0 and "skipping" in (tmp_path / "run" / "train.log").read_text()
    assert ckpt.stat().st_mtime_ns == stamp


def test_a_bpe_of_the_same_size_trained_on_other_text_is_refused():
    """Issue 13.5: same kind and vocabulary size is not the same tokenizer."""
    from attn_lm.data.tokenizers import build_tokenizer, check_same_tokenizer

    code = build_tokenizer("bpe", "def main(x):\n    return x + 1\n" * 50, 270)
    prose = build_tokenizer("bpe", "To be, or not to be, that is the question.\n" * 50, 270)
    assert code.vocab_size == prose.vocab_size
    check_same_tokenizer(code.payload(), code, "the checkpoint", "the data")
    with pytest.raises(ValueError, match=r"both have a bpe tokenizer of \d+ tokens, but not the same vocabulary"):
        check_same_tokenizer(code.payload(), prose, "the checkpoint", "the data")


def test_evaluate_cli_writes_its_log_and_takes_a_comparison_folder(finished_run, tmp_path, monkeypatch, capsys):
    """Issues 13.11 and 13.14: evaluate.log is filled; a folder named attention=local,seed=2 is
    passed unquoted."""
    named = tmp_path / "multirun" / "attention=local,seed=2"
    shutil.copytree(finished_run, named)
    monkeypatch.chdir(tmp_path)
    proc = cli_in_process("evaluate", [f"ckpt={named}", f"hydra.run.dir={tmp_path / 'eval'}",
                                       "trainer.enable_progress_bar=false"], monkeypatch, capsys)
    assert proc.returncode == 0, proc.stderr
    assert '"unit": "byte"' in (tmp_path / "eval" / "evaluate.log").read_text()
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["block_size"] == 24
