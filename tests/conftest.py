"""Shared fixtures: a token cache directory reused by every test in the session, and the Hydra
overrides that make any training run tiny and offline."""
from __future__ import annotations

import os

import pytest

from attn_lm.budgets import register_resolvers

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_configure(config) -> None:
    """Tests compose configs with ``hydra.compose`` and resolve them, as the entry points do after
    registering the ``${attn_lm.*}`` resolvers (importing the package registers nothing)."""
    register_resolvers()


def pytest_collection_modifyitems(config, items) -> None:
    """``gpu``-marked tests need CUDA: skipped on CPU machines (CI), run with ``pytest -m gpu``."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def token_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def smoke_overrides(token_cache) -> list[str]:
    """A tiny run on a slice of the embedded default corpus (real text, no network)."""
    return ["debug=smoke", f"data.cache_dir={token_cache}", "data.max_chars=200000", "trainer.enable_progress_bar=false"]
