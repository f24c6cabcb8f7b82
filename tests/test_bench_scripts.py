"""The GPU benchmark scripts run end to end on CPU at tiny sizes and print their tables."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
# One thread: tiny ops on a busy 2-core machine are dominated by thread hand-offs otherwise.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                            env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def run_main(name: str, *args: str, capsys, monkeypatch) -> subprocess.CompletedProcess:
    """``python scripts/<name> ARGS`` in this process (starting a process that imports torch and
    attn_lm is most of a small run's time): the script's ``main`` with ``sys.argv`` as the command
    line, its exit status as the interpreter would make it of a ``SystemExit`` (a message: printed
    to stderr, status 1), its stdout and stderr. The process-wide settings the scripts change
    (matmul precision, Dynamo's recompile limits, threads) are put back after the test and what
    they compiled is dropped; each script keeps at least one test that runs it as a real process
    (run_script)."""
    import importlib.util

    import torch._dynamo.config as dynamo_config

    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    for option in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                   "accumulated_cache_size_limit"):
        if hasattr(dynamo_config, option):
            monkeypatch.setattr(dynamo_config, option, getattr(dynamo_config, option))
    monkeypatch.syspath_prepend(str(SCRIPTS))  # the scripts import _bench_common as a top-level module
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / name), *args])
    # Fresh modules, in sys.modules for this test only (dataclasses look their module up there):
    # _bench_common binds sys.stdout, this test's captured one, when it is imported.
    for module_name, file in (("_bench_common", "_bench_common.py"), (f"_script_{Path(name).stem}", name)):
        spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / file)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, module_name, module)
        spec.loader.exec_module(module)
    capsys.readouterr()
    code, message = 0, ""
    try:
        module.main()
    except SystemExit as done:
        if isinstance(done.code, str):
            code, message = 1, done.code + "\n"
        else:
            code = done.code or 0
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # what the script compiled (its models' graphs) goes with it
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(sys.argv, code, out, err + message)


def run_in_process(name: str, *args: str, capsys, monkeypatch) -> str:
    """:func:`run_main` of a run that must succeed (exit status 0): its stdout."""
    result = run_main(name, *args, capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(stdout: str) -> list[list[str]]:
    """Cells of the markdown table rows (header and separator excluded)."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, stdout
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_bench_attention_tiny(tmp_path):
    out = tmp_path / "attn.jsonl"
    stdout = run_script(
        "bench_attention.py", "--mechanisms", "full,linear,linformer", "--seq-lens", "32,64", "--head-dims", "8",
        "--heads", "2", "--tokens-heads", "256", "--check-len", "32", "--baselines", "sdpa,naive",
        "--sdpa-backends", "flash,math", "--target-ms", "1", "--whole-module", "--out", str(out),
    )
    assert "- device: CPU" in stdout and "- command:" in stdout
    rows = table_rows(stdout)
    names = {row[0] for row in rows}
    assert {"sdpa[flash]", "sdpa[math]", "naive", "full", "linear", "linformer", "full (module)"} <= names
    assert len(rows) == 2 * 2 * (3 + 2 * 3)  # (T, mode) x (baselines + core and module rows)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == len(rows)
    for rec in records:
        assert rec.get("ms", 0) > 0 and rec["note"] is None, rec
        if rec["name"] in ("full", "linear", "linformer"):
            assert rec["rel_err"] < 1e-4 and rec["tflops"] > 0 and rec["vs_best_sdpa"] > 0, rec
    assert {rec["B"] for rec in records} == {4, 2}  # B = 256 // (2 heads * T)


def test_bench_attention_times_every_registered_mechanism(tmp_path, capsys, monkeypatch):
    """Every mechanism's attention core runs forward and backward on the inputs the benchmark
    makes for it (its own projection where ``attend`` needs one: gates, a latent row) and matches
    its reference: no row may end in an error note."""
    from attn_lm import AttentionFactory

    out = tmp_path / "attn.jsonl"
    run_in_process("bench_attention.py", "--seq-lens", "32", "--head-dims", "16", "--heads", "4", "--tokens-heads",
                   "128", "--check-len", "32", "--baselines", "naive", "--modes", "fwd+bwd", "--compile", "none",
                   "--target-ms", "1", "--out", str(out), capsys=capsys, monkeypatch=monkeypatch)
    records = {rec["name"]: rec for rec in map(json.loads, out.read_text().splitlines()) if rec["kind"] == "mechanism"}
    assert set(records) == set(AttentionFactory.names())
    for name, rec in records.items():
        assert rec["note"] is None and rec.get("ms", 0) > 0 and rec["rel_err"] < 1e-4, (name, rec)


def test_bench_attention_skips_after_slow_call(capsys, monkeypatch):
    stdout = run_in_process(
        "bench_attention.py", "--mechanisms", "full", "--seq-lens", "16,32", "--head-dims", "8", "--heads", "2",
        "--check-len", "16", "--baselines", "naive", "--modes", "fwd", "--max-call-ms", "0",
        capsys=capsys, monkeypatch=monkeypatch,
    )
    notes = {(row[0], row[1]): row[-1] for row in table_rows(stdout)}
    assert notes[("full", "16")].startswith("1 call >")
    assert notes[("full", "32")].startswith("skipped (")


MEMORY_CHECK = ["--check-memory-model", "--head-dims", "8", "--heads", "4", "--tokens-heads", "256"]


def test_bench_attention_checks_every_memory_model(tmp_path, capsys, monkeypatch):
    """--check-memory-model on tiny CPU shapes (too small for the models to hold; the 1k-16k bound
    is tests/test_selector_profiler.py's): one row per registered mechanism, length and mode with
    the layer's modelled and measured peak and their ratio, the core's pair, and a summary; with a
    tolerance every cell meets it exits 0."""
    from attn_lm import AttentionFactory

    out = tmp_path / "memory.jsonl"
    stdout = run_in_process("bench_attention.py", *MEMORY_CHECK, "--seq-lens", "32,64", "--tolerance", "1e9",
                            "--out", str(out), capsys=capsys, monkeypatch=monkeypatch)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    cells = {(rec["name"], rec["T"], rec["mode"]) for rec in records}
    assert len(records) == len(cells) == len(AttentionFactory.names()) * 2 * 2
    assert {name for name, _, _ in cells} == set(AttentionFactory.names())
    for rec in records:
        assert rec["note"] is None and rec["model_mb"] > 0 and rec["measured_mb"] > 0, rec
        assert rec["ratio"] == pytest.approx(rec["model_mb"] / rec["measured_mb"])
        assert rec["family"] == AttentionFactory.get_class(rec["name"]).family and rec["core_model_mb"] > 0
    assert f"{len(records)} cells within +-100000000000%, 0 outside, 0 failed, 0 skipped" in stdout
    assert len(table_rows(stdout)) == len(records)


def test_bench_attention_memory_check_fails_outside_the_tolerance_and_skips_slow_cells(capsys, monkeypatch):
    """A cell outside --tolerance is flagged and listed, and the exit status is 1; a cell predicted
    slower than --max-call-ms is skipped with the reason and does not fail the check."""
    result = run_main("bench_attention.py", *MEMORY_CHECK, "--mechanisms", "full,linear", "--seq-lens", "32",
                      "--tolerance", "0", capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "OUTSIDE +-0%" in result.stdout and "- outside: full T=32 D=8 fwd: model" in result.stdout
    stdout = run_in_process("bench_attention.py", *MEMORY_CHECK, "--mechanisms", "linear", "--seq-lens", "16,32",
                            "--modes", "fwd", "--max-call-ms", "0", "--tolerance", "1e9",
                            capsys=capsys, monkeypatch=monkeypatch)
    notes = {row[2]: row[-1] for row in table_rows(stdout)}
    assert notes["16"] == "-" and notes["32"].startswith("skipped (~")
    assert "1 cells within" in stdout and "1 skipped" in stdout and "- skipped: linear T=32 D=8 fwd: skipped" in stdout


TINY_TRAIN = ["--n-layer", "2", "--d-model", "32", "--n-heads", "2", "--seq-len", "32", "--vocab-size", "64",
              "--batch-size", "2", "--warmup-steps", "1", "--steps", "2", "--matmul-size", "64"]


def test_bench_train_tiny(tmp_path):
    out = tmp_path / "train.jsonl"
    stdout = run_script("bench_train.py", "--mechanisms", "full,linear", "--nanogpt-baseline", *TINY_TRAIN,
                        "--min-ratio", "0.01", "--out", str(out))
    assert "TFLOP/s" in stdout
    rows = table_rows(stdout)
    assert [(row[0], row[1]) for row in rows] == [("full", "eager"), ("linear", "eager"), ("nanoGPT reference", "eager")]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(rec["tokens_per_s"] > 0 and rec["mfu"] > 0 for rec in records), records
    # The reference has exactly the library model's shape, hence the same parameter count.
    assert records[0]["params_m"] == records[2]["params_m"]
    assert "- ok: full tokens/s" in stdout


def test_bench_train_guard_fails_below_the_ratio(capsys, monkeypatch):
    result = run_main("bench_train.py", "--nanogpt-baseline", *TINY_TRAIN, "--min-ratio", "1000",
                      capsys=capsys, monkeypatch=monkeypatch)
    assert result.returncode == 1
    assert "FAIL: full tokens/s" in result.stdout and "check(s) failed" in result.stderr


def test_bench_train_times_the_real_loop_and_the_bare_step_of_its_model(token_cache, capsys, monkeypatch):
    """--loop runs python -m attn_lm.train at the benchmark's shape and the bare step of the
    model that run built (its checkpoint's config: the data's vocabulary, not --vocab-size)."""
    overrides = f"data=stdlib data.max_chars=200000 data.max_eval_tokens=2048 data.cache_dir={token_cache}"
    stdout = run_in_process("bench_train.py", "--mechanisms", "full", *TINY_TRAIN, "--loop", "--loop-steps", "30",
                            "--loop-overrides", overrides, capsys=capsys, monkeypatch=monkeypatch)
    rows = {row[0]: row for row in table_rows(stdout)}
    assert {"full", "bare step of the loop's model", "python -m attn_lm.train"} <= set(rows)
    assert rows["bare step of the loop's model"][2] != rows["full"][2]  # other vocabulary, other parameter count
    assert "training loop step time" in stdout


def test_pattern_density_counts_rows_in_chunks():
    """The density behind the benchmarks' FLOPs (MaskPattern.density) is exact when counted in
    row chunks (never one T x T tensor)."""
    from attn_lm.attention.masks import MaskPattern, SlidingWindowPattern

    T = 4500  # > 2^24 / T rows per chunk: counted in two chunks
    assert MaskPattern(causal=True).density(T) == pytest.approx((T + 1) / (2 * T))
    window = SlidingWindowPattern(causal=True, window=7)
    pos = torch.arange(T)
    assert window.density(T) == pytest.approx(window.dense(pos, pos).float().mean().item())


def test_bench_decode_tiny():
    stdout = run_script(
        "bench_decode.py", "--d-model", "32", "--n-layer", "1", "--n-heads", "2", "--vocab", "64",
        "--mechanisms", "full", "linear", "--batches", "1", "3", "--prompt", "8", "--new-tokens", "5",
        "--contexts", "16", "32", "--steps", "4", "--repeats", "1", "--eager", "--device", "cpu",
    )
    assert "device-to-device copy" in stdout and "decoding step: eager" in stdout
    rows = table_rows(stdout.split("### Context scaling")[0])
    assert [(row[0], row[1]) for row in rows] == [("full", "1"), ("full", "3"), ("linear", "1"), ("linear", "3")]
    assert all(float(row[2]) > 0 and float(row[4]) > 0 and row[-1] == "-" for row in rows), rows
    scaling = table_rows(stdout.split("### Context scaling")[1])
    assert [(row[0], row[1], row[3]) for row in scaling][::2] == [("full", "16", "1"), ("linear", "16", "1")]
    # A recurrent state reads the same bytes at every context; a KV cache reads more.
    kv_mb = {(row[0], row[1]): float(row[4]) for row in scaling}
    assert kv_mb[("linear", "16")] == kv_mb[("linear", "32")] and kv_mb[("full", "16")] < kv_mb[("full", "32")]


def test_bench_decode_times_the_compiled_prefill(capsys, monkeypatch):
    """--compile-prefill: the generation rows run the compiled step and prefill (Inductor on CPU),
    with no fallback note; --eager, which compiles nothing, refuses it."""
    stdout = run_in_process(
        "bench_decode.py", "--d-model", "32", "--n-layer", "1", "--n-heads", "2", "--vocab", "64",
        "--mechanisms", "local", "--batches", "2", "--prompt", "8", "--new-tokens", "4", "--contexts",
        "--repeats", "1", "--compile-prefill", "--device", "cpu", capsys=capsys, monkeypatch=monkeypatch,
    )
    assert "decoding step: compiled; generation prefill: compiled" in stdout
    (row,) = table_rows(stdout)
    assert row[:2] == ["local", "2"] and float(row[5]) > 0 and row[-1] == "-", row
    refused = run_main("bench_decode.py", "--eager", "--compile-prefill", capsys=capsys, monkeypatch=monkeypatch)
    assert refused.returncode == 2 and "--eager compiles nothing" in refused.stderr


def test_profile_loop_reports_the_host_ops_of_a_cpu_run(tmp_path, token_cache):
    """scripts/profile_loop.py runs the real training job with its overrides and writes the
    profile of the chosen steps (on CPU: the host-op table; the GPU sections need CUDA)."""
    report = tmp_path / "loop.txt"
    run_script("profile_loop.py", "--profile-steps", "4", "8", "--out", str(report), "--",
               "debug=smoke", f"data.cache_dir={token_cache}", "data.max_chars=200000", "trainer.max_steps=10",
               "trainer.enable_progress_bar=false", "test_after_training=false", f"hydra.run.dir={tmp_path / 'run'}")
    text = report.read_text()
    assert "## Profile over 4 steps" in text and "no CUDA kernels" in text
    assert "Optimizer.step" in text  # the host ops of the optimizer steps were profiled


def test_profile_decode_prints_a_row_per_decoder():
    """scripts/profile_decode.py: --rows decoders per mechanism, each with its wall and host time
    per token (on CPU no kernel columns: there are no CUDA kernels to profile)."""
    stdout = run_script("profile_decode.py", "--device", "cpu", "--eager", "--d-model", "32", "--n-layer", "1",
                        "--n-heads", "2", "--vocab", "64", "--prompt", "8", "--warmup-steps", "2", "--steps", "5",
                        "--profile-steps", "3", "--rows", "2", "--mechanisms", "full", "mqa")
    rows = table_rows(stdout)
    assert [(row[0], row[1]) for row in rows] == [("full", "1"), ("full", "2"), ("mqa", "1"), ("mqa", "2")]
    for row in rows:
        wall, tokens_per_s, host = float(row[2]), float(row[3]), float(row[4])
        assert 0 < host <= wall and tokens_per_s == pytest.approx(1e3 / wall, rel=0.01) and row[5] == "-", row


def test_idle_gaps_of_kernel_intervals(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_common", SCRIPTS / "_bench_common.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "_bench_common", module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    busy, gaps = module.idle_gaps([(0, 10), (5, 20), (30, 35), (50, 51)])
    assert busy == 26 and gaps == [(15, 35), (10, 20)]


def test_check_compiled_eval_writes_every_evaluation_of_a_compiled_run(tmp_path):
    """scripts/check_compiled_eval.py runs the real job (compiled, fp32 on CPU: all four losses
    equal) and writes one row per evaluation, the run's final one included."""
    report = tmp_path / "eval.txt"
    run_script("check_compiled_eval.py", "--out", str(report), "--", "experiment=compare_recall", "trainer=cpu",
               "debug=smoke", "data.block_size=32", "model.d_model=16", "attention=local", "model.position=rope",
               "compile=true", "compile_mode=default", "trainer.enable_progress_bar=false",
               "test_after_training=false", f"hydra.run.dir={tmp_path / 'run'}")
    rows = table_rows(report.read_text())
    assert [row[:2] for row in rows] == [["3", "val"], ["6", "val"], ["6", "val"]]
    for row in rows:
        losses = [float(value) for value in row[2:6]]
        assert max(losses) - min(losses) < 1e-3 and row[6] == "agree", row


def test_check_compiled_eval_names_the_loss_nearer_the_reference(capsys, monkeypatch):
    """A compiled loss far from float32 is a disagreement that the eager model is nearer to."""
    import importlib.util
    from types import SimpleNamespace

    from attn_lm import GPT, AttentionConfig, GPTConfig

    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("_script_check_compiled_eval", SCRIPTS / "check_compiled_eval.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, context_len=16, n_layer=1, d_model=16, n_heads=2,
                          attention=AttentionConfig(attention_type="full"))).eval()
    x, y = torch.randint(64, (2, 16)), torch.randint(64, (2, 16))
    with torch.no_grad():
        loss = model(x, y)[1]
        module = SimpleNamespace(model=model, global_step=7)
        wrong, right = ([cell.strip() for cell in script.compare_row(module, x, y, value, split).strip("|").split("|")]
                        for value, split in ((loss + 0.5, "val"), (loss, "test")))
    assert wrong[:2] == ["7", "val"] and wrong[6:] == ["DISAGREE", "eager"]
    assert right[:2] == ["7", "test"] and right[6:] == ["agree", "equal"]
