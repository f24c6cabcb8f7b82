"""Corpora bigger than memory: a ``hub`` dataset tokenized straight into sharded token memmaps.

The in-memory path (:func:`~attn_lm.data.sources.load_hub` + :func:`~attn_lm.data.token_store.open_or_build`)
joins each split into one Python string. With ``sharded=True`` the ``hub`` source comes here
instead, and no split is ever joined; RAM holds a few batches of rows, whatever the corpus size.

Non-streaming datasets (``streaming=False``: Arrow files on disk, memory-mapped by ``datasets``)
    Each split is encoded by ``Dataset.map(batched=True, num_proc=N, with_rank=True)``:
    ``datasets`` cuts the rows into ``N`` contiguous shards, process ``k`` encodes its shard
    :data:`ROWS_PER_BATCH` rows at a time and appends the ids to its own file ``<split>-<k>.bin``.
    ``map`` itself only returns one row of counts per batch (tokens, characters, bytes, words).
    Cost: one pass over the text, ``N`` processes; the ``datasets`` cache is not written.
Streaming datasets (``streaming=True``: an ``IterableDataset``, e.g. FineWeb from the Hub)
    Batches of :data:`ROWS_PER_BATCH` rows are encoded in order (by a pool of ``num_proc``
    processes with at most ``2 * num_proc`` batches in flight, or in this process when
    ``num_proc=1``) and appended to ``<split>-<k>.bin`` files that roll over after the batch that
    brings a file to ``shard_tokens`` tokens. Only what is read is downloaded.

Both keep the in-memory path's text exactly: one row per line (:func:`~attn_lm.data.sources.hub_row_pieces`),
``max_chars`` per split cutting the row that crosses it like :func:`~attn_lm.data.sources.join_capped`.
Every tokenizer is line-local, so a split encoded batch by batch has the ids of the joined text:
with the same tokenizer training text (``tokenizer_sample_chars`` >= the training split) and no
carved split, both paths give identical ids (the tests check it).

The tokenizer (``char``/``word``/``bpe``; ``byte`` needs none) is trained on the first
``tokenizer_sample_chars`` characters of the training split (default 10 M), read once up front.

Missing validation/test splits are carved from the end of train without reading it into memory:

* non-streaming: by rows; each missing split gets ``int(holdout_fraction * rows)`` rows of the
  (``max_chars``-capped) training split, selected as index ranges (no copy);
* streaming: by whole shards, since a stream's end is unknown until it is reached; each missing
  split gets the last ``max(1, round(holdout_fraction * shards))`` shards (the last one may be
  short), so choose ``shard_tokens`` small enough to leave several shards for training.

Cache entry ``<cache_dir>/hub-<tokenizer>-sharded-<key>/``::

    tokenizer.json                      the trained tokenizer
    train-0.bin ... train-<N-1>.bin     token ids (uint16 / uint32), one file per shard
    validation-0.bin ... test-0.bin
    meta.json                           dtype, tokenizer, corpus description, build timings and, per split,
                                        tokens / characters / bytes / words and its shard files with theirs

``key`` hashes what identifies the data without reading it: for a non-streaming dataset the
``datasets`` fingerprint of every split used (it changes with the data files), for a streaming one
``path``/``name``/``revision``/``data_files`` (plus size and mtime of local data files) and the
split names; then ``text_field``, ``max_chars``, the carving and the tokenizer settings. ``num_proc``
is not part of it: any process count reuses the entry. A build writes into a private
``.build-*`` folder, renames its files into the entry and writes ``meta.json`` last; an entry is
used only when ``meta.json`` exists and every listed file has the listed size, so an interrupted
build is simply rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..rundir import write_atomic
from .token_store import CACHE_FORMAT, TokenCache, open_cache, token_dtype
from .sources import SPLITS, check_text_column, hub_files, hub_row_pieces, join_capped, load_hub, open_hub
from .tokenizers import Tokenizer, build_tokenizer, count_units, load_tokenizer

#: Rows per encoded batch (per ``map`` call, per streamed batch): the unit of RAM use.
ROWS_PER_BATCH = 1000
#: Default roll-over size of streamed shard files (nanoGPT's FineWeb shards hold 100 M tokens).
DEFAULT_SHARD_TOKENS = 100_000_000
#: Default size of the tokenizer's training sample, in characters of the training split.
DEFAULT_TOKENIZER_SAMPLE_CHARS = 10_000_000
#: Names of the data-module options that belong to this path.
SHARDING_OPTIONS = ("sharded", "num_proc", "shard_tokens", "tokenizer_sample_chars")
UNITS = ("tokens", "characters", "bytes", "words")


@dataclass(frozen=True)
class ShardingOptions:
    """Settings of the sharded path (``LMDataModule(sharded=True, ...)``).

    ``num_proc``: processes that tokenize (and, non-streaming, shard files per split);
    ``shard_tokens``: roll-over size of streamed shard files; ``tokenizer_sample_chars``:
    characters of the training split the tokenizer is trained on.
    """

    num_proc: int = 1
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    tokenizer_sample_chars: int = DEFAULT_TOKENIZER_SAMPLE_CHARS


def check_sharding(
    source: str,
    sharded: bool | None = None,
    num_proc: int | None = None,
    shard_tokens: int | None = None,
    tokenizer_sample_chars: int | None = None,
    streaming: bool | None = None,
) -> ShardingOptions | None:
    """Validate the sharding options; ``None`` means the in-memory path (``sharded`` off).

    ``ValueError`` for a non-boolean ``sharded``, for ``sharded=True`` with a source other than
    ``hub``, for sizes that are not positive integers, for sizes given without ``sharded=True``
    and for ``shard_tokens`` without ``streaming=True`` (where it would be ignored).
    """
    given = {
        k: v
        for k, v in (("num_proc", num_proc), ("shard_tokens", shard_tokens), ("tokenizer_sample_chars", tokenizer_sample_chars))
        if v is not None
    }
    if sharded not in (None, True, False):
        raise ValueError(f"sharded must be true or false, got {sharded!r}")
    if not sharded:
        if given:
            raise ValueError(
                f"option(s) {sorted(given)} apply only to the large-corpus path; set sharded=true (source 'hub')"
            )
        return None
    if source != "hub":
        raise ValueError(
            f"sharded=true applies to source 'hub' only (datasets.load_dataset, e.g. path=parquet); "
            f"source {source!r} reads its text into memory"
        )
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if shard_tokens is not None and not streaming:
        raise ValueError(
            "shard_tokens applies to streaming=true only (a non-streaming split is cut into num_proc shards)"
        )
    return ShardingOptions(**given)


@dataclass(frozen=True)
class Entry:
    """What one cache entry is built from: the opened dataset, the tokenizer kind and size asked
    for, the sharding, :func:`~attn_lm.data.sources.load_hub`'s arguments (``opts``) and the
    dataset split each role reads (``None``: carved from train)."""

    dataset: Any
    kind: str
    vocab_size: int | None
    sharding: ShardingOptions
    opts: Mapping[str, Any]
    chosen: Mapping[str, str | None]

    @property
    def missing(self) -> list[str]:
        """The roles carved from the training split."""
        return [role for role, split in self.chosen.items() if split is None]


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def open_or_build_sharded(
    tokenizer: str,
    vocab_size: int | None,
    cache_dir: str | os.PathLike,
    sharding: ShardingOptions = ShardingOptions(),
    **hub_options: Any,
) -> tuple[TokenCache, dict[str, Any]]:
    """Open the sharded cache entry of a ``hub`` dataset, building it first if needed.

    ``hub_options`` are :func:`~attn_lm.data.sources.load_hub`'s arguments (same names, same
    defaults). Opening the dataset is ``datasets.load_dataset`` (for a non-streaming dataset that
    prepares its Arrow files once); a complete entry is then used without reading any text.
    Returns the cache (tokenizer + token arrays, :class:`~attn_lm.data.token_store.ShardedTokenArray`
    per split) and the corpus description for ``results.json``.
    """
    hub = inspect.signature(load_hub).bind(**hub_options)
    hub.apply_defaults()
    opts = dict(hub.arguments)
    if not 0.0 < opts["holdout_fraction"] < 0.5:
        raise ValueError(f"holdout_fraction must be in (0, 0.5), got {opts['holdout_fraction']}")
    dataset, chosen = open_hub(opts["path"], opts["name"], opts["data_files"], opts["revision"], opts["streaming"],
                               opts["train"], opts["validation"], opts["test"])
    entry = Entry(dataset, tokenizer, vocab_size, sharding, opts, chosen)
    directory = Path(cache_dir).expanduser() / entry_name(entry)
    if not entry_complete(directory):
        _build(directory, entry)
    cache = open_cache(directory)
    return cache, cache.meta["corpus"]


def entry_name(entry: Entry) -> str:
    """Directory name of the entry (see the module docstring for what the key covers)."""
    kind, sharding, opts, chosen, missing = entry.kind, entry.sharding, entry.opts, entry.chosen, entry.missing
    used = sorted({s for s in chosen.values() if s is not None})
    if opts["streaming"]:
        data: dict[str, Any] = {
            "path": opts["path"],
            "name": opts["name"],
            "revision": opts["revision"],
            "data_files": opts["data_files"],
            "local_files": _local_file_stats(opts["data_files"]),
            "shard_tokens": sharding.shard_tokens if missing else None,  # where the holdout is cut
        }
    else:
        data = {"fingerprints": {split: entry.dataset[split]._fingerprint for split in used}}
    material = {
        "format": CACHE_FORMAT,
        "layout": "sharded",
        "data": data,
        "splits": dict(chosen),
        "text_field": opts["text_field"],
        "max_chars": opts["max_chars"],
        "holdout_fraction": opts["holdout_fraction"] if missing else None,
        "tokenizer": kind,
        "vocab_size": entry.vocab_size,
        "tokenizer_sample_chars": None if kind == "byte" else sharding.tokenizer_sample_chars,
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"hub-{kind}-sharded-{digest}"


def entry_complete(directory: Path) -> bool:
    """True when ``meta.json`` exists and the tokenizer and every listed shard file (with the
    listed size) are there. Costs one ``stat`` per shard; reads no token."""
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (directory / "tokenizer.json").is_file():
        return False
    itemsize = np.dtype(meta["dtype"]).itemsize
    for stats in meta["splits"].values():
        for shard in stats["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def _local_file_stats(data_files: Any) -> dict[str, list[int]]:
    """Size and mtime of every local file that ``data_files`` names (globs expanded)."""
    if data_files is None:
        return {}
    if isinstance(data_files, (str, os.PathLike)):
        entries = [data_files]
    elif isinstance(data_files, Mapping):
        entries = [e for v in data_files.values() for e in ([v] if isinstance(v, (str, os.PathLike)) else v)]
    else:
        entries = list(data_files)
    stats = {}
    for entry in entries:
        for name in sorted(glob.glob(os.path.expanduser(str(entry)))):
            if os.path.isfile(name):
                st = os.stat(name)
                stats[name] = [st.st_size, st.st_mtime_ns]
    return stats


# --------------------------------------------------------------------------------------------
# Building an entry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpan:
    """Part of a non-streaming split: whole rows ``[start, stop)``, then ``tail``, the cut
    beginning of row ``stop`` where ``max_chars`` falls inside it ("" if none)."""

    split: str
    start: int
    stop: int
    tail: str = ""

    @property
    def pieces(self) -> int:
        return self.stop - self.start + (1 if self.tail else 0)


def _build(directory: Path, entry: Entry) -> None:
    """Train the tokenizer, encode every split into shard files, then write ``meta.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(directory)
    work = directory / f".build-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    work.mkdir()
    try:
        build = _build_streaming if entry.opts["streaming"] else _build_arrow
        shards, tokenizer, timing, description = build(work, entry)
        _finalize(directory, work, entry, tokenizer, shards, timing, description)
    finally:
        shutil.rmtree(work, ignore_errors=True)


#: What building the shards returns: the shards of each role, the tokenizer, the timing and each
#: role's description (the dataset split it came from, its rows and fingerprint where known).
Built = tuple[dict[str, list[dict[str, Any]]], Tokenizer, dict[str, Any], dict[str, Any]]


def _build_arrow(work: Path, entry: Entry) -> Built:
    """Non-streaming: plan row spans (cap, carve), train the tokenizer, ``map`` every span."""
    dataset, sharding, opts, missing = entry.dataset, entry.sharding, entry.opts, entry.missing
    path, text_field = opts["path"], opts["text_field"]
    spans: dict[str, RowSpan] = {}
    for role, split in entry.chosen.items():
        if split is not None:
            check_text_column(dataset[split], text_field, path)
            spans[role] = _capped_span(dataset[split], split, text_field, path, opts["max_chars"])
    if missing:
        spans.update(carve_rows(spans["train"], missing, opts["holdout_fraction"]))
    started = time.perf_counter()
    tokenizer, tokenizer_file, dtype = _train_tokenizer(
        work, entry.kind, entry.vocab_size, _span_pieces(dataset, spans["train"], text_field, path),
        sharding.tokenizer_sample_chars,
    )
    trained = time.perf_counter()
    shards: dict[str, list[dict[str, Any]]] = {}
    done: dict[RowSpan, list[dict[str, Any]]] = {}  # a split used for two roles is encoded once
    for role in SPLITS:
        span = spans[role]
        if span not in done:
            done[span] = _map_span(work, role, dataset[span.split], span, text_field, path, tokenizer, tokenizer_file, dtype, sharding.num_proc)
        shards[role] = done[span]
    timing = {"tokenizer_seconds": trained - started, "encode_seconds": time.perf_counter() - trained}
    description = {
        role: {"dataset_split": span.split, "rows": [span.start, span.stop + (1 if span.tail else 0)],
               "dataset_fingerprint": dataset[span.split]._fingerprint}
        for role, span in spans.items()
    }
    return shards, tokenizer, timing, description


def _capped_span(split_data: Any, split: str, text_field: str, path: str, max_chars: int | None) -> RowSpan:
    """The rows of ``split`` within ``max_chars`` characters (all rows when ``None``).

    With a cap, reads rows (as :func:`~attn_lm.data.sources.join_capped` would) up to the one that
    crosses it, whose beginning becomes the tail; cost proportional to the capped text only.
    """
    if max_chars is None:
        return RowSpan(split, 0, len(split_data))
    total = 0
    for row, piece in enumerate(_rows(split_data, text_field, path)):
        if total + len(piece) >= max_chars:
            if total + len(piece) == max_chars:
                return RowSpan(split, 0, row + 1)
            return RowSpan(split, 0, row, piece[: max_chars - total])
        total += len(piece)
    return RowSpan(split, 0, len(split_data))


def carve_rows(train: RowSpan, missing: Sequence[str], fraction: float) -> dict[str, RowSpan]:
    """Cut the missing evaluation splits off the end of ``train``'s rows.

    Each missing split gets ``int(fraction * pieces)`` rows (a tail piece counts as one and stays
    last); ``ValueError`` when that is zero rows or leaves no training row. Returns the new spans
    of ``"train"`` and of every missing split.
    """
    size = int(train.pieces * fraction)
    keep = train.pieces - size * len(missing)
    if size == 0 or keep < 1:
        raise ValueError(
            f"the training split ({train.pieces} rows) is too small to carve {list(missing)} ({fraction:.0%} of its "
            "rows each) from it; give the split(s) explicitly"
        )
    carved = {"train": RowSpan(train.split, train.start, train.start + keep)}
    for k, role in enumerate(missing):
        start = train.start + keep + k * size
        if k == len(missing) - 1:
            carved[role] = RowSpan(train.split, start, train.stop, train.tail)
        else:
            carved[role] = RowSpan(train.split, start, start + size)
    return carved


def _rows(split_data: Any, text_field: str, path: str) -> Iterator[str]:
    """The rows of ``text_field`` as lines, a batch at a time (only that column is decoded)."""
    for batch in split_data.select_columns([text_field]).iter(batch_size=ROWS_PER_BATCH):
        yield from hub_row_pieces(batch[text_field], text_field, path)


def _span_rows(split_data: Any, span: RowSpan) -> Any:
    """The whole rows of ``span`` as a ``Dataset`` (a contiguous range: no copy, no index map)."""
    if (span.start, span.stop) == (0, len(split_data)):
        return split_data
    return split_data.select(range(span.start, span.stop))


def _span_pieces(dataset: Any, span: RowSpan, text_field: str, path: str) -> Iterator[str]:
    """The text of ``span`` piece by piece (rows, then the tail): what a sample is cut from."""
    yield from _rows(_span_rows(dataset[span.split], span), text_field, path)
    if span.tail:
        yield span.tail


def _map_span(
    work: Path,
    role: str,
    split_data: Any,
    span: RowSpan,
    text_field: str,
    path: str,
    tokenizer: Tokenizer,
    tokenizer_file: Path,
    dtype: np.dtype,
    num_proc: int,
) -> list[dict[str, Any]]:
    """Encode the rows of ``span`` with ``Dataset.map(num_proc=...)`` into one file per process.

    Returns the shards in row order, each ``{"path", "tokens", "characters", "bytes", "words"}``;
    a tail piece is encoded here and becomes a last, small shard.
    """
    rows = _span_rows(split_data, span).select_columns([text_field])
    n_proc = max(1, min(num_proc, len(rows)))
    files = [work / f"{role}-{span.start}-{k}.bin" for k in range(n_proc)]
    shards = [{"path": f, **dict.fromkeys(UNITS, 0)} for f in files]
    if len(rows):
        for f in files:
            f.write_bytes(b"")
        # map sets TOKENIZERS_PARALLELISM=false for its workers but restores only the os.environ mapping,
        # leaving the real environment (read by HF tokenizers) off for this process: restore it here.
        with _tokenizers_parallelism_off() if n_proc > 1 else contextlib.nullcontext():
            counts = rows.map(
                encode_rows_into_shard,
                batched=True,
                batch_size=ROWS_PER_BATCH,
                with_rank=True,
                num_proc=n_proc if n_proc > 1 else None,
                remove_columns=[text_field],
                keep_in_memory=True,
                load_from_cache_file=False,
                fn_kwargs={
                    "text_field": text_field,
                    "path": path,
                    "tokenizer_file": str(tokenizer_file),
                    "shard_files": [str(f) for f in files],
                    "dtype": dtype.name,
                },
                desc=f"tokenizing {role}",
            ).to_dict()
        for k, *values in zip(counts["shard"], *(counts[u] for u in UNITS)):
            for unit, value in zip(UNITS, values):
                shards[k][unit] += value
    if span.tail:
        tail_file = work / f"{role}-{span.start}-tail.bin"
        ids, counts = encode_text(tokenizer, span.tail, dtype)
        tail_file.write_bytes(ids.tobytes())
        shards.append({"path": tail_file, **counts})
    return shards


def encode_rows_into_shard(
    batch: dict[str, list[Any]],
    rank: int | None,
    *,
    text_field: str,
    path: str,
    tokenizer_file: str,
    shard_files: Sequence[str],
    dtype: str,
) -> dict[str, list[int]]:
    """``Dataset.map`` function: encode a batch of rows and append the ids to this process's shard.

    ``rank`` (``None`` without multiprocessing) picks the file. Returns one row of counts
    (``shard``, ``tokens``, ``characters``, ``bytes``, ``words``) for the batch.
    """
    shard = rank or 0
    text = "".join(hub_row_pieces(batch[text_field], text_field, path))
    ids, counts = encode_text(cached_tokenizer(tokenizer_file), text, np.dtype(dtype))
    with open(shard_files[shard], "ab") as f:
        f.write(ids.tobytes())
    return {"shard": [shard], **{unit: [value] for unit, value in counts.items()}}


def _build_streaming(work: Path, entry: Entry) -> Built:
    """Streaming: train the tokenizer on the stream's head, stream every split into rolling shards."""
    dataset, sharding, opts, chosen = entry.dataset, entry.sharding, entry.opts, entry.chosen
    path, text_field, max_chars = opts["path"], opts["text_field"], opts["max_chars"]
    started = time.perf_counter()
    train_split = chosen["train"]
    assert train_split is not None
    tokenizer, tokenizer_file, dtype = _train_tokenizer(
        work, entry.kind, entry.vocab_size, capped_batches(dataset[train_split], text_field, path, max_chars),
        sharding.tokenizer_sample_chars,
    )
    trained = time.perf_counter()
    shards: dict[str, list[dict[str, Any]]] = {}
    done: dict[str, list[dict[str, Any]]] = {}
    for role, split in chosen.items():
        if split is None:
            continue
        if split not in done:
            writer = RollingShards(work, role, sharding.shard_tokens)
            texts = capped_batches(dataset[split], text_field, path, max_chars)
            for ids, counts in encode_in_order(texts, tokenizer, tokenizer_file, dtype, sharding.num_proc):
                writer.write(ids, counts)
            done[split] = writer.close()
        shards[role] = done[split]
    if entry.missing:
        shards.update(carve_shards(shards["train"], entry.missing, opts["holdout_fraction"]))
    timing = {"tokenizer_seconds": trained - started, "encode_seconds": time.perf_counter() - trained}
    description = {role: {"dataset_split": chosen[role] or train_split} for role in SPLITS}
    return shards, tokenizer, timing, description


def capped_batches(split_data: Any, text_field: str, path: str, max_chars: int | None) -> Iterator[str]:
    """The text of a (streamed) split, one joined batch of :data:`ROWS_PER_BATCH` rows at a time,
    cut at ``max_chars`` characters like :func:`~attn_lm.data.sources.join_capped`; reading (and
    downloading) stops at the cap."""
    check_text_column(split_data, text_field, path)
    remaining = max_chars
    for batch in split_data.iter(batch_size=ROWS_PER_BATCH):
        if text_field not in batch:
            raise ValueError(f"hub dataset {path!r} has no column text_field={text_field!r}; columns: {sorted(batch)}")
        text, _ = join_capped(hub_row_pieces(batch[text_field], text_field, path), remaining)
        if text:
            yield text
        if remaining is not None:
            remaining -= len(text)
            if remaining <= 0:
                return


class RollingShards:
    """Appends encoded batches to ``<prefix>-<k>.bin`` files in ``directory``, starting a new
    file after the batch that brings the current one to ``shard_tokens`` tokens. Keeps the
    counts of every file; holds no token after writing it."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file: Any = None

    def write(self, ids: np.ndarray, counts: Mapping[str, int]) -> None:
        if self._file is None:
            path = self.directory / f"{self.prefix}-{len(self.shards)}.bin"
            self._file = open(path, "wb")  # noqa: SIM115 - stays open across write() calls, closed on roll-over or close()
            self.shards.append({"path": path, **dict.fromkeys(UNITS, 0)})
        self._file.write(ids.tobytes())
        shard = self.shards[-1]
        for unit in UNITS:
            shard[unit] += counts[unit]
        if shard["tokens"] >= self.shard_tokens:
            self._file.close()
            self._file = None

    def close(self) -> list[dict[str, Any]]:
        """Close the open file; return every shard's ``{"path", "tokens", ...}`` in order."""
        if self._file is not None:
            self._file.close()
            self._file = None
        return self.shards


def carve_shards(train: list[dict[str, Any]], missing: Sequence[str], fraction: float) -> dict[str, list[dict[str, Any]]]:
    """Give each missing split the last ``max(1, round(fraction * shards))`` whole shards of train.

    ``ValueError`` when no training shard would be left (lower ``shard_tokens``).
    """
    size = max(1, round(fraction * len(train)))
    keep = len(train) - size * len(missing)
    if keep < 1:
        raise ValueError(
            f"the streamed training split filled {len(train)} shard(s); carving {list(missing)} takes {size} whole "
            f"shard(s) each from its end and would leave none for training: lower shard_tokens, or give the split(s) "
            "explicitly"
        )
    carved = {"train": train[:keep]}
    for k, role in enumerate(missing):
        carved[role] = train[keep + k * size : keep + (k + 1) * size]
    return carved


# --------------------------------------------------------------------------------------------
# Tokenizer and encoding
# --------------------------------------------------------------------------------------------


def _train_tokenizer(work: Path, kind: str, vocab_size: int | None, pieces: Iterable[str],
                     sample_chars: int) -> tuple[Tokenizer, Path, np.dtype]:
    """Train ``kind`` on the first ``sample_chars`` characters of ``pieces`` (``byte``: reads
    nothing) and save it into the build folder ``work``: (tokenizer, its file, the ids' dtype)."""
    if kind == "byte":
        tokenizer = build_tokenizer("byte", "")
    else:
        sample, _ = join_capped(pieces, sample_chars)
        if not sample:
            raise ValueError("source 'hub': the train split is empty (no characters read)")
        tokenizer = build_tokenizer(kind, sample, vocab_size)
    path = work / "tokenizer.json"
    tokenizer.save(path)
    return tokenizer, path, token_dtype(tokenizer.vocab_size)


def encode_text(tokenizer: Tokenizer, text: str, dtype: np.dtype) -> tuple[np.ndarray, dict[str, int]]:
    """Ids of ``text`` as ``dtype`` and its counts: ``tokens`` plus :func:`~attn_lm.data.tokenizers.count_units`."""
    ids = tokenizer.encode(text).astype(dtype)
    return ids, {"tokens": len(ids), **count_units(text)}


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int) -> Tokenizer:
    return load_tokenizer(path)


def cached_tokenizer(path: str) -> Tokenizer:
    """The tokenizer saved at ``path``, loaded once per process (and per file version)."""
    return _load_cached(path, os.stat(path).st_mtime_ns)


def _encode_in_worker(tokenizer_file: str, text: str, dtype: str) -> tuple[np.ndarray, dict[str, int]]:
    return encode_text(cached_tokenizer(tokenizer_file), text, np.dtype(dtype))


def encode_in_order(
    texts: Iterable[str], tokenizer: Tokenizer, tokenizer_file: Path, dtype: np.dtype, num_proc: int
) -> Iterator[tuple[np.ndarray, dict[str, int]]]:
    """``encode_text`` of every text, in order: here for ``num_proc=1``, else by a pool of
    ``num_proc`` processes with at most ``2 * num_proc`` texts in flight (bounded RAM: the
    stream is read only as fast as the pool encodes)."""
    if num_proc == 1:
        for text in texts:
            yield encode_text(tokenizer, text, dtype)
        return
    with _tokenizers_parallelism_off(), multiprocessing.get_context().Pool(num_proc) as pool:
        pending: deque[Any] = deque()
        for text in texts:
            pending.append(pool.apply_async(_encode_in_worker, (str(tokenizer_file), text, dtype.name)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextmanager
def _tokenizers_parallelism_off() -> Iterator[None]:
    """Forked workers must not use the HF tokenizers thread pool (what ``Dataset.map`` does too);
    on exit the previous setting is restored, in ``os.environ`` and in the process environment."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# --------------------------------------------------------------------------------------------
# Finishing an entry
# --------------------------------------------------------------------------------------------


def _finalize(directory: Path, work: Path, entry: Entry, tokenizer: Tokenizer, shards: Mapping[str, list[dict[str, Any]]],
              timing: dict[str, Any], description: dict[str, Any]) -> None:
    """Move the shard files into the entry as ``<split>-<k>.bin`` (a file shared by two splits
    keeps its first name), then the tokenizer, then write ``meta.json`` last."""
    opts, sharding, missing = entry.opts, entry.sharding, entry.missing
    dtype = token_dtype(tokenizer.vocab_size)
    names: dict[Path, str] = {}
    splits: dict[str, Any] = {}
    encoded = dict.fromkeys(UNITS, 0)  # each file once, even when two splits share it
    for role in SPLITS:
        listed = []
        for shard in shards[role]:
            if shard["tokens"] == 0:
                continue
            if shard["path"] not in names:
                names[shard["path"]] = f"{role}-{sum(1 for n in names.values() if n.startswith(role + '-'))}.bin"
                size = shard["path"].stat().st_size
                if size != shard["tokens"] * dtype.itemsize:
                    raise RuntimeError(f"{shard['path']} has {size} bytes, expected {shard['tokens']} {dtype.name} tokens")
                os.replace(shard["path"], directory / names[shard["path"]])
                for unit in UNITS:
                    encoded[unit] += int(shard[unit])
            listed.append({"file": names[shard["path"]], **{u: int(shard[u]) for u in UNITS}})
        totals = {u: sum(s[u] for s in listed) for u in UNITS}
        if totals["tokens"] == 0:
            raise ValueError(f"source 'hub': the {role} split is empty (no characters read)")
        splits[role] = {**totals, "shards": listed}
    os.replace(work / "tokenizer.json", directory / "tokenizer.json")
    encode_seconds = timing["encode_seconds"]
    corpus = {
        "source": "hub",
        "layout": "sharded",
        **{k: opts[k] for k in ("path", "name", "revision", "data_files", "text_field", "streaming", "max_chars")},
        "dataset_splits": dict(entry.chosen),
        "tokenizer_sample_chars": None if tokenizer.kind == "byte" else sharding.tokenizer_sample_chars,
        "splits": {
            role: {"files": hub_files(opts["path"], opts["name"], opts["data_files"], description[role]["dataset_split"]),
                   **description[role]}
            for role in SPLITS
        },
    }
    if missing:
        corpus.update(carved_from_train=list(missing), holdout_fraction=opts["holdout_fraction"],
                      carved_by="shards" if opts["streaming"] else "rows")
    meta = {
        "format": CACHE_FORMAT,
        "layout": "sharded",
        "dtype": dtype.name,
        "tokenizer": {**tokenizer.settings(), "requested_vocab_size": entry.vocab_size},
        "corpus": corpus,
        "build": {
            "num_proc": sharding.num_proc,
            **{k: round(v, 3) for k, v in timing.items()},
            "encoded": encoded,
            "tokens_per_s": round(encoded["tokens"] / encode_seconds, 1) if encode_seconds > 0 else None,
            "mb_per_s": round(encoded["bytes"] / 1e6 / encode_seconds, 3) if encode_seconds > 0 else None,
        },
        "splits": splits,
    }
    write_atomic(directory / "meta.json", json.dumps(meta, indent=2).encode())


def _remove_dead_builds(directory: Path) -> None:
    """Delete ``.build-<host>-<pid>-*`` folders of this host whose process no longer exists
    (left by a killed build); folders of live processes or other hosts are left alone."""
    host = socket.gethostname()
    for folder in directory.glob(f".build-{host}-*"):
        pid_text = folder.name[len(f".build-{host}-"):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass
