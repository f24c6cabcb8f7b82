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
@pytest.mark.parametrize("qk_nope_dim", [None, 5])
def test_mla_absorbed_step_equals_explicit_attention_over_materialised_keys(qk_nope_dim):
    """attend_step folds W_UK into the query and W_UV after the softmax; the explicit form
    up-projects every cached latent to K_h = [k^R, W_UK_h c], V_h = W_UV_h c. Same numbers, with
    q/k content as wide as the values (None) or not."""
    from attn_lm.attention.functional import reference_attention

    layer = build("mla", position="rope", qk_nope_dim=qk_nope_dim)
    assert layer.score_dim == layer.rope_dim + (qk_nope_dim or layer.head_dim)
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


def test_gla_chunkwise_stays_finite_down_to_the_gate_floor():
    """Gates down to the floor (alpha = e^-5) across chunks of 64 and of 40 tokens (sub-chunks that
    do not divide the chunk), float32: the chunkwise form equals the float64 recurrence and its
    gradients the float64 ones, all finite (factored about the chunk start, e^-b reached e^315 and
    the output was NaN below alpha ~ 0.25)."""
    from attn_lm.attention.gla import MIN_LOG_GATE, chunked_gla

    torch.manual_seed(0)
    B, H, T, D = 1, 2, 150, 4
    q, k, v = torch.randn(3, B, H, T, D, dtype=torch.float64).unbind(0)
    log_alpha = MIN_LOG_GATE * torch.rand(B, H, T, D, dtype=torch.float64).sqrt()  # many gates near the floor
    state, recurrent = torch.zeros(B, H, D, D, dtype=torch.float64), []
    for t in range(T):
        state = log_alpha[:, :, t, :, None].exp() * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        recurrent.append(q[:, :, t:t + 1] @ state)
    for C in (64, 40):
        inputs = [t.float().requires_grad_() for t in (q, k, v, log_alpha)]
        exact = [t.clone().requires_grad_() for t in (q, k, v, log_alpha)]
        out, final = chunked_gla(*inputs, C)
        torch.testing.assert_close(out.double(), torch.cat(recurrent, dim=2), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(final.double(), state, rtol=1e-4, atol=1e-4)
        out.sum().backward()
        chunked_gla(*exact, C)[0].sum().backward()
        for ours, reference in zip(inputs, exact):
            torch.testing.assert_close(ours.grad.double(), reference.grad, rtol=1e-3, atol=1e-3)


def test_gla_floors_its_gates():
    """A gate pre-activation far below zero gives log alpha = MIN_LOG_GATE, not less."""
    from attn_lm.attention.gla import MIN_LOG_GATE

    layer = build("gla")
    with torch.no_grad():
        layer.gate[1].bias.fill_(-1e4)
    _, kg, _ = layer.project(torch.randn(1, 5, layer.dims.d_model, dtype=torch.float64), None)
    assert (kg[..., layer.head_dim:] == MIN_LOG_GATE).all()


def test_gla_gates_depend_on_the_token():
    layer = build("gla")
    x = torch.randn(1, 5, layer.dims.d_model, dtype=torch.float64)
    _, kg, _ = layer.project(x, None)
    log_alpha = kg[..., layer.head_dim:]
    assert (log_alpha < 0).all() and log_alpha.std(dim=2).min() > 0  # varies over tokens, in (0, 1) as a gate
    cache = layer.new_cache(1, 5, torch.float64, "cpu")
    assert cache.nbytes() == layer.new_cache(1, 5000, torch.float64, "cpu").nbytes()


# ------------------------------------------------------------------------------ deltanet
def delta_inputs(B=2, H=3, T=13, D=4, dtype=torch.float64, seed=0):
    """Unit keys and queries, beta in (0, 1), gates alpha in (e^-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(B, H, T, D, generator=g, dtype=dtype), dim=-1) for _ in "qk")
    v = torch.randn(B, H, T, D + 1, generator=g, dtype=dtype)  # values may be wider than keys
    return q, k, v, torch.rand(B, H, T, generator=g, dtype=dtype), -torch.rand(B, H, T, generator=g, dtype=dtype)


def delta_recurrence(q, k, v, beta, log_alpha, state=None):
    """S_t = alpha_t (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t, with explicit
    D x D matrices (the papers' equation, transposed to row vectors)."""
    B, H, T, D = k.shape
    S = torch.zeros(B, H, D, v.shape[-1], dtype=v.dtype) if state is None else state
    eye, out = torch.eye(D, dtype=v.dtype), []
    for t in range(T):
        kt, b, a = k[:, :, t, :, None], beta[:, :, t, None, None], log_alpha[:, :, t, None, None].exp()
        S = a * (eye - b * kt @ kt.transpose(-2, -1)) @ S + b * kt @ v[:, :, t, None, :]
        out.append(q[:, :, t, None, :] @ S)
    return torch.cat(out, dim=2), S


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_deltanet_chunkwise_wy_form_equals_the_recurrence(gated, dtype, tol):
    """The chunkwise WY form == the delta rule token by token, for chunks that do and do not
    divide T = 13, also resumed from a state (split at t = 6)."""
    from attn_lm.attention.deltanet import chunked_delta_rule

    q, k, v, beta, log_alpha = delta_inputs(dtype=dtype)
    if not gated:
        log_alpha = torch.zeros_like(log_alpha)
    expected, state = delta_recurrence(*(t.double() for t in (q, k, v, beta, log_alpha)))
    for C in (1, 3, 4, 5, 13, 64):
        out, final = chunked_delta_rule(q, k, v, beta, log_alpha, C)
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(final.double(), state, rtol=tol, atol=tol)
        first, mid = chunked_delta_rule(*(t[:, :, :6] for t in (q, k, v, beta, log_alpha)), C)
        second, end = chunked_delta_rule(*(t[:, :, 6:] for t in (q, k, v, beta, log_alpha)), C, mid)
        torch.testing.assert_close(torch.cat([first, second], dim=2).double(), expected, rtol=tol, atol=tol)
        torch.testing.assert_close(end.double(), state, rtol=tol, atol=tol)


def test_delta_rule_with_beta_one_replaces_the_value_under_a_key():
    """Writing v1 then v2 under the same unit key with beta = 1 leaves exactly v2 there (linear
    attention would hold v1 + v2); what an orthogonal key holds is untouched."""
    from attn_lm.attention.deltanet import chunked_delta_rule

    e = torch.eye(4, dtype=torch.float64)
    k = torch.stack([e[0], e[1], (e[0] + e[2]) / 2**0.5, (e[0] + e[2]) / 2**0.5])[None, None]  # [1, 1, 4, 4]
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64)
    ones, zeros = torch.ones(1, 1, 4, dtype=torch.float64), torch.zeros(1, 1, 4, dtype=torch.float64)
    for C in (1, 2, 4):
        _, S = chunked_delta_rule(k, k, v, ones, zeros, C)
        torch.testing.assert_close(k[0, 0, 3] @ S[0, 0], v[0, 0, 3], rtol=1e-12, atol=1e-12)  # replaced, not v2 + v3
        torch.testing.assert_close(e[1] @ S[0, 0], v[0, 0, 1], rtol=1e-12, atol=1e-12)  # orthogonal key kept
    # beta = 1/2 moves the stored value halfway: b v_new + (1 - b) v_old
    _, S = chunked_delta_rule(k[:, :, 2:], k[:, :, 2:], v[:, :, 2:], torch.tensor([[[1.0, 0.5]]], dtype=torch.float64),
                              zeros[:, :, 2:], 2)
    torch.testing.assert_close(k[0, 0, 3] @ S[0, 0], (v[0, 0, 2] + v[0, 0, 3]) / 2, rtol=1e-12, atol=1e-12)


def test_delta_rule_state_stays_bounded_where_linear_attention_grows():
    """For unit keys, (I - beta k^T k) never expands the state (its spectral norm never grows
    without new values), and with bounded values and random keys the state stays at the size of D
    stored values over thousands of writes, while the linear-attention sum sum_t k_t^T v_t grows
    with T. (Not a worst-case bound: keys chosen orthogonal to the state can grow it like sqrt(T).)"""
    from attn_lm.attention.deltanet import chunked_delta_rule

    B, H, T, D = 1, 2, 4096, 8
    q, k, v, beta, _ = delta_inputs(B, H, T, D)
    v = v[..., :D].clamp(-1, 1)
    zeros = torch.zeros(B, H, T, dtype=torch.float64)
    start = torch.randn(B, H, D, D, dtype=torch.float64)
    norms = [torch.linalg.matrix_norm(chunked_delta_rule(q[:, :, :n], k[:, :, :n], 0 * v[:, :, :n], beta[:, :, :n],
                                                         zeros[:, :, :n], 64, start)[1], ord=2) for n in (1, 10, 100)]
    assert (norms[1] <= norms[0] + 1e-12).all() and (norms[2] <= norms[1] + 1e-12).all()
    bound = D**0.5 * v.norm(dim=-1).amax()  # D key directions, each holding a blend of values
    for n in (64, 512, T):
        _, S = chunked_delta_rule(q[:, :, :n], k[:, :, :n], v[:, :, :n], beta[:, :, :n], zeros[:, :, :n], 64)
        assert (torch.linalg.matrix_norm(S) <= bound).all()
    linear = torch.linalg.matrix_norm(k.transpose(-2, -1) @ v)
    assert (linear > 4 * bound).all()


def test_deltanet_layer_gates_masks_and_options():
    layer = build("deltanet", gated=True)
    x = torch.randn(1, 6, layer.dims.d_model, dtype=torch.float64)
    _, kg, _ = layer.project(x, None)
    beta, log_alpha = kg[..., layer.head_dim], kg[..., layer.head_dim + 1]
    assert ((beta > 0) & (beta < 1)).all() and (log_alpha < 0).all() and log_alpha.std(dim=2).min() > 0
    plain = build("deltanet")
    assert (plain.project(x, None)[1][..., -1] == 0).all()  # alpha = 1 without the gate
    with pytest.raises(ValueError, match="non-linear function of every earlier key"):
        plain(x, mask=torch.ones(6, 6, dtype=torch.bool))
    for bad, match in ((dict(gated=1), "gated=1 must be bool"),
                       (dict(kernel="triton"), "kernel must be one of")):
        with pytest.raises(ValueError, match=match):
            build("deltanet", **bad)
    cache = layer.new_cache(1, 6, torch.float64, "cpu")
    assert cache.nbytes() == layer.new_cache(1, 6000, torch.float64, "cpu").nbytes() == 4 * 8 * 8 * 8


# ------------------------------------------------------------------------------ fla hook (CPU plumbing)
@pytest.mark.parametrize("name,opts", [("retention", {}), ("gla", {}), ("deltanet", {}),
                                       ("deltanet", {"gated": True})])
def test_fla_hook_transposes_and_falls_back_with_one_notice(name, opts, monkeypatch):
    """With a stand-in for fla (the PyTorch scan behind fla's [B, T, H, D] signature), kernel=fla
    gives the PyTorch path's output; when fla is missing or raises, the PyTorch path runs after one
    warning. The real kernels are compared on the GPU (test_gpu.py)."""
    from attn_lm.attention import fla_kernels, retention

    layer = build(name, kernel="fla", **opts)
    x = torch.randn(2, 11, layer.dims.d_model, dtype=torch.float64)
    expected = build(name, kernel="torch", **opts)(x)
    monkeypatch.setattr(retention, "wants_fla", lambda kernel, t: kernel != "torch")
    monkeypatch.setattr(fla_kernels, "_FAILED", set())
    monkeypatch.setattr(fla_kernels, "_BACKWARD_OK", set())
    calls = []

    def stand_in(q, k, v, *gates, scale):
        calls.append(q.shape)
        heads = [t.transpose(1, 2) for t in (q, k, v, *gates)]
        q32, k32, v32 = heads[:3]
        if name == "deltanet":  # gates arrive as fla orders them: (g, beta) gated, (beta,) plain
            beta, g = (heads[4], heads[3]) if len(heads) == 5 else (heads[3], torch.zeros_like(heads[3]))
            decay = torch.stack([beta, g], dim=-1)
        else:
            decay = heads[3] if len(heads) == 4 else layer.log_gamma.double()
        return layer.scan(q32 * scale, k32, v32, decay)[0].transpose(1, 2), None

    monkeypatch.setattr(fla_kernels, "fla_function", lambda module, fn: stand_in)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert calls == [(2, 11, 4, 8)] * 2  # the first differentiable call probes fla's backward first
    layer(x)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 4  # probed once per kernel and dtype; no probe without autograd

    def refuses(*args, **kwargs):
        raise AssertionError("does not support float64")

    monkeypatch.setattr(fla_kernels, "fla_function", lambda module, fn: refuses)
    with pytest.warns(UserWarning, match=r"fla\.ops\..* refused torch.float64 \(AssertionError: does not"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # once per kernel and dtype
    monkeypatch.setattr(fla_kernels, "_FAILED", set())
    monkeypatch.setattr(fla_kernels, "fla_function", lambda module, fn: None)
    with pytest.warns(UserWarning, match="is not installed; using the PyTorch chunkwise form"):
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


class ForwardOnlyFla(torch.autograd.Function):
    """A stand-in for an fla kernel whose forward runs and whose backward refuses (fla 0.6.0's
    gated kernels on Hopper with Triton 3.4-3.7.0 raise in chunk_bwd_dqkwg, fla issue #640)."""

    @staticmethod
    def forward(ctx, q):
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces incorrect results")


def test_fla_refusing_in_its_backward_falls_back_before_the_forward_is_used(monkeypatch):
    """A training call probes fla's backward first, so a refusal there still hands the call to the
    PyTorch form (with the one-line notice) instead of failing in loss.backward(); evaluation
    (no autograd) uses fla's forward without a probe."""
    from attn_lm.attention import fla_kernels

    monkeypatch.setattr(fla_kernels, "_FAILED", set())
    monkeypatch.setattr(fla_kernels, "_BACKWARD_OK", set())
    monkeypatch.setattr(fla_kernels, "fla_function",
                        lambda module, fn: lambda q, k, v, *gates, scale: (ForwardOnlyFla.apply(q), None))
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(fla_kernels.run_fla("m", "kernel", lambda: None, q, k, v, scale=1.0), q)
    q.requires_grad_()
    fallback = lambda: 2 * q  # noqa: E731
    with pytest.warns(UserWarning, match=r"fla\.ops\.m\.kernel refused torch.float32 \(RuntimeError: Triton >= 3.4"):
        out = fla_kernels.run_fla("m", "kernel", fallback, q, k, v, scale=1.0)
    out.sum().backward()
    torch.testing.assert_close(q.grad, torch.full_like(q, 2.0))
