"""Tokenize a corpus once; afterwards, memory-map the ids.

Layout of one cache entry, ``<cache_dir>/<source>-<tokenizer>-<key>/``::

    tokenizer.json              the trained tokenizer (see attn_lm.data.tokenizers)
    train.bin validation.bin test.bin
                                raw token ids, uint16 when the vocabulary fits, else uint32
    meta.json                   dtype, per-split token / character / byte / word counts

``key`` hashes the SHA-256 of each split's text and the *requested* tokenizer settings, so the
same content tokenized the same way hits the cache wherever the files live, and any change of
content or tokenizer gets a fresh entry. (The training window length is not part of it: a new
``block_size`` reuses the entry.)

Every file is written to a temporary name and renamed into place, and ``meta.json`` is written
last, so an entry with a ``meta.json`` is complete, an interrupted build is simply rebuilt, and
processes racing to build the same entry write identical files.

The ``hub`` source with ``sharded=True`` (:mod:`attn_lm.data.sharded`) writes a second layout
into the same cache folder, ``hub-<tokenizer>-sharded-<key>/``: ``<split>-<k>.bin`` shard files
listed (with their counts) in ``meta.json``, read through :class:`ShardedTokenArray`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..rundir import atomic_writer, write_atomic
from .sources import SPLITS, Corpus
from .tokenizers import Tokenizer, build_tokenizer, count_units, load_tokenizer, split_at_lines

#: Bump when the layout or the tokenization changes, to invalidate old entries.
CACHE_FORMAT = 1
#: The corpus is encoded in pieces of about this many characters (cut at line ends).
ENCODE_CHUNK_CHARS = 1 << 22


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass
class TokenArray:
    """A split's token ids on disk, memory-mapped on first access.

    Behaves like a read-only 1-D array for ``len`` and slicing. Pickling (e.g. to DataLoader
    worker processes) sends only the path, never the data.
    """

    path: Path
    dtype: str
    length: int
    _array: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.length,))
        return self._array

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Union[int, slice]) -> Any:
        return self.array[index]

    def head(self, n: int) -> "TokenArray":
        """The first ``n`` tokens (all of them if there are fewer)."""
        return TokenArray(self.path, self.dtype, min(n, self.length))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "length": self.length, "_array": None}


class ShardedTokenArray:
    """Several shard files (:class:`TokenArray` s) read as one 1-D token sequence.

    Behaves like :class:`TokenArray` for ``len``, integer indexing and slicing, so the windows
    of :mod:`attn_lm.data.windows` and the data module use it unchanged. A slice inside one shard
    is a view of that shard's memmap (nothing is read until used); a slice across a boundary
    copies just the requested tokens (``np.concatenate`` of the pieces). Locating the shard is a
    binary search over the ``n_shards + 1`` offsets. Each shard is memory-mapped on first access
    and the corpus is never read as a whole. Pickling sends the shards' paths and lengths only.
    Empty shards are dropped (a zero-length file cannot be memory-mapped).
    """

    def __init__(self, shards: Sequence[TokenArray]) -> None:
        self.shards = [s for s in shards if len(s) > 0]
        dtypes = {s.dtype for s in self.shards}
        if len(dtypes) > 1:
            raise ValueError(f"shards of one token array must share a dtype, got {sorted(dtypes)}")
        self.dtype = dtypes.pop() if dtypes else "uint16"
        #: ``offsets[k]`` = index of the first token of shard ``k``; ``offsets[-1]`` = length.
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards], dtype=np.int64)

    @property
    def arrays(self) -> list[np.ndarray]:
        """The shards' memmaps (opened on first access)."""
        return [s.array for s in self.shards]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: Union[int, slice]) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self._span(start, stop) if step == 1 else self._gather(start, stop, step)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {index} out of range for {len(self)} tokens")
            k = int(np.searchsorted(self.offsets, i, side="right")) - 1
            return self.shards[k].array[i - int(self.offsets[k])]
        raise TypeError(f"ShardedTokenArray indices are integers or slices, not {type(index).__name__}")

    def _span(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (``0 <= start, stop <= len``): a view inside one shard, else a copy."""
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        last = int(np.searchsorted(self.offsets, stop, side="left")) - 1
        pieces = [
            self.shards[k].array[max(start - int(self.offsets[k]), 0) : stop - int(self.offsets[k])]
            for k in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _gather(self, start: int, stop: int, step: int) -> np.ndarray:
        """Strided slices: read the covered span once and stride it (rare; only small ones are sensible)."""
        idx = np.arange(start, stop, step, dtype=np.int64)
        if len(idx) == 0:
            return np.zeros(0, dtype=self.dtype)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return np.asarray(self._span(lo, hi))[idx - lo]

    def head(self, n: int) -> "ShardedTokenArray":
        """The first ``n`` tokens (all of them if there are fewer), as a view of the same files."""
        kept: list[TokenArray] = []
        for shard, offset in zip(self.shards, self.offsets):
            if offset >= n:
                break
            kept.append(shard.head(n - int(offset)))
        return ShardedTokenArray(kept)

    def __repr__(self) -> str:
        return f"ShardedTokenArray({len(self.shards)} shards, {len(self)} tokens, {self.dtype})"


@dataclass
class TokenCache:
    """A complete cache entry: the tokenizer and the token ids of the three splits."""

    directory: Path
    tokenizer: Tokenizer
    meta: dict[str, Any]

    @property
    def split_stats(self) -> dict[str, dict[str, int]]:
        """Per split: ``tokens``, ``characters``, ``bytes``, ``words`` (see ``count_units``)."""
        return self.meta["splits"]

    def tokens(self, split: str) -> Union[TokenArray, "ShardedTokenArray"]:
        """Memory-mapped ids of ``split``: one file, or its shard files (sharded layout)."""
        stats = self.split_stats[split]
        if "shards" in stats:
            dtype = self.meta["dtype"]
            return ShardedTokenArray([TokenArray(self.directory / s["file"], dtype, s["tokens"]) for s in stats["shards"]])
        return TokenArray(self.directory / f"{split}.bin", self.meta["dtype"], stats["tokens"])


def cache_key(corpus: Corpus, tokenizer: str, vocab_size: Optional[int]) -> str:
    """Directory name of the entry for ``corpus`` tokenized by ``tokenizer``."""
    material = {"format": CACHE_FORMAT, "sha256": corpus.sha256, "tokenizer": tokenizer, "vocab_size": vocab_size}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]
    return f"{corpus.source}-{tokenizer}-{digest}"


def open_or_build(
    corpus: Corpus, tokenizer: str, vocab_size: Optional[int], cache_dir: Union[str, os.PathLike]
) -> TokenCache:
    """Return the cache entry of ``corpus`` + tokenizer, building it first if it does not exist."""
    directory = Path(cache_dir).expanduser() / cache_key(corpus, tokenizer, vocab_size)
    if not (directory / "meta.json").is_file():
        build(corpus, tokenizer, vocab_size, directory)
    return open_cache(directory)


def open_cache(directory: Path) -> TokenCache:
    """Open a complete entry (one with a ``meta.json``) without reading the token ids."""
    meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    return TokenCache(directory, load_tokenizer(directory / "tokenizer.json"), meta)


def build(corpus: Corpus, kind: str, vocab_size: Optional[int], directory: Path) -> None:
    """Train the tokenizer on the training text, encode every split, write the entry."""
    tokenizer = build_tokenizer(kind, corpus.texts["train"], vocab_size)
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {}
    for split in SPLITS:
        text = corpus.texts[split]
        n_tokens = encode_to_file(tokenizer, text, directory / f"{split}.bin", dtype)
        splits[split] = {"tokens": n_tokens, **count_units(text)}
    tokenizer.save(directory / "tokenizer.json")
    meta = {
        "format": CACHE_FORMAT,
        "dtype": dtype.name,
        "tokenizer": {**tokenizer.settings(), "requested_vocab_size": vocab_size},
        "sha256": corpus.sha256,
        "splits": splits,
    }
    write_atomic(directory / "meta.json", json.dumps(meta, indent=2).encode())


def encode_to_file(tokenizer: Tokenizer, text: str, path: Path, dtype: np.dtype) -> int:
    """Encode ``text`` chunk by chunk into a raw ``dtype`` file; return the number of tokens."""
    count = 0
    with atomic_writer(path) as f:
        for chunk in split_at_lines(text, ENCODE_CHUNK_CHARS):
            ids = tokenizer.encode(chunk)
            f.write(ids.astype(dtype).tobytes())
            count += len(ids)
    return count
