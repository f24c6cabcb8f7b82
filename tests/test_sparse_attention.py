"""Sparse family: each pattern against a brute-force definition, layouts, FlexAttention, caches,
option validation."""
from __future__ import annotations

import warnings

import pytest
import torch

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention.config import AttentionDims
from attn_lm.attention.functional import reference_attention

from .helpers import build

T = 19  # small and not a multiple of any block size used below


# --------------------------------------------------------------------------- brute-force patterns
# Each function lists, with plain Python, the keys query i may see (before the causal cut).

def local_keys(i, n, window):
    return set(range(i - window + 1, i + window))


def block_keys(i, n, block, offsets):
    return {j for o in offsets for j in range((i // block + o) * block, (i // block + o + 1) * block)}


def strided_keys(i, n, stride, dilation):
    band = {i + sign * step * dilation for sign in (1, -1) for step in range(stride)}
    summary = {i + sign * step * stride for sign in (1, -1) for step in range(n)}
    return band | summary


def longformer_keys(i, n, window, num_global):
    if i < num_global:
        return set(range(n))
    return local_keys(i, n, window) | set(range(num_global))


def bigbird_keys(i, n, window, num_global, block, layout):
    keys = longformer_keys(i, n, window, num_global)
    for kb in range(layout.shape[1]):
        if layout[i // block, kb]:
            keys |= set(range(kb * block, (kb + 1) * block))
    return keys


def brute_force_mask(keys_of, n, causal):
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in keys_of(i):
            if 0 <= j < n and (j <= i or not causal):
                mask[i, j] = True
    return mask


CASES = {
    "local": (dict(window_size=4), lambda m: lambda i: local_keys(i, T, 4)),
    "block_sparse": (dict(sparse_block=4, layout="0"), lambda m: lambda i: block_keys(i, T, 4, (0,))),
    "block_sparse-0,-2": (dict(sparse_block=3, layout="0,-2"), lambda m: lambda i: block_keys(i, T, 3, (0, -2))),
    "strided": (dict(stride=4), lambda m: lambda i: strided_keys(i, T, 4, 1)),
    "strided-dilated": (dict(stride=3, dilation=2), lambda m: lambda i: strided_keys(i, T, 3, 2)),
    "longformer": (dict(window_size=3, num_global_tokens=2), lambda m: lambda i: longformer_keys(i, T, 3, 2)),
    "bigbird": (dict(window_size=2, num_global_tokens=1, sparse_block=4, num_random_blocks=2),
                lambda m: lambda i: bigbird_keys(i, T, 2, 1, 4, m.random_layout)),
}


def make(case, causal=True, **extra):
    options, _ = CASES[case]
    return build(case.split("-")[0], causal=causal, **{**options, **extra})


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_pattern_equals_brute_force(case, causal):
    module = make(case, causal)
    keys_of = CASES[case][1](module)
    pos = torch.arange(T)
    assert torch.equal(module.pattern.dense(pos, pos), brute_force_mask(keys_of, T, causal))


def test_non_causal_block_sparse_takes_positive_offsets():
    module = build("block_sparse", causal=False, sparse_block=4, layout="0,1,-1")
    pos = torch.arange(T)
    expected = brute_force_mask(lambda i: block_keys(i, T, 4, (0, 1, -1)), T, causal=False)
    assert torch.equal(module.pattern.dense(pos, pos), expected)


@pytest.mark.parametrize("layout,causal,expected", [
    ("0", False, lambda n, b: 1 / n),
    ("0,-1", False, lambda n, b: (2 * n - 1) / n ** 2),
    ("0,-1,1", False, lambda n, b: (3 * n - 2) / n ** 2),
    ("0", True, lambda n, b: (b + 1) / (2 * n * b)),
    ("0,-1", True, lambda n, b: (n * (b + 1) / 2 + (n - 1) * b) / (n ** 2 * b)),
])
def test_block_sparse_density_matches_layout(layout, causal, expected):
    n, b = 8, 4  # T = n * b, so every block is whole
    module = build("block_sparse", causal=causal, sparse_block=b, layout=layout)
    assert module.pattern.density(n * b) == pytest.approx(expected(n, b))


# --------------------------------------------------------------------------- BigBird layout
def test_bigbird_layout_is_seeded_saved_and_loaded():
    a, same, other = (build("bigbird", layout_seed=s) for s in (0, 0, 1))
    assert torch.equal(a.random_layout, same.random_layout)
    assert not torch.equal(a.random_layout, other.random_layout)
    assert torch.equal(a.state_dict()["random_layout"], a.random_layout)
    assert a.random_layout.shape == (64 // 4, 64 // 4)  # max_seq_len / sparse_block blocks

    x = torch.randn(1, 40, 32, dtype=torch.float64)
    y_other = other(x)
    a.load_state_dict(other.state_dict())  # same weights and the other seed's layout
    assert a.pattern.random_layout is a.random_layout
    pos = torch.arange(40)
    assert torch.equal(a.pattern.dense(pos, pos), other.pattern.dense(pos, pos))
    torch.testing.assert_close(a(x), y_other, rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False])
def test_bigbird_layout_draws_the_requested_blocks(causal):
    module = build("bigbird", causal=causal, num_random_blocks=2)
    layout = module.random_layout
    n = layout.shape[0]
    for i in range(n):
        candidates = list(range(i)) if causal else [j for j in range(n) if j != i]
        assert layout[i].sum() == min(2, len(candidates))
        assert all(j in candidates for j in layout[i].nonzero().flatten().tolist())


def test_bigbird_pattern_follows_device_and_dtype_moves():
    module = build("bigbird").to(torch.float32)
    assert module.pattern.random_layout is module.random_layout


def test_bigbird_rejects_sequences_longer_than_its_layout():
    module = build("bigbird", sparse_block=5)  # max_seq_len 64 -> 13 blocks -> 65 positions
    assert module.covered_len == 65
    module(torch.randn(1, 65, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="covers 65 positions.*larger max_seq_len"):
        module(torch.randn(1, 66, 32, dtype=torch.float64))
    module.new_cache(1, 65, torch.float64, "cpu")
    with pytest.raises(ValueError, match="reaches position 65"):  # decoding checks the cache's size
        module.new_cache(1, 66, torch.float64, "cpu")


# --------------------------------------------------------------------------- FlexAttention
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [23, 130])
def test_flex_attention_block_mask_equals_dense_path(case, causal, length):
    """The BlockMask the GPU path uses gives the dense reference's numbers (eager FlexAttention
    runs on CPU), and marks as non-empty exactly the 128 x 128 tiles the pattern touches."""
    from torch.nn.attention.flex_attention import flex_attention

    module = make(case, causal, **({"sparse_block": 4} if case == "bigbird" else {}))
    pattern = module.pattern
    block_mask = pattern.block_mask(length, length, "cpu")
    pos = torch.arange(length)
    allowed = pattern.dense(pos, pos)

    tile = block_mask.BLOCK_SIZE[0]
    pad = (-length) % tile
    touched = torch.nn.functional.pad(allowed, (0, pad, 0, pad)).unflatten(0, (-1, tile)).unflatten(2, (-1, tile))
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), touched.any(dim=(1, 3)))

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, length, 8, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        out = flex_attention(q, k, v, block_mask=block_mask)
    torch.testing.assert_close(out, reference_attention(q, k, v, allowed=allowed), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- decoding caches
def decode(module, x, chunks, mask=None):
    """Run ``x`` through ``module`` in pieces of the given sizes with one cache."""
    cache = module.new_cache(x.shape[0], x.shape[1], x.dtype, "cpu")
    outs, start = [], 0
    for size in chunks:
        end = start + size
        piece_mask = None if mask is None else mask[..., start:end, :end]
        step = torch.arange(start, end) if start else None  # the first piece is the prefill
        outs.append(module(x[:, start:end], mask=piece_mask, cache=cache, input_pos=step))
        start = end
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("name,options", [
    ("local", dict(window_size=5)),
    ("block_sparse", dict(sparse_block=4, layout="0")),
    ("block_sparse", dict(sparse_block=3, layout="0,-2")),
    ("longformer", dict(window_size=4, num_global_tokens=3)),
])
@pytest.mark.parametrize("position", ["none", "alibi"])
def test_bounded_cache_decoding_equals_full_forward(name, options, position):
    """Prefill longer than the window, then single tokens and uneven chunks, with a user mask."""
    module = build(name, position=position, **options)
    x = torch.randn(2, 31, 32, dtype=torch.float64)
    user_mask = torch.rand(2, 1, 31, 31) > 0.2
    for mask in (None, user_mask):
        out, _ = decode(module, x, [9, 1, 1, 3, 7, 1, 2, 7], mask)
        torch.testing.assert_close(out, module(x, mask=mask), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,options,slots", [
    ("local", dict(window_size=5), 5),
    ("block_sparse", dict(sparse_block=4, layout="0"), 4),
    ("block_sparse", dict(sparse_block=4, layout="0,-1"), 8),
    ("longformer", dict(window_size=5, num_global_tokens=2), 7),
])
def test_bounded_cache_memory_does_not_grow(name, options, slots):
    module = build(name, **options)
    cache = module.new_cache(1, 64, torch.float64, "cpu")
    start = cache.nbytes()
    decode_bytes = []
    for t in range(40):
        module(torch.randn(1, 1, 32, dtype=torch.float64), cache=cache, input_pos=torch.tensor([t]))
        decode_bytes.append(cache.nbytes())
    assert set(decode_bytes) == {start}
    kv_bytes = 2 * module.n_kv_heads * slots * module.head_dim * 8
    assert start == kv_bytes + slots * 8  # keys + values + one int64 position per slot
    full = build("full").new_cache(1, 64, torch.float64, "cpu")
    assert start < full.nbytes()


@pytest.mark.parametrize("name", ["strided", "bigbird"])
def test_long_range_patterns_keep_the_full_kv_cache(name):
    module = build(name)
    full = build("full")
    assert module.new_cache(1, 64, torch.float64, "cpu").nbytes() == full.new_cache(1, 64, torch.float64, "cpu").nbytes()


# --------------------------------------------------------------------------- option validation
@pytest.mark.parametrize("name,options,message", [
    ("local", dict(window_size=0), "window_size must be a positive integer"),
    ("longformer", dict(window_size=-3), "window_size must be a positive integer"),
    ("block_sparse", dict(sparse_block=0), "sparse_block must be a positive integer"),
    ("strided", dict(stride=0), "stride must be a positive integer"),
    ("strided", dict(dilation=0), "dilation must be a positive integer"),
    ("bigbird", dict(num_random_blocks=0), "num_random_blocks must be a positive integer"),
    ("block_sparse", dict(layout="-1"), "must contain offset 0"),
    ("block_sparse", dict(layout="0,1"), r"positive offsets \[1\].*causal=False"),
    ("block_sparse", dict(layout="0,-1,-1"), "repeats an offset"),
    ("block_sparse", dict(layout="0;-1"), "comma-separated list of integer block offsets"),
    ("local", dict(sparse_block=4), "does not apply to attention_type 'local'"),
])
def test_bad_options_raise_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        AttentionFactory.create_attention(AttentionConfig(attention_type=name, options=options), AttentionDims(32, 4))
