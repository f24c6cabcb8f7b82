"""The package as users install it: a wheel, installed non-editable, trains from any directory with
the configs it carries (and a config directory of the user's own); importing it changes nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc


def test_installed_wheel_trains_from_another_directory(tmp_path):
    # Build from a copy of what the wheel is made of, so the build leaves nothing in the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO / "attn_lm", source / "attn_lm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source)])
    site = tmp_path / "site"
    run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), *map(str, (tmp_path / "dist").glob("*.whl"))])
    assert (site / "attn_lm" / "conf" / "train.yaml").is_file()

    # A config directory of the user's own, next to the package's (an experiment preset).
    mine = tmp_path / "my_conf" / "experiment"
    mine.mkdir(parents=True)
    (mine / "tiny.yaml").write_text("# @package _global_\ntrainer:\n  max_steps: 2\n  val_check_interval: 2\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy only, not this checkout
    run([sys.executable, "-m", "attn_lm.train", "--config-dir", str(tmp_path / "my_conf"), "debug=smoke",
         "experiment=tiny", "data.max_chars=20000", f"data.cache_dir={tmp_path / 'cache'}",
         "trainer.enable_progress_bar=false", "sample_every=0", "hydra.run.dir=run"], cwd=elsewhere, env=env)

    hydra = yaml.safe_load((elsewhere / "run" / ".hydra" / "hydra.yaml").read_text())["hydra"]
    sources = {s["provider"]: s["path"] for s in hydra["runtime"]["config_sources"]}
    assert Path(sources["main"]) == site / "attn_lm" / "conf"  # the code and configs of the wheel ran
    assert "experiment=tiny" in hydra["overrides"]["task"]
    assert (elsewhere / "run" / "results.json").is_file()


def test_importing_the_package_registers_no_resolver():
    """The ``${attn_lm.*}`` resolvers are registered by the entry points, not as an import side effect."""
    code = ("import attn_lm.train, attn_lm.evaluate, attn_lm.generate, attn_lm.compare\n"
            "from omegaconf import OmegaConf\n"
            "from attn_lm.budgets import register_resolvers\n"
            "assert not OmegaConf.has_resolver('attn_lm.budget_steps')\n"
            "register_resolvers(); register_resolvers()\n"
            "assert OmegaConf.has_resolver('attn_lm.budget_steps')\n"
            "assert OmegaConf.create({'n': '${attn_lm.div:16,4}'}).n == 4\n")
    run([sys.executable, "-c", code], cwd=REPO)
