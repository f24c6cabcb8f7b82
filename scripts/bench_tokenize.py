"""Tokenization throughput of the large-corpus data path (``hub`` + ``sharded=True``).

Builds a local parquet dataset from a text corpus (default: WikiText-2 train under
``$ATTN_LM_DATA_ROOT``), repeated ``--repeat`` times to get tens of MB; one line per row, like a Hub text dataset
and tokenizes it through :func:`attn_lm.data.sharded.open_or_build_sharded` for every tokenizer,
mode and process count asked for, each time into a fresh cache entry:

``map``     non-streaming ``Dataset.map(batched=True, num_proc=N)``, one shard file per process;
``stream``  ``streaming=True``: batches read in order, encoded by a pool of N processes.

Validation and test are the same split as train, so they share its shards and only train is
encoded. The timed part is the encoding (reading rows, tokenizing, writing the shard files; for
``map`` including the start of its worker processes), as recorded in the entry's ``meta.json``;
training the tokenizer (on ``--sample-chars`` characters) and converting the parquet file to
Arrow (once, first run) are not. MB = UTF-8 megabytes (10^6) of text. Prints a markdown table.

Note: with ``num_proc=1`` the BPE tokenizer (HF ``tokenizers``) already uses its own thread pool;
with more processes ``datasets`` turns that off (``TOKENIZERS_PARALLELISM=false``), as we do for
the streaming pool.

    python scripts/bench_tokenize.py --repeat 3 --num-proc 1,2,4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import (  # also puts the repo on sys.path
    MarkdownTable,
    csv_ints,
    csv_strs,
    header,
)

#: Default corpus: WikiText-2 train under $ATTN_LM_DATA_ROOT (the data presets' root variable).
WIKITEXT2_TRAIN = ("wikitext-2/wiki.train.tokens", "wikitext-2/wiki.train.tokens.gz")
ROW_GROUP_ROWS = 10_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", help="UTF-8 text file (.gz ok); default: $ATTN_LM_DATA_ROOT/wikitext-2/wiki.train.tokens")
    p.add_argument("--repeat", type=int, default=3, help="concatenate the corpus this many times")
    p.add_argument("--num-proc", type=csv_ints, default=csv_ints("1,2,4"), help="process counts, e.g. 1,2,4")
    p.add_argument("--tokenizers", type=csv_strs, default=csv_strs("byte,char,word,bpe"))
    p.add_argument("--modes", type=csv_strs, default=csv_strs("map,stream"), help="map and/or stream")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    p.add_argument("--sample-chars", type=int, default=2_000_000, help="tokenizer training sample (characters)")
    p.add_argument("--workdir", help="where the parquet file, the datasets cache and the entries go (default: a temp dir)")
    p.add_argument("--out", help="also append one JSON object per row to this file")
    args = p.parse_args(argv)
    bad = [m for m in args.modes if m not in ("map", "stream")]
    if bad or args.repeat < 1 or min(args.num_proc, default=0) < 1:
        p.error(f"--modes takes map,stream (got {bad}); --repeat and --num-proc must be >= 1")
    return args


def find_corpus(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    root = os.environ.get("ATTN_LM_DATA_ROOT")
    found = next((Path(root) / name for name in WIKITEXT2_TRAIN if root and (Path(root) / name).is_file()), None)
    if found is None:
        raise SystemExit(f"no --corpus given and no {WIKITEXT2_TRAIN[0]}(.gz) under ATTN_LM_DATA_ROOT={root!r}; "
                         "pass --corpus FILE (any UTF-8 text, .gz ok) or set ATTN_LM_DATA_ROOT")
    return found


def write_parquet(corpus: Path, repeat: int, dest: Path) -> tuple[int, int]:
    """One row per line of ``corpus``, ``repeat`` times; returns (rows, UTF-8 bytes incl. newlines)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attn_lm.data.sources import read_text_file

    lines = read_text_file(corpus).splitlines()
    table = pa.table({"text": lines})
    with pq.ParquetWriter(dest, table.schema) as writer:
        for _ in range(repeat):
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    size = sum(len(line.encode("utf-8")) + 1 for line in lines)
    return len(lines) * repeat, size * repeat


def main(argv: list[str] | None = None) -> None:
    """Run the sweep of ``argv`` (default: the command line) and print its table."""
    args = parse_args(argv)
    corpus = find_corpus(args.corpus)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_tokenize_"))
    workdir.mkdir(parents=True, exist_ok=True)
    import datasets
    import datasets.config
    import tokenizers

    from attn_lm.data.sharded import ShardingOptions, open_or_build_sharded

    datasets.config.HF_DATASETS_CACHE = workdir / "hf_cache"  # the parquet -> Arrow conversion goes there
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    parquet = workdir / "corpus.parquet"
    rows, size = write_parquet(corpus, args.repeat, parquet)
    print("## Tokenization throughput (sharded hub path)\n")
    print(header(torch.device("cpu"), [
        (f"{os.cpu_count()} CPU cores, {platform.platform()}; datasets {datasets.__version__}, "
         f"tokenizers {tokenizers.__version__}"),
        (f"corpus: {corpus.name} x {args.repeat} = {rows:,} rows, {size / 1e6:.1f} MB; "
         f"tokenizer sample {args.sample_chars:,} chars; BPE vocab {args.vocab_size}"),
    ]))
    print()
    table = MarkdownTable(["mode", "tokenizer", "num_proc", "tokens", "MB", "encode s", "tokens/s", "MB/s",
                           "speed-up", "train tok s"], stream=sys.stdout)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - closed in the finally below
    try:
        for mode in args.modes:
            for kind in args.tokenizers:
                first = None
                for num_proc in args.num_proc:
                    cache_dir = workdir / f"cache-{mode}-{kind}-{num_proc}"
                    started = time.perf_counter()
                    cache, _ = open_or_build_sharded(
                        kind, args.vocab_size if kind == "bpe" else None, cache_dir,
                        ShardingOptions(num_proc=num_proc, tokenizer_sample_chars=args.sample_chars),
                        path="parquet", data_files={"train": str(parquet)}, validation="train", test="train",
                        streaming=mode == "stream",
                    )
                    wall = time.perf_counter() - started
                    build = cache.meta["build"]
                    seconds = build["encode_seconds"]
                    first = first or build["tokens_per_s"]
                    row = {
                        "mode": mode, "tokenizer": kind, "num_proc": num_proc,
                        "tokens": f"{build['encoded']['tokens']:,}", "MB": build["encoded"]["bytes"] / 1e6,
                        "encode s": seconds, "tokens/s": f"{build['tokens_per_s']:,.0f}", "MB/s": build["mb_per_s"],
                        "speed-up": build["tokens_per_s"] / first, "train tok s": build["tokenizer_seconds"],
                    }
                    table.row(row)
                    if out is not None:
                        out.write(json.dumps({**row, "wall_s": wall, "build": build}) + "\n")
                        out.flush()
                    shutil.rmtree(cache_dir, ignore_errors=True)
    finally:
        if bars:
            datasets.enable_progress_bars()
        if out is not None:
            out.close()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
