"""The training loop reads nothing from the device per step.

A host read of a device tensor (``.item()``, ``float()``, ``bool()``...) waits for every queued
kernel, so the GPU idles while the host launches the next step. One such read per step (the loss
logged with ``prog_bar=True``, which Lightning converts to a float after every batch) cost 11-14%
of the step time at the GPT-2-small shape on an H200. On CPU the reads are free but countable:
over N training steps the loop may read only at its intervals (progress bar refresh, the
non-finite check, the speed windows), never once per step.
"""
from __future__ import annotations

import sys

import torch

from attn_lm.lit_module import LitGPT
from attn_lm.train import train

from .test_train import compose_cfg

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def test_training_steps_make_no_per_step_host_reads(tmp_path, monkeypatch, smoke_overrides):
    reads = {"active": False, "count": 0}
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            # AdamW on CPU reads its (CPU) step counters; fused AdamW on CUDA keeps them on the device.
            reads["count"] += reads["active"] and "torch/optim" not in sys._getframe(1).f_code.co_filename
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    # Count from the first training step to the first evaluation.
    monkeypatch.setattr(LitGPT, "on_train_start", lambda self: reads.update(active=True), raising=False)
    monkeypatch.setattr(LitGPT, "on_validation_start", lambda self: reads.update(active=False), raising=False)
    monkeypatch.chdir(tmp_path)
    steps = 40
    train(compose_cfg([*smoke_overrides, f"trainer.max_steps={steps}", "trainer.log_every_n_steps=20",
                       f"trainer.val_check_interval={steps}", "progress_refresh=10", "test_after_training=false",
                       "trainer.enable_progress_bar=true"]))
    # 4 progress-bar refreshes + 2 non-finite checks + margin; a per-step read would be >= 40.
    assert 0 < reads["count"] <= 10, reads
