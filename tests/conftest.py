"""Shared fixtures: a token cache directory reused by every test in the session, and the Hydra
overrides that make any training run tiny and offline."""
from __future__ import annotations

import os

# Under pytest-xdist the workers share the machine's cores: each worker, and each process a test
# starts, gets its share of threads (set before torch is imported), instead of every one of them
# running as many threads as there are cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402

from attn_lm.budgets import register_resolvers  # noqa: E402

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
