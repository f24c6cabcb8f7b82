"""Checkpoints that stand alone: find one from a run directory, read it with a clear error when it
is not one, refuse to resume it into a model of another shape, and rebuild the trained model with
its tokenizer and data settings (no data preset, no token cache needed).

A Lightning checkpoint of this package holds ``hyper_parameters`` (``model_config``, ``optim``),
``datamodule_hyper_parameters`` (every ``LMDataModule`` argument: source, tokenizer kind,
``vocab_size``, ``block_size``, ...) and ``LMDataModule`` (the tokenizer's state, see
``LMDataModule.state_dict``).
"""
from __future__ import annotations

import dataclasses
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from .config import GPTConfig, gpt_config_from_dict
from .data.tokenizers import Tokenizer, tokenizer_from_payload
from .lit_module import LitGPT
from .rundir import resolve_checkpoint

def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors memory-mapped, so reading only its settings is cheap)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a checkpoint (not a file written by torch.save)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch.load fails in many ways on other files (KeyError, UnpicklingError, ...)
        raise ValueError(f"{path} is not a checkpoint: torch.load failed ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model_config" not in (ckpt.get("hyper_parameters") or {}):
        raise ValueError(f"{path} is not an attn_lm checkpoint (it has no hyper_parameters.model_config)")
    return ckpt


def describe_model(config: GPTConfig) -> dict[str, Any]:
    """The settings that give the weights their shapes and meaning, per key (dropout left out:
    changing it is a legitimate fine-tuning choice)."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("attention", "dropout")}
    layers = [f"{a.attention_type} position={a.position}" + "".join(f" {k}={v}" for k, v in a.option_values().items())
              for a in config.layer_attention]
    return {**fields, "attention": layers}


def check_same_model(path: Path, saved: GPTConfig, wanted: GPTConfig) -> None:
    """One line naming every setting where this run's model differs from the checkpoint's."""
    have, want = describe_model(saved), describe_model(wanted)
    keys = [k for k in want if have.get(k) != want[k]]
    if keys:
        raise ValueError(f"checkpoint {path} has {', '.join(f'{k}={have.get(k)}' for k in keys)}; "
                         f"this run asks for {', '.join(f'{k}={want[k]}' for k in keys)}")


def saved_model_config(ckpt: dict[str, Any]) -> GPTConfig:
    return gpt_config_from_dict(ckpt["hyper_parameters"]["model_config"])


@dataclass
class Loaded:
    """A trained model with what it needs to read and write text."""

    path: Path
    module: LitGPT
    tokenizer: Tokenizer
    #: The training run's ``LMDataModule`` arguments (source, tokenizer, block_size, ...).
    data: dict[str, Any]


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Loaded:
    """Rebuild the :class:`LitGPT` of a checkpoint (or run directory) with its tokenizer.

    Replaces ``LitGPT.load_from_checkpoint`` for this package's checkpoints: it also returns the
    tokenizer and data settings, and errors are one line."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    saved = ckpt.get("LMDataModule", {}).get("tokenizer")
    if saved is None:
        raise ValueError(f"{path} holds no tokenizer (it was written before checkpoints stored theirs); "
                         "re-train, or resume it once with ckpt_path= to write a new checkpoint")
    hparams = dict(ckpt["hyper_parameters"])
    module = LitGPT(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    module.to(map_location)
    return Loaded(path, module, tokenizer_from_payload(saved), dict(ckpt.get("datamodule_hyper_parameters", {})))
