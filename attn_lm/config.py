"""Typed configuration of the whole model, :class:`GPTConfig`.

One attention layer is an :class:`~attn_lm.attention.config.AttentionConfig` (re-exported here);
its options are typed by the mechanism and checked by :mod:`attn_lm.attention.factory` when the
model config is built, so a bad option fails before anything is allocated.
"""
from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Mapping, Sequence, Union

from .attention.config import (ATTENTION_POSITIONS, AttentionConfig, AttentionDims, attention_config_from_dict,
                               deprecated, divisors)
from .attention.factory import AttentionFactory

__all__ = ["ATTENTION_POSITIONS", "EMBEDDING_POSITIONS", "MODEL_POSITIONS", "AttentionConfig", "AttentionDims",
           "GPTConfig", "attention_config_from_dict", "gpt_config_from_dict"]

#: Positional schemes applied to the token embedding (model level).
EMBEDDING_POSITIONS = ("learned", "sinusoidal")
#: Every accepted value of ``GPTConfig.position``.
MODEL_POSITIONS = EMBEDDING_POSITIONS + ATTENTION_POSITIONS


AttentionSpec = Union[AttentionConfig, Sequence[AttentionConfig]]


@dataclass(init=False)
class GPTConfig:
    """A GPT-style decoder-only language model.

    ``attention`` is one :class:`AttentionConfig` used by every layer, or a sequence with one per
    layer. Each layer is built with the model's dimensions (:attr:`attention_dims`: ``d_model``,
    ``n_heads``, ``dropout``, ``bias``, ``context_len``) and inherits the model's attention-level
    ``position`` (rope/xpos/alibi) and rotary parameters unless it sets its own (a layer's
    ``position="none"`` opts out of the model's RoPE). :attr:`layer_attention` holds the
    resolved per-layer configs (typed options, positions filled in).

    Keyword arguments only; ``block_size`` (the old name of ``context_len``) is accepted for one
    release with a deprecation warning.
    """

    vocab_size: int = 256
    #: Longest sequence the model handles (learned positions, Linformer's projections, BigBird's layout).
    context_len: int = 256
    n_layer: int = 4
    d_model: int = 128
    n_heads: int = 4
    dropout: float = 0.0
    bias: bool = False
    mlp: str = "gelu"
    mlp_ratio: float = 4.0
    position: str = "learned"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    xpos_scale_base: float = 512.0
    tie_weights: bool = True
    attention: AttentionSpec = field(default_factory=AttentionConfig)

    def __init__(self, **values: Any):
        if "block_size" in values:
            deprecated("GPTConfig(block_size=...) is now GPTConfig(context_len=...) (the old name works for one release)")
            values.setdefault("context_len", values.pop("block_size"))
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TypeError(f"GPTConfig got unknown field(s) {unknown}; valid: {sorted(names)}")
        for f in fields(self):
            default = f.default_factory() if f.default is MISSING else f.default
            setattr(self, f.name, values.get(f.name, default))
        self.__post_init__()

    @property
    def block_size(self) -> int:
        deprecated("GPTConfig.block_size is now GPTConfig.context_len (the old name works for one release)")
        return self.context_len

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_len", "n_layer", "d_model", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"valid n_heads for this d_model: {divisors(self.d_model)}"
            )
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"GPTConfig.mlp={self.mlp!r}; valid: 'gelu', 'swiglu'")
        if self.position not in MODEL_POSITIONS:
            raise ValueError(f"GPTConfig.position={self.position!r}; valid: {MODEL_POSITIONS}")
        if isinstance(self.attention, AttentionConfig):
            layers = [self.attention] * self.n_layer
        else:
            layers = list(self.attention)
            if len(layers) != self.n_layer:
                raise ValueError(
                    f"GPTConfig.attention has {len(layers)} per-layer entries but n_layer={self.n_layer}; "
                    "give one AttentionConfig for all layers or exactly one per layer"
                )
        self.attention_dims = AttentionDims(d_model=self.d_model, n_heads=self.n_heads, dropout=self.dropout,
                                            bias=self.bias, max_seq_len=self.context_len)
        position = self.position if self.position in ATTENTION_POSITIONS else "none"
        inherited = [cfg.inherit(position, rope_base=self.rope_base, rope_fraction=self.rope_fraction,
                                 xpos_scale_base=self.xpos_scale_base) for cfg in layers]
        self.layer_attention: list[AttentionConfig] = [AttentionFactory.resolve(cfg, self.attention_dims)
                                                       for cfg in inherited]
        # Keep the typed options (every default written out, so a saved config does not change
        # meaning when a default does), but the layers' own positions: None stays "inherit".
        typed = [dataclasses.replace(cfg, attention_type=r.attention_type, options=r.options)
                 for cfg, r in zip(layers, self.layer_attention)]
        self.attention = typed[0] if isinstance(self.attention, AttentionConfig) else typed


def gpt_config_from_dict(values: Mapping[str, Any]) -> GPTConfig:
    """Inverse of ``dataclasses.asdict(GPTConfig)`` (checkpoints store the config that way). A
    dict written before the options redesign (flat attention records with model dimensions,
    ``block_size``) is converted with a deprecation message."""
    values = dict(values)
    attention = values.pop("attention", {})
    if isinstance(attention, Mapping):
        attention = attention_config_from_dict(attention)
    else:
        attention = [a if isinstance(a, AttentionConfig) else attention_config_from_dict(a) for a in attention]
    return GPTConfig(attention=attention, **values)
