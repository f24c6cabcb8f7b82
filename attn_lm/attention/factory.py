"""The attention registry and :class:`AttentionFactory`.

A mechanism registers itself with ``@register("name", aliases=(...))`` on its class; the class
declares the options it accepts (``options = {"window_size": 256}``: name -> default). The factory
validates a config against that declaration before building the module, so an option that does
not apply to the chosen mechanism is an error, never silently ignored.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..config import AttentionConfig

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


class AttentionFactory:
    """Builds attention modules from :class:`AttentionConfig` objects."""

    @staticmethod
    def get_class(attention_type: str) -> type["Attention"]:
        return _REGISTRY[canonical_name(attention_type)]

    @staticmethod
    def create_attention(config: AttentionConfig) -> "Attention":
        """Validate ``config`` against its mechanism and build the module."""
        cls = AttentionFactory.get_class(config.attention_type)
        cls.check_config(config)
        return cls(config)

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
