"""Shared test helpers: small configs for every registered mechanism."""
from __future__ import annotations

import torch

from attn_lm import AttentionConfig, AttentionFactory

#: Small values for every mechanism option, so patterns are non-trivial at T ~ 24.
SMALL_OPTIONS = {
    "window_size": 5,
    "block_size": 4,
    "stride": 3,
    "dilation": 1,
    "num_global_tokens": 2,
    "num_random_blocks": 1,
    "num_features": 64,
    "redraw_interval": None,
    "proj_len": 4,
    "num_landmarks": 4,
    "chunk_size": 4,
    "n_kv_heads": 2,
    "layout": None,
    "seed": 0,
    "backend": None,
    "num_sink_tokens": 2,
    "kv_rank": 12,
    "rope_dim": 4,
    "kernel": None,
    "gated": None,
}


def small_config(name: str, d_model: int = 32, n_heads: int = 4, **overrides) -> AttentionConfig:
    """An AttentionConfig for ``name`` with small option values for the options it accepts."""
    cls = AttentionFactory.get_class(name)
    opts = {k: v for k, v in SMALL_OPTIONS.items() if k in cls.options and v is not None}
    if name == "mqa":
        opts.pop("n_kv_heads", None)
    opts = {"max_seq_len": 64, **opts, **overrides}
    return AttentionConfig(attention_type=name, d_model=d_model, n_heads=n_heads, **opts)


def build(name: str, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    module = AttentionFactory.create_attention(small_config(name, **overrides)).to(dtype)
    return module.eval()


def context_for(module, x):
    """The context a mechanism needs (cross-attention reads an aligned stream)."""
    return torch.randn_like(x) if module.uses_context else None
