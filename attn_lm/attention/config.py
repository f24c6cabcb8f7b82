"""Configuration of one attention layer: :class:`AttentionConfig` (what the user chooses) and
:class:`AttentionDims` (what the model gives every layer).

A layer's config says only what is the layer's own: the mechanism (``attention_type``), whether it
is causal, its positions (``None`` = inherit the model's) and the mechanism's ``options``. The
options are the mechanism's typed ``Options`` dataclass, declared on the mechanism's class next to
its code; that dataclass is the only place their defaults live. Model dimensions (width, heads,
dropout, bias, longest context) are passed to the builder as :class:`AttentionDims`, never copied
into each layer's config.

Hydra and checkpoints give configs as flat mappings (``{attention_type: local, window_size: 64}``):
:func:`attention_config_from_dict` reads those, and the pre-redesign format (model dimensions and
every option of every mechanism in one flat record) with a deprecation message.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

#: Positional schemes applied inside attention (to queries/keys or as a score bias).
ATTENTION_POSITIONS = ("none", "rope", "xpos", "alibi")
#: Rotary parameters a layer inherits from the model unless it sets them, with the defaults of a
#: layer built on its own.
ROPE_DEFAULTS = {"rope_base": 10000.0, "rope_fraction": 1.0, "xpos_scale_base": 512.0}
#: Fields of the pre-redesign AttentionConfig that are model dimensions (now :class:`AttentionDims`).
LEGACY_DIMS = ("d_model", "n_heads", "dropout", "bias", "max_seq_len")
#: Mechanism defaults before the redesign, where they differ from today's (they were unified with
#: the values the Hydra configs always used). A config saved then with such an option unset
#: (``None``: "the mechanism's default") is converted with these, so it keeps computing the same
#: function and its weights keep their shapes. Keyed by the names (aliases too) saved then.
PRE_REDESIGN_DEFAULTS = {
    "local": {"window_size": 256},
    "longformer": {"window_size": 256},
    "sink": {"window_size": 256},
    "bigbird": {"window_size": 256, "block_size": 64},
    "linformer": {"proj_len": 64, "chunk_size": 256},
    "nystrom": {"num_landmarks": 32, "chunk_size": 128},
    "nystromformer": {"num_landmarks": 32, "chunk_size": 128},
    "mla": {"kv_rank": 128, "rope_dim": 32},
}


class AttnLmDeprecationWarning(FutureWarning):
    """An old key or field name that still works for one release (shown to users by default)."""


def deprecated(message: str) -> None:
    warnings.warn(message, AttnLmDeprecationWarning, stacklevel=3)


def option(default: Any, *examples: Any, minimum: Optional[int] = 1) -> Any:
    """A field of a mechanism's ``Options`` dataclass: its ``default``, a few small valid
    ``examples`` (property tests and short-sequence tests draw from them, so a new option is
    tested with no test edit) and, for integers, the smallest valid value (``None``: any)."""
    return field(default=default, metadata={"examples": examples or (default,), "minimum": minimum})


def option_examples(options_cls: type) -> dict[str, tuple]:
    """``{option: small valid values}`` of an ``Options`` dataclass."""
    return {f.name: f.metadata.get("examples", (f.default,)) for f in fields(options_cls)}


@dataclass(frozen=True)
class NoOptions:
    """Options of a mechanism that has none."""


@dataclass(frozen=True)
class AttentionDims:
    """The model dimensions a layer is built for: given by the model (or the caller building a
    layer on its own), never stored in the layer's :class:`AttentionConfig`."""

    d_model: int = 512
    n_heads: int = 8
    dropout: float = 0.0
    bias: bool = False
    #: Longest sequence the layer will see (GPT: its ``context_len``). Mechanisms with
    #: length-dependent parameters (Linformer's projection, BigBird's random layout) use it.
    max_seq_len: int = 1024

    def __post_init__(self) -> None:
        if self.d_model <= 0 or self.n_heads <= 0:
            raise ValueError(f"d_model and n_heads must be positive, got d_model={self.d_model}, n_heads={self.n_heads}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                             f"valid n_heads for this d_model: {divisors(self.d_model)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(init=False)
class AttentionConfig:
    """One attention layer: mechanism, causality, positions and the mechanism's options.

    ``position``: ``None`` inherits the model's attention-level position (``GPTConfig.position``
    when it is rope/xpos/alibi, else none); ``"none"`` means no positions in this layer even when
    the model sets RoPE. The rotary parameters likewise inherit when ``None``.

    ``options``: the mechanism's ``Options`` dataclass, or a mapping of some of its fields (the
    rest keep their defaults). :meth:`AttentionFactory.resolve` turns a mapping into the typed
    dataclass and rejects options the mechanism does not declare.

    Keyword arguments of the pre-redesign flat config (``window_size=64``, ``d_model=...``) are
    accepted for one release with a deprecation warning.
    """

    attention_type: str = "full"
    causal: bool = True
    position: Optional[str] = None
    rope_base: Optional[float] = None
    rope_fraction: Optional[float] = None
    xpos_scale_base: Optional[float] = None
    options: Any = field(default_factory=dict)

    def __init__(self, attention_type: str = "full", causal: bool = True, position: Optional[str] = None,
                 rope_base: Optional[float] = None, rope_fraction: Optional[float] = None,
                 xpos_scale_base: Optional[float] = None, options: Any = None, **legacy: Any):
        self.attention_type, self.causal, self.position = attention_type, causal, position
        self.rope_base, self.rope_fraction, self.xpos_scale_base = rope_base, rope_fraction, xpos_scale_base
        self.options = {} if options is None else options
        #: Model dimensions given the pre-redesign way (``AttentionConfig(d_model=...)``), used by
        #: ``create_attention`` when it is given no dims. Not a field: never saved.
        self.legacy_dims: Optional[AttentionDims] = None
        if legacy:
            self._take_legacy(legacy)
        if self.position is not None and self.position not in ATTENTION_POSITIONS:
            raise ValueError(f"AttentionConfig.position={self.position!r} is not an attention-level position; valid: "
                             f"None (inherit the model's), {ATTENTION_POSITIONS} (learned/sinusoidal are set on "
                             "GPTConfig.position)")
        if self.rope_fraction is not None and not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")

    def _take_legacy(self, legacy: dict[str, Any]) -> None:
        dims = {k: legacy.pop(k) for k in LEGACY_DIMS if k in legacy}
        if dims:
            self.legacy_dims = AttentionDims(**dims)
        flat = {k: v for k, v in legacy.items() if v is not None}
        if flat:
            if not isinstance(self.options, Mapping):
                raise ValueError(f"AttentionConfig got options={self.options!r} and flat options {sorted(flat)}; "
                                 "give them all in options")
            self.options = {**flat, **self.options}
        deprecated(f"AttentionConfig({', '.join(f'{k}=...' for k in [*dims, *legacy])}): flat options and model "
                   "dimensions are deprecated; pass options={...} and give dimensions to the builder "
                   "(AttentionFactory.create_attention(config, AttentionDims(d_model=..., n_heads=...)))")

    def inherit(self, position: str = "none", **rope: float) -> "AttentionConfig":
        """A copy whose unset (``None``) position and rotary parameters take the given ones (the
        model's), then :data:`ROPE_DEFAULTS`."""
        values = {"position": position, **ROPE_DEFAULTS, **rope}
        return dataclasses.replace(self, **{k: v for k, v in values.items() if getattr(self, k) is None})

    def option_values(self) -> dict[str, Any]:
        """The options as a plain dict (typed or mapping alike)."""
        if dataclasses.is_dataclass(self.options):
            return dataclasses.asdict(self.options)
        return dict(self.options)

    def flat(self) -> dict[str, Any]:
        """The Hydra / YAML form: the common fields and the options side by side."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**{k: v for k, v in common.items() if v is not None}, **self.option_values()}


COMMON_FIELDS = tuple(f.name for f in fields(AttentionConfig) if f.name != "options")


def attention_config_from_dict(values: Mapping[str, Any], **overrides: Any) -> AttentionConfig:
    """An :class:`AttentionConfig` from a mapping: the nested form (``options: {...}``, what
    ``dataclasses.asdict`` writes) or the flat Hydra form (options next to ``attention_type``;
    ``None`` = unset). A mapping of the pre-redesign format (it carries the model dimensions)
    is converted, with a deprecation message: its dimensions were always overwritten by the model
    and are dropped, its ``position="none"`` meant "inherit", its unset options take that
    version's defaults (:data:`PRE_REDESIGN_DEFAULTS`), and its options are renamed where they
    were renamed. Which keys are options is checked against the mechanism later."""
    merged = {**dict(values), **overrides}
    legacy = [k for k in LEGACY_DIMS if k in merged]
    if legacy:
        for key in legacy:
            merged.pop(key)
        if merged.get("position") == "none":
            merged["position"] = None
        for key, value in PRE_REDESIGN_DEFAULTS.get(merged.get("attention_type", "full"), {}).items():
            if merged.get(key) is None:
                merged[key] = value
        deprecated(f"attention config in the pre-redesign format (it has {legacy}); converted: model dimensions "
                   "dropped, position 'none' read as 'inherit the model's', options moved under 'options', unset "
                   "options given the defaults of that version. "
                   "Re-save it (e.g. attn_lm.checkpoint / dataclasses.asdict of the loaded config) to convert it")
    options = dict(merged.pop("options", None) or {})
    common = {k: v for k in COMMON_FIELDS if k in merged and (v := merged.pop(k)) is not None}
    options.update({k: v for k, v in merged.items() if v is not None})
    return AttentionConfig(**common, options=options)
