"""Tests of the large-corpus data path (``hub`` with ``sharded=True``, :mod:`attn_lm.data.sharded`).

Offline: every dataset is a parquet / json / text file written to ``tmp_path`` and read through
``datasets``' packaged builders, with the ``datasets`` cache inside ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from attn_lm.cli import CONF_DIR
from attn_lm.data import LMDataModule, ShardedTokenArray, TokenArray
from attn_lm.data import sharded as sharded_module
from attn_lm.data.windows import EvalWindows, RandomWindows

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SPLITS = ("train", "validation", "test")
UNITS = ("tokens", "characters", "bytes", "words")
#: Rows mixing multi-line values, values ending in a newline, empty rows and non-ASCII text.
VOCAB = ["alpha", "beta", "gamma", "délta", "日本語", "x\ny", "end\n", "", "🙂"]


@pytest.fixture
def hf_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets`` offline and its cache inside tmp_path."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 50 rows, so that a few hundred rows make several batches (and shards)."""
    monkeypatch.setattr(sharded_module, "ROWS_PER_BATCH", 50)


def rows_for(split: str, n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{split} {i}: " + " ".join(rng.choice(VOCAB, size=int(rng.integers(0, 12)))) for i in range(n)]


def write_parquet(tmp_path: Path, sizes=(("train", 600), ("validation", 80), ("test", 70))) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = {}
    for seed, (split, n) in enumerate(sizes):
        files[split] = str(tmp_path / f"{split}.parquet")
        rows = rows_for(split, n, seed)
        pq.write_table(pa.table({"text": rows, "id": list(range(n))}), files[split], row_group_size=128)
    return files


def make_dm(tmp_path: Path, cache: str = "cache", **kwargs) -> LMDataModule:
    kwargs.setdefault("source", "hub")
    kwargs.setdefault("cache_dir", tmp_path / cache)
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("samples_per_epoch", 16)
    dm = LMDataModule(**kwargs)
    dm.setup()
    return dm


def ids(dm: LMDataModule, split: str) -> np.ndarray:
    return np.asarray(dm._cache.tokens(split)[:]).astype(np.int64)


def assert_same_data(a: LMDataModule, b: LMDataModule) -> None:
    """Same token ids, unit counts and tokenizer in every split."""
    assert a.vocab_size == b.vocab_size
    for split in SPLITS:
        assert np.array_equal(ids(a, split), ids(b, split)), split
        assert {u: a.split_stats[split][u] for u in UNITS} == {u: b.split_stats[split][u] for u in UNITS}, split


def random_shards(tmp_path: Path, lengths: list[int], dtype: str = "uint16") -> tuple[ShardedTokenArray, np.ndarray]:
    rng = np.random.default_rng(len(lengths))
    parts = []
    shards = []
    for k, n in enumerate(lengths):
        data = rng.integers(0, 60_000, size=n).astype(dtype)
        path = tmp_path / f"s-{k}.bin"
        path.write_bytes(data.tobytes())
        parts.append(data)
        shards.append(TokenArray(path, dtype, n))
    return ShardedTokenArray(shards), np.concatenate(parts)


# ------------------------------------------------------------------------------------------
# Same ids as the in-memory path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokenizer", "vocab_size", "num_proc", "max_chars"),
    [("byte", None, 2, None), ("char", None, 1, 4321), ("word", None, 2, 4321), ("bpe", 320, 2, None)],
)
def test_sharded_parquet_matches_in_memory(tmp_path, hf_local, small_batches, tokenizer, vocab_size, num_proc,
                                           max_chars) -> None:
    files = write_parquet(tmp_path)
    common = {"path": "parquet", "data_files": files, "tokenizer": tokenizer, "vocab_size": vocab_size,
              "max_chars": max_chars}
    memory = make_dm(tmp_path, "memory", **common)
    sharded = make_dm(tmp_path, "sharded", sharded=True, num_proc=num_proc, **common)
    assert_same_data(memory, sharded)
    shards = sharded.split_stats["train"]["shards"]
    assert len(shards) == num_proc + (1 if max_chars else 0)  # one per process (+ the row cut by max_chars)
    assert [s["file"] for s in shards] == [f"train-{k}.bin" for k in range(len(shards))]
    assert sharded.fingerprint["splits"]["train"]["dataset_split"] == "train"
    assert json.loads(json.dumps(sharded.fingerprint)) == sharded.fingerprint
    if max_chars:
        assert sharded.split_stats["train"]["characters"] == max_chars
    x, y = next(iter(sharded.val_dataloader()))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64


def test_json_and_text_builders_match_in_memory(tmp_path, hf_local, small_batches) -> None:
    files = {}
    for split, n in (("train", 300), ("validation", 60), ("test", 60)):
        files[split] = str(tmp_path / f"{split}.jsonl")
        Path(files[split]).write_text("".join(json.dumps({"story": row}) + "\n" for row in rows_for(split, n, 7)))
    common = {"path": "json", "data_files": files, "text_field": "story", "tokenizer": "char"}
    assert_same_data(make_dm(tmp_path, "m1", **common), make_dm(tmp_path, "s1", sharded=True, num_proc=2, **common))

    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"line {i} with some text\n" for i in range(400)), encoding="utf-8")
    common = {"path": "text", "data_files": {"train": str(lines), "validation": str(lines), "test": str(lines)}}
    memory = make_dm(tmp_path, "m2", **common)
    sharded = make_dm(tmp_path, "s2", sharded=True, **common)
    assert_same_data(memory, sharded)
    assert sharded.split_stats["validation"]["shards"][0]["file"] == "validation-0.bin"


@pytest.mark.parametrize("num_proc", [1, 2])
def test_streaming_matches_non_streaming(tmp_path, hf_local, small_batches, num_proc) -> None:
    files = write_parquet(tmp_path)
    common = {"path": "parquet", "data_files": files, "tokenizer": "bpe", "vocab_size": 300, "max_chars": 9000,
              "sharded": True}
    arrow = make_dm(tmp_path, "arrow", num_proc=2, **common)
    stream = make_dm(tmp_path, "stream", streaming=True, num_proc=num_proc, shard_tokens=1000, **common)
    assert_same_data(arrow, stream)
    train_shards = stream.split_stats["train"]["shards"]
    assert len(train_shards) > 2 and all(s["tokens"] >= 1000 for s in train_shards[:-1])  # rolled over
    assert sum(s["characters"] for s in train_shards) == 9000  # max_chars holds across shards
    assert stream.fingerprint["streaming"] is True


# ------------------------------------------------------------------------------------------
# Carving missing splits
# ------------------------------------------------------------------------------------------


def test_carving_takes_the_last_rows_or_shards(tmp_path, hf_local, small_batches) -> None:
    files = {"train": write_parquet(tmp_path, (("train", 600),))["train"]}
    whole = make_dm(tmp_path, "whole", path="parquet", data_files=files, validation="train", test="train",
                    sharded=True)
    carved = make_dm(tmp_path, "rows", path="parquet", data_files=files, sharded=True, num_proc=2,
                     holdout_fraction=0.1)
    fp = carved.fingerprint
    assert fp["carved_from_train"] == ["validation", "test"] and fp["carved_by"] == "rows"
    assert [fp["splits"][s]["rows"] for s in SPLITS] == [[0, 480], [480, 540], [540, 600]]
    joined = np.concatenate([ids(carved, s) for s in SPLITS])
    assert np.array_equal(joined, ids(whole, "train"))
    assert sum(carved.split_stats[s]["words"] for s in SPLITS) == whole.split_stats["train"]["words"]

    stream = make_dm(tmp_path, "shards", path="parquet", data_files=files, sharded=True, streaming=True,
                     shard_tokens=2000, holdout_fraction=0.1)
    stats = stream.split_stats
    assert stream.fingerprint["carved_by"] == "shards"
    assert len(stats["validation"]["shards"]) == len(stats["test"]["shards"]) == 1
    assert np.array_equal(np.concatenate([ids(stream, s) for s in SPLITS]), ids(whole, "train"))

    with pytest.raises(ValueError, match="would leave none for training: lower shard_tokens"):
        make_dm(tmp_path, "few", path="parquet", data_files=files, sharded=True, streaming=True,
                shard_tokens=10**9)
    (tmp_path / "tiny").mkdir()
    tiny = {"train": write_parquet(tmp_path / "tiny", (("train", 10),))["train"]}
    with pytest.raises(ValueError, match=r"too small to carve \['validation', 'test'\]"):
        make_dm(tmp_path, "tiny", path="parquet", data_files=tiny, sharded=True)


# ------------------------------------------------------------------------------------------
# Cache entries
# ------------------------------------------------------------------------------------------


def test_complete_entry_is_reused_by_any_num_proc(tmp_path, hf_local, small_batches, monkeypatch) -> None:
    files = write_parquet(tmp_path)
    first = make_dm(tmp_path, path="parquet", data_files=files, tokenizer="word", sharded=True, num_proc=2)
    entry = tmp_path / "cache" / first.fingerprint["cache"]
    assert entry.name.startswith("hub-word-sharded-")
    assert sorted(p.name for p in entry.iterdir()) == sorted(
        ["meta.json", "tokenizer.json"] + [f"{s}-{k}.bin" for s in SPLITS for k in range(2)]
    )
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["build"]["num_proc"] == 2 and meta["build"]["tokens_per_s"] > 0
    assert meta["build"]["encoded"]["tokens"] == sum(first.split_stats[s]["tokens"] for s in SPLITS)

    def forbidden(*args, **kwargs):
        raise AssertionError("cache miss: the dataset was tokenized again")

    monkeypatch.setattr(sharded_module, "_build", forbidden)
    again = make_dm(tmp_path, path="parquet", data_files=files, tokenizer="word", sharded=True, num_proc=1,
                    block_size=8)
    assert again.fingerprint == first.fingerprint
    assert np.array_equal(ids(again, "test"), ids(first, "test"))
    with pytest.raises(AssertionError, match="cache miss"):  # other settings are another entry
        make_dm(tmp_path, path="parquet", data_files=files, tokenizer="word", sharded=True, max_chars=5000)


def test_interrupted_build_is_rebuilt(tmp_path, hf_local, small_batches, monkeypatch) -> None:
    files = write_parquet(tmp_path)
    common = {"path": "parquet", "data_files": files, "sharded": True}
    calls = {"n": 0}
    real = sharded_module.encode_text

    def dies_on_the_third_call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(sharded_module, "encode_text", dies_on_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        make_dm(tmp_path, **common)
    (entry,) = (tmp_path / "cache").iterdir()
    assert not (entry / "meta.json").exists() and not list(entry.glob("*.bin"))  # nothing half-written in place
    # A killed build (dead pid) leaves its work folder; the next build removes it.
    import socket

    stale = entry / f".build-{socket.gethostname()}-999999999-deadbeef"
    stale.mkdir()
    monkeypatch.setattr(sharded_module, "encode_text", real)
    dm = make_dm(tmp_path, **common)
    assert (entry / "meta.json").is_file() and not stale.exists()
    assert not [p for p in entry.iterdir() if p.name.startswith(".")]

    # A complete-looking entry whose shard lost bytes is not used: it is rebuilt.
    shard = entry / dm.split_stats["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    assert not sharded_module.entry_complete(entry)
    rebuilt = make_dm(tmp_path, **common)
    assert sharded_module.entry_complete(entry) and len(ids(rebuilt, "train")) == dm.split_stats["train"]["tokens"]


# ------------------------------------------------------------------------------------------
# ShardedTokenArray
# ------------------------------------------------------------------------------------------


def test_sharded_token_array_indexes_like_concatenate(tmp_path) -> None:
    view, whole = random_shards(tmp_path, [7, 0, 1, 13, 5, 0, 9])
    assert len(view) == len(whole) == 35 and len(view.shards) == 5  # empty shards dropped
    rng = np.random.default_rng(0)
    cases = [slice(None), slice(0, 7), slice(6, 8), slice(5, 30), slice(-4, None), slice(30, 100), slice(9, 3),
             slice(None, None, 3), slice(33, 2, -5)]
    cases += [slice(int(a), int(b)) for a, b in rng.integers(-40, 40, size=(50, 2))]
    for case in cases:
        got = view[case]
        assert got.dtype == np.uint16 and np.array_equal(got, whole[case]), case
    assert [view[i] for i in range(-35, 35)] == [whole[i] for i in range(-35, 35)]
    assert view[np.int64(8)] == whole[8]
    with pytest.raises(IndexError):
        view[35]
    with pytest.raises(TypeError):
        view[[1, 2]]
    head = view.head(10)
    assert len(head) == 10 and np.array_equal(head[:], whole[:10]) and len(view.head(1000)) == 35
    empty = ShardedTokenArray([])
    assert len(empty) == 0 and empty[0:5].size == 0


def test_sharded_token_array_pickles_paths_only(tmp_path) -> None:
    view, whole = random_shards(tmp_path, [200_000, 150_000, 100_000])
    _ = view[199_990:200_010]  # maps the first two shards
    blob = pickle.dumps(view)
    assert len(blob) < 2000  # 900 kB of tokens
    back = pickle.loads(blob)
    assert all(s._array is None for s in back.shards)
    assert np.array_equal(back[199_990:200_010], whole[199_990:200_010])


def test_windows_read_only_their_tokens_from_memmaps(tmp_path) -> None:
    """2 GiB of (sparse) shards: every shard stays a memmap, a window reads block_size+1 tokens,
    and loading batches grows the resident memory by far less than the corpus."""
    size = 1 << 29
    shards = []
    for k in range(4):
        path = tmp_path / f"big-{k}.bin"
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: no disk used
        shards.append(TokenArray(path, "uint16", size // 2))
    view = ShardedTokenArray(shards)
    assert len(view) == 2 * size
    inside, across = view[10:43], view[size // 2 - 16 : size // 2 + 17]
    assert isinstance(inside, np.memmap) and inside.shape == (33,)  # a view: nothing copied
    assert type(across) is np.ndarray and across.shape == (33,)  # copies just the window
    assert all(isinstance(a, np.memmap) for a in view.arrays)

    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc/self/statm")
    before = rss_bytes()
    loader = torch.utils.data.DataLoader(RandomWindows(view, 32, 128, seed=0), batch_size=32)
    batches = list(loader)
    eval_set = EvalWindows(view.head(100_000), 32)
    _ = [eval_set[i] for i in range(0, len(eval_set), 97)]
    assert len(batches) == 4 and batches[0][0].shape == (32, 32)
    assert rss_bytes() - before < 100 * (1 << 20)  # corpus: 2 GiB


# ------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sharded": True, "num_proc": 0}, r"num_proc must be a positive integer, got 0"),
        ({"sharded": True, "num_proc": 1.5}, r"num_proc must be a positive integer, got 1.5"),
        ({"sharded": True, "tokenizer_sample_chars": -1}, r"tokenizer_sample_chars must be a positive integer"),
        ({"sharded": True, "streaming": True, "shard_tokens": 0}, r"shard_tokens must be a positive integer"),
        ({"sharded": True, "shard_tokens": 1000}, r"shard_tokens applies to streaming=true only"),
        ({"num_proc": 4}, r"\['num_proc'\] apply only to the large-corpus path; set sharded=true"),
        ({"sharded": "yes"}, r"sharded must be true or false, got 'yes'"),
    ],
)
def test_bad_sharding_options_fail_in_the_constructor(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        LMDataModule(source="hub", path="parquet", **options)


def test_sharded_needs_the_hub_source_and_a_valid_fraction(tmp_path, hf_local) -> None:
    with pytest.raises(ValueError, match=r"sharded=true applies to source 'hub' only"):
        LMDataModule(source="stdlib", sharded=True)
    files = write_parquet(tmp_path, (("train", 50),))
    with pytest.raises(ValueError, match=r"holdout_fraction must be in \(0, 0.5\), got 0.7"):
        make_dm(tmp_path, path="parquet", data_files=files, sharded=True, holdout_fraction=0.7)
    with pytest.raises(ValueError, match=r"no column text_field='body'"):
        make_dm(tmp_path, path="parquet", data_files=files, sharded=True, text_field="body")


# ------------------------------------------------------------------------------------------
# End to end: the Hydra entry point, and the benchmark script
# ------------------------------------------------------------------------------------------


def test_train_cli_on_a_sharded_parquet_dataset(tmp_path, hf_local, monkeypatch) -> None:
    from attn_lm.train import train

    files = write_parquet(tmp_path, (("train", 3000), ("validation", 300)))
    monkeypatch.chdir(tmp_path)
    overrides = [
        "debug=smoke", "data=hub", "data.path=parquet",
        f"data.data_files={{train:'{files['train']}',validation:'{files['validation']}'}}",
        "data.sharded=true", "data.num_proc=2", "data.tokenizer=char", f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.enable_progress_bar=false", "trainer.max_steps=4", "trainer.val_check_interval=2",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    results = train(cfg)
    assert results["status"] == "complete" and results["steps"] == 4
    dataset = results["dataset"]
    assert dataset["layout"] == "sharded" and dataset["carved_from_train"] == ["test"]
    assert len(dataset["splits"]["train"]["shards"]) == 2
    assert np.isfinite(results["val_loss"])


def test_bench_tokenize_script_prints_a_table(tmp_path, hf_local, monkeypatch, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f" = heading {i} = \n some words of line {i} .\n" for i in range(3000)))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_tokenize  # in-process: the imports are paid already

    bench_tokenize.main(["--corpus", str(corpus), "--repeat", "2", "--num-proc", "1,2", "--tokenizers", "word",
                         "--modes", "map,stream", "--workdir", str(tmp_path / "w")])
    stdout = capsys.readouterr().out
    assert "- command:" in stdout and "corpus: corpus.txt x 2 = 12,000 rows" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("|")][2:]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [(c[0], c[2]) for c in cells] == [("map", "1"), ("map", "2"), ("stream", "1"), ("stream", "2")]
    assert {c[3] for c in cells} == {"72,000"}  # 2 x 3000 x (4 + 6 words + 2 <eos>) in every setting
    assert all(float(c[7]) > 0 for c in cells)  # MB/s
