"""Properties every registered mechanism must have. Parametrized over the registry, so a new
mechanism is tested as soon as it is registered."""
from __future__ import annotations

import pytest
import torch

import dataclasses
import warnings

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention import reference_mode
from attn_lm.attention.conf import stale_files
from attn_lm.attention.config import AttentionDims, AttnLmDeprecationWarning, option_examples
from attn_lm.attention.functional import reference_attention
from attn_lm.cli import CONF_DIR

from .helpers import build, context_for, small_config, small_dims

NAMES = AttentionFactory.names()
EXACT = [n for n in NAMES if AttentionFactory.get_class(n).exact]
MASKLESS = [n for n in NAMES if AttentionFactory.get_class(n).mask_unsupported]
RENAMED = [(n, old, new) for n in NAMES for old, new in AttentionFactory.get_class(n).renamed_options.items()]
T = 23  # deliberately not a multiple of any block size


@pytest.mark.parametrize("name", NAMES)
def test_causal_no_future_leak(name):
    """Changing tokens after position t changes no output at positions <= t."""
    module = build(name)
    x = torch.randn(2, T, module.dims.d_model, dtype=torch.float64)
    ctx = context_for(module, x)
    y = module(x, context=ctx)
    for t in (0, 7, T - 2):
        x2 = x.clone()
        x2[:, t + 1:] = torch.randn_like(x2[:, t + 1:])
        ctx2 = None
        if ctx is not None:
            ctx2 = ctx.clone()
            ctx2[:, t + 1:] = torch.randn_like(ctx2[:, t + 1:])
        y2 = module(x2, context=ctx2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(y2[:, t + 1:], y[:, t + 1:])


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("causal", [True, False])
def test_exact_equals_dense_softmax_reference(name, dtype, tol, causal):
    """Fast path == softmax(QK^T/sqrt(d) + mask) V with the mechanism's pattern, outputs and grads."""
    cls = AttentionFactory.get_class(name)
    if not causal and cls.noncausal_unsupported:
        pytest.skip(cls.noncausal_unsupported)
    module = build(name, dtype=dtype, causal=causal)
    x = torch.randn(2, T, module.dims.d_model, dtype=dtype, requires_grad=True)
    ctx = context_for(module, x)
    user_mask = torch.rand(2, 1, T, T) > 0.2
    for mask in (None, user_mask):
        y = module(x, context=ctx, mask=mask)
        q, k, v = module.project(x, ctx)
        pos = torch.arange(T)
        allowed = module.pattern.dense(pos, pos)
        if mask is not None:
            allowed = allowed & mask
        ref = reference_attention(q, k, v, allowed=allowed)
        ref = module.out(ref.transpose(1, 2).reshape(2, T, -1))
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        g, = torch.autograd.grad(y.square().sum(), x)
        g_ref, = torch.autograd.grad(ref.square().sum(), x)
        torch.testing.assert_close(g, g_ref, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("name", NAMES)
def test_reference_path_matches_fast_path(name):
    module = build(name)
    x = torch.randn(2, T, module.dims.d_model, dtype=torch.float64)
    ctx = context_for(module, x)
    y = module(x, context=ctx)
    with reference_mode(module):
        y_ref = module(x, context=ctx)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("position", ["none", "rope"])
def test_cached_decoding_equals_full_forward(name, position):
    """Prefill a prompt, then decode token by token: outputs equal the full forward."""
    module = build(name, position=position)
    x = torch.randn(2, T, module.dims.d_model, dtype=torch.float64)
    ctx = context_for(module, x)
    full = module(x, context=ctx)
    cache = module.new_cache(2, T, torch.float64, "cpu")
    pieces = [module(x[:, :6], context=None if ctx is None else ctx[:, :6], cache=cache)]
    for t in range(6, T):
        c = None if ctx is None else ctx[:, t:t + 1]
        pieces.append(module(x[:, t:t + 1], context=c, cache=cache, input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [True, False])
def test_covers_context_is_said_exactly_when_the_layer_is_full_attention(name, causal):
    """Issue 13.1: ``covers_context`` names the option when a pattern or chunk covers the whole
    sequence, and then the layer's output is full attention's (same weights); on long sequences
    no mechanism claims it."""
    cls = AttentionFactory.get_class(name)
    if not causal and cls.noncausal_unsupported:
        pytest.skip(cls.noncausal_unsupported)
    module = build(name, causal=causal)
    assert cls.covers_context(module.config, 10_000) is None
    option = cls.covering_option(module.config)
    if option is None:
        return
    length = getattr(module.options, option)
    assert cls.covers_context(module.config, length + 1) is None
    reason = cls.covers_context(module.config, length)
    assert reason == f"{name}: {option} {length} ≥ context {length} — this is full attention"
    full = build("full", causal=causal)
    full.load_state_dict(module.state_dict(), strict=False)  # the same projections
    for n in (length, max(1, length - 1)):  # a pattern longer than the sequence covers it too
        x = torch.randn(2, n, module.dims.d_model, dtype=torch.float64)
        torch.testing.assert_close(module(x, context=context_for(module, x)), full(x), rtol=0, atol=1e-10)


def test_hydra_attention_group_is_generated_from_the_registry():
    """conf/attention/<name>.yaml and conf/attention_options/unset.yaml match the registry (after
    adding a mechanism or an option: python -m attn_lm.attention.conf)."""
    assert stale_files(CONF_DIR) == [], "run `python -m attn_lm.attention.conf` to regenerate them"


@pytest.mark.parametrize("name", NAMES)
def test_options_are_typed_and_every_declared_example_is_valid(name):
    """The Options dataclass is the only place defaults live; its defaults and each declared
    example build a layer, and a value of the wrong type or range is refused naming the option."""
    cls = AttentionFactory.get_class(name)
    assert dataclasses.is_dataclass(cls.Options)
    dims = small_dims()
    assert AttentionFactory.resolve(AttentionConfig(name), dims).options == cls.Options()
    for option, examples in option_examples(cls.Options).items():
        for value in examples:
            resolved = AttentionFactory.resolve(small_config(name, **{option: value}), dims)
            assert getattr(resolved.options, option) == value
        with pytest.raises(ValueError, match=option):
            AttentionFactory.resolve(small_config(name, **{option: [1]}), dims)


@pytest.mark.parametrize("name", NAMES)
def test_benchmark_settings_are_valid_options_of_the_mechanism(name):
    """``bench_options`` (what scripts/bench_attention.py runs the mechanism with) are options it
    declares, with values valid at the benchmark's default shape (16 heads, up to 32k tokens); a
    subclass must not inherit settings of options it does not have."""
    cls = AttentionFactory.get_class(name)
    dims = AttentionDims(d_model=16 * 64, n_heads=16, max_seq_len=32768)
    resolved = AttentionFactory.resolve(AttentionConfig(name, options=dict(cls.bench_options)), dims)
    for option, value in cls.bench_options.items():
        assert getattr(resolved.options, option) == value


@pytest.mark.parametrize("name", NAMES)
def test_foreign_options_are_refused_naming_their_users(name):
    cls = AttentionFactory.get_class(name)
    mine = {f.name for f in dataclasses.fields(cls.Options)}
    for other in NAMES:
        for option in {f.name for f in dataclasses.fields(AttentionFactory.get_class(other).Options)} - mine:
            with pytest.raises(ValueError, match=f"does not apply to attention_type '{name}'.*{other}"):
                AttentionFactory.resolve(AttentionConfig(name, options={option: 1}))
            return


@pytest.mark.parametrize("name,old,new", RENAMED)
def test_renamed_options_still_work_for_one_release(name, old, new):
    value = option_examples(AttentionFactory.get_class(name).Options)[new][0]
    with pytest.warns(AttnLmDeprecationWarning, match=f"'{old}' of '{name}' is now '{new}'"):
        resolved = AttentionFactory.resolve(AttentionConfig(name, options={old: value}))
    assert getattr(resolved.options, new) == value


@pytest.mark.parametrize("name", MASKLESS)
def test_a_family_that_cannot_mask_refuses_user_masks(name):
    module = build(name)
    x = torch.randn(1, 8, module.dims.d_model, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        module(x, context=context_for(module, x), mask=torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_hold(name):
    """alibi/non-causal refusals are raised exactly when declared; the cache is the declared kind
    (a bounded kind does not grow with the decoded length)."""
    cls = AttentionFactory.get_class(name)
    for kwargs, reason in (({"position": "alibi"}, cls.alibi_unsupported), ({"causal": False}, cls.noncausal_unsupported)):
        if reason:
            with pytest.raises(ValueError, match="not supported"):
                build(name, **kwargs)
        else:
            build(name, **kwargs)
    module = build(name)
    short, long = (module.new_cache(1, n, torch.float32, "meta").nbytes() for n in (32, 64))
    assert (short == long) == (cls.cache_kind in ("window", "state")), cls.cache_kind


def test_legacy_flat_attention_config_still_builds():
    with pytest.warns(AttnLmDeprecationWarning, match="flat options"):
        config = AttentionConfig("local", d_model=32, n_heads=4, window_size=5)
    layer = AttentionFactory.create_attention(config)
    assert layer.dims == AttentionDims(d_model=32, n_heads=4) and layer.options.window_size == 5
