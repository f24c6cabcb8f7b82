"""GPT and TransformerBlock: public API, shapes, init, per-layer attention, bad input."""
from __future__ import annotations

import math

import pytest
import torch

import dataclasses

from attn_lm import GPT, AttentionConfig, AttentionFactory, GPTConfig, TransformerBlock
from attn_lm.attention import reference_mode
from attn_lm.attention.config import AttentionDims, AttnLmDeprecationWarning, attention_config_from_dict
from attn_lm.config import gpt_config_from_dict


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=61, context_len=32, n_layer=2, d_model=32, n_heads=4)
    base.update(kw)
    return GPTConfig(**base)


def test_public_api_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 61, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, 61)
    logits2, loss = model(idx, torch.randint(0, 61, (3, 17)))
    torch.testing.assert_close(logits, logits2)
    # Fresh GPT-2 init predicts roughly uniformly: loss near ln(V).
    assert abs(loss.item() - math.log(61)) < 0.3


def test_ignore_index_targets_are_not_scored():
    torch.manual_seed(0)
    model = GPT(tiny())
    idx = torch.randint(0, 61, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    manual = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 61), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, manual)


def test_weight_tying_and_scaled_residual_init():
    torch.manual_seed(0)
    model = GPT(tiny(n_layer=8, d_model=64))
    assert model.lm_head.weight is model.wte.weight
    out_std = model.blocks[0].attn.out.weight.std().item()
    qkv_std = model.blocks[0].attn.qkv.weight.std().item()
    assert out_std == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert qkv_std == pytest.approx(0.02, rel=0.1)


def test_per_layer_attention_list_is_honoured():
    cfg = tiny(n_layer=3, attention=[AttentionConfig("full"), AttentionConfig("sdpa"), AttentionConfig("flash")])
    model = GPT(cfg)
    assert model.layer_types == ["full", "sdpa", "full"]  # flash is an alias of full
    # every layer is built with the model's dimensions
    assert all(b.attn.dims == cfg.attention_dims == AttentionDims(32, 4, max_seq_len=32) for b in model.blocks)


def test_a_layer_can_opt_out_of_the_models_rope():
    """position=None inherits the model's RoPE; position='none' means none, even under a RoPE model."""
    cfg = tiny(position="rope", attention=[AttentionConfig("full"), AttentionConfig("full", position="none")])
    assert [a.position for a in cfg.layer_attention] == ["rope", "none"]
    model = GPT(cfg)
    assert model.blocks[0].attn.rotary is not None and model.blocks[1].attn.rotary is None
    assert [a.position for a in tiny(position="learned").layer_attention] == ["none", "none"]


def test_saved_config_round_trips_with_every_option_written_out():
    cfg = tiny(attention=[AttentionConfig("local", options={"window_size": 5}), AttentionConfig("full")])
    saved = dataclasses.asdict(cfg)
    assert saved["attention"][0]["options"] == {"window_size": 5}
    assert saved["attention"][0]["position"] is None  # "inherit" stays inherit
    assert gpt_config_from_dict(saved).layer_attention == cfg.layer_attention


def test_a_config_saved_before_the_options_redesign_still_loads():
    """Checkpoints store dataclasses.asdict(GPTConfig): the old format had block_size, and flat
    attention records with the model dimensions, every option of every mechanism (None = unset)
    and position 'none' for "inherit"."""
    old_layer = {"attention_type": "bigbird", "d_model": 32, "n_heads": 4, "dropout": 0.0, "causal": True,
                 "bias": False, "max_seq_len": 32, "position": "none", "rope_base": 10000.0, "rope_fraction": 1.0,
                 "xpos_scale_base": 512.0, "window_size": 4, "block_size": 8, "seed": 3, "stride": None,
                 "num_features": None, "n_kv_heads": None, "num_global_tokens": None}
    old = {"vocab_size": 61, "block_size": 32, "n_layer": 2, "d_model": 32, "n_heads": 4, "dropout": 0.0,
           "bias": False, "mlp": "gelu", "mlp_ratio": 4.0, "position": "rope", "rope_base": 10000.0,
           "rope_fraction": 1.0, "xpos_scale_base": 512.0, "tie_weights": True, "attention": old_layer}
    with pytest.warns(AttnLmDeprecationWarning, match="pre-redesign format"):
        cfg = gpt_config_from_dict(old)
    assert cfg.context_len == 32
    layer = cfg.layer_attention[0]
    assert layer.position == "rope"  # the old "none" meant "inherit the model's"
    assert (layer.options.window_size, layer.options.sparse_block, layer.options.layout_seed) == (4, 8, 3)
    assert GPT(cfg).blocks[0].attn.random_layout.shape == (4, 4)


def test_options_left_unset_before_the_redesign_keep_that_versions_defaults():
    """A Python-API config saved before the redesign with options unset (None) meant the
    mechanism's defaults of that version, some of which changed (local's window 256 -> 64, mla's
    kv_rank 128 -> 64): the converted config keeps the old values, so the model computes the same
    function and its weights keep their shapes."""
    def old_layer(name):
        return {"attention_type": name, "d_model": 32, "n_heads": 4, "dropout": 0.0, "causal": True, "bias": False,
                "max_seq_len": 32, "position": "none", "window_size": None, "kv_rank": None, "rope_dim": None}

    with pytest.warns(AttnLmDeprecationWarning, match="pre-redesign format"):
        local, mla = (attention_config_from_dict(old_layer(n)) for n in ("local", "mla"))
    assert local.options == {"window_size": 256}
    assert mla.options == {"kv_rank": 128, "rope_dim": 32}
    with pytest.warns(AttnLmDeprecationWarning):
        kept = attention_config_from_dict({**old_layer("local"), "window_size": 8})
    assert kept.options == {"window_size": 8}  # a value that was set is kept as it was


def test_block_size_is_the_deprecated_name_of_context_len():
    with pytest.warns(AttnLmDeprecationWarning, match="context_len"):
        cfg = GPTConfig(block_size=48)
    assert cfg.context_len == 48


def test_model_fast_path_equals_reference_path():
    torch.manual_seed(0)
    model = GPT(tiny(attention=AttentionConfig("full"))).double()
    idx = torch.randint(0, 61, (2, 20))
    fast = model(idx)
    with reference_mode(model):
        ref = model(idx)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_transformer_block_standalone(mlp):
    block = TransformerBlock(AttentionConfig(attention_type="full"), AttentionDims(d_model=64, n_heads=4), mlp=mlp)
    x = torch.randn(2, 10, 64)
    assert block(x).shape == x.shape


def test_readme_attention_example():
    config = AttentionConfig(attention_type="flash")
    attention = AttentionFactory.create_attention(config, AttentionDims(d_model=512, n_heads=8, dropout=0.1))
    x = torch.randn(2, 128, 512)
    assert attention(x).shape == (2, 128, 512)
    assert "full" in AttentionFactory.available() and "mha" in AttentionFactory.available()


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=30, n_heads=4), "n_heads=4 does not divide d_model=30"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(mlp="relu"), "mlp='relu'"),
    (dict(position="spiral"), "position='spiral'"),
    (dict(n_layer=3, attention=[AttentionConfig()] * 2), "2 per-layer entries but n_layer=3"),
])
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT(tiny(**kwargs))


def test_bad_attention_config():
    with pytest.raises(ValueError, match="unknown attention_type 'nope'; available: .*full"):
        AttentionFactory.create_attention(AttentionConfig("nope"))
    with pytest.raises(ValueError, match="option window_size=8 does not apply to attention_type 'full'"):
        AttentionFactory.create_attention(AttentionConfig("full", options={"window_size": 8}))
    with pytest.raises(ValueError, match="does not divide d_model"):
        AttentionDims(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="needs a context"):
        AttentionFactory.create_attention(AttentionConfig("cross"), AttentionDims(16, 2))(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="takes no context"):
        AttentionFactory.create_attention(AttentionConfig("full"), AttentionDims(16, 2))(
            torch.randn(1, 4, 16), context=torch.randn(1, 4, 16))


def test_learned_positions_reject_too_long_input():
    model = GPT(tiny(context_len=8))
    with pytest.raises(ValueError, match="learned positions are defined up to 7"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_kv_cache_decoding_equals_full_forward():
    torch.manual_seed(0)
    model = GPT(tiny(attention=[AttentionConfig("full"), AttentionConfig("cross")])).double().eval()
    idx = torch.randint(0, 61, (2, 20))
    full = model(idx)
    caches = model.new_caches(2, 20)
    steps = [model(idx[:, :7], caches=caches)]
    steps += [model(idx[:, t:t + 1], caches=caches, input_pos=torch.tensor([t])) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_lightning_module_runs_compiled_model(monkeypatch):
    """compile=true wraps the model in torch.compile (eager backend here to keep CPU tests fast)."""
    import functools

    from attn_lm.lit_module import LitGPT

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    module = LitGPT(tiny(), {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95], "warmup_steps": 1,
                             "min_lr_ratio": 0.1}, compile=True)
    module.configure_model()
    assert module._compiled is not None and "_compiled" not in dict(module.named_children())
    idx = torch.randint(0, 61, (2, 8))
    _, loss = module(idx, idx)
    assert torch.isfinite(loss)
    assert not any(k.startswith("_compiled") for k in module.state_dict())
