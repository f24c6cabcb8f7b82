"""The README's Python API example runs as written."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    api = next(b for b in blocks if "AttentionFactory.create_attention" in b)
    namespace: dict = {}
    exec(compile(api, "README.md", "exec"), namespace)  # noqa: S102 - the documented example itself
    assert tuple(namespace["y"].shape) == (2, 128, 512)
    assert tuple(namespace["logits"].shape) == (2, 64, 256)
    assert namespace["block"].attn.name == "local"


def test_readme_mechanism_table_follows_the_registry():
    """Every row of the mechanism table is a registered name with its aliases and family, and the
    text states no mechanism count (it would go stale with the next registration)."""
    from attn_lm import AttentionFactory

    text = README.read_text()
    rows = re.findall(r"^\| `(\w+)`(?: \(([^)]*)\))? \| (\w+) \|", text, flags=re.M)
    assert rows and len({name for name, _, _ in rows}) == len(rows)
    for name, aliases, family in rows:
        assert family == AttentionFactory.get_class(name).family, name
        assert AttentionFactory.get_class(name).name == name, f"{name} is an alias: list it with its mechanism"
        assert sorted(re.findall(r"`(\w+)`", aliases)) == sorted(
            a for a, target in AttentionFactory.aliases().items() if target == name), name
    assert not re.findall(r"\b\d+ (?:attention )?mechanisms\b", text)
