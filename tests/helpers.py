"""Shared test helpers: small configs for every registered mechanism, read from the registry."""
from __future__ import annotations

import torch

from attn_lm import AttentionConfig, AttentionFactory
from attn_lm.attention.config import COMMON_FIELDS, AttentionDims, option_examples


def small_options(name: str) -> dict:
    """The first declared example of each option of ``name``: values small enough that patterns
    and chunks are non-trivial at T ~ 24 (each mechanism declares them with its options)."""
    return {k: v[0] for k, v in option_examples(AttentionFactory.get_class(name).Options).items()}


def small_config(name: str, **overrides) -> AttentionConfig:
    """An AttentionConfig for ``name`` with its small option values; ``overrides`` are flat
    (common fields such as ``causal`` or ``position``, and options)."""
    common = {k: v for k, v in overrides.items() if k in COMMON_FIELDS}
    options = {k: v for k, v in overrides.items() if k not in COMMON_FIELDS}
    return AttentionConfig(attention_type=name, **common, options={**small_options(name), **options})


def small_dims(d_model: int = 32, n_heads: int = 4, max_seq_len: int = 64, **dims) -> AttentionDims:
    return AttentionDims(d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, **dims)


def build(name: str, dtype=torch.float64, d_model: int = 32, n_heads: int = 4, max_seq_len: int = 64,
          dropout: float = 0.0, **overrides):
    torch.manual_seed(0)
    dims = small_dims(d_model, n_heads, max_seq_len, dropout=dropout)
    module = AttentionFactory.create_attention(small_config(name, **overrides), dims).to(dtype)
    return module.eval()


def context_for(module, x):
    """The context a mechanism needs (cross-attention reads an aligned stream)."""
    return torch.randn_like(x) if module.uses_context else None
