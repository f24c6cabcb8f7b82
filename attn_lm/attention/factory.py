"""The attention registry and :class:`AttentionFactory`.

A mechanism registers itself with ``@register("name", aliases=(...))`` on its class; the class
declares its options as a typed ``Options`` dataclass (``window_size: int = option(256, 5, 12)``).
:meth:`AttentionFactory.resolve` turns a config's options into that dataclass, so an option that
does not apply to the chosen mechanism is an error, never silently ignored; everything else that
knows the mechanisms (the Hydra group, the comparison sweep, the selector, the benchmarks, the
tests) reads this registry.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

from .config import AttentionConfig, AttentionDims, deprecated

if TYPE_CHECKING:
    from .base import Attention

_REGISTRY: dict[str, type["Attention"]] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, aliases: tuple[str, ...] = ()) -> Callable[[type["Attention"]], type["Attention"]]:
    """Class decorator adding a mechanism to the registry under ``name`` (and ``aliases``)."""

    def add(cls: type["Attention"]) -> type["Attention"]:
        for key in (name, *aliases):
            if key in _REGISTRY or key in _ALIASES:
                raise ValueError(f"attention type {key!r} is registered twice")
        if not (dataclasses.is_dataclass(cls.Options) and cls.Options.__dataclass_params__.frozen):
            raise TypeError(f"{cls.__name__}.Options must be a frozen dataclass (the mechanism's typed options)")
        cls.name = name
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return add


def canonical_name(name: str) -> str:
    """Resolve an alias (``mha`` -> ``full``) and reject unknown names with the valid list."""
    name = _ALIASES.get(name, name)
    if name not in _REGISTRY:
        valid = sorted(_REGISTRY) + sorted(f"{a} (= {t})" for a, t in _ALIASES.items())
        raise ValueError(f"unknown attention_type {name!r}; available: {', '.join(valid)}")
    return name


def option_names(cls: type["Attention"]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls.Options))


def all_option_names() -> list[str]:
    """Every option of every registered mechanism, and the old names still accepted, sorted."""
    names = {o for cls in _REGISTRY.values() for o in (*option_names(cls), *cls.renamed_options)}
    return sorted(names)


def _typed_options(cls: type["Attention"], given: Any) -> Any:
    """``given`` (a mapping, or the mechanism's own Options) as ``cls.Options``, values checked."""
    if isinstance(given, cls.Options):
        values = dataclasses.asdict(given)
    elif isinstance(given, Mapping):
        values = dict(given)
    else:
        raise ValueError(f"options of attention_type {cls.name!r} must be a mapping or {cls.__name__}.Options, "
                         f"got {type(given).__name__}")
    for old, new in cls.renamed_options.items():
        if old in values:
            if new in values:
                raise ValueError(f"attention option {old!r} of {cls.name!r} is the old name of {new!r}; give only {new!r}")
            deprecated(f"attention option {old!r} of {cls.name!r} is now {new!r} (the old name works for one release)")
            values[new] = values.pop(old)
    declared = option_names(cls)
    for key, value in values.items():
        if key not in declared:
            users = [n for n, c in _REGISTRY.items() if key in option_names(c)]
            raise ValueError(f"option {key}={value!r} does not apply to attention_type {cls.name!r} (it accepts "
                             f"{sorted(declared) or 'no mechanism options'}); {key} is used by: "
                             f"{', '.join(users) or 'no mechanism'}")
    options = cls.Options(**values)
    hints = typing.get_type_hints(cls.Options)
    for f in dataclasses.fields(options):
        _check_value(cls.name, f, hints[f.name], getattr(options, f.name))
    return options


def _check_value(mechanism: str, f: dataclasses.Field, hint: Any, value: Any) -> None:
    """Type (from the field's annotation) and range (its ``minimum``) of one option value."""
    kinds = typing.get_args(hint) or (hint,)
    ok = any(value is None if k is type(None) else
             isinstance(value, (int, float) if k is float else k) and (k is bool or not isinstance(value, bool))
             for k in kinds)
    if not ok:
        names = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{f.name}={value!r} must be {names} for attention_type {mechanism!r}")
    minimum = f.metadata.get("minimum", 1)
    if isinstance(value, int) and not isinstance(value, bool) and minimum is not None and value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{f.name} must be {what} for attention_type {mechanism!r}, got {value}")


class AttentionFactory:
    """Builds attention modules from :class:`AttentionConfig` objects."""

    @staticmethod
    def get_class(attention_type: str) -> type["Attention"]:
        return _REGISTRY[canonical_name(attention_type)]

    @staticmethod
    def resolve(config: AttentionConfig, dims: Optional[AttentionDims] = None) -> AttentionConfig:
        """``config`` with its canonical mechanism name and typed, checked options; raises a
        ``ValueError`` naming the problem for options or settings the mechanism cannot take
        (``dims``: also check the combination with the model's dimensions)."""
        cls = AttentionFactory.get_class(config.attention_type)
        resolved = dataclasses.replace(config, attention_type=cls.name, options=_typed_options(cls, config.options))
        cls.check_config(resolved.inherit(), dims)  # checked with the defaults of what it leaves unset
        return resolved

    @staticmethod
    def create_attention(config: AttentionConfig, dims: Optional[AttentionDims] = None) -> "Attention":
        """Validate ``config`` against its mechanism and build the module for ``dims`` (default:
        the dimensions a pre-redesign config carried, else :class:`AttentionDims`'s defaults).
        Positions the config leaves unset are none (a model passes its own with
        :meth:`AttentionConfig.inherit` first)."""
        if dims is None:
            dims = config.legacy_dims or AttentionDims()
        config = AttentionFactory.resolve(config.inherit(), dims)
        return AttentionFactory.get_class(config.attention_type)(config, dims)

    @staticmethod
    def available() -> dict[str, str]:
        """Every registered name (aliases included) with a one-line description."""
        names = {name: cls.description for name, cls in sorted(_REGISTRY.items())}
        names.update({alias: f"alias of {target!r}" for alias, target in sorted(_ALIASES.items())})
        return names

    @staticmethod
    def names() -> list[str]:
        """Canonical registered names (no aliases), in registration order."""
        return list(_REGISTRY)

    @staticmethod
    def aliases() -> dict[str, str]:
        """``{alias: canonical name}``."""
        return dict(_ALIASES)
