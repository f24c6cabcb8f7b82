"""``python -m attn_lm.generate ckpt=<run dir or .ckpt> prompt="..."`` (console script
``attn-lm-generate``): sample text from a checkpoint, streamed to stdout as it is produced.

The tokenizer is the one saved in the checkpoint (no data preset needed); prompt characters
outside its vocabulary are an error unless ``allow_unknown=true``. Decoding uses
:class:`attn_lm.decoding.Decoder` (prefill, then one cached step per token; on GPU the step is
one compiled CUDA graph unless ``compile=false``); tokens stay on the device and are read every
``stream_every`` steps to stream the text. ``compile_prefill=true`` compiles the prefill as well
(off by default: one prompt per call, so its compilation would cost seconds to save
milliseconds; the first-token time then includes it); ``compile=false`` turns every compilation
off. stdout gets only the text (prompt, then
continuation), stderr gets warnings and the summary: first-token time, decode tokens/s and the
bytes held by the decoding caches.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional, TextIO

import torch
from omegaconf import DictConfig

from .checkpoint import load_checkpoint
from .cli import hydra_entry
from .data import Tokenizer
from .decoding import Decoder, context_window
from .devices import resolve_device
from .rundir import run_facts

log = logging.getLogger(__name__)


class TextStream:
    """Writes the text of a growing token sequence as soon as it is final.

    Every flush decodes the whole sequence and writes what is new; text ending in the Unicode
    replacement character waits for the next token, which may complete a multi-byte character
    split across byte/BPE tokens.
    """

    def __init__(self, tokenizer: Tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = 0

    def add(self, ids: list[int], final: bool = False) -> None:
        """Append ``ids`` and write the new text; ``final`` writes it even if incomplete."""
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") and not final:
            return
        self.out.write(text[self.written:])
        self.out.flush()
        self.written = len(text)


def check_known(tokenizer: Tokenizer, prompt: str, allow_unknown: bool) -> None:
    """Name the prompt's characters (words) outside the vocabulary: an error, or with
    ``allow_unknown`` a warning (they become ``<unk>``)."""
    unknown = tokenizer.unknown(prompt)
    if not unknown:
        return
    message = (f"the prompt has {len(unknown)} {tokenizer.unit}(s) that the checkpoint's {tokenizer.kind} tokenizer "
               f"does not know: {' '.join(map(repr, unknown[:20]))}")
    if not allow_unknown:
        raise ValueError(f"{message}; remove them, or set allow_unknown=true to encode them as <unk>")
    log.warning("%s; they become <unk>", message)


def encode_prompt(tokenizer: Tokenizer, prompt: str, window: int, strict: bool) -> list[int]:
    """Token ids of the prompt, cut to the last ``window`` tokens (or an error when ``strict``)."""
    ids = tokenizer.encode(prompt).tolist()
    if not ids:
        raise ValueError("the prompt encodes to no tokens; give at least one character (e.g. prompt='\\n')")
    if len(ids) > window:
        message = f"the prompt has {len(ids)} tokens but the model conditions on at most {window} (max_context)"
        if strict:
            raise ValueError(f"{message}; shorten it, or set strict_prompt=false to keep its last {window} tokens")
        log.warning("%s; keeping its last %d tokens", message, window)
        ids = ids[-window:]
    return ids


def generate(cfg: DictConfig, out: Optional[TextIO] = None) -> dict[str, Any]:
    """Generate from ``cfg`` (see ``conf/generate.yaml``), writing the text to ``out`` (default
    stdout); returns the text and the measurements."""
    device = resolve_device(cfg.device)
    loaded = load_checkpoint(cfg.ckpt, device)
    model, tokenizer = loaded.module.model, loaded.tokenizer
    max_new = int(cfg.max_new_tokens)
    check_known(tokenizer, str(cfg.prompt), bool(cfg.allow_unknown))
    prompt = encode_prompt(tokenizer, str(cfg.prompt), context_window(model, cfg.max_context), bool(cfg.strict_prompt))
    compiled = device.type == "cuda" if str(cfg.compile) == "auto" else bool(cfg.compile)
    if not isinstance(cfg.compile_prefill, bool):
        raise ValueError(f"compile_prefill must be true or false, got {cfg.compile_prefill!r}")
    compile_prefill = cfg.compile_prefill and compiled
    if cfg.compile_prefill and not compiled:
        log.warning("compile_prefill=true is ignored: compile=%s leaves decoding eager on %s, the prefill "
                    "included (set compile=true to compile both)", cfg.compile, device)
    decoder = Decoder(model, len(prompt) + max_new, bool(cfg.use_cache), cfg.max_context, compile=compiled,
                      compile_prefill=compile_prefill)
    generator = torch.Generator(device).manual_seed(int(cfg.seed))
    stream = TextStream(tokenizer, out or sys.stdout)
    stream.add(prompt)
    every = int(cfg.stream_every)
    if every < 1:
        raise ValueError(f"stream_every must be a positive number of tokens, got {every}")
    start = time.perf_counter()
    pending, reads = [], []  # device tokens not yet read; (tokens so far, time) at each read
    for i, token in enumerate(decoder.stream(torch.tensor([prompt], device=device), max_new,
                                             float(cfg.temperature), cfg.top_k, cfg.top_p, generator)):
        pending.append(token)
        if i == 0 or len(pending) == every or i + 1 == max_new:
            stream.add(torch.cat(pending, 1)[0].tolist())  # .tolist() waits for the device: the times are real
            pending = []
            reads.append((i + 1, time.perf_counter()))
    stream.add([], final=True)
    stream.out.write("\n")
    reads = reads or [(0, start)]
    # A compiled step compiles and records its CUDA graph in the first steps after the first
    # token: the rate is taken after that block, the block's time is reported as the warm-up.
    (_, t_first), (n_base, t_base), (n_last, t_last) = reads[0], reads[1 if compiled and len(reads) > 2 else 0], reads[-1]
    result = {
        "prompt_tokens": len(prompt),
        "new_tokens": max_new,
        "text": tokenizer.decode(stream.ids[len(prompt):]),
        "first_token_s": t_first - start,
        "warmup_s": t_base - t_first,
        "decode_tokens_per_s": (n_last - n_base) / (t_last - t_base) if n_last > n_base else float("nan"),
        "cache_bytes": decoder.cache_nbytes(),
        **run_facts(model.layer_types, str(device)),
        "compiled": compiled,
        "compiled_prefill": decoder.compile_prefill,
    }
    print(f"[attn_lm] {len(prompt)} prompt + {max_new} new tokens | first token {result['first_token_s'] * 1e3:.1f} ms | "
          f"decode {result['decode_tokens_per_s']:,.1f} tokens/s (after a {result['warmup_s']:.1f} s warm-up) | cache {result['cache_bytes'] / 2**20:.3f} MiB "
          f"({result['cache_bytes']:,} bytes, use_cache={bool(cfg.use_cache)}) | {device}, "
          f"{'compiled step' if compiled else 'eager step'}, "
          f"{'compiled prefill' if decoder.compile_prefill else 'eager prefill'}", file=sys.stderr)
    return result


main = hydra_entry("generate", generate)


if __name__ == "__main__":
    main()
