"""The Hydra ``attention`` config group, generated from the registry.

``conf/attention/<name>.yaml`` names one registered mechanism (or alias) and nothing else: its
options take the defaults of its ``Options`` dataclass unless overridden (``attention=local
attention.window_size=32``). Other files of the group are hand-written presets (a mechanism
with other option values, ``gated_deltanet.yaml``). ``conf/attention_options/unset.yaml`` lists every key of the
``attention`` node as ``null`` (= unset) and is composed under ``attention`` before the selected
file, so that any option is a plain override: one the selected mechanism does not take reaches
its own check (``option window_size=64 does not apply to attention_type 'full'``) instead of
Hydra's "use +attention.window_size". Old option names are listed too, so their overrides still
reach the deprecation message.

Write the files after adding a mechanism or an option (``tests/test_attention_registry.py``
fails until they match)::

    python -m attn_lm.attention.conf            # into attn_lm.cli.CONF_DIR (the package's conf/)
"""
from __future__ import annotations

import sys
from pathlib import Path

from .config import COMMON_FIELDS
from .factory import AttentionFactory, all_option_names

HEADER = "# Generated from the attention registry by `python -m attn_lm.attention.conf`; do not edit.\n"


def group_files() -> dict[str, str]:
    """``{path relative to the config directory: text}`` of the generated files."""
    files = {}
    for name in AttentionFactory.names():
        cls = AttentionFactory.get_class(name)
        options = ", ".join(f.name for f in cls.Options.__dataclass_fields__.values()) or "none"
        files[f"attention/{name}.yaml"] = (
            f"{HEADER}# {cls.description}\n# Options (defaults on {cls.__name__}.Options): {options}\n"
            f"attention_type: {name}\n")
    for alias, name in AttentionFactory.aliases().items():
        files[f"attention/{alias}.yaml"] = f"{HEADER}# Alias of {name}.\nattention_type: {alias}\n"
    keys = [k for k in COMMON_FIELDS if k != "attention_type"] + all_option_names()
    files["attention_options/unset.yaml"] = (
        f"{HEADER}# Every key of the attention node, unset (null = the default: the mechanism's options, causal\n"
        "# attention, the model's positions); composed under `attention` before conf/attention/<name>.yaml so that\n"
        "# `attention.<key>=value` is a plain override for every key (see attn_lm/attention/conf.py).\n"
        + "".join(f"{key}: null\n" for key in keys))
    return files


def stale_files(conf_dir: Path) -> list[str]:
    """Generated files that are missing or differ, and group files no mechanism generates."""
    files = group_files()
    stale = [path for path, text in files.items()
             if not (conf_dir / path).is_file() or (conf_dir / path).read_text() != text]
    # A generated file no mechanism generates any more; hand-written presets (a mechanism with other
    # option values, e.g. gated_deltanet.yaml) are not generated and stay.
    extra = [f"attention/{p.name}" for p in (conf_dir / "attention").glob("*.yaml")
             if f"attention/{p.name}" not in files and p.read_text().startswith(HEADER)]
    return sorted(stale + extra)


def write(conf_dir: Path) -> list[str]:
    """Write the generated files into ``conf_dir`` and remove group files of no mechanism."""
    changed = stale_files(conf_dir)
    files = group_files()
    for path in changed:
        if path in files:
            (conf_dir / path).parent.mkdir(parents=True, exist_ok=True)
            (conf_dir / path).write_text(files[path])
        else:
            (conf_dir / path).unlink()
    return changed


def main(argv: list[str]) -> None:
    from ..cli import CONF_DIR

    conf_dir = Path(argv[0]) if argv else CONF_DIR
    changed = write(conf_dir)
    print("\n".join(f"wrote {conf_dir / p}" for p in changed) or f"{conf_dir}: up to date")


if __name__ == "__main__":
    main(sys.argv[1:])
