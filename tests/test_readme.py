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
