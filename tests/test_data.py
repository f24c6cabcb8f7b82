"""Tests of the data layer: sources, tokenizers, cache, windows, presets and error messages.

Everything runs offline: hub-style loading goes through ``datasets``' local packaged builders
(``parquet``/``json``) on files written here, and the real corpora are read from the shared data
folder next to the checkout (``../shared/data``), skipping those tests when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from attn_lm.cli import CONF_DIR
from attn_lm.data import IGNORE_INDEX, LMDataModule, build_tokenizer, load_corpus, load_tokenizer
from attn_lm.data import token_store
from attn_lm.data.sources import carve_holdout
from attn_lm.data.tokenizers import count_units, split_at_lines
from attn_lm.data.windows import EvalWindows, RandomWindows

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESETS = CONF_DIR / "data"

SAMPLE = (
    "It was the best of times, it was the worst of times,\n"
    "it was the age of wisdom, it was the age of foolishness,\n"
    "  café naïve 日本語 — emoji 🙂 and tabs\tinside\n"
    "\n"
    "it was the epoch of belief, it was the epoch of incredulity.\n"
)


def requires_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared corpus {path} not available")
    return path


@pytest.fixture
def data_corpus_dir(tmp_path: Path) -> Path:
    """A small multi-file corpus: plain, gzip and nested files, plus a hidden file to skip."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    lines = [f"line {i}: the quick brown fox {i % 7} jumps over the lazy dog {i % 11}\n" for i in range(400)]
    (root / "a.txt").write_text("".join(lines[:200]), encoding="utf-8")
    with gzip.open(root / "nested" / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(lines[200:]))
    (root / ".hidden").write_bytes(b"\xff\xfe not text")
    return root


@pytest.fixture
def data_hf_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets`` offline and its cache inside tmp_path."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def make_dm(tmp_path: Path, **kwargs) -> LMDataModule:
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    kwargs.setdefault("block_size", 16)
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("samples_per_epoch", 16)
    dm = LMDataModule(**kwargs)
    dm.setup()
    return dm


def write_sample(tmp_path: Path) -> str:
    path = tmp_path / "sample.txt"
    path.write_text(SAMPLE * 40, encoding="utf-8")
    return str(path)


def scored_positions(dataset: EvalWindows) -> list[int]:
    """Token positions whose next-token target is scored, over the whole evaluation pass."""
    positions = []
    for k in range(len(dataset)):
        _, y = dataset[k]
        start = int(dataset.starts[k])
        positions.extend(start + 1 + j for j in torch.nonzero(y != IGNORE_INDEX).flatten().tolist())
    return positions


# ------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------


def test_text_files_folder_gz_and_carving(data_corpus_dir: Path) -> None:
    corpus = load_corpus("text_files", train=str(data_corpus_dir), holdout_fraction=0.1)
    whole = (data_corpus_dir / "a.txt").read_text() + gzip.decompress(
        (data_corpus_dir / "nested" / "b.txt.gz").read_bytes()
    ).decode()
    assert corpus.texts["train"] + corpus.texts["validation"] + corpus.texts["test"] == whole
    assert all(corpus.texts[s].endswith("\n") for s in ("train", "validation"))  # cuts at line starts
    assert 0.08 < len(corpus.texts["test"]) / len(whole) < 0.12
    assert corpus.details["carved_from_train"] == ["validation", "test"]
    assert [Path(f).name for f in corpus.files["train"]] == ["a.txt", "b.txt.gz"]  # sorted, hidden skipped


def test_text_files_explicit_splits_and_lists(tmp_path: Path, data_corpus_dir: Path) -> None:
    extra = tmp_path / "extra.txt"
    extra.write_text("one more line\n")
    corpus = load_corpus(
        "text_files",
        train=[str(data_corpus_dir / "a.txt"), str(extra)],
        validation=str(data_corpus_dir / "nested"),
        test=str(extra),
    )
    assert corpus.texts["train"].endswith("one more line\n")
    assert corpus.texts["validation"].startswith("line 200:")
    assert corpus.texts["test"] == "one more line\n"
    assert "carved_from_train" not in corpus.details


def test_carve_keeps_every_character() -> None:
    text = "".join(f"{i}\n" for i in range(1000))
    parts = carve_holdout(text, ["test"], 0.05)
    assert parts["train"] + parts["test"] == text and parts["test"].startswith("9")


def test_hub_path_with_local_parquet_and_json(tmp_path: Path, data_hf_offline: None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        split: [f"{split} document {i} with some words" for i in range(n)]
        for split, n in (("train", 300), ("validation", 40), ("test", 40))
    }
    files = {}
    for split, texts in rows.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), files[split])
    dm = make_dm(tmp_path, source="hub", path="parquet", data_files=files)
    assert dm.fingerprint["splits"]["validation"]["files"] == [files["validation"]]
    assert dm.split_stats["test"]["characters"] == sum(len(t) + 1 for t in rows["test"])  # one row per line
    assert dm.tokenizer.decode(dm._datasets["validation"].tokens[:18]) == "validation documen"

    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"story": f"story {i}: once upon a time"}) + "\n" for i in range(200)))
    corpus = load_corpus("hub", path="json", data_files=str(shard), text_field="story")
    assert corpus.details["carved_from_train"] == ["validation", "test"]
    assert corpus.texts["test"].endswith("story 199: once upon a time\n")


def test_hub_errors_name_columns_and_splits(tmp_path: Path, data_hf_offline: None) -> None:
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(50)))
    with pytest.raises(ValueError, match=r"no column text_field='text'; columns: \['body'\]"):
        load_corpus("hub", path="json", data_files=str(shard))
    with pytest.raises(ValueError, match=r"no split 'dev' .*available: \['train'\]"):
        load_corpus("hub", path="json", data_files=str(shard), text_field="body", validation="dev")


def test_stdlib_default_is_offline_deterministic_and_fingerprinted(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, max_chars=100_000)  # source="stdlib", tokenizer="byte" are the defaults
    fp = dm.fingerprint
    assert fp["source"] == "stdlib" and fp["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert json.loads(json.dumps(fp)) == fp
    files = {split: set(fp["splits"][split]["files"]) for split in ("train", "validation", "test")}
    assert not files["train"] & files["validation"] and not files["train"] & files["test"]
    assert all(f.endswith(".py") and "site-packages" not in f for f in files["train"])
    assert dm.split_stats["train"]["characters"] == 100_000
    again = load_corpus("stdlib", max_chars=100_000)
    assert again.sha256 == {split: fp["splits"][split]["sha256"] for split in again.sha256}
    assert fp["tokenizer"] == {"kind": "byte", "vocab_size": 256, "requested_vocab_size": None}


def test_tinyshakespeare_preset_nanogpt_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requires_shared("tinyshakespeare", "input.txt")
    monkeypatch.setenv("ATTN_LM_DATA_ROOT", str(SHARED_DATA))
    cfg = OmegaConf.load(PRESETS / "tinyshakespeare.yaml")
    dm = instantiate(cfg, cache_dir=str(tmp_path), samples_per_epoch=64)
    dm.setup()
    assert (dm.split_stats["train"]["tokens"], dm.split_stats["validation"]["tokens"]) == (1_003_854, 111_540)
    assert dm.vocab_size == 66 and dm.tokenizer.decode([dm.vocab_size - 1]) == "\ufffd"  # 65 chars + <unk>
    assert dm.fingerprint["splits"]["train"]["sha256"] != dm.fingerprint["splits"]["validation"]["sha256"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (64, 256)


def test_wikitext2_preset_published_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    requires_shared("wikitext-2")
    monkeypatch.setenv("ATTN_LM_DATA_ROOT", str(SHARED_DATA))
    dm = instantiate(OmegaConf.load(PRESETS / "wikitext2.yaml"), cache_dir=str(tmp_path))
    dm.setup()
    assert {s: dm.split_stats[s]["tokens"] for s in ("train", "validation", "test")} == {
        "train": 2_088_628,
        "validation": 217_646,
        "test": 245_569,
    }
    assert dm.vocab_size == 33_278
    assert dm.unit == "word" and dm.extra_metrics("test", 5.0) == {"bits_per_word": pytest.approx(5.0 / np.log(2))}
    assert dm._datasets["train"].tokens.dtype == "uint16"


def test_every_preset_is_accepted_by_the_constructor() -> None:
    names = sorted(p.stem for p in PRESETS.glob("*.yaml"))
    assert names == [
        "hub",
        "mqar",
        "stdlib",
        "text_files",
        "tinyshakespeare",
        "tinystories",
        "wikitext103_raw",
        "wikitext2",
        "wikitext2_raw",
    ]
    required = {
        "hub": {"path": "parquet"},
        "text_files": {"train": "corpus.txt"},
    }  # the presets leave these to the user
    for name in names:
        cfg = OmegaConf.load(PRESETS / f"{name}.yaml")
        assert cfg._target_ == ("attn_lm.data.MQARDataModule" if name == "mqar" else "attn_lm.data.LMDataModule")
        dm = instantiate(cfg, **required.get(name, {}))  # validates every option; reads nothing
        assert (dm.block_size, dm.batch_size) == (cfg.block_size, cfg.batch_size), name


def test_stdlib_preset_instantiates(tmp_path: Path) -> None:
    dm = instantiate(OmegaConf.load(PRESETS / "stdlib.yaml"), cache_dir=str(tmp_path), max_chars=50_000)
    dm.setup()
    assert (dm.vocab_size, dm.block_size, dm.unit) == (256, 128, "byte")


# ------------------------------------------------------------------------------------------
# Tokenizers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_tokenizer_round_trip_save_load_and_line_locality(kind: str, tmp_path: Path) -> None:
    train = SAMPLE * 20
    tok = build_tokenizer(kind, train, vocab_size=300 if kind == "bpe" else None)
    ids = tok.encode(SAMPLE)
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < tok.vocab_size
    assert tok.decode(ids) == SAMPLE
    tok.save(tmp_path / "tok.json")
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.vocab_size == tok.vocab_size and np.array_equal(again.encode(SAMPLE), ids)
    pieces = split_at_lines(SAMPLE * 3, 10)
    assert np.array_equal(np.concatenate([tok.encode(p) for p in pieces]), tok.encode(SAMPLE * 3))


def test_char_tokenizer_unknown_characters() -> None:
    tok = build_tokenizer("char", "abc\n")
    assert tok.vocab_size == 5 and tok.encode("abz").tolist() == [1, 2, 4]
    assert tok.decode(tok.encode("abz")) == "ab\ufffd"


def test_word_tokenizer_eos_unk_and_cap() -> None:
    tok = build_tokenizer("word", "the cat\nthe dog <unk>\nthe\n")
    assert tok.words[:3] == ["<eos>", "<unk>", "the"]
    ids = tok.encode("the  cat\nbird\nthe")
    assert ids.tolist() == [2, tok.words.index("cat"), 0, 1, 0, 2, 0]  # <eos> also after an unterminated line
    assert tok.decode(ids) == "the cat\n<unk>\nthe\n"
    assert tok.decode(tok.encode(SAMPLE.replace("\t", " "))).split() == [
        w if w in tok.words else "<unk>" for w in SAMPLE.split()
    ]
    capped = build_tokenizer("word", "a a a b b c\n", vocab_size=4)
    assert capped.words == ["<eos>", "<unk>", "a", "b"] and capped.encode("c").tolist() == [1, 0]
    assert len(tok.encode(SAMPLE)) == count_units(SAMPLE)["words"]


# ------------------------------------------------------------------------------------------
# Cache
# ------------------------------------------------------------------------------------------


def test_second_setup_hits_the_cache(tmp_path: Path, data_corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_dm(tmp_path, source="text_files", train=str(data_corpus_dir), tokenizer="bpe", vocab_size=300)
    entry = tmp_path / "cache" / first.fingerprint["cache"]
    assert sorted(p.name for p in entry.iterdir()) == [
        "meta.json",
        "test.bin",
        "tokenizer.json",
        "train.bin",
        "validation.bin",
    ]
    assert (entry / "train.bin").stat().st_size == 2 * first.split_stats["train"]["tokens"]  # uint16

    def forbidden(*args, **kwargs):
        raise AssertionError("cache miss: the corpus was tokenized again")

    monkeypatch.setattr(token_store, "build_tokenizer", forbidden)
    monkeypatch.setattr(token_store, "encode_to_file", forbidden)
    second = make_dm(
        tmp_path, source="text_files", train=str(data_corpus_dir), tokenizer="bpe", vocab_size=300, block_size=32
    )
    assert second.fingerprint == first.fingerprint
    second.setup()  # idempotent
    first_batch = next(iter(first.val_dataloader()))[0][0]
    assert torch.equal(next(iter(second.val_dataloader()))[0][0][:16], first_batch)


def test_token_array_pickles_without_data(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, max_chars=20_000)
    tokens = dm._datasets["train"].tokens
    _ = tokens[:5]
    assert len(pickle.dumps(tokens)) < 1000
    assert np.array_equal(pickle.loads(pickle.dumps(tokens))[:100], tokens[:100])


# ------------------------------------------------------------------------------------------
# Windows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "block", "stride"), [(101, 10, 10), (100, 10, 10), (11, 10, 10), (100, 10, 3), (57, 8, 1), (200, 16, 5)]
)
def test_eval_pass_scores_every_target_exactly_once(n: int, block: int, stride: int) -> None:
    tokens = np.arange(1000, 1000 + n)
    dataset = EvalWindows(tokens, block, stride)
    positions = scored_positions(dataset)
    assert sorted(positions) == list(range(1, n))
    for k in range(len(dataset)):
        x, y = dataset[k]
        s = int(dataset.starts[k])
        assert torch.equal(x, torch.arange(1000 + s, 1000 + s + block))
        assert torch.equal(y[y != IGNORE_INDEX], torch.arange(1000 + s + 1, 1000 + s + 1 + block)[y != IGNORE_INDEX])


@pytest.mark.parametrize("eval_stride", [None, 5])
def test_eval_loader_covers_the_split(tmp_path: Path, eval_stride: int | None) -> None:
    dm = make_dm(tmp_path, max_chars=9_000, eval_stride=eval_stride, eval_batch_size=7)  # 500-char splits
    scored = sum(int((y != IGNORE_INDEX).sum()) for _, y in dm.val_dataloader())
    assert scored == dm.split_stats["validation"]["tokens"] - 1
    capped = make_dm(tmp_path, max_chars=9_000, eval_stride=eval_stride, max_eval_tokens=300)
    assert sum(int((y != IGNORE_INDEX).sum()) for _, y in capped.test_dataloader()) == 299


def test_train_windows_are_deterministic_and_fresh_each_epoch(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, max_chars=20_000, seed=7)
    loader = dm.train_dataloader()
    epoch0 = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(epoch0, (x for x, _ in dm.train_dataloader())))
    loader.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(epoch0), torch.cat([x for x, _ in loader]))
    x, y = next(iter(loader))
    assert x.shape == (4, 16) and x.dtype == y.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])

    tokens = np.arange(500)
    a, b = RandomWindows(tokens, 16, 8, seed=1), RandomWindows(tokens, 16, 8, seed=2)
    assert [a.offset(i) for i in (5, 3, 5)] == [RandomWindows(tokens, 16, 8, seed=1).offset(i) for i in (5, 3, 5)]
    assert [a.offset(i) for i in range(8)] != [b.offset(i) for i in range(8)]
    assert all(0 <= a.offset(i) <= 500 - 17 for i in range(200))


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokenizer,vocab_size,unit", [("char", None, "char"), ("byte", None, "byte"),
                                                       ("word", None, "word"), ("bpe", 300, "token")])
def test_metrics_are_reported_in_the_tokenizers_unit_only(tmp_path: Path, tokenizer, vocab_size, unit) -> None:
    """A byte model gets no word perplexity (issue 13.2): only bits per its own unit."""
    dm = make_dm(tmp_path, source="text_files", train=[write_sample(tmp_path)], tokenizer=tokenizer,
                 vocab_size=vocab_size, holdout_fraction=0.2)
    assert dm.unit == unit
    assert dm.extra_metrics("validation", 0.5) == {f"bits_per_{unit}": pytest.approx(0.5 / np.log(2))}


# ------------------------------------------------------------------------------------------
# Bad input: one clear message naming the value and what would be valid
# ------------------------------------------------------------------------------------------


def test_bad_names_fail_in_the_constructor() -> None:
    with pytest.raises(ValueError, match=r"unknown data source 'wikitext'; valid sources: \[.*'stdlib'"):
        LMDataModule(source="wikitext")
    with pytest.raises(
        ValueError, match=r"unknown tokenizer 'sentencepiece'; valid tokenizers: \['char', 'byte', 'word', 'bpe'\]"
    ):
        LMDataModule(tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="tokenizer='bpe' needs vocab_size"):
        LMDataModule(tokenizer="bpe")
    with pytest.raises(
        ValueError, match=r"option\(s\) \['path'\] do not apply to source 'stdlib'; it accepts: \['max_chars'\]"
    ):
        LMDataModule(path="wikitext")
    with pytest.raises(ValueError, match=r"source 'text_files' needs option\(s\) \['train'\]"):
        LMDataModule(source="text_files")
    with pytest.raises(ValueError, match=r"eval_stride must be in \[1, block_size=16\]"):
        LMDataModule(block_size=16, eval_stride=32)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train path .*nope\.txt does not exist"):
        make_dm(tmp_path, source="text_files", train=str(tmp_path / "nope.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match=r"validation folder .*empty_dir contains no"):
        make_dm(tmp_path, source="text_files", train=write_sample(tmp_path), validation=str(tmp_path / "empty_dir"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"test file .*empty\.txt is empty"):
        make_dm(tmp_path, source="text_files", train=write_sample(tmp_path), test=str(tmp_path / "empty.txt"))
    with pytest.raises(
        FileNotFoundError, match=r"tinyshakespeare: neither .*input\.txt nor .*tinyshakespeare/input\.txt exists"
    ):
        make_dm(tmp_path, source="tinyshakespeare", tokenizer="char", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"download=False"):
        make_dm(tmp_path, source="tinyshakespeare", tokenizer="char", download=False)
    with pytest.raises(FileNotFoundError, match=r"wikitext2: wiki\.train\.tokens not found"):
        make_dm(tmp_path, source="wikitext2", tokenizer="word", root=str(tmp_path))


def test_non_utf8_file_names_file_and_offset(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("déjà vu\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text: byte 0xe9 at offset 1"):
        make_dm(tmp_path, source="text_files", train=str(bad))
    with gzip.open(tmp_path / "bad.txt.gz", "wb") as f:
        f.write(b"abc\x80")
    with pytest.raises(
        ValueError, match=r"bad\.txt\.gz is not UTF-8 text: byte 0x80 at offset 3 of the decompressed data"
    ):
        make_dm(tmp_path, source="text_files", train=str(tmp_path / "bad.txt.gz"))


def test_split_shorter_than_a_window(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"the validation split of source 'text_files' has \d+ tokens .* "
        r"fewer than block_size\+1 = 4097; use block_size <= \d+",
    ):
        make_dm(tmp_path, source="text_files", train=write_sample(tmp_path), block_size=4096)
    with pytest.raises(ValueError, match=r"validation split .* has 20 tokens .*raise max_eval_tokens \(=20\)"):
        make_dm(tmp_path, source="text_files", train=write_sample(tmp_path), max_eval_tokens=20, block_size=32)


def test_stdlib_splits_are_90_5_5_by_size_and_no_file_dominates() -> None:
    """Issue 13.16: one module (pydoc_data/topics.py) was 75% of the training text and validation
    was 709k characters of a 1M-character training text."""
    from attn_lm.data.sources import STDLIB_MAX_FILE_CHARS

    corpus = load_corpus("stdlib", max_chars=900_000)
    sizes = {split: len(text) for split, text in corpus.texts.items()}
    assert sizes == {"train": 900_000, "validation": 50_000, "test": 50_000}
    assert len(corpus.files["train"]) >= 900_000 // STDLIB_MAX_FILE_CHARS
    assert not set(corpus.files["train"]) & (set(corpus.files["validation"]) | set(corpus.files["test"]))
