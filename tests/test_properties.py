"""Property-based tests (hypothesis): random valid attention configs and inputs — lengths that
are not multiples of any block/chunk size, T = 1, T below the window, user masks that block
whole rows — must give finite outputs, causality, and the fast path equal to the reference path.
Invalid configs drawn the same way must raise a clear ValueError. Example counts are fixed
(``max_examples``) so the suite's cost is bounded; failures print a reproducible example."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention import reference_mode

NAMES = AttentionFactory.names()
MAX_LEN = 40
EXAMPLES = 500

OPTION_VALUES = {
    "window_size": st.integers(1, 12),
    "block_size": st.integers(1, 9),
    "stride": st.integers(1, 7),
    "dilation": st.integers(1, 3),
    "num_global_tokens": st.integers(1, 3),
    "num_random_blocks": st.integers(1, 3),
    "num_features": st.integers(4, 48),
    "redraw_interval": st.just(0),
    "proj_len": st.integers(1, 4),
    "num_landmarks": st.integers(1, 6),
    "chunk_size": st.integers(4, 9),
    "layout": st.sampled_from(["0", "0,-1", "-2,0"]),
    "seed": st.integers(0, 1000),
    "backend": st.sampled_from(["auto", "math"]),
    "num_sink_tokens": st.integers(1, 3),
    "lambda_init": st.floats(0.1, 0.9),
    "kv_rank": st.integers(1, 16),
    "rope_dim": st.sampled_from([2, 4, 6]),
    "kernel": st.sampled_from(["auto", "torch"]),
    "gated": st.booleans(),
}


@st.composite
def attention_cases(draw):
    name = draw(st.sampled_from(NAMES))
    cls = AttentionFactory.get_class(name)
    n_heads = draw(st.sampled_from([1, 2, 4]))
    options = {}
    for option in cls.options:
        if option == "n_kv_heads":
            options[option] = draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0]))
        else:
            options[option] = draw(OPTION_VALUES[option])
    for summary in ("proj_len", "num_landmarks"):  # the causal low-rank form needs <= chunk_size summaries
        if summary in options:
            options[summary] = min(options[summary], options["chunk_size"])
    config = AttentionConfig(attention_type=name, d_model=8 * n_heads, n_heads=n_heads, max_seq_len=MAX_LEN,
                             position=draw(st.sampled_from(["none", "rope"])), **options)
    T = draw(st.integers(1, MAX_LEN))
    use_mask = draw(st.booleans()) and name not in ("linformer", "nystrom", "deltanet")  # they reject masks by design
    return config, T, use_mask, draw(st.integers(0, 2**31 - 1))


# derandomize: CI draws the same examples every run (explore new ones locally with --hypothesis-seed).
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_random_valid_configs_are_finite_causal_and_match_the_reference(case):
    config, T, use_mask, seed = case
    torch.manual_seed(seed)
    module = AttentionFactory.create_attention(config).double().eval()
    x = torch.randn(2, T, config.d_model, dtype=torch.float64)
    context = torch.randn_like(x) if module.uses_context else None
    mask = None
    if use_mask:
        mask = torch.rand(2, 1, T, T) > 0.3
        mask[:, :, torch.randint(0, T, (1,))] = False  # a query row that may attend to nothing
    y = module(x, context=context, mask=mask)
    assert torch.isfinite(y).all()
    with reference_mode(module):
        y_ref = module(x, context=context, mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-8, atol=1e-8)
    # Causality: perturbing positions after t changes nothing at positions <= t.
    t = T // 2
    x2 = x.clone()
    x2[:, t + 1:] += torch.randn_like(x2[:, t + 1:])
    context2 = None
    if context is not None:
        context2 = context.clone()
        context2[:, t + 1:] += torch.randn_like(context2[:, t + 1:])
    torch.testing.assert_close(module(x2, context=context2, mask=mask)[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)


INVALID_VALUES = st.one_of(st.integers(-5, 0), st.just(10**9))


@st.composite
def invalid_cases(draw):
    name = draw(st.sampled_from(NAMES))
    cls = AttentionFactory.get_class(name)
    kind = draw(st.sampled_from(["foreign_option", "bad_value", "bad_heads"]))
    sizes = [o for o in cls.options if o not in ("layout", "backend", "seed", "redraw_interval")]
    if kind == "bad_value" and sizes:
        option = draw(st.sampled_from(sizes))
        value = draw(st.integers(-5, 0))
        return AttentionConfig.__new__(AttentionConfig), dict(attention_type=name, d_model=16, n_heads=2,
                                                              **{option: value})
    if kind == "bad_heads":
        return None, dict(attention_type=name, d_model=draw(st.sampled_from([10, 14, 15])), n_heads=4)
    foreign = [o for o in OPTION_VALUES if o not in cls.options]
    option = draw(st.sampled_from(foreign))
    return None, dict(attention_type=name, d_model=16, n_heads=2, **{option: draw(OPTION_VALUES[option])})


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True)
@given(invalid_cases())
def test_random_invalid_configs_raise_a_clear_error(case):
    _, kwargs = case
    with pytest.raises(ValueError) as err:
        AttentionFactory.create_attention(AttentionConfig(**kwargs))
    message = str(err.value)
    assert len(message) > 20 and ("valid" in message or "must" in message or "does not" in message
                                  or "apply" in message or "accepts" in message), message
