"""Typed configuration objects: :class:`AttentionConfig` (one attention layer) and
:class:`GPTConfig` (the whole model).

Both are plain dataclasses so they work from Python and from Hydra (a YAML mapping is turned into
one with :func:`attention_config_from_dict`). Validation that needs to know the mechanism (which
options it accepts) lives in :mod:`attn_lm.attention.factory`; validation of shapes lives here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

#: Positional schemes applied inside attention (to queries/keys or as a score bias).
ATTENTION_POSITIONS = ("none", "rope", "xpos", "alibi")
#: Positional schemes applied to the token embedding (model level).
EMBEDDING_POSITIONS = ("learned", "sinusoidal")
#: Every accepted value of ``GPTConfig.position``.
MODEL_POSITIONS = EMBEDDING_POSITIONS + ATTENTION_POSITIONS

#: Mechanism-specific options. ``None`` means "not set": the mechanism's default is used, and a
#: value set for a mechanism that does not declare the option is an error, never ignored.
MECHANISM_OPTIONS = (
    "window_size",
    "block_size",
    "stride",
    "dilation",
    "num_global_tokens",
    "num_random_blocks",
    "num_features",
    "redraw_interval",
    "proj_len",
    "num_landmarks",
    "chunk_size",
    "n_kv_heads",
    "layout",
    "seed",
    "backend",
    "num_sink_tokens",
    "lambda_init",
    "kv_rank",
    "rope_dim",
    "kernel",
    "gated",
)


@dataclass
class AttentionConfig:
    """Options of one attention layer.

    Common fields apply to every mechanism; the fields in :data:`MECHANISM_OPTIONS` apply only to
    the mechanisms that declare them (see ``AttentionFactory.available()``) and default to
    ``None`` = "use the mechanism's default".
    """

    attention_type: str = "full"
    d_model: int = 512
    n_heads: int = 8
    dropout: float = 0.0
    causal: bool = True
    bias: bool = False
    #: Longest sequence this layer will see (GPT sets it to its ``block_size``). Mechanisms with
    #: length-dependent parameters (Linformer's projection, BigBird's random layout) use it.
    max_seq_len: int = 1024
    position: str = "none"
    rope_base: float = 10000.0
    rope_fraction: float = 1.0
    xpos_scale_base: float = 512.0

    window_size: Optional[int] = None
    block_size: Optional[int] = None
    stride: Optional[int] = None
    dilation: Optional[int] = None
    num_global_tokens: Optional[int] = None
    num_random_blocks: Optional[int] = None
    num_features: Optional[int] = None
    redraw_interval: Optional[int] = None
    proj_len: Optional[int] = None
    num_landmarks: Optional[int] = None
    chunk_size: Optional[int] = None
    n_kv_heads: Optional[int] = None
    layout: Optional[str] = None
    seed: Optional[int] = None
    backend: Optional[str] = None
    num_sink_tokens: Optional[int] = None
    lambda_init: Optional[float] = None
    kv_rank: Optional[int] = None
    rope_dim: Optional[int] = None
    kernel: Optional[str] = None
    gated: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got d_model={self.d_model}, n_heads={self.n_heads}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"valid n_heads for this d_model: {_divisors(self.d_model)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.position not in ATTENTION_POSITIONS:
            raise ValueError(
                f"AttentionConfig.position={self.position!r} is not an attention-level position; "
                f"valid: {ATTENTION_POSITIONS} (learned/sinusoidal are set on GPTConfig.position)"
            )
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def set_options(self) -> dict[str, Any]:
        """The mechanism options that were explicitly set (not ``None``)."""
        return {name: getattr(self, name) for name in MECHANISM_OPTIONS if getattr(self, name) is not None}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def attention_config_from_dict(values: Mapping[str, Any], **overrides: Any) -> AttentionConfig:
    """Build an :class:`AttentionConfig` from a mapping (e.g. a Hydra ``attention`` node).

    Unknown keys are rejected with the list of valid ones instead of a bare ``TypeError``.
    """
    merged = {**dict(values), **overrides}
    valid = {f.name for f in fields(AttentionConfig)}
    unknown = sorted(set(merged) - valid)
    if unknown:
        raise ValueError(f"unknown attention option(s) {unknown}; valid options: {sorted(valid)}")
    return AttentionConfig(**merged)


AttentionSpec = Union[AttentionConfig, Sequence[AttentionConfig]]


@dataclass
class GPTConfig:
    """A GPT-style decoder-only language model.

    ``attention`` is one :class:`AttentionConfig` used by every layer, or a sequence with one per
    layer. ``d_model``, ``n_heads``, ``dropout`` and ``max_seq_len`` (= ``block_size``) of the
    model are authoritative: they are copied into every layer's attention config. An
    attention-level ``position`` (rope/xpos/alibi) set here is copied into every layer too.
    """

    vocab_size: int = 256
    block_size: int = 256
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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "d_model", "n_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"valid n_heads for this d_model: {_divisors(self.d_model)}"
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
        attn_position = self.position if self.position in ATTENTION_POSITIONS else "none"
        self.layer_attention: list[AttentionConfig] = [
            dataclasses.replace(
                cfg,
                d_model=self.d_model,
                n_heads=self.n_heads,
                dropout=self.dropout,
                bias=self.bias,
                max_seq_len=self.block_size,
                position=attn_position if cfg.position == "none" else cfg.position,
                rope_base=self.rope_base,
                rope_fraction=self.rope_fraction,
                xpos_scale_base=self.xpos_scale_base,
            )
            for cfg in layers
        ]


def gpt_config_from_dict(values: Mapping[str, Any]) -> GPTConfig:
    """Inverse of ``dataclasses.asdict(GPTConfig)`` (checkpoints store the config that way)."""
    values = dict(values)
    attention = values.pop("attention", {})
    if isinstance(attention, Mapping):
        attention = attention_config_from_dict(attention)
    else:
        attention = [a if isinstance(a, AttentionConfig) else attention_config_from_dict(a) for a in attention]
    return GPTConfig(attention=attention, **values)
