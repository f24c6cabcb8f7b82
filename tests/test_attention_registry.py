"""Properties every registered mechanism must have. Parametrized over the registry, so a new
mechanism is tested as soon as it is registered."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionFactory
from attn_lm.attention import reference_mode
from attn_lm.attention.functional import reference_attention

from .helpers import build, context_for

NAMES = AttentionFactory.names()
EXACT = [n for n in NAMES if AttentionFactory.get_class(n).exact]
T = 23  # deliberately not a multiple of any block size


@pytest.mark.parametrize("name", NAMES)
def test_causal_no_future_leak(name):
    """Changing tokens after position t changes no output at positions <= t."""
    module = build(name)
    x = torch.randn(2, T, module.config.d_model, dtype=torch.float64)
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
    x = torch.randn(2, T, module.config.d_model, dtype=dtype, requires_grad=True)
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
    x = torch.randn(2, T, module.config.d_model, dtype=torch.float64)
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
    x = torch.randn(2, T, module.config.d_model, dtype=torch.float64)
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
    length = cls.option_of(module.config, option)
    assert cls.covers_context(module.config, length + 1) is None
    reason = cls.covers_context(module.config, length)
    assert reason == f"{name}: {option} {length} ≥ context {length} — this is full attention"
    full = build("full", causal=causal)
    full.load_state_dict(module.state_dict(), strict=False)  # the same projections
    for n in (length, max(1, length - 1)):  # a pattern longer than the sequence covers it too
        x = torch.randn(2, n, module.config.d_model, dtype=torch.float64)
        torch.testing.assert_close(module(x, context=context_for(module, x)), full(x), rtol=0, atol=1e-10)
