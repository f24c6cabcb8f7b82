"""Weights out and in: ``python -m attn_lm.export <checkpoint or run dir> <out dir>`` (console
script ``attn-lm-export``) writes ``model.safetensors``, ``config.json`` and ``tokenizer.json``;
:func:`from_pretrained` loads such a directory (or a checkpoint, or a run directory) in one call;
:func:`init_weights` starts a training run from those weights (``init_from=``) with a new
optimizer and schedule.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_model, save_model

from .checkpoint import check_same_model, load_checkpoint
from .cli import one_line_errors
from .config import gpt_config_from_dict
from .data.tokenizers import Tokenizer, check_same_tokenizer, load_tokenizer
from .model import GPT

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.json"


def export(source: Union[str, Path], out: Union[str, Path]) -> Path:
    """Write the model of checkpoint (or run directory) ``source`` into directory ``out``: weights
    as safetensors (tied embedding/head stored once), the model config and the training data
    settings as JSON, the tokenizer as JSON."""
    loaded = load_checkpoint(source)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_model(loaded.module.model, str(out / WEIGHTS))
    config = {"model_config": dataclasses.asdict(loaded.module.model_config), "data": loaded.data,
              "source": str(loaded.path)}
    (out / CONFIG).write_text(json.dumps(config, indent=2, default=str))
    loaded.tokenizer.save(out / TOKENIZER)
    return out


def from_pretrained(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> tuple[GPT, Tokenizer]:
    """The trained :class:`GPT` (in eval mode) and its tokenizer, from an export directory, a
    checkpoint file or a run directory."""
    path = Path(path).expanduser()
    if not (path / CONFIG).is_file():
        loaded = load_checkpoint(path, device)
        return loaded.module.model.eval(), loaded.tokenizer
    model = GPT(gpt_config_from_dict(json.loads((path / CONFIG).read_text())["model_config"]))
    load_model(model, str(path / WEIGHTS), device=str(device))
    return model.eval(), load_tokenizer(path / TOKENIZER)


def init_weights(model: GPT, source: Union[str, Path], data_tokenizer: Tokenizer) -> None:
    """Copy the weights of ``source`` (export, checkpoint or run directory) into ``model``: the
    model settings and the tokenizer must be the same (one line naming both when not)."""
    pretrained, tokenizer = from_pretrained(source)
    check_same_model(Path(source), pretrained.config, model.config)
    check_same_tokenizer(tokenizer.payload(), data_tokenizer, f"init_from={source}", "the data")
    model.load_state_dict(pretrained.state_dict())


@one_line_errors
def run(args: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a checkpoint file or a run directory (its checkpoints/last.ckpt)")
    parser.add_argument("out", help="directory to write model.safetensors, config.json and tokenizer.json into")
    options = parser.parse_args(args)
    out = export(options.source, options.out)
    print(f"exported {options.source} to {out} ({WEIGHTS}, {CONFIG}, {TOKENIZER})")
    return out


def main() -> None:
    run()


if __name__ == "__main__":
    main()
