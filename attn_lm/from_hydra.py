"""From a composed Hydra config to the typed objects of the package.

The ``attention`` group node (``conf/attention/<name>.yaml``, generated from the registry, plus
command-line overrides) is the attention of every layer unless ``model.layer_attention`` lists one
entry per layer. An entry is a mechanism name (its options take their defaults; when it names the
selected ``attention`` group option, that node, with its overrides, is used) or a mapping
``{attention_type: name, option: value, ...}``.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, get_args, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf

from .attention import AttentionFactory
from .attention.config import deprecated
from .attention.factory import canonical_name
from .cli import CONF_DIR
from .config import AttentionConfig, GPTConfig, attention_config_from_dict

log = logging.getLogger(__name__)


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
        base = default if name == default_type else {}
        configs.append(attention_config_from_dict({**base, **overrides}))
    return configs


MODEL_KEYS = ("context_len", "n_layer", "d_model", "n_heads", "dropout", "bias", "mlp", "mlp_ratio", "position",
              "rope_base", "rope_fraction", "xpos_scale_base", "tie_weights")


def gpt_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """Build the :class:`GPTConfig` of a run; every layer's attention is validated here, at start."""
    model = _as_dict(cfg.model)
    if model.get("block_size") is not None:  # the pre-context_len key, one release
        deprecated("model.block_size is now model.context_len (the old key works for one release)")
        model["context_len"] = model["block_size"]
    model.pop("block_size", None)
    unknown = sorted(set(model) - set(MODEL_KEYS) - {"layer_attention", "vocab_size"})
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid: {sorted(MODEL_KEYS + ('layer_attention',))}")
    return GPTConfig(vocab_size=vocab_size, attention=layer_attention_configs(cfg),
                     **{k: model[k] for k in MODEL_KEYS if k in model})


class Rule(NamedTuple):
    """What a run-level value must be: its types, a range test, and the words for both."""

    types: tuple[type, ...]
    test: Any
    wanted: str
    nullable: bool = False


_NUMBER, _INT = (int, float), (int,)
_ABSENT = object()
#: Values of the trainer/optim/run nodes that would otherwise fail late (after the data is
#: tokenized, or after training started) with a message that does not name them.
RUN_VALUES = {
    "seed": Rule(_INT, lambda v: True, "an integer"),
    "trainer.max_steps": Rule(_INT, lambda v: v >= -1, "an integer >= -1 (-1 = no step limit)"),
    "trainer.val_check_interval": Rule(_NUMBER, lambda v: v > 0, "a positive number (steps, or a fraction of an epoch)", True),
    "trainer.log_every_n_steps": Rule(_INT, lambda v: v > 0, "a positive integer"),
    "trainer.accumulate_grad_batches": Rule(_INT, lambda v: v > 0, "a positive integer"),
    "trainer.gradient_clip_val": Rule(_NUMBER, lambda v: v >= 0, "a number >= 0 or null", True),
    "optim.lr": Rule(_NUMBER, lambda v: v > 0, "a positive number"),
    "optim.weight_decay": Rule(_NUMBER, lambda v: v >= 0, "a number >= 0"),
    "optim.warmup_steps": Rule(_INT, lambda v: v >= 0, "an integer >= 0"),
    "optim.min_lr_ratio": Rule(_NUMBER, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "optim.eps": Rule(_NUMBER, lambda v: v > 0, "a positive number"),
}


def _is(value: Any, kind: type) -> bool:
    """``isinstance`` where a bool is not a number and an int is also a float."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _check_field(key: str, value: Any, hint: Any) -> None:
    kinds = get_args(hint) or (hint,)
    if not all(k in (int, float, bool, str, type(None)) for k in kinds):
        return  # not a scalar field (e.g. GPTConfig.attention)
    if value is None and type(None) in kinds or any(_is(value, k) for k in kinds if k is not type(None)):
        return
    names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    raise ValueError(f"{key}={value!r} must be {names}")


def check_types(cfg: DictConfig) -> None:
    """Name the key of a value of the wrong type or range, before anything is built: the model
    and attention nodes against the fields of :class:`GPTConfig` / :class:`AttentionConfig`, the
    run's trainer/optim values against :data:`RUN_VALUES`."""
    for section, schema in (("model", GPTConfig), ("attention", AttentionConfig)):
        hints = get_type_hints(schema)
        for key, value in _as_dict(cfg[section]).items():
            unset = value is None and section == "attention"  # null = unset: the default applies
            if key in hints and not unset:
                _check_field(f"{section}.{key}", value, hints[key])
    for key, rule in RUN_VALUES.items():
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT or value is None and rule.nullable:
            continue  # a preset without the key keeps the library's default
        if not (any(_is(value, k) for k in rule.types) and rule.test(value)):
            raise ValueError(f"{key}={value!r} must be {rule.wanted}")


def check_run_config(cfg: DictConfig) -> None:
    """Every check of the composed config that needs no data: types and ranges, the model and each
    layer's attention (vocabulary size not known yet), and the context length."""
    check_types(cfg)
    model = gpt_config(cfg, vocab_size=1)
    if int(cfg.data.block_size) > model.context_len:
        raise ValueError(f"data.block_size={cfg.data.block_size} is larger than model.context_len="
                         f"{model.context_len}, the longest context the model supports")
    reasons = full_attention_layers(model, int(cfg.data.block_size))
    if reasons and OmegaConf.select(cfg, "compare.refuse_full_attention", default=False):
        raise ValueError(f"{'; '.join(reasons)}: a comparison row must differ from full attention "
                         "(compare.refuse_full_attention=true); lower that size, or set compare.structure_fraction")
    for reason in reasons:
        log.warning("%s", reason)


def command_line_keys(cfg: DictConfig) -> set[str]:
    """The keys given on the command line (Hydra's task overrides, ``+``/``~`` prefixes dropped):
    from the config's own ``hydra`` node when composed with it, else from the running Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    task = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if task is None and HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
    return {str(item).split("=", 1)[0].lstrip("+~") for item in task or ()}


def scale_structure(cfg: DictConfig) -> dict[str, int]:
    """``compare.structure_fraction``: set the attention node's structural size (the option that
    ``covering_option`` names: window, block, stride or chunk) to that fraction of
    ``data.block_size``, so a mechanism keeps one density at every context length (window = T/8 at
    every T for 1/8). A size set on the command line (not the preset file's) is kept. The
    mechanism's family says which options follow the size (``Attention.structure_options``:
    low-rank summaries are capped at the new chunk). Returns what it set."""
    fraction = OmegaConf.select(cfg, "compare.structure_fraction", default=None)
    if fraction is None:
        return {}
    mechanism = AttentionFactory.get_class(cfg.attention.attention_type)
    config = AttentionFactory.resolve(attention_config_from_dict(_as_dict(cfg.attention)))
    option = mechanism.covering_option(config)
    given = command_line_keys(cfg)
    old_names = [old for old, new in mechanism.renamed_options.items() if new == option]
    if option is None or any(f"attention.{name}" in given for name in (option, *old_names)):
        return {}
    size = max(1, int(int(cfg.data.block_size) * float(fraction)))
    sizes = mechanism.structure_options(config, size)
    for key, value in sizes.items():
        cfg.attention[key] = value
    log.info("structure at T=%s (compare.structure_fraction=%s): %s", cfg.data.block_size, fraction,
             ", ".join(f"{k}={v}" for k, v in sizes.items()))
    return sizes


def full_attention_layers(model: GPTConfig, context_len: int) -> list[str]:
    """One line per distinct reason why layers compute plain full attention at ``context_len``
    (``Attention.covers_context``), naming the layers, e.g. ``layers 0, 1: local: window_size 256 ≥
    context 128 — this is full attention``."""
    layers: dict[str, list[int]] = {}
    for i, layer in enumerate(model.layer_attention):
        reason = AttentionFactory.get_class(layer.attention_type).covers_context(layer, context_len)
        if reason:
            layers.setdefault(reason, []).append(i)
    return [f"layer{'s' * (len(idx) > 1)} {', '.join(map(str, idx))}: {reason}" for reason, idx in layers.items()]
