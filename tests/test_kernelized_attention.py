"""Kernel family (linear, performer, cosformer): chunked scan == quadratic form, convexity,
Performer's approximation of softmax, feature redraws, recurrent cache size, masks, positions."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionFactory
from attn_lm.attention.functional import reference_attention

from .helpers import build, small_config, small_dims

KERNELS = ["linear", "performer", "cosformer"]
T = 23  # not a multiple of any chunk size below


def qkv(module, T=T, D=None, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (2, module.n_heads, T, D or module.head_dim)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) * scale for _ in range(3))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 8, 64])
def test_chunked_scan_equals_quadratic_reference(name, causal, chunk_size):
    module = build(name, causal=causal, chunk_size=chunk_size)
    q, k, v = qkv(module)
    pos = torch.arange(T)
    fast = module.attend(q, k, v, pos, pos, None)
    ref = module.attend_reference(q, k, v, pos, pos, None)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_outputs_are_convex_combinations(name, causal):
    """With one-hot values the output row is the weight row: non-negative, summing to 1, and zero
    on future keys in the causal form."""
    module = build(name, causal=causal)
    q, k, _ = qkv(module)
    pos = torch.arange(T)
    weights = module.attend(q, k, torch.eye(T, dtype=torch.float64).expand(2, module.n_heads, T, T), pos, pos, None)
    assert (weights >= 0).all()
    sums = weights.sum(-1)
    seen = sums > 0  # cosformer: a query with relu(q) = 0 sees nothing and outputs zeros
    assert seen.float().mean() > 0.5
    torch.testing.assert_close(sums[seen], torch.ones_like(sums[seen]), rtol=0, atol=1e-12)
    if causal:
        assert (weights.triu(1) == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_falls_with_num_features(causal):
    """FAVOR+ estimates exp(q.k/sqrt(d)) without bias, variance ~ 1/m: the error against exact
    softmax attention, averaged over seeds, shrinks as num_features grows."""
    errors = []
    for m in (16, 64, 256, 1024):
        err = 0.0
        for seed in range(3):
            config = small_config("performer", num_features=m, feature_seed=seed, causal=causal)
            module = AttentionFactory.create_attention(config, small_dims(d_model=64, n_heads=4)).double()
            q, k, v = qkv(module, T=32, seed=100 + seed)
            q, k = q / 2, k / 2
            pos = torch.arange(32)
            exact = reference_attention(q, k, v, allowed=torch.ones(32, 32, dtype=torch.bool).tril() if causal else None)
            err += ((module.attend(q, k, v, pos, pos, None) - exact).norm() / exact.norm()).item()
        errors.append(err / 3)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 3, errors


def test_performer_redraw_only_when_interval_set_and_training():
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    fixed = build("performer").train()
    before = fixed.projection.clone()
    for _ in range(3):
        fixed(x)
    torch.testing.assert_close(fixed.projection, before, rtol=0, atol=0)

    redrawn = build("performer", redraw_interval=2).eval()
    before = redrawn.projection.clone()
    for _ in range(3):
        redrawn(x)
    torch.testing.assert_close(redrawn.projection, before, rtol=0, atol=0)  # eval: never
    redrawn.train()
    redrawn(x), redrawn(x)
    torch.testing.assert_close(redrawn.projection, before, rtol=0, atol=0)  # calls 1-2 use the first draw
    redrawn(x)
    assert not torch.allclose(redrawn.projection, before)  # call 3 redraws
    assert "projection" in redrawn.state_dict()


def test_performer_seed_reproducible_and_orthogonal_blocks():
    a, b = build("performer", feature_seed=3), build("performer", feature_seed=3)
    torch.testing.assert_close(a.projection, b.projection, rtol=0, atol=0)
    w = a.projection[: a.head_dim]
    directions = w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(directions @ directions.T, torch.eye(a.head_dim, dtype=w.dtype), rtol=0, atol=1e-6)


def test_performer_key_features_bounded_for_any_input():
    """The key stabiliser is data-independent yet no input can overflow: features <= 1/sqrt(m)."""
    module = build("performer")
    k = torch.randn(1, module.n_heads, 10, module.head_dim, dtype=torch.float64) * 100
    feats = module.feature_map(k, torch.arange(10), is_query=False)
    assert torch.isfinite(feats).all() and (feats <= module.feature_dim ** -0.5 + 1e-15).all()


@pytest.mark.parametrize("name", KERNELS)
def test_cache_size_constant_in_generated_length(name):
    module = build(name)
    x = torch.randn(1, 40, 32, dtype=torch.float64)
    cache = module.new_cache(1, 40, torch.float64, "cpu")
    sizes = []
    with torch.no_grad():
        for t in range(40):
            module(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]))
            sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1
    assert sizes[0] == module.n_heads * module.feature_dim * (module.head_dim + 1) * 8


@pytest.mark.parametrize("name", KERNELS)
def test_noncausal_cached_prefill_sees_all_keys_so_far(name):
    """Non-causal decoding attends to every key consumed so far, like the softmax KV cache."""
    module = build(name, causal=False)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    cache = module.new_cache(2, 10, torch.float64, "cpu")
    module(x[:, :6], cache=cache)
    last = module(x[:, 6:], cache=cache, input_pos=torch.arange(6, 10))
    torch.testing.assert_close(last, module(x)[:, 6:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_user_mask_uses_quadratic_form(name, causal):
    module = build(name, causal=causal)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    keep = torch.rand(2, 1, T, T) > 0.3
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    y = module(x, mask=keep)
    torch.testing.assert_close(module(x, mask=additive), y, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, module(x))
    q, k, v = module.project(x, None)
    pos = torch.arange(T)
    # Explicit: masked weights, renormalised over the keys left.
    weights = module.attend(q, k, torch.eye(T, dtype=torch.float64).expand(2, 4, T, T), pos, pos, keep)
    assert (weights[~keep.expand_as(weights)] == 0).all()
    with pytest.raises(ValueError, match="custom mask"):
        module(x[:, :1], mask=torch.ones(1, 1, 1, 1, dtype=torch.bool), cache=module.new_cache(2, T, x.dtype, "cpu"))


def test_fully_masked_rows_give_zeros():
    module = build("linear")
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    y = module(x, mask=mask)
    assert torch.isfinite(y).all()
    bias = module.out.bias
    torch.testing.assert_close(y[0, 2], torch.zeros(32, dtype=y.dtype) if bias is None else bias)


@pytest.mark.parametrize("name", KERNELS)
def test_alibi_rejected_with_reason(name):
    with pytest.raises(ValueError, match="never forms the T x S score matrix.*rope"):
        AttentionFactory.create_attention(small_config(name, position="alibi"))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("position", ["rope", "xpos"])
def test_rotary_applied_before_feature_map(name, position):
    module = build(name, position=position)
    x = torch.randn(2, T, 32, dtype=torch.float64)
    q, k, v = module.project(x, None)
    pos = torch.arange(T)
    q, k = module.rotary(q, k, pos, pos)
    expected = module.attend_reference(q, k, v, pos, pos, None)
    expected = module.out(expected.transpose(1, 2).reshape(2, T, 32))
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_cosformer_positions_beyond_max_seq_len_raise():
    module = build("cosformer")  # max_seq_len = 64
    module(torch.randn(1, 64, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_seq_len"):
        module(torch.randn(1, 65, 32, dtype=torch.float64))
    module.new_cache(1, 64, torch.float64, "cpu")
    with pytest.raises(ValueError, match="position 64"):  # decoding checks the cache's size, not every step
        module.new_cache(1, 65, torch.float64, "cpu")


def test_option_validation():
    build("performer", redraw_interval=0)  # 0 = fixed, accepted
    with pytest.raises(ValueError, match="redraw_interval"):
        build("performer", redraw_interval=-1)
    with pytest.raises(ValueError, match="num_features.*does not apply"):
        build("linear", num_features=8)


def test_split_chunks_is_a_view_unless_it_must_pad():
    """Chunks are a view of the input when the chunk divides T (a padded copy of every input once
    sat at the scans' memory peak); otherwise zeros go in front or behind, as asked."""
    from attn_lm.attention.linear_scan import split_chunks

    x = torch.randn(2, 3, 8, 5)
    chunks = split_chunks(x, 4, front=True)
    assert chunks.shape == (2, 3, 2, 4, 5) and chunks.data_ptr() == x.data_ptr()
    for front in (True, False):
        padded = split_chunks(x[:, :, :7], 4, front=front).flatten(2, 3)
        zero_row, data = (padded[:, :, :1], padded[:, :, 1:]) if front else (padded[:, :, 7:], padded[:, :, :7])
        assert not zero_row.any() and torch.equal(data, x[:, :, :7])
    gates = split_chunks(torch.ones(2, 3, 7), 4, front=True)  # [B, H, T] inputs (deltanet's beta)
    assert gates.shape == (2, 3, 2, 4) and gates[:, :, 0, 0].eq(0).all() and gates.sum() == 2 * 3 * 7
