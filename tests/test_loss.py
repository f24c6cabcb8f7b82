"""The fused head + cross-entropy (attn_lm.loss) against the plain form, and the model's use of it."""
from __future__ import annotations

import pytest
import torch

from attn_lm import GPT, GPTConfig
from attn_lm.loss import chunk_rows, linear_cross_entropy, reference_cross_entropy


def _problem(dtype, n=37, c=16, v=53, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(v, c, dtype=dtype, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -1  # unscored rows, also in the last (short) chunk
    return x, w, targets


@pytest.mark.parametrize("rows", [1, 8, 37, 64])
def test_loss_and_gradients_equal_the_plain_form_in_float64(rows):
    x, w, targets = _problem(torch.float64)
    loss = linear_cross_entropy(x, w, targets, rows=rows)
    grads = torch.autograd.grad(loss * 2.5, (x, w))  # the backward scales by the incoming gradient
    expected = reference_cross_entropy(x, w, targets)
    expected_grads = torch.autograd.grad(expected * 2.5, (x, w))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(g.dtype == torch.float64 for g in grads)


def test_without_autograd_only_the_loss_is_computed():
    x, w, targets = _problem(torch.float64)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, targets, rows=5)
    torch.testing.assert_close(loss, reference_cross_entropy(x.detach(), w.detach(), targets))
    assert loss.grad_fn is None


def test_autocast_runs_the_matmuls_in_bf16_like_the_plain_form():
    x, w, targets = _problem(torch.float32, n=64, c=32, v=97)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, targets, rows=16)
        expected = reference_cross_entropy(x, w, targets)
    grads = torch.autograd.grad(loss, (x, w))
    expected_grads = torch.autograd.grad(expected, (x, w))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == torch.float32  # the parameters' and inputs' own dtype
        assert ((got - want).norm() / want.norm()).item() < 2e-2


def test_every_target_unscored_gives_zero_loss_and_gradients():
    x, w, targets = _problem(torch.float64)
    loss = linear_cross_entropy(x, w, torch.full_like(targets, -1), rows=8)
    grads = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and all(g.abs().max().item() == 0.0 for g in grads)


def test_chunks_hold_at_most_the_budget_and_cover_every_row():
    assert chunk_rows(16384, 50304) == 4096  # the GPT-2-small step: four chunks
    assert chunk_rows(16384, 65) == 16384  # a character vocabulary: one
    for rows, vocab, budget in [(37, 53, 100), (1000, 7, 64), (5, 10**6, 10)]:
        r = chunk_rows(rows, vocab, budget)
        assert 1 <= r <= rows and (r * vocab <= budget or r == 1)


def test_compiled_fused_loss_is_one_graph_and_equals_eager():
    x, w, targets = _problem(torch.float32)

    def loss_fn(x, w, targets):
        return linear_cross_entropy(x, w, targets, rows=8)

    explained = torch._dynamo.explain(loss_fn)(x, w, targets)
    assert explained.graph_break_count == 0
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss, expected = compiled(x, w, targets), loss_fn(x, w, targets)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(expected, (x, w))):
        torch.testing.assert_close(got, want)


def test_model_training_loss_without_logits_equals_the_logits_path():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=61, context_len=32, n_layer=2, d_model=32, n_heads=4)).double()
    idx = torch.randint(0, 61, (3, 17))
    targets = torch.randint(0, 61, (3, 17))
    targets[:, :3] = -1
    logits, loss = model(idx, targets)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    none, fused = model(idx, targets, return_logits=False)
    got = torch.autograd.grad(fused, list(model.parameters()))
    assert none is None and logits.shape == (3, 17, 61)
    torch.testing.assert_close(fused, loss.to(fused.dtype), rtol=1e-6, atol=1e-6)  # the logits path's loss is fp32
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_model_training_forward_with_autograd_is_one_graph():
    """With gradients on (the autograd.Function path that training takes), under bf16 autocast."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_len=64, n_layer=2, d_model=64, n_heads=4)).train()
    idx, targets = (torch.randint(97, (2, 64)) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = torch._dynamo.explain(model)(idx, targets, return_logits=False)
    assert report.graph_count == 1 and report.graph_break_count == 0, report.break_reasons
