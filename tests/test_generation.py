"""GPT.generate, sampling filters, the Decoder's context window, batches of prompts of different
lengths, the compiled decoding step and the generate CLI."""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import functools

import lightning
import pytest
import torch
from hydra import compose, initialize_config_dir

from attn_lm import GPT, AttentionFactory, GPTConfig
from attn_lm.cli import CONF_DIR
from attn_lm.data import LMDataModule
from attn_lm.generate import generate
from attn_lm.lit_module import LitGPT
from attn_lm.attention import functional
from attn_lm.decoding import CUDAGraphStep, Decoder, prefill, prefill_width
from attn_lm.sampling import filter_logits, sample_next

from .helpers import small_config

NAMES = AttentionFactory.names()
V = 41
REPO = Path(__file__).resolve().parent.parent


def tiny_gpt(name: str = "full", position: str = "learned", block_size: int = 32, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, context_len=block_size, n_layer=2, d_model=32, n_heads=4, dropout=dropout,
                       position=position, attention=small_config(name))
    return GPT(config).eval()


# ------------------------------------------------------------------------------ every mechanism
@pytest.mark.parametrize("name", NAMES)
def test_cached_generation_equals_uncached_and_full_forward(name):
    model = tiny_gpt(name)
    prompt = torch.randint(0, V, (2, 5))
    cached = model.generate(prompt, 19, temperature=0)
    assert cached.shape == (2, 24)
    torch.testing.assert_close(model.generate(prompt, 19, temperature=0, use_cache=False), cached, rtol=0, atol=0)
    # Per-step logits of incremental decoding == the full forward at the same positions.
    full = model(cached)
    decoder = Decoder(model, 24)
    steps = [decoder.prefill(cached[:, :5])] + [decoder.step(cached[:, t:t + 1]) for t in range(5, 23)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:23], rtol=1e-5, atol=1e-5)


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Prompts of different lengths as one left-padded batch (padding = a real token id, which
    must not matter) and their lengths."""
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.full((width - len(p),), V - 1), p]) for p in prompts])
    return batch, [len(p) for p in prompts]


@pytest.mark.parametrize("name", NAMES)
def test_batch_of_left_padded_prompts_equals_each_row_alone(name):
    model = tiny_gpt(name)
    prompts = [torch.randint(0, V, (n,)) for n in (7, 2, 5)]
    idx, lengths = left_padded(prompts)
    batch = model.generate(idx, 12, temperature=0, prompt_lengths=lengths)
    assert batch.shape == (3, 7 + 12)
    torch.testing.assert_close(model.generate(idx, 12, temperature=0, prompt_lengths=lengths, use_cache=False), batch,
                               rtol=0, atol=0)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], 12, temperature=0)
        torch.testing.assert_close(batch[row, 7 - len(prompt):], alone[0], rtol=0, atol=0)
    # The logits too, at every step: prefill and steps of the batch == each row's own decoder.
    decoder = Decoder(model, 7 + 12)
    logits = [decoder.prefill(idx, lengths)] + [decoder.step(batch[:, t:t + 1]) for t in range(7, 18)]
    for row, prompt in enumerate(prompts):
        alone = Decoder(model, len(prompt) + 12)
        own = [alone.prefill(prompt[None])] + [alone.step(batch[row:row + 1, t:t + 1]) for t in range(7, 18)]
        torch.testing.assert_close(torch.stack(logits)[:, row], torch.stack(own)[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["full", "local", "gqa", "linear", "performer"])
def test_noncausal_layers_never_see_the_padding_of_shorter_rows(name):
    """Non-causal layers would attend to right padding: the prefill (cached or not) masks it."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=V, context_len=32, n_layer=2, d_model=32, n_heads=4, position="learned",
                       attention=small_config(name, causal=False))
    model = GPT(config).eval()
    prompts = [torch.randint(0, V, (n,)) for n in (6, 3)]
    idx, lengths = left_padded(prompts)
    for use_cache in (True, False):
        decoder = Decoder(model, 6 + 4, use_cache=use_cache)
        first = decoder.prefill(idx, lengths)
        second = decoder.step(first.argmax(-1, keepdim=True))
        for row, prompt in enumerate(prompts):
            alone = Decoder(model, len(prompt) + 4, use_cache=use_cache)
            own = alone.prefill(prompt[None])
            torch.testing.assert_close(first[row], own[0], rtol=1e-5, atol=1e-5)
            own_next = alone.step(first[row:row + 1].argmax(-1, keepdim=True))
            torch.testing.assert_close(second[row], own_next[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_is_one_graph_and_equals_eager(name, monkeypatch):
    """The step compiles without a graph break (fullgraph: a break is an error) and decodes the
    eager tokens, batch of uneven prompts included. Dynamo's own backend here keeps the CPU suite
    fast; Inductor is covered below and CUDA graphs by the gpu test."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = tiny_gpt(name)
    idx, lengths = left_padded([torch.randint(0, V, (n,)) for n in (6, 3)])
    eager = model.generate(idx, 10, temperature=0, prompt_lengths=lengths)
    torch.testing.assert_close(model.generate(idx, 10, temperature=0, prompt_lengths=lengths, compile=True), eager,
                               rtol=0, atol=0)


def test_inductor_compiled_step_equals_eager():
    model = tiny_gpt("gqa")
    idx, lengths = left_padded([torch.randint(0, V, (n,)) for n in (6, 3)])
    eager = model.generate(idx, 10, temperature=0, prompt_lengths=lengths)
    torch.testing.assert_close(model.generate(idx, 10, temperature=0, prompt_lengths=lengths, compile=True), eager,
                               rtol=0, atol=0)


def uncompilable(fn, **kwargs):
    """Stands in for ``torch.compile``: a compiled function that fails as Dynamo does on an
    untraceable op."""
    def compiled(*args):
        raise torch._dynamo.exc.TorchDynamoException("an op Dynamo cannot trace")
    return compiled


def test_a_step_that_cannot_be_compiled_falls_back_to_eager_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch, "compile", uncompilable)
    model = tiny_gpt("local")
    prompt = torch.randint(0, V, (2, 4))
    with pytest.warns(UserWarning, match=r"step of local cannot be compiled \(an op Dynamo cannot trace\); decoding eager"):
        compiled = model.generate(prompt, 6, temperature=0, compile=True)
    torch.testing.assert_close(compiled, model.generate(prompt, 6, temperature=0), rtol=0, atol=0)


# ------------------------------------------------------------------------------ compiled prefill
def cache_tensors(caches) -> list[torch.Tensor]:
    """Every tensor of every layer's cache (buffers, slot positions, states), in a fixed order."""
    return [t for cache in caches for _, t in sorted(vars(cache).items()) if isinstance(t, torch.Tensor)]


def check_compiled_prefill(name: str, tol: float) -> None:
    """A Decoder with the compiled prefill, on a batch of uneven prompts (9 and 4 tokens: width
    bucket 16, so row 0 carries 7 padding tokens and row 1 twelve): its prefill returns the eager
    prefill's logits and fills the caches as the eager prefill of the same padded rows does, every
    later step gives the eager decoder's logits, and greedy tokens equal the eager and uncached
    ones. Tile-loop teaching code prefills eagerly after a warning naming the reason."""
    model = tiny_gpt(name)
    idx, lengths = left_padded([torch.randint(0, V, (n,)) for n in (9, 4)])
    new = 10
    untraceable = AttentionFactory.get_class(name).compile_unsupported
    expect_warning = pytest.warns(UserWarning, match=f"compile_prefill: the prefill runs eagerly, since {name}: "
                                                     "teaching code")
    with expect_warning if untraceable else contextlib.nullcontext():
        compiled = Decoder(model, 9 + new, compile_prefill=True)
    assert compiled.compile_prefill == (not untraceable)
    eager = Decoder(model, 9 + new)
    torch.testing.assert_close(compiled.prefill(idx, lengths), eager.prefill(idx, lengths), rtol=tol, atol=tol)
    assert compiled.compile_prefill == (not untraceable)  # compiled, not fallen back
    width = prefill_width(9, 9 + new) if compiled.compile_prefill else 9
    reference = model.new_caches(2, 9 + new)
    prefill(model, compiled.tokens[:, :width], torch.tensor(lengths), reference)
    for got, want in zip(cache_tensors(compiled.caches), cache_tensors(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)

    uncached = model.generate(idx, new, temperature=0, prompt_lengths=lengths, use_cache=False)
    steps = [(compiled.step(uncached[:, t:t + 1]), eager.step(uncached[:, t:t + 1])) for t in range(9, 9 + new - 1)]
    torch.testing.assert_close(*map(torch.stack, zip(*steps)), rtol=tol, atol=tol)
    for use in (True, False):
        warned = use and untraceable
        with pytest.warns(UserWarning, match="prefill runs eagerly") if warned else contextlib.nullcontext():
            tokens = model.generate(idx, new, temperature=0, prompt_lengths=lengths, compile_prefill=use)
        torch.testing.assert_close(tokens, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compiled_prefill_equals_eager_prefill_and_uncached(name, monkeypatch):
    """Every mechanism, through Dynamo (fullgraph) and AOTAutograd, which functionalises the
    in-place cache writes as Inductor does, in a fraction of Inductor's compile time; Inductor
    itself for one mechanism per cache family below."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    check_compiled_prefill(name, 1e-5)


@pytest.mark.parametrize("name", ["gqa", "local", "linear", "nystrom"])
def test_inductor_compiled_prefill_equals_eager(name):
    """Inductor on CPU: grouped K/V cache, ring buffer, recurrent state, chunk summaries."""
    check_compiled_prefill(name, 1e-4)


@pytest.mark.parametrize("name", [n for n in NAMES if not AttentionFactory.get_class(n).compile_unsupported])
def test_compiled_prefill_is_one_graph_on_the_gpu_dispatch_path(name, monkeypatch):
    """The prefill takes the GPU's branch of the attention dispatch (FlexAttention BlockMasks at
    the bucket width, cuDNN-first SDPA) and still traces as one graph, with the CPU prefill's
    logits: a GPU-only graph break would fail here, not on the GPU."""
    model = tiny_gpt(name)
    idx, lengths = left_padded([torch.randint(0, V, (n,)) for n in (9, 4)])
    expected = Decoder(model, 19).prefill(idx, lengths)
    monkeypatch.setattr(functional, "FORCE_GPU_DISPATCH", True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    decoder = Decoder(model, 19, compile_prefill=True)
    torch.testing.assert_close(decoder.prefill(idx, lengths), expected, rtol=1e-5, atol=1e-5)
    assert decoder.compile_prefill


def test_prefill_widths_are_few_buckets():
    assert [prefill_width(n, 1000) for n in (1, 16, 17, 100, 512, 513)] == [16, 16, 32, 128, 512, 1000]
    assert prefill_width(5, 8) == 8 and prefill_width(700, 768) == 768
    with pytest.raises(ValueError, match="prefill of 20 tokens does not fit a cache of 19"):
        prefill_width(20, 19)


def test_compiled_prefill_compiles_once_per_width_bucket(monkeypatch):
    """Prompts of 5, 9 and 16 tokens share the 16-wide graph; 20 tokens make the 32-wide one."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(example_inputs[0].shape if example_inputs else None)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    model = tiny_gpt("local")
    decoder = Decoder(model, 30, compile_prefill=True)
    for n in (5, 9, 16, 20):
        prompt = torch.randint(0, V, (1, n))
        torch.testing.assert_close(decoder.prefill(prompt), Decoder(model, 30).prefill(prompt), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 2 and decoder.compile_prefill


def test_a_prefill_that_cannot_be_compiled_falls_back_to_eager_with_the_reason(monkeypatch):
    monkeypatch.setattr(torch, "compile", uncompilable)
    model = tiny_gpt("linear")
    prompt = torch.randint(0, V, (2, 4))
    decoder = Decoder(model, 10, compile_prefill=True)
    with pytest.warns(UserWarning, match=r"prefill of linear cannot be compiled \(an op Dynamo cannot trace\); "
                                         r"prefilling eagerly"):
        logits = decoder.prefill(prompt)
    assert not decoder.compile_prefill
    # The fallback prefills at the width bucket (16), the plain decoder at the prompt's width (4):
    # the same function, but matmuls of other shapes may round differently.
    torch.testing.assert_close(logits, Decoder(model, 10).prefill(prompt), rtol=1e-5, atol=1e-5)


def counting_prefill(offset: float = 0.0):
    """A stand-in for the compiled prefill: the eager prefill (caches written as it writes them),
    ``offset`` added to its logits (a compiler bug), counting its calls."""
    calls = []

    def fn(model, idx, lengths=None, caches=None):
        calls.append(idx.shape)
        return prefill(model, idx, lengths, caches) + offset
    return fn, calls


def test_a_compiled_prefill_that_disagrees_with_eager_is_replaced_by_eager_for_that_model():
    """The first compiled prefill of each width and batch is checked against the eager prefill; a
    disagreeing one (RESULTS.md 5f: compiled FlexAttention without autograd was wrong on the GPU)
    warns, returns the eager logits with the eager caches, and that model prefills eagerly in
    every later decoder too."""
    model = tiny_gpt("local")
    prompt = torch.randint(0, V, (2, 6))
    eager = Decoder(model, 20)
    expected = eager.prefill(prompt)
    decoder = Decoder(model, 20, compile_prefill=True)
    decoder.prefill_fn, calls = counting_prefill(offset=1.0)
    with pytest.warns(UserWarning, match=r"compiled prefill of local disagrees with the eager prefill \(width 16, "
                                         r"batch 2\); prefilling this model eagerly"):
        torch.testing.assert_close(decoder.prefill(prompt), expected, rtol=1e-5, atol=1e-5)
    assert not decoder.compile_prefill and len(calls) == 1
    token = torch.randint(0, V, (2, 1))
    torch.testing.assert_close(decoder.step(token), eager.step(token), rtol=1e-5, atol=1e-5)  # eager caches
    with pytest.warns(UserWarning, match="compiled prefill disagreed with the eager one"):
        assert not Decoder(model, 20, compile_prefill=True).compile_prefill


def test_an_agreeing_compiled_prefill_is_checked_once_per_width_and_batch(monkeypatch):
    """Within the tolerance the compiled prefill's own logits and caches are used; the eager
    reference runs only at the first prefill of each (width, batch) of the model."""
    from attn_lm import decoding

    model = tiny_gpt("linear")
    reference = decoding.prefill
    eager_calls = []

    def eager_prefill(*args):
        eager_calls.append(args[1].shape)
        return reference(*args)

    decoder = Decoder(model, 40, compile_prefill=True)
    decoder.prefill_fn, calls = counting_prefill(offset=1e-4)
    monkeypatch.setattr(decoding, "prefill", eager_prefill)
    for width, batch in ((6, 2), (5, 2), (6, 3), (20, 2)):
        logits = decoder.prefill(torch.randint(0, V, (batch, width)))
        # the stand-in's own logits (eager + 1e-4), not the eager reference's
        torch.testing.assert_close(logits, reference(model, decoder.tokens[:, :width]) + 1e-4, rtol=1e-5, atol=1e-6)
    second = Decoder(model, 40, compile_prefill=True)
    second.prefill_fn = decoder.prefill_fn
    second.prefill(torch.randint(0, V, (2, 7)))
    assert decoder.compile_prefill and second.compile_prefill
    assert [tuple(s) for s in calls] == [(2, 16), (2, 16), (3, 16), (2, 32), (2, 16)]
    assert [tuple(s) for s in eager_calls] == [(2, 16), (3, 16), (2, 32)]  # the bucket widths, once each


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"), reason="torch < 2.7")
def test_the_recompile_limit_is_a_warned_fallback_not_a_silent_one(monkeypatch):
    """Past Dynamo's recompile limit a compiled function raises (fullgraph, recent torch) or runs
    eagerly without a word (older torch); the compiled prefill turns either into its warned
    fallback."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = tiny_gpt("full")
    decoder = Decoder(model, 30, compile_prefill=True)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    decoder.prefill(torch.randint(0, V, (1, 5)))  # the 16-wide graph
    prompt = torch.randint(0, V, (1, 20))  # the 32-wide one: a recompilation past the limit
    reason = r"prefill of full cannot be compiled \(.*recompile_limit = 1 graphs\); prefilling eagerly"
    with pytest.warns(UserWarning, match=reason):
        logits = decoder.prefill(prompt)
    assert not decoder.compile_prefill
    # At the width bucket (32) against the prompt's width (20): equal up to rounding (seen: 3e-8).
    torch.testing.assert_close(logits, Decoder(model, 30).prefill(prompt), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"), reason="torch < 2.7")
def test_the_recompile_limit_of_the_step_is_a_warned_fallback(monkeypatch):
    """The compiled step too: a batch size past the recompile limit warns and decodes eagerly."""
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = tiny_gpt("local")
    decoder = Decoder(model, 30, compile=True)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    decoder.prefill(torch.randint(0, V, (1, 5)))
    decoder.step(torch.randint(0, V, (1, 1)))  # batch 1: the one graph allowed
    prompt, token = torch.randint(0, V, (2, 5)), torch.randint(0, V, (2, 1))
    decoder.prefill(prompt)  # batch 2: new caches, so the next step recompiles, past the limit
    reason = r"step of local cannot be compiled \(.*recompile_limit = 1 graphs\); decoding eagerly"
    with pytest.warns(UserWarning, match=reason):
        logits = decoder.step(token)
    assert not decoder.compile
    eager = Decoder(model, 30)
    eager.prefill(prompt)
    torch.testing.assert_close(logits, eager.step(token), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with: pytest -m gpu)")
@pytest.mark.parametrize("name", NAMES)
def test_gpu_cuda_graph_step_equals_eager_and_uncached(name, monkeypatch, recwarn):
    """On the GPU: the step captured in a CUDA graph (CUDAGraphStep), alone and after the compiled
    prefill, gives the eager step's and the uncached forward's greedy tokens, for a batch of
    left-padded prompts (fp32, TF32 off, so the paths compute the same numbers up to summation
    order); and neither the compilation nor the capture fell back."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_gpt(name).cuda()
    idx, lengths = left_padded([torch.randint(0, V, (n,)) for n in (9, 4, 6)])
    idx = idx.cuda()
    eager = model.generate(idx, 16, temperature=0, prompt_lengths=lengths)
    for options in ({"compile": True}, {"compile": True, "compile_prefill": True}, {"use_cache": False}):
        torch.testing.assert_close(model.generate(idx, 16, temperature=0, prompt_lengths=lengths, **options), eager,
                                   rtol=0, atol=0, msg=lambda m: f"{options}: {m}")
    fallbacks = [str(w.message) for w in recwarn if "could not be captured" in str(w.message)
                 or "cannot be compiled" in str(w.message)]
    assert not fallbacks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run with: pytest -m gpu)")
@pytest.mark.parametrize("name", ["full", "local", "linear"])
def test_gpu_decoder_recaptures_its_graph_for_new_caches(name, monkeypatch):
    """One Decoder, two batch sizes: the second prefill allocates new caches, so the step is
    captured again (a replay of the first graph would write the old caches); both generations
    give the eager tokens."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = tiny_gpt(name).cuda()
    decoder, eager = Decoder(model, 24, compile=True), Decoder(model, 24)
    for batch in (3, 1):
        prompt = torch.randint(0, V, (batch, 6), device="cuda")
        tokens = [torch.cat(list(d.stream(prompt, 12, temperature=0)), 1) for d in (decoder, eager)]
        torch.testing.assert_close(*tokens, rtol=0, atol=0)
        assert isinstance(decoder.step_fn, CUDAGraphStep) and decoder.step_fn.captured[1] is decoder.caches


# ------------------------------------------------------------------------------ context window
def nanogpt_greedy(model: GPT, idx: torch.Tensor, steps: int, window: int) -> torch.Tensor:
    """The textbook loop: full forward over the last ``window`` tokens, argmax, append."""
    for _ in range(steps):
        idx = torch.cat([idx, model(idx[:, -window:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("name", ["full", "linear", "local"])
def test_learned_positions_slide_the_window_past_block_size(name):
    if name not in NAMES:
        pytest.skip(f"{name} is not registered")
    model = tiny_gpt(name, block_size=8)
    prompt = torch.randint(0, V, (1, 11))  # longer than the context: conditioned on its last 8 tokens
    expected = nanogpt_greedy(model, prompt, 12, window=8)
    torch.testing.assert_close(model.generate(prompt, 12, temperature=0), expected, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(prompt, 12, temperature=0, use_cache=False), expected, rtol=0, atol=0)


def test_max_context_lets_relative_positions_read_past_block_size():
    model = tiny_gpt("full", position="rope", block_size=8)
    prompt = torch.randint(0, V, (1, 3))
    expected = nanogpt_greedy(model, prompt, 20, window=16)
    torch.testing.assert_close(model.generate(prompt, 20, temperature=0, max_context=16), expected, rtol=0, atol=0)
    decoder = Decoder(model, 23, max_context=16)
    list(decoder.stream(prompt, 20, temperature=0))
    assert decoder.caches[0].k.shape[2] == 16  # sized for the window; past it, steps re-run the window
    with pytest.raises(ValueError, match="max_context=16 is longer than context_len=8, and learned positions"):
        tiny_gpt("full", block_size=8).generate(prompt, 2, max_context=16)


# ------------------------------------------------------------------------------ sampling
def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))

    def kept(filtered: torch.Tensor) -> list[bool]:
        return torch.isfinite(filtered)[0].tolist()

    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_k=10)) == [True] * 4
    assert kept(filter_logits(logits, top_p=0.8)) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.8
    assert kept(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]  # the top token survives
    assert kept(filter_logits(logits, top_k=3, top_p=0.6)) == [False, True, False, True]
    draws = torch.cat([sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(50)])
    assert set(draws.flatten().tolist()) == {1, 3}
    assert sample_next(logits, temperature=0).item() == 1


def reference_filter(row: list[float], top_k, top_p) -> list[bool]:
    """Which tokens survive, by the definitions, one row of Python floats at a time."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order)
    if top_k is not None:
        kth = row[order[min(top_k, len(row)) - 1]]
        keep = {i for i in keep if row[i] >= kth}
    if top_p is not None:
        probs = torch.tensor([row[i] if i in keep else float("-inf") for i in range(len(row))]).softmax(-1).tolist()
        mass, nucleus = 0.0, set()
        for i in sorted(keep, key=lambda i: -row[i]):
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += probs[i]
        keep = nucleus
    return [i in keep for i in range(len(row))]


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (7, 0.9), (1, None), (None, 0.999)])
def test_filters_on_device_match_the_definition(top_k, top_p):
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    kept = torch.isfinite(filter_logits(logits, top_k, top_p)).tolist()
    assert kept == [reference_filter(row, top_k, top_p) for row in logits.tolist()]


def test_sampling_frequencies_follow_the_filtered_distribution():
    """The exponential race draws token i with probability p_i (the filtered softmax)."""
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(20000, 4)
    draws = sample_next(logits, top_p=0.8, generator=torch.Generator().manual_seed(0)).flatten()
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375], dtype=torch.float64), rtol=0, atol=0.015)


def test_sampling_is_reproducible_and_filters_reduce_to_greedy():
    model = tiny_gpt()
    prompt = torch.randint(0, V, (2, 4))
    greedy = model.generate(prompt, 10, temperature=0)
    torch.testing.assert_close(model.generate(prompt, 10, top_k=1), greedy, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(prompt, 10, top_p=1e-6), greedy, rtol=0, atol=0)
    a = model.generate(prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 10, temperature=1.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, greedy)


def test_generate_runs_in_eval_mode_without_grad_and_restores_the_mode():
    model = tiny_gpt(dropout=0.5).train()
    prompt = torch.randint(0, V, (1, 4))
    first = model.generate(prompt, 8, temperature=0)
    torch.testing.assert_close(model.generate(prompt, 8, temperature=0), first, rtol=0, atol=0)  # no dropout
    assert model.training and torch.is_grad_enabled()
    torch.testing.assert_close(model.generate(prompt, 0), prompt, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-2), "max_new_tokens must be a non-negative integer"),
    (dict(max_context=0), "max_context must be a positive number"),
])
def test_bad_generation_arguments(kwargs, match):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        tiny_gpt().generate(torch.zeros(1, 2, dtype=torch.long), **args)


def test_empty_prompt_is_rejected():
    with pytest.raises(ValueError, match="non-empty prompt"):
        tiny_gpt().generate(torch.zeros(1, 0, dtype=torch.long), 3)


# ------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny LitGPT saved as a Lightning checkpoint with its tokenizer."""
    root = tmp_path_factory.mktemp("generate")
    datamodule = LMDataModule(source="stdlib", max_chars=20000, cache_dir=str(root / "cache"))
    datamodule.prepare_data()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=datamodule.vocab_size, context_len=16, n_layer=1, d_model=16, n_heads=2,
                       position="rope")
    module = LitGPT(config, optim={"lr": 1e-3})
    path = root / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "LMDataModule": datamodule.state_dict(), "datamodule_hyper_parameters": dict(datamodule.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def compose_generate(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("generate", overrides=overrides)


def test_cli_streams_greedy_text_and_reports_speed_and_cache(checkpoint, tmp_path):
    path = checkpoint
    args = [f"ckpt={path}", "prompt='def f(x):'", "max_new_tokens=12", "temperature=0", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "attn_lm.generate", *args], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written next to the user
    model = LitGPT.load_from_checkpoint(str(path), map_location="cpu").model
    prompt = torch.tensor([list(b"def f(x):")])
    expected = bytes(model.generate(prompt, 12, temperature=0)[0].tolist()).decode("utf-8", errors="replace")
    assert run.stdout == expected + "\n"
    assert "decode" in run.stderr and "tokens/s" in run.stderr and "cache" in run.stderr
    # In-process: the same text, and the cache bytes are the layer's K/V for every position.
    result = generate(compose_generate(args))
    assert result["text"] == expected[len("def f(x):"):]
    # 9 + 12 tokens > block_size = 16: the cache holds the 16-token window.
    assert result["cache_bytes"] == 2 * 1 * 2 * 16 * 8 * 4  # k+v, batch, heads, positions, head_dim, fp32
    assert not result["compiled"] and not result["compiled_prefill"]  # compile=auto compiles on GPU only


def test_cli_compiled_step_and_reads_every_few_tokens(checkpoint, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    args = [f"ckpt={checkpoint}", "prompt='def f(x):'", "max_new_tokens=12", "temperature=0", "device=cpu"]
    eager = generate(compose_generate(args + ["compile=false"]))
    result = generate(compose_generate(args + ["compile=true", "stream_every=5"]))
    assert result["compiled"] and not result["compiled_prefill"] and result["text"] == eager["text"]
    result = generate(compose_generate(args + ["compile=true", "compile_prefill=true"]))
    assert result["compiled"] and result["compiled_prefill"] and result["text"] == eager["text"]
    with pytest.raises(ValueError, match="stream_every must be a positive"):
        generate(compose_generate(args + ["stream_every=0"]))
    with pytest.raises(ValueError, match="compile_prefill must be true or false, got 'auto'"):
        generate(compose_generate(args + ["compile_prefill=auto"]))


def test_cli_compile_false_turns_the_compiled_prefill_off_too(checkpoint, caplog):
    args = [f"ckpt={checkpoint}", "prompt='def f(x):'", "max_new_tokens=4", "temperature=0", "device=cpu"]
    with caplog.at_level(logging.WARNING):
        result = generate(compose_generate(args + ["compile=false", "compile_prefill=true"]))
    assert not result["compiled"] and not result["compiled_prefill"]
    assert "compile_prefill=true is ignored: compile=False leaves decoding eager on cpu" in caplog.text


def test_cli_prompt_longer_than_the_context(checkpoint, caplog, capsys):
    path = checkpoint
    args = [f"ckpt={path}", "prompt=abcdefghijklmnopqrstuvwxyz", "max_new_tokens=3", "temperature=0", "device=cpu"]
    with caplog.at_level(logging.WARNING):
        result = generate(compose_generate(args))
    assert result["prompt_tokens"] == 16 and "prompt has 26 tokens" in caplog.text
    assert capsys.readouterr().out.startswith("klmnopqrstuvwxyz")
    with pytest.raises(ValueError, match="prompt has 26 tokens .* set strict_prompt=false"):
        generate(compose_generate(args + ["strict_prompt=true"]))


def test_cli_needs_a_checkpoint_with_its_tokenizer(checkpoint, tmp_path):
    path = checkpoint
    with pytest.raises(FileNotFoundError, match="does not exist"):
        generate(compose_generate([f"ckpt={path}.missing"]))
    bare = torch.load(path, weights_only=False)
    del bare["LMDataModule"]
    torch.save(bare, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="holds no tokenizer"):
        generate(compose_generate([f"ckpt={tmp_path / 'bare.ckpt'}"]))
