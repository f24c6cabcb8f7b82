"""Low-rank family (linformer, nystrom): published non-causal forms, the causal chunked variant,
its reference path and its compressed decoding cache."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention import reference_mode
from attn_lm.attention.config import AttentionDims
from attn_lm.attention.functional import reference_attention
from attn_lm.attention.lowrank import segment_means

from .helpers import build

NAMES = [n for n in AttentionFactory.names() if AttentionFactory.get_class(n).family == "low_rank"]
D = 8  # head_dim of the small configs (d_model 32, 4 heads)


def qkv(T, B=2, H=4):
    torch.manual_seed(1)
    return (torch.randn(B, H, T, D, dtype=torch.float64) for _ in range(3))


def exact(q, k, v, causal=True):
    allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    return reference_attention(q, k, v, allowed=allowed.tril() if causal else allowed)


def run(module, q, k, v):
    pos = torch.arange(q.shape[2])
    return module.attend(q, k, v, pos, pos, None)


def test_segment_means_uneven():
    x = torch.randn(10, 3, dtype=torch.float64)
    avg, sizes = segment_means(10, 4, torch.float64, "cpu")
    assert sizes.tolist() == [3, 2, 3, 2]
    bounds = [0, 3, 5, 8, 10]
    expected = torch.stack([x[a:b].mean(0) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(avg @ x, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [23, 16])
def test_causal_variant_never_sees_the_future(name, T):
    """Perturbing the rest of position i's chunk, or only later chunks, leaves outputs <= i unchanged."""
    module = build(name, num_landmarks=2) if name == "nystrom" else build(name)
    C = module.chunk_size
    x = torch.randn(1, T, 32, dtype=torch.float64)
    y = module(x)
    for i in range(T):
        chunk_end = min((i // C + 1) * C, T)
        for lo, hi in ((i + 1, chunk_end), (chunk_end, T)):
            if lo >= hi:
                continue
            x2 = x.clone()
            x2[:, lo:hi] = torch.randn(1, hi - lo, 32, dtype=torch.float64)
            y2 = module(x2)
            torch.testing.assert_close(y2[:, : i + 1], y[:, : i + 1], rtol=0, atol=1e-12)
            assert not torch.allclose(y2[:, lo:hi], y[:, lo:hi])


@pytest.mark.parametrize("name", NAMES)
def test_single_chunk_is_exact_causal_attention(name):
    """chunk_size >= T: no completed chunk, so the causal variant is exact causal softmax."""
    module = build(name, chunk_size=32)
    q, k, v = qkv(23)
    torch.testing.assert_close(run(module, q, k, v), exact(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_identity_summaries_are_exact_causal_attention(name):
    """Summaries equal to the chunk's own keys (Linformer E_c = F_c = I, Nystrom one token per
    landmark): own chunk + all earlier keys = exact causal attention, across chunk boundaries."""
    module = build(name, chunk_size=4, proj_len=4) if name == "linformer" else build(name, chunk_size=4)
    if name == "linformer":
        with torch.no_grad():
            module.proj_k.copy_(torch.eye(4))
            module.proj_v.copy_(torch.eye(4))
    q, k, v = qkv(23)
    torch.testing.assert_close(run(module, q, k, v), exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_nystrom_causal_landmarks_are_proportional():
    """Keys constant over each landmark segment: the log(size) bias makes a landmark worth its
    tokens, so the causal Nystrom variant equals exact causal attention (uneven segments 3, 2, 3, 2)."""
    module = build("nystrom", chunk_size=10, num_landmarks=4)
    q, _, v = qkv(27)
    seg = torch.arange(10) * 4 // 10
    k = torch.randn(2, 4, 3, 4, D, dtype=torch.float64)[:, :, :, seg].flatten(2, 3)[:, :, :27]
    torch.testing.assert_close(run(module, q, k, v), exact(q, k, v), rtol=1e-12, atol=1e-12)


def test_linformer_identity_projection_is_exact_noncausal():
    module = build("linformer", causal=False, proj_len=16)
    with torch.no_grad():
        module.proj_k.copy_(torch.eye(16, 64))
        module.proj_v.copy_(torch.eye(16, 64))
    q, k, v = qkv(16)
    torch.testing.assert_close(run(module, q, k, v), exact(q, k, v, causal=False), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [12, 7])
def test_nystrom_all_landmarks_is_exact_noncausal(T):
    """T <= num_landmarks: every token is a landmark and the pseudo-inverse is exact."""
    module = build("nystrom", causal=False, num_landmarks=12)
    q, k, v = qkv(T)
    torch.testing.assert_close(run(module, q, k, v), exact(q, k, v, causal=False), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("T", [23, 8])
def test_reference_path_matches_fast_path(name, causal, T):
    module = build(name, causal=causal, num_landmarks=3) if name == "nystrom" else build(name, causal=causal)
    x = torch.randn(2, T, 32, dtype=torch.float64, requires_grad=True)
    y = module(x)
    g, = torch.autograd.grad(y.square().sum(), x)
    with reference_mode(module):
        y_ref = module(x)
        g_ref, = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prompt,step", [(1, 1), (4, 3), (5, 4), (9, 2)])
def test_cached_decoding_any_split(name, prompt, step):
    """Prompts and decoding steps that start/end anywhere in a chunk equal the full forward, and
    the cache holds C raw positions + p summaries per chunk (the current one included)."""
    module = build(name, num_landmarks=2, position="rope") if name == "nystrom" else build(name, position="rope")
    T = 23
    x = torch.randn(2, T, 32, dtype=torch.float64)
    cache = module.new_cache(2, T, torch.float64, "cpu")
    pieces = [module(x[:, :prompt], cache=cache)]
    for t in range(prompt, T, step):
        pieces.append(module(x[:, t:t + step], cache=cache, input_pos=torch.arange(t, min(t + step, T))))
    torch.testing.assert_close(torch.cat(pieces, 1), module(x), rtol=1e-10, atol=1e-10)
    C, p = module.chunk_size, module.summary_len
    assert cache.nbytes() == 2 * 2 * 4 * (C + -(-T // C) * p) * D * 8
    with pytest.raises(ValueError, match="cannot prefill"):
        module(x, cache=module.new_cache(2, 2 * C, torch.float64, "cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_clear_errors(name):
    with pytest.raises(ValueError, match="no single distance"):
        AttentionFactory.create_attention(AttentionConfig(attention_type=name, position="alibi"))
    option = "proj_len" if name == "linformer" else "num_landmarks"
    with pytest.raises(ValueError, match="must be <= chunk_size"):
        AttentionFactory.create_attention(AttentionConfig(attention_type=name, options={"chunk_size": 8, option: 16}))
    module = build(name)
    x = torch.randn(1, 8, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot be applied"):
        module(x, mask=torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="no incremental decoding"):
        build(name, causal=False).new_cache(1, 8, torch.float64, "cpu")


def test_linformer_noncausal_length_errors():
    with pytest.raises(ValueError, match="must project to fewer keys"):
        AttentionFactory.create_attention(AttentionConfig("linformer", causal=False, options={"proj_len": 48}),
                                          AttentionDims(max_seq_len=32))
    module = build("linformer", causal=False)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        module(torch.randn(1, 65, 32, dtype=torch.float64))
