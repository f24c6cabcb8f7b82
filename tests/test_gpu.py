"""GPU-only checks (``pytest -m gpu`` on a CUDA machine; skipped elsewhere). Their runs are
recorded in benchmarks/RESULTS.md, since CI has no GPU."""
from __future__ import annotations

import pytest
import torch

from attn_lm import AttentionFactory

from .test_compile import positions_for, training_graph_report

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", AttentionFactory.names())
def test_training_forward_is_one_graph_on_cuda(name):
    """The CPU test's claim on real CUDA tensors, with autograd on (FlexAttention has a backward
    here): zero graph breaks, unless the mechanism declares why it cannot be traced."""
    cls = AttentionFactory.get_class(name)
    for position in positions_for(name):
        model, report = training_graph_report(name, position, device="cuda")
        if cls.compile_unsupported:
            assert name in model.untraceable
            continue
        reasons = [str(b.reason).splitlines()[0] for b in report.break_reasons]
        assert report.graph_count == 1 and report.graph_break_count == 0, (position, reasons)


@pytest.mark.parametrize("name", ["full", "local", "linear"])
def test_compiled_fullgraph_step_equals_eager(name):
    """One fused SDPA, one FlexAttention and one scan mechanism: the compiled one-graph training
    loss and gradients equal the eager ones (bf16 autocast tolerance)."""
    from attn_lm import GPT, AttentionConfig, GPTConfig
    from attn_lm.lit_module import compile_for_training

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=512, block_size=256, n_layer=2, d_model=128, n_heads=4,
                       attention=AttentionConfig(attention_type=name))
    model = GPT(config).cuda().train()
    idx, targets = (torch.randint(512, (4, 256), device="cuda") for _ in range(2))
    compiled = compile_for_training(model)
    losses, grads = [], []
    for fn in (model, compiled):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = fn(idx, targets)
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(model.lm_head.weight.grad.detach().clone())
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=5e-3)


def test_cuda_graph_steps_equal_plain_compiled_steps():
    """``compile_mode=reduce-overhead`` replays the compiled step as CUDA graphs: over several
    optimizer steps on fresh batches (copied into the graphs' static inputs) the losses equal
    those of the plain compiled model, in fp32."""
    from attn_lm import GPT, AttentionConfig, GPTConfig
    from attn_lm.lit_module import compile_for_training

    config = GPTConfig(vocab_size=512, block_size=128, n_layer=2, d_model=128, n_heads=4,
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
            _, loss = compiled(idx, targets)
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
        warnings.simplefilter("always")
        monkeypatch.setattr(warnings, "showwarning", record)
        torch.cuda.set_sync_debug_mode("warn")

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
