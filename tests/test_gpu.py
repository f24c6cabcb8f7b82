"""GPU-only checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere). Their runs are
recorded in benchmarks/RESULTS.md, since CI has no GPU."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionFactory

from .helpers import small_config
from .test_compile import flex_pattern_names, training_graph_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", AttentionFactory.names())
def test_training_forward_is_one_graph_on_cuda(name):
    """The CPU test's claim on real CUDA tensors, with autograd on (FlexAttention has a backward
    here): zero graph breaks, unless the mechanism declares why it cannot be traced."""
    model, report = training_graph_report(name, device="cuda")
    if AttentionFactory.get_class(name).compile_unsupported:
        assert name in model.untraceable
        return
    reasons = [str(b.reason).splitlines()[0] for b in report.break_reasons]
    assert report.graph_count == 1 and report.graph_break_count == 0, reasons


@pytest.mark.parametrize("name", ["full", "local", "linear"])
def test_compiled_fullgraph_step_equals_eager(name):
    """One fused SDPA, one FlexAttention and one scan mechanism: the compiled one-graph training
    loss and gradients equal the eager ones (bf16 autocast tolerance)."""
    from attn_lm import GPT, AttentionConfig, GPTConfig
    from attn_lm.lit_module import compile_for_training

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, context_len=256, n_layer=2, d_model=128, n_heads=4,
                       attention=AttentionConfig(attention_type=name))
    model = GPT(config).cuda().train()
    idx, targets = (torch.randint(512, (4, 256), device="cuda") for _ in range(2))
    compiled = compile_for_training(model)
    losses, grads = [], []
    for fn in (model, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fn(idx, targets, return_logits=False)
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(model.lm_head.weight.grad.detach().clone())
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", flex_pattern_names())
def test_compiled_evaluation_with_rope_equals_eager(name, dtype, monkeypatch):
    """Compiled forward without autograd (evaluation, a compiled prefill) of every sparse pattern
    with RoPE at T=64, 2 layers, on CUDA: its logits are no further from the fp32 dense reference
    than the eager model's. Below 128 queries Inductor picks FlexAttention's decoding kernel when
    no gradient is needed, and on an H200 that kernel was off by 2.5e-2 of the logits' range here
    in fp32 and bf16 alike (eager: 3e-7 and 5e-3), so compiled validation of sparse patterns with
    RoPE was wrong at MQAR's T=64 (RESULTS.md 2l, 5f); the dispatch now forces the main kernel.
    bf16 is judged against eager's own bf16 error, which a fixed tolerance would hide it under."""
    from attn_lm import GPT, GPTConfig
    from attn_lm.attention.base import reference_mode

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, context_len=64, n_layer=2, d_model=128, n_heads=2, position="rope",
                       attention=small_config(name))  # windows well inside T: the masks matter
    model = GPT(config).cuda().eval()
    idx = torch.randint(512, (8, 64), device="cuda")
    with torch.no_grad():
        with reference_mode(model):
            reference = model(idx)[0]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            eager = model(idx)[0].float()
            model.prepare_fused(64, idx.device)
            compiled = torch.compile(model, fullgraph=True, dynamic=False)(idx)[0].float()
    scale = reference.abs().max()
    eager_error = ((eager - reference).abs().max() / scale).item()
    compiled_error = ((compiled - reference).abs().max() / scale).item()
    assert compiled_error <= 2 * eager_error + 1e-5, (compiled_error, eager_error)


def test_cuda_graph_steps_equal_plain_compiled_steps():
    """``compile_mode=reduce-overhead`` replays the compiled step as CUDA graphs: over several
    optimizer steps on fresh batches (copied into the graphs' static inputs) the losses equal
    those of the plain compiled model, in fp32."""
    from attn_lm import GPT, AttentionConfig, GPTConfig
    from attn_lm.lit_module import compile_for_training

    config = GPTConfig(vocab_size=512, context_len=128, n_layer=2, d_model=128, n_heads=4,
                       attention=AttentionConfig(attention_type="full"))
    batches = [tuple(torch.randint(512, (4, 128), device="cuda") for _ in range(2)) for _ in range(5)]
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch.manual_seed(0)
        model = GPT(config).cuda().train()
        compiled = compile_for_training(model, mode)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        losses[mode] = []
        for idx, targets in batches:
            torch.compiler.cudagraph_mark_step_begin()
            _, loss = compiled(idx, targets, return_logits=False)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[mode].append(loss.detach().clone())
        torch._dynamo.reset()
    torch.testing.assert_close(torch.stack(losses["reduce-overhead"]), torch.stack(losses["default"]),
                               rtol=1e-4, atol=1e-4)


def test_training_run_with_cuda_graphs(tmp_path, monkeypatch, smoke_overrides):
    """The whole Lightning run (logging, progress bar, evaluation, checkpoint) under
    ``compile_mode=reduce-overhead``: it finishes with a finite validation loss."""
    from attn_lm.train import train

    from .test_train import compose_cfg

    monkeypatch.chdir(tmp_path)
    results = train(compose_cfg([*smoke_overrides, "trainer=gpu", "compile=true", "compile_mode=reduce-overhead",
                                 "trainer.max_steps=30", "trainer.val_check_interval=15", "progress_refresh=5",
                                 "trainer.enable_progress_bar=true", "test_after_training=false"]))
    assert torch.isfinite(torch.tensor(results["val_loss"])), results


def test_training_steps_never_wait_for_the_gpu(tmp_path, monkeypatch, smoke_overrides):
    """From the first training step to the first validation, nothing in the loop waits for the
    GPU: the progress bar, the loggers (loss, learning rate, speed windows) and the non-finite
    check read device values one interval late, at their intervals. Any synchronizing call in
    that stretch is reported by CUDA's sync debug mode, with where it came from."""
    import traceback
    import warnings

    from attn_lm.lit_module import LitGPT
    from attn_lm.train import train

    from .test_train import compose_cfg

    syncs: list[str] = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            syncs.append("".join(traceback.format_stack(limit=8)[:-1]))

    def start(self):
        torch.cuda.set_sync_debug_mode("warn")  # first: switching it on issues a notice of its own
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", record)

    monkeypatch.setattr(LitGPT, "on_train_start", start, raising=False)
    monkeypatch.setattr(LitGPT, "on_validation_start", lambda self: torch.cuda.set_sync_debug_mode(0), raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        train(compose_cfg([*smoke_overrides, "trainer=gpu", "compile=false", "trainer.max_steps=30",
                           "trainer.val_check_interval=30", "trainer.log_every_n_steps=5", "progress_refresh=2",
                           "trainer.enable_progress_bar=true", "test_after_training=false", "logger=csv"]))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not syncs, f"{len(syncs)} host syncs during training; the first at:\n{syncs[0]}"


# ------------------------------------------------------------------------------ fla kernels (issue 15)
MATRIX_STATE = [("retention", {}), ("gla", {}), ("deltanet", {}), ("deltanet", {"gated": True})]
IDS = ["retention", "gla", "deltanet", "gated_deltanet"]


def matrix_state_case(name: str, opts: dict, B: int = 2, T: int = 1000, H: int = 4, D: int = 64):
    """A layer on CUDA and float32 ``q, k, v, decay`` from its own projection (valid gates); T is
    not a multiple of any chunk size."""
    from attn_lm import AttentionConfig, AttentionDims

    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = AttentionFactory.create_attention(AttentionConfig(attention_type=name, options={"kernel": "torch", **opts}),
                                              AttentionDims(d_model=H * D, n_heads=H, max_seq_len=T)).cuda()
    with torch.no_grad():
        return layer, layer.prepare(*layer.project(torch.randn(B, T, H * D, device="cuda"), None))


def fla_or_xfail(layer, q, k, v, decay, monkeypatch):
    """``layer.fla_scan`` in bf16; xfail with fla's own reason if it refuses (the layer would then
    run the PyTorch form after one warning)."""
    import warnings

    from attn_lm.attention import fla_kernels

    monkeypatch.setattr(fla_kernels, "_FAILED", set())
    monkeypatch.setattr(fla_kernels, "_BACKWARD_OK", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = layer.fla_scan(q.bfloat16(), k.bfloat16(), v.bfloat16(), decay, lambda: None)
    if out is None:
        pytest.xfail(str(caught[-1].message))
    return out.float()


@pytest.mark.parametrize("name,opts", MATRIX_STATE, ids=IDS)
def test_fla_kernel_equals_the_pytorch_chunkwise_form(name, opts, monkeypatch):
    """fla's chunk kernel (bf16 inputs) == the PyTorch chunkwise form (float32), output and the
    gradients of q, k, v; the maximum errors are printed for benchmarks/RESULTS.md (-s)."""
    layer, (q, k, v, decay) = matrix_state_case(name, opts)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = layer.scan(*leaves, decay)[0]
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    fla_leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = fla_or_xfail(layer, *fla_leaves, decay, monkeypatch)
    grads = torch.autograd.grad(out, fla_leaves, grad_out)
    errors = {"output": (out, expected), **{f"d{label}": (g.float(), ref)
                                               for label, g, ref in zip("qkv", grads, expected_grads)}}
    # One line with every error, printed and in the assertion message: under pytest-xdist a
    # worker's output is not shown, and a failure must say by how much.
    rel = {key: ((got - ref).norm() / ref.norm()).item() for key, (got, ref) in errors.items()}
    report = (f"{IDS[MATRIX_STATE.index((name, opts))]}: fla bf16 vs PyTorch fp32, max abs / rel err: " + "; ".join(
        f"{key} {(got - ref).abs().max().item():.3e} / {rel[key]:.3e}" for key, (got, ref) in errors.items()))
    print("\n" + report)
    assert rel["output"] < 2e-2 and all(rel[f"d{label}"] < 5e-2 for label in "qkv"), report


@pytest.mark.parametrize("name,opts", MATRIX_STATE, ids=IDS)
def test_pytorch_forms_equal_fla_naive_references(name, opts):
    """Peer check: our chunkwise form (float32) == fla's own naive PyTorch references, which use
    fla's conventions: [B, T, H, D] (or head-first for retention/delta_rule), queries scaled by
    1/sqrt(D) where fla fixes the scale (our retention/gla scale k instead; our deltanet uses 1)."""
    import importlib

    layer, (q, k, v, decay) = matrix_state_case(name, opts)
    ours = layer.scan(q, k, v, decay)[0]
    D, heads_last = q.shape[-1], (lambda t: t.transpose(1, 2))
    if name == "retention":
        naive = importlib.import_module("fla.ops.retention.naive")
        ref = naive.naive_retention(q, k * D**0.5, v)
    elif name == "gla":
        naive = importlib.import_module("fla.ops.gla.naive")
        ref = heads_last(naive.naive_recurrent_gla(*map(heads_last, (q, k * D**0.5, v, decay)))[0])
    elif not opts.get("gated"):
        naive = importlib.import_module("fla.ops.delta_rule.naive")
        ref = naive.delta_rule_recurrence(q, k, v, decay[..., 0])[0] * D**0.5
    else:
        naive = importlib.import_module("fla.ops.gated_delta_rule.naive")
        ref = heads_last(naive.naive_recurrent_gated_delta_rule(
            *map(heads_last, (q, k, v, decay[..., 0], decay[..., 1])), scale=1.0)[0])
    err = (ours - ref).abs().max().item()
    print(f"\n{IDS[MATRIX_STATE.index((name, opts))]}: PyTorch chunkwise vs {naive.__name__}: max abs err {err:.3e}")
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,opts", MATRIX_STATE, ids=IDS)
def test_kernel_auto_runs_fla_in_eager_and_torch_under_compile(name, opts, monkeypatch):
    """The layer's own dispatch: kernel=auto on CUDA calls fla in eager mode (no fallback warning
    unless fla refuses) and the compiled layer (one graph) equals it at bf16 tolerance."""
    import warnings

    from attn_lm import AttentionConfig, AttentionDims
    from attn_lm.attention import fla_kernels

    pytest.importorskip("fla")
    monkeypatch.setattr(fla_kernels, "_FAILED", set())
    torch.manual_seed(0)
    layer = AttentionFactory.create_attention(AttentionConfig(attention_type=name, options=opts),
                                              AttentionDims(d_model=256, n_heads=4, max_seq_len=512)).cuda()
    x = torch.randn(2, 512, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = layer(x).float()
        compiled = torch.compile(layer, fullgraph=True)(x).float()
    if caught:
        pytest.xfail(str(caught[-1].message))
    torch.testing.assert_close(compiled, eager, rtol=5e-2, atol=5e-2)
