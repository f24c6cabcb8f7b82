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
    config = GPTConfig(vocab_size=512, context_len=256, n_layer=2, d_model=128, n_heads=4,
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
