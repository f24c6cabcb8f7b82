"""Shared-KV family: GQA/MQA against multi-head attention, head grouping, sizes, validation."""
from __future__ import annotations

import math

import pytest
import torch

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention import functional

from .helpers import build

T = 17


def same_weights(target, source):
    target.load_state_dict(source.state_dict())
    return target


def test_gqa_with_one_group_per_head_is_full_attention():
    full = build("full")
    gqa = same_weights(build("gqa", n_kv_heads=4), full)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), full(x), rtol=0, atol=1e-12)
    cache = gqa.new_cache(2, T, torch.float64, "cpu")
    steps = torch.cat([gqa(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full(x), rtol=1e-10, atol=1e-10)


def test_mqa_is_gqa_with_one_kv_head():
    gqa = build("gqa", n_kv_heads=1)
    mqa = same_weights(build("mqa"), gqa)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    torch.testing.assert_close(mqa(x), gqa(x), rtol=0, atol=0)


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_query_heads_read_their_groups_kv_head(n_kv_heads):
    """Query head h attends with key/value head h // (n_heads / n_kv_heads), written out per head."""
    module = build("gqa", n_kv_heads=n_kv_heads)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    q, k, v = module.project(x, None)
    group = module.n_heads // n_kv_heads
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    heads = []
    for h in range(module.n_heads):
        scores = q[:, h] @ k[:, h // group].transpose(-2, -1) / math.sqrt(module.head_dim)
        heads.append(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, h // group])
    expected = module.out(torch.stack(heads, dim=2).flatten(2))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,n_kv_heads", [("full", 4), ("gqa", 2), ("gqa", 1), ("mqa", 1)])
def test_kv_projection_and_cache_shrink(name, n_kv_heads):
    options = {"n_kv_heads": n_kv_heads} if name == "gqa" else {}
    module = build(name, **options)
    head_dim, d_model = 8, 32
    assert module.n_kv_heads == n_kv_heads
    assert module.qkv.weight.shape == ((4 + 2 * n_kv_heads) * head_dim, d_model)
    cache = module.new_cache(1, 64, torch.float32, "cpu")
    assert cache.nbytes() == 2 * n_kv_heads * 64 * head_dim * 4


def test_fused_path_does_not_repeat_kv_heads(monkeypatch):
    """SDPA broadcasts the shared heads itself (enable_gqa): no [B, H, S, D] copy is made."""
    module = build("gqa", n_kv_heads=2)
    x = torch.randn(2, T, 32, dtype=torch.float64)

    def forbidden(*args):
        raise AssertionError("K/V heads were repeated on the fused path")

    monkeypatch.setattr(functional, "repeat_kv", forbidden)
    module(x)
    module(x, mask=torch.rand(2, 1, T, T) > 0.2)


@pytest.mark.parametrize("options,message", [
    (dict(attention_type="gqa", n_kv_heads=3), r"n_kv_heads to divide n_heads.*n_kv_heads=3.*valid n_kv_heads: \[1, 2, 4\]"),
    (dict(attention_type="gqa", n_kv_heads=8), r"valid n_kv_heads: \[1, 2, 4\]"),
    (dict(attention_type="gqa", n_kv_heads=0), "n_kv_heads must be a positive integer"),
    (dict(attention_type="gqa", n_heads=1), r"n_kv_heads=2, n_heads=1.*valid n_kv_heads: \[1\]"),
    (dict(attention_type="mqa", n_kv_heads=2), "does not apply to attention_type 'mqa'.*used by: gqa"),
])
def test_bad_options_raise_clear_errors(options, message):
    config = {"d_model": 32, "n_heads": 4, **options}
    with pytest.raises(ValueError, match=message):
        AttentionFactory.create_attention(AttentionConfig(**config))
