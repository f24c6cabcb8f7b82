"""Positional encodings: the defining property of each scheme, every position x mechanism
combination, and running past the training length."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from attn_lm import GPT, AttentionConfig, AttentionFactory, GPTConfig
from attn_lm.attention.functional import reference_attention
from attn_lm.config import MODEL_POSITIONS
from attn_lm.positions import ALiBi, Rotary, SinusoidalPositionalEmbedding, alibi_slopes

from .helpers import build, context_for, small_config

NAMES = AttentionFactory.names()
D = 16


def rotated_score(rotary: Rotary, q: torch.Tensor, k: torch.Tensor, n: int, m: int) -> float:
    """``q . k`` after rotating ``q`` at position ``n`` and ``k`` at position ``m``."""
    qr, kr = rotary(q[None], k[None], torch.tensor([n]), torch.tensor([m]))
    return float((qr * kr).sum())


# ------------------------------------------------------------------------------ RoPE / xPos
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_scores_depend_only_on_relative_position(fraction):
    torch.manual_seed(0)
    rotary = Rotary(D, fraction=fraction)
    q, k = torch.randn(1, D, dtype=torch.float64), torch.randn(1, D, dtype=torch.float64)
    for n, m in [(3, 0), (7, 7), (2, 9), (40, 1)]:
        base = rotated_score(rotary, q, k, n, m)
        for shift in (1, 17, 1000):
            assert rotated_score(rotary, q, k, n + shift, m + shift) == pytest.approx(base, abs=1e-10)
    assert rotated_score(rotary, q, k, 4, 0) != pytest.approx(rotated_score(rotary, q, k, 5, 0), abs=1e-6)


def test_rope_is_a_rotation_and_partial_rotary_leaves_the_rest_untouched():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, D, dtype=torch.float64)
    pos = torch.arange(5, 15)
    full_q, _ = Rotary(D)(x, x, pos, pos)
    torch.testing.assert_close(full_q.norm(dim=-1), x.norm(dim=-1))
    partial = Rotary(D, fraction=0.5)
    assert partial.rot_dim == D // 2
    q, k = partial(x, x, pos, pos)
    torch.testing.assert_close(q[..., D // 2:], x[..., D // 2:], rtol=0, atol=0)
    torch.testing.assert_close(k[..., D // 2:], x[..., D // 2:], rtol=0, atol=0)
    assert not torch.allclose(q[..., : D // 2], x[..., : D // 2])
    with pytest.raises(ValueError, match="fewer than 2 rotated channels"):
        Rotary(D, fraction=0.1)


def test_xpos_scales_each_pair_by_zeta_to_the_relative_distance():
    """Restricted to channel pair ``i``, the xPos score is the RoPE score times
    ``zeta_i^((n - m) / scale_base)``: shift-invariant, 1 at distance 0, decaying with distance."""
    torch.manual_seed(0)
    scale_base = 8.0
    rope, xpos = Rotary(D), Rotary(D, xpos_scale_base=scale_base)
    zeta = (torch.arange(0, D, 2, dtype=torch.float64) / D + 0.4) / 1.4
    for i in range(D // 2):
        q = torch.zeros(1, D, dtype=torch.float64)
        k = torch.zeros(1, D, dtype=torch.float64)
        q[0, [i, i + D // 2]] = torch.randn(2, dtype=torch.float64)
        k[0, [i, i + D // 2]] = torch.randn(2, dtype=torch.float64)
        ratios = []
        for n, m in [(0, 0), (5, 3), (9, 3), (20, 3), (40, 3)]:
            ratio = rotated_score(xpos, q, k, n, m) / rotated_score(rope, q, k, n, m)
            assert ratio == pytest.approx(float(zeta[i]) ** ((n - m) / scale_base), rel=1e-6)  # float32 zeta
            assert rotated_score(xpos, q, k, n + 50, m + 50) == pytest.approx(rotated_score(xpos, q, k, n, m), rel=1e-9)
            ratios.append(ratio)
        assert ratios[0] == pytest.approx(1.0)
        assert all(later < earlier for earlier, later in itertools.pairwise(ratios))


def test_xpos_needs_causal_attention():
    with pytest.raises(ValueError, match="position='xpos' needs causal=True.*use position='rope'"):
        AttentionFactory.create_attention(AttentionConfig("full", d_model=32, n_heads=4, position="xpos", causal=False))


# ------------------------------------------------------------------------------ ALiBi
def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    torch.testing.assert_close(alibi_slopes(1), torch.tensor([2.0 ** -8]))
    # Not a power of two: the slopes of the next-lower power of two, then every other slope of
    # the next-higher one (Press et al., 2022, reference implementation).
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0 ** -e for e in (2, 4, 6, 8, 1, 3)]))
    torch.testing.assert_close(
        alibi_slopes(12), torch.tensor([2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)])
    )


def test_alibi_bias_and_score_mod_equal_the_closed_form():
    alibi = ALiBi(4)
    q_pos, k_pos = torch.tensor([5, 9, 30]), torch.arange(12)
    bias = alibi.bias(q_pos, k_pos, torch.float64)
    slopes = alibi_slopes(4).double()
    expected = torch.tensor([[[-float(slopes[h]) * abs(n - m) for m in k_pos.tolist()] for n in q_pos.tolist()]
                             for h in range(4)], dtype=torch.float64)
    torch.testing.assert_close(bias, expected, rtol=0, atol=1e-12)
    heads = torch.arange(4)[:, None, None]
    scored = alibi.score_mod()(torch.zeros(4, 3, 12), 0, heads, q_pos[None, :, None], k_pos[None, None, :])
    torch.testing.assert_close(scored, expected.float())


def test_alibi_attention_equals_softmax_with_the_bias():
    module = build("full", position="alibi")
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q, k, v = module.project(x, None)
    pos = torch.arange(11)
    allowed = pos[None, :] <= pos[:, None]
    ref = reference_attention(q, k, v, allowed=allowed, bias=module.alibi.bias(pos, pos, torch.float64))
    torch.testing.assert_close(module(x), module.out(ref.transpose(1, 2).reshape(2, 11, 32)), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------ sinusoidal
def test_sinusoidal_values_at_known_positions():
    emb = SinusoidalPositionalEmbedding(5).double()
    out = emb(torch.tensor([0, 1, 100]))
    assert out.dtype == torch.float64 and out.shape == (3, 5)
    for row, p in enumerate((0, 1, 100)):
        freqs = [10000.0 ** (-2 * i / 5) for i in range(3)]
        expected = [math.sin(p * freqs[0]), math.cos(p * freqs[0]), math.sin(p * freqs[1]), math.cos(p * freqs[1]),
                    math.sin(p * freqs[2])]
        torch.testing.assert_close(out[row], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64))


# ------------------------------------------------------------------------------ every combination
def tiny_gpt(name: str, position: str, block_size: int = 24, n_layer: int = 1) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=37, context_len=block_size, n_layer=n_layer, d_model=32, n_heads=4,
                       position=position, attention=small_config(name))
    return GPT(config).double().eval()


@pytest.mark.parametrize("position", MODEL_POSITIONS)
@pytest.mark.parametrize("name", NAMES)
def test_every_position_with_every_mechanism_works_or_says_why(name, position):
    reason = AttentionFactory.get_class(name).alibi_unsupported
    if position == "alibi" and reason:
        with pytest.raises(ValueError, match=f"position='alibi' is not supported by attention_type '{name}'") as err:
            tiny_gpt(name, position)
        assert reason in str(err.value) and "use " in reason
        return
    model = tiny_gpt(name, position)
    idx = torch.randint(0, 37, (2, 24))
    logits = model(idx)
    assert torch.isfinite(logits).all()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 37
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in ("linear", "performer", "cosformer") if n in NAMES])
def test_kernelized_attention_rejects_alibi_and_names_the_alternative(name):
    with pytest.raises(ValueError, match="never forms the T x S score matrix.*use position='rope'"):
        AttentionFactory.create_attention(small_config(name, position="alibi"))


@pytest.mark.parametrize("position", ["xpos", "alibi"])
@pytest.mark.parametrize("name", NAMES)
def test_cached_decoding_with_xpos_and_alibi_equals_full_forward(name, position):
    """The bias/scaling is applied at absolute positions, so cached steps see what the full pass sees."""
    if position == "alibi" and AttentionFactory.get_class(name).alibi_unsupported:
        pytest.skip("ALiBi unsupported (tested above)")
    module = build(name, position=position)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    ctx = context_for(module, x)
    full = module(x, context=ctx)
    cache = module.new_cache(2, 15, torch.float64, "cpu")
    pieces = [module(x[:, :5], context=None if ctx is None else ctx[:, :5], cache=cache)]
    for t in range(5, 15):
        pieces.append(module(x[:, t:t + 1], context=None if ctx is None else ctx[:, t:t + 1], cache=cache,
                             input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------ extrapolation
@pytest.mark.parametrize("position", ["rope", "alibi", "none", "xpos", "sinusoidal"])
def test_relative_and_fixed_positions_run_at_twice_the_training_length(position):
    model = tiny_gpt("full", position, block_size=16, n_layer=2)
    idx = torch.randint(0, 37, (2, 32))
    logits = model(idx)
    assert logits.shape == (2, 32, 37) and torch.isfinite(logits).all()
    # The first 16 positions are computed exactly as in a training-length pass.
    torch.testing.assert_close(logits[:, :16], model(idx[:, :16]), rtol=1e-10, atol=1e-10)


def test_learned_positions_cannot_extrapolate():
    model = tiny_gpt("full", "learned", block_size=16)
    with pytest.raises(ValueError, match=r"learned positions are defined up to 15 \(context_len=16\), got position 31"):
        model(torch.randint(0, 37, (1, 32)))


@pytest.mark.parametrize("name", NAMES)
def test_every_mechanism_at_twice_the_training_length_runs_or_names_its_limit(name):
    """With RoPE: runs past block_size, or the mechanism says its horizon is ``max_seq_len``."""
    model = tiny_gpt(name, "rope", block_size=16)
    try:
        logits = model(torch.randint(0, 37, (2, 32)))
    except ValueError as err:
        assert "max_seq_len" in str(err)
    else:
        assert torch.isfinite(logits).all()
