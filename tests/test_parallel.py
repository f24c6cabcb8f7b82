"""Data-parallel runs through Lightning's strategies, on CPU (gloo): one Hydra run directory and
one results.json however many ranks; the FSDP preset builds its strategy."""
from __future__ import annotations

import json

from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from attn_lm.model import TransformerBlock

from .test_train import compose_cfg, run_cli


def test_ddp_two_ranks_share_one_run_directory(tmp_path, smoke_overrides):
    run = tmp_path / "run"
    proc = run_cli([*smoke_overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                    "trainer.precision=32-true", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.stdout.count("val loss") == 1 and proc.stdout.count("run directory:") == 1  # rank 0 reports once
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "complete" and results["steps"] == 6
    assert results["config"]["trainer"]["strategy"] == "ddp"
    assert not (tmp_path / "outputs").exists()  # no per-rank Hydra output directories
    assert len(list(tmp_path.rglob("results.json"))) == 1


def test_fsdp_preset_wraps_every_transformer_block():
    cfg = compose_cfg(["trainer=fsdp"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert set(policy._module_classes) == {TransformerBlock}
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert cfg.trainer.precision == "bf16-mixed"


def test_optimizer_groups_survive_wrapper_names():
    """Decay groups are decided by name on the unwrapped model, so wrapped names (FSDP,
    activation checkpointing, torch.compile) and flattened shapes still land in the right group."""
    from attn_lm.lit_module import LitGPT
    from attn_lm.parallel import unwrapped_name

    cfg = compose_cfg(["debug=smoke"])
    from attn_lm.from_hydra import gpt_config

    module = LitGPT(gpt_config(cfg, vocab_size=64), dict(cfg.optim))
    assert unwrapped_name("blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.qkv.weight") \
        == "blocks.0.attn.qkv.weight"
    names = dict(module.model.named_parameters())
    decay = {n for n in names if module._decays[unwrapped_name(n)]}
    assert decay == {n for n, p in names.items() if p.dim() >= 2} and decay and len(decay) < len(names)


def test_fsdp_preset_keeps_original_parameter_names():
    strategy = instantiate(compose_cfg(["trainer=fsdp"]).trainer.strategy)
    assert strategy.kwargs["use_orig_params"] is True
