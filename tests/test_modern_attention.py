"""Mechanism-specific properties of the issue-15 mechanisms (the registry-parametrized tests in
test_attention_registry.py / test_generation.py / test_compile.py cover the common ones)."""
from __future__ import annotations

import pytest
import torch

from attn_lm import GPT, GPTConfig
from attn_lm.decoding import Decoder

from .helpers import build, small_config


# ------------------------------------------------------------------------------ sink
def streaming_reference(layer, q, k, v, L, n, w):
    """StreamingLLM attention written out per query from *unrotated* q, k: window keys at their
    true distance, sinks at distance ``min(p, L - 1) - j`` (sink.py: the rule past the training
    length)."""
    T, out = q.shape[2], []
    zero = torch.zeros(1, dtype=torch.long)
    for p in range(T):
        keys = [j for j in range(p + 1) if j < n or p - j < w]
        dist = torch.tensor([min(p, L - 1) - j if j < n else p - j for j in keys])
        qr = layer.rotary(q[:, :, p:p + 1].expand(-1, -1, len(keys), -1), q[:, :, :1], dist, zero)[0]
        kr = layer.rotary(k[:, :, keys], k[:, :, :1], zero, zero)[0]  # distance is all the query carries
        scores = (qr * kr).sum(-1) / q.shape[-1] ** 0.5
        out.append((scores.softmax(-1)[..., None] * v[:, :, keys]).sum(2, keepdim=True))
    return torch.cat(out, dim=2)


def test_sink_decodes_ten_times_its_training_length_at_constant_memory():
    """A layer trained on L = 16 positions decodes 10 L positions with one bounded cache; each
    output equals the written-out rule (sinks at capped distance, window exact)."""
    L, n, w = 16, 2, 5
    layer = build("sink", position="rope", max_seq_len=L, window_size=w, num_sink_tokens=n)
    x = torch.randn(1, 10 * L, layer.dims.d_model, dtype=torch.float64)
    cache = layer.new_cache(1, 10 * L, torch.float64, "cpu")
    nbytes = cache.nbytes()
    ys = [layer(x[:, :4], cache=cache)]
    ys += [layer(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in range(4, 10 * L)]
    assert cache.nbytes() == nbytes == 2 * (n + w) * layer.dims.d_model * 8 + (n + w) * 8
    q, k, v = layer.project(x, None)
    expected = layer.project_out(streaming_reference(layer, q, k, v, L, n, w))
    torch.testing.assert_close(torch.cat(ys, dim=1), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="decode with a cache"):
        layer(x[:, : L + 1])  # an uncached forward past L would need the cap per query


def test_sink_model_streams_past_block_size_with_constant_cache_bytes():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=41, context_len=16, n_layer=2, d_model=32, n_heads=4, position="rope",
                       attention=small_config("sink", window_size=4, num_sink_tokens=2))
    model = GPT(config).eval()
    prompt = torch.randint(0, 41, (1, 5))
    sizes = []
    for new in (10, 160):  # 160 = 10 x block_size
        decoder = Decoder(model, 5 + new, max_context=5 + new)
        tokens = torch.cat(list(decoder.stream(prompt, new, temperature=0)), dim=1)
        assert tokens.shape == (1, new)
        sizes.append(decoder.cache_nbytes())
    assert sizes[0] == sizes[1] > 0


# ------------------------------------------------------------------------------ diff
def test_diff_is_the_papers_equation_with_lambda_and_head_norm():
    """DiffAttn = RMSNorm_head((softmax(q1 k1^T/sqrt(D/2)) - lambda softmax(q2 k2^T/sqrt(D/2))) v)
    * (1 - lambda_init), lambda = exp(lq1.lk1) - exp(lq2.lk2) + lambda_init, written per head."""
    from attn_lm.attention.diff import lambda_init_for_layer

    assert lambda_init_for_layer(1) == pytest.approx(0.2) and lambda_init_for_layer(100) == pytest.approx(0.8)
    layer = build("diff", lambda_init=0.3)
    with torch.no_grad():
        layer.norm_weight.uniform_(0.5, 1.5)
    T, D = 9, layer.head_dim
    x = torch.randn(2, T, layer.dims.d_model, dtype=torch.float64)
    q, k, v = layer.project(x, None)
    lam = (torch.exp(layer.lambda_q1 @ layer.lambda_k1) - torch.exp(layer.lambda_q2 @ layer.lambda_k2) + 0.3)
    assert abs(lam.item() - 0.3) > 1e-3  # the learned part is not trivially zero
    first = torch.cat([torch.arange(D // 4), torch.arange(D // 2, 3 * D // 4)])  # closed under (i, i + D/2)
    second = torch.cat([torch.arange(D // 4, D // 2), torch.arange(3 * D // 4, D)])
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def softmax_map(idx):
        s = q[..., idx] @ k[..., idx].transpose(-2, -1) / (D / 2) ** 0.5
        return s.masked_fill(~causal, float("-inf")).softmax(-1)

    y = (softmax_map(first) - lam * softmax_map(second)) @ v
    y = y / (y.square().mean(-1, keepdim=True) + 1e-5).sqrt() * layer.norm_weight * (1 - 0.3)
    expected = layer.project_out(y)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in (layer.lambda_q1, layer.lambda_k1, layer.lambda_q2, layer.lambda_k2, layer.norm_weight))


def test_diff_halves_keep_rope_relative():
    """Each half-score depends on the distance only (halves follow RoPE's rotation pairs)."""
    from attn_lm.attention.diff import halves

    layer = build("diff", position="rope")
    q, k = torch.randn(2, 1, 4, 1, layer.head_dim, dtype=torch.float64).unbind(0)
    for shift in (0, 7):
        qr, kr = layer.rotary(q, k, torch.tensor([5 + shift]), torch.tensor([2 + shift]))
        scores = [(a * b).sum() for a, b in zip(halves(qr), halves(kr))]
        if shift == 0:
            base = scores
        torch.testing.assert_close(torch.stack(scores), torch.stack(base), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("overrides,match", [(dict(lambda_init=1.0), "lambda_init must be in"),
                                             (dict(lambda_init=0.0), "lambda_init must be in"),
                                             (dict(position="rope", rope_fraction=0.5), "rope_fraction=1"),
                                             (dict(d_model=24, n_heads=4), "divisible by 4"),
                                             (dict(position="alibi"), "each of the two maps")])
def test_diff_rejects_what_it_cannot_compute(overrides, match):
    with pytest.raises(ValueError, match=match):
        build("diff", **overrides)


# ------------------------------------------------------------------------------ retention
def test_retention_decays_are_the_papers():
    from attn_lm.attention.retention import retention_decays

    gamma = retention_decays(4).exp()
    torch.testing.assert_close(gamma, torch.tensor([1 - 2.0**-5, 1 - 2.0**-6, 1 - 2.0**-7, 1 - 2.0**-8],
                                                   dtype=torch.float64))


def test_retention_parallel_chunkwise_and_recurrent_forms_agree():
    """(Q K^T * D) V written with explicit powers == the chunkwise form for several chunk sizes
    (also from a non-zero state) == the recurrence S <- gamma S + k^T v, o = q S, token by token."""
    from attn_lm.attention.retention import chunked_retention

    torch.manual_seed(0)
    B, H, T, D = 2, 3, 13, 4
    q, k, v = torch.randn(3, B, H, T, D, dtype=torch.float64).unbind(0)
    gamma = torch.tensor([0.9, 0.6, 0.97], dtype=torch.float64)
    n = torch.arange(T)
    decay = torch.stack([torch.where(n[:, None] >= n, g ** (n[:, None] - n).double(), 0.0) for g in gamma])
    parallel = ((q @ k.transpose(-2, -1)) * decay) @ v
    state, recurrent = torch.zeros(B, H, D, D, dtype=torch.float64), []
    for t in range(T):
        state = gamma[:, None, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        recurrent.append(q[:, :, t:t + 1] @ state)
    torch.testing.assert_close(torch.cat(recurrent, dim=2), parallel, rtol=1e-12, atol=1e-12)
    for C in (1, 3, 5, T, 64):
        out, final = chunked_retention(q, k, v, gamma.log(), C)
        torch.testing.assert_close(out, parallel, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(final, state, rtol=1e-12, atol=1e-12)
        # split in two at t = 6: the second half from the first half's state
        first, mid = chunked_retention(q[:, :, :6], k[:, :, :6], v[:, :, :6], gamma.log(), C)
        second, end = chunked_retention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], gamma.log(), C, mid)
        torch.testing.assert_close(torch.cat([first, second], dim=2), parallel, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(end, state, rtol=1e-12, atol=1e-12)


def test_retention_decodes_at_constant_memory_and_rejects_masks_while_decoding():
    layer = build("retention", position="xpos")
    x = torch.randn(2, 9, layer.dims.d_model, dtype=torch.float64)
    full = layer(x)
    cache = layer.new_cache(2, 9, torch.float64, "cpu")
    assert cache.nbytes() == layer.new_cache(2, 10_000, torch.float64, "cpu").nbytes() == 2 * 4 * 8 * 8 * 8
    steps = [layer(x[:, :3], cache=cache), layer(x[:, 3:7], cache=cache, input_pos=torch.arange(3, 7))]
    steps += [layer(x[:, t:t + 1], cache=cache, input_pos=torch.tensor([t])) for t in (7, 8)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="recurrent state"):
        layer(x[:, :1], cache=cache, input_pos=torch.tensor([9]), mask=torch.ones(1, 10, dtype=torch.bool))


# ------------------------------------------------------------------------------ mla
def test_mla_absorbed_step_equals_explicit_attention_over_materialised_keys():
    """attend_step folds W_UK into the query and W_UV after the softmax; the explicit form
    up-projects every cached latent to K_h = [k^R, W_UK_h c], V_h = W_UV_h c. Same numbers."""
    from attn_lm.attention.functional import reference_attention

    layer = build("mla", position="rope")
    x = torch.randn(2, 11, layer.dims.d_model, dtype=torch.float64)
    cache = layer.new_cache(2, 16, torch.float64, "cpu")
    layer(x[:, :7], cache=cache)
    pos = torch.arange(7, 11)
    q, k, v = layer.project(x[:, 7:], None)
    q, k = layer.rotary(q, k, pos.view(1, 1, -1), pos.view(1, 1, -1))
    absorbed = layer.attend_step(q, k, v, pos.view(1, 1, -1), cache, None)
    keys, values = layer.materialise(cache.latent)
    allowed = torch.arange(16) <= pos[:, None]  # written slots up to each query
    torch.testing.assert_close(absorbed, reference_attention(q, keys, values, allowed=allowed), rtol=1e-10, atol=1e-10)


def test_mla_cache_is_the_latent_row_only():
    from attn_lm.selector import cache_bytes

    per_token = {name: cache_bytes(build(name, dtype=torch.float32, d_model=64, n_heads=4, **opts), 1, 100,
                                   torch.float32) / 100
                 for name, opts in [("full", {}), ("gqa", {"n_kv_heads": 2}), ("mqa", {}),
                                    ("mla", {"kv_rank": 16, "rope_dim": 4})]}
    assert per_token == {"full": 2 * 64 * 4, "gqa": 2 * 2 * 16 * 4, "mqa": 2 * 16 * 4, "mla": (16 + 4) * 4}


# ------------------------------------------------------------------------------ gla
def test_gla_chunkwise_equals_the_gated_recurrence():
    """S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, o_t = q_t S_t with per-channel, per-token gates
    (strong ones too: alpha down to e^-1) == the chunkwise form, also resumed from a state."""
    from attn_lm.attention.gla import chunked_gla

    torch.manual_seed(0)
    B, H, T, D = 2, 2, 13, 4
    q, k, v = torch.randn(3, B, H, T, D, dtype=torch.float64).unbind(0)
    log_alpha = -torch.rand(B, H, T, D, dtype=torch.float64)
    state, recurrent = torch.zeros(B, H, D, D, dtype=torch.float64), []
    for t in range(T):
        state = log_alpha[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        recurrent.append(q[:, :, t:t + 1] @ state)
    recurrent = torch.cat(recurrent, dim=2)
    for C in (1, 3, 5, T):
        out, final = chunked_gla(q, k, v, log_alpha, C)
        torch.testing.assert_close(out, recurrent, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, state, rtol=1e-10, atol=1e-10)
        first, mid = chunked_gla(q[:, :, :6], k[:, :, :6], v[:, :, :6], log_alpha[:, :, :6], C)
        second, end = chunked_gla(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], log_alpha[:, :, 6:], C, mid)
        torch.testing.assert_close(torch.cat([first, second], dim=2), recurrent, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(end, state, rtol=1e-10, atol=1e-10)


def test_gla_gates_depend_on_the_token():
    layer = build("gla")
    x = torch.randn(1, 5, layer.dims.d_model, dtype=torch.float64)
    _, kg, _ = layer.project(x, None)
    log_alpha = kg[..., layer.head_dim:]
    assert (log_alpha < 0).all() and log_alpha.std(dim=2).min() > 0  # varies over tokens, in (0, 1) as a gate
    cache = layer.new_cache(1, 5, torch.float64, "cpu")
    assert cache.nbytes() == layer.new_cache(1, 5000, torch.float64, "cpu").nbytes()
