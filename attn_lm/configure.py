"""From a composed Hydra config to the typed objects of the package.

The ``attention`` group node (``conf/attention/<name>.yaml`` plus command-line overrides) is the
attention of every layer unless ``model.layer_attention`` lists one entry per layer. An entry is
a mechanism name (its options are read from ``conf/attention/<name>.yaml``; when it names the
selected ``attention`` group option, that node, with its overrides, is used) or a mapping
``{attention_type: name, option: value, ...}`` whose options override that file's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .attention import AttentionFactory
from .attention.factory import canonical_name
from .config import AttentionConfig, GPTConfig, attention_config_from_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def attention_group_options(name: str) -> dict[str, Any]:
    """The options stored in ``conf/attention/<name>.yaml`` (aliases resolved)."""
    canonical = canonical_name(name)
    path = CONF_DIR / "attention" / f"{canonical}.yaml"
    if not path.is_file():
        raise ValueError(f"no config file {path} for attention_type {canonical!r}")
    return dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def _as_dict(node: Any) -> dict[str, Any]:
    return dict(OmegaConf.to_container(node, resolve=True)) if isinstance(node, DictConfig) else dict(node)


def layer_attention_configs(cfg: DictConfig) -> list[AttentionConfig]:
    """One :class:`AttentionConfig` per layer from ``cfg.attention`` and ``cfg.model.layer_attention``."""
    default = _as_dict(cfg.attention)
    n_layer = int(cfg.model.n_layer)
    entries = cfg.model.get("layer_attention")
    if entries is None:
        return [attention_config_from_dict(default)] * n_layer
    if not isinstance(entries, (list, ListConfig)):
        raise ValueError(f"model.layer_attention must be a list of attention names, got {entries!r}")
    if len(entries) != n_layer:
        raise ValueError(
            f"model.layer_attention has {len(entries)} entries but model.n_layer={n_layer}; "
            f"set model.n_layer={len(entries)} or give {n_layer} entries"
        )
    default_type = canonical_name(default["attention_type"])
    configs = []
    for entry in entries:
        overrides = _as_dict(entry) if isinstance(entry, (dict, DictConfig)) else {"attention_type": str(entry)}
        if "attention_type" not in overrides:
            raise ValueError(f"model.layer_attention entry {overrides} needs an attention_type")
        name = canonical_name(overrides["attention_type"])
        base = default if name == default_type else attention_group_options(name)
        configs.append(attention_config_from_dict({**base, **overrides}))
    return configs


MODEL_KEYS = ("block_size", "n_layer", "d_model", "n_heads", "dropout", "bias", "mlp", "mlp_ratio", "position",
              "rope_base", "rope_fraction", "xpos_scale_base", "tie_weights")


def gpt_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """Build the :class:`GPTConfig` of a run; every layer's attention is validated here, at start."""
    model = _as_dict(cfg.model)
    unknown = sorted(set(model) - set(MODEL_KEYS) - {"layer_attention", "vocab_size"})
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(MODEL_KEYS + ('layer_attention',))}")
    config = GPTConfig(vocab_size=vocab_size, attention=layer_attention_configs(cfg),
                       **{k: model[k] for k in MODEL_KEYS if k in model})
    for layer in config.layer_attention:
        AttentionFactory.get_class(layer.attention_type).check_config(layer)
    return config
