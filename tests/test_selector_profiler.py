"""AttentionProfiler (latency, memory, throughput of one layer) and AttentionSelector (a mechanism
per scenario within a memory budget), on CPU with tiny sizes."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionFactory, AttentionProfiler, AttentionSelector
from attn_lm.profiler import build_layer
from attn_lm.selector import KINDS, SCENARIOS, analytic_memory_bytes, kind_of

TINY = {"batch_size": 2, "seq_len": 64, "d_model": 32, "n_heads": 4}
SELF_ATTENTION = [n for n in AttentionFactory.names() if not AttentionFactory.get_class(n).uses_context]


@pytest.mark.parametrize("name", ["full", "flash_v2", "linear", "nystrom"])
def test_profiler_returns_sane_numbers(name):
    r = AttentionProfiler.profile_attention(name, num_iterations=3, warmup=1, **TINY)
    for key in ("forward_ms", "forward_backward_ms", "avg_latency_ms", "memory_mb", "tokens_per_s"):
        assert r[key] > 0, key
    assert r["avg_latency_ms"] == r["forward_backward_ms"]
    assert r["latency_p10_ms"] <= r["avg_latency_ms"] <= r["latency_p90_ms"]
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / (r["avg_latency_ms"] / 1000))
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["memory_kind"] == "cpu_profiler_allocations"
    # The step keeps at least the projected q, k, v of the batch for the backward pass.
    assert r["memory_mb"] * 2**20 >= 2 * 64 * 3 * 32 * 4


def test_profiler_forward_only_any_dtype_and_options():
    r = AttentionProfiler.profile_attention("local", backward=False, dtype=torch.bfloat16, num_iterations=2,
                                            window_size=8, **TINY)
    assert r["forward_backward_ms"] is None and r["avg_latency_ms"] == r["forward_ms"] > 0
    assert r["dtype"] == "bfloat16" and r["options"] == {"window_size": 8} and r["memory_mb"] > 0
    r64 = AttentionProfiler.profile_attention("performer", dtype=torch.float64, num_iterations=2, **TINY)
    assert r64["dtype"] == "float64" and r64["memory_mb"] > 0


def test_profiler_memory_is_measured_not_guessed():
    """Materialised T x T tiles (flash_v1's autograd through its loops) grow 4x with 2x length."""
    short, long = (AttentionProfiler.profile_attention("flash_v1", seq_len=t, batch_size=2, d_model=32, n_heads=4,
                                                       num_iterations=1, warmup=1, block_size=16)["memory_mb"]
                   for t in (128, 256))
    assert 3.0 < long / short < 5.0


def test_profiler_errors():
    with pytest.raises(ValueError, match="unknown attention_type"):
        AttentionProfiler.profile_attention("nope", num_iterations=1, **TINY)
    with pytest.raises(ValueError, match="unknown attention option"):
        AttentionProfiler.profile_attention("full", num_iterations=1, windw_size=3, **TINY)
    with pytest.raises(ValueError, match="does not apply"):
        AttentionProfiler.profile_attention("full", num_iterations=1, window_size=3, **TINY)
    with pytest.raises(ValueError, match="num_iterations"):
        AttentionProfiler.profile_attention("full", num_iterations=0, **TINY)


def test_analytic_memory_model_tracks_measurements():
    """The no-profiling model is within a small factor of the measured peak for every mechanism."""
    B, T, d, H = 2, 256, 64, 4
    for name in SELF_ATTENTION:
        layer = build_layer(name, d, H, T)
        for backward in (True, False):
            measured = AttentionProfiler.profile_attention(name, batch_size=B, seq_len=T, d_model=d, n_heads=H,
                                                           num_iterations=1, warmup=1, backward=backward)["memory_mb"]
            model = analytic_memory_bytes(layer, B, T, torch.float32, backward, torch.device("cpu")) / 2**20
            assert 0.4 < model / measured < 2.5, (name, backward, model, measured)


def test_selector_obeys_a_measured_memory_constraint():
    selector = AttentionSelector(iterations=2)
    selector.select_for_scenario("training", profile=True, **TINY)
    measured = sorted(c.memory_mb for c in selector.last.candidates)
    budget = measured[len(measured) // 2]
    config = selector.select_for_scenario("long_context", memory_constraint=budget, profile=True, **TINY)
    chosen = selector.last.chosen
    assert config.attention_type == chosen.name and chosen.memory_source == "measured"
    assert chosen.memory_mb <= budget
    over = [c for c in selector.last.candidates if c.memory_mb > budget]
    assert over and all(not c.fits for c in over) and chosen not in over
    with pytest.raises(ValueError, match="no attention mechanism fits"):
        selector.select_for_scenario("training", memory_constraint=1e-6, profile=True, **TINY)


def test_selector_rules_without_profiling():
    selector = AttentionSelector()
    settings = {"seq_len": 2048, "batch_size": 1, "d_model": 256, "n_heads": 8}
    assert selector.select_for_scenario("training", **settings).attention_type == "flash"
    assert "flash" in selector.explain() and "rule:" in selector.explain()

    inference = selector.select_for_scenario("inference", **settings)
    exact = [c for c in selector.last.candidates if c.kind in ("exact_full", "shared_kv")]
    assert selector.last.chosen.cache_mb == min(c.cache_mb for c in exact)
    assert inference.attention_type in ("gqa", "mqa") or not any(c.kind == "shared_kv" for c in exact)

    long_context = selector.select_for_scenario("long_context", **settings)
    kinds = {c.kind for c in selector.last.candidates}
    expected_kind = next(k for k in ("exact_sparse", "kernel", "low_rank") if k in kinds)
    assert kind_of(build_layer(long_context.attention_type, 256, 8, 2048)) == expected_kind

    selector.select_for_scenario("memory_limited", **settings)
    assert selector.last.chosen.memory_mb == min(c.memory_mb for c in selector.last.candidates)

    # A budget just below the favourite's analytic memory moves the choice, and never above it.
    selector.select_for_scenario("training", **settings)
    budget = selector.last.chosen.memory_mb * 0.999
    moved = selector.select_for_scenario("training", memory_constraint=budget, **settings)
    assert moved.attention_type != "flash" and selector.last.chosen.memory_mb <= budget


def test_selector_errors():
    selector = AttentionSelector()
    with pytest.raises(RuntimeError, match="select_for_scenario"):
        selector.explain()
    with pytest.raises(ValueError, match="unknown scenario 'fast'.*training, inference, long_context, memory_limited"):
        selector.select_for_scenario("fast", seq_len=64)
    assert set(SCENARIOS) == {"training", "inference", "long_context", "memory_limited"}
    assert all(kind in KINDS for s in SCENARIOS.values() for tier in s.tiers for kind in tier)


def test_selector_returns_a_buildable_causal_config():
    selector = AttentionSelector(candidates=["full", "linear", "local"], options={"local": {"window_size": 16}})
    config = selector.select_for_scenario("long_context", seq_len=128, d_model=32, n_heads=4)
    assert config.attention_type == "local" and config.window_size == 16 and config.causal
    layer = AttentionFactory.create_attention(config)
    assert layer(torch.randn(1, 128, 32)).shape == (1, 128, 32)
