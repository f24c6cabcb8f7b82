"""``LMDataModule``: the one object the training script needs for data.

Pipeline, run by :meth:`LMDataModule.prepare_data` / :meth:`LMDataModule.setup`::

    load_corpus(source, ...)  ->  Corpus (text of train / validation / test + fingerprint)
    open_or_build(corpus, tokenizer, vocab_size, cache_dir)
                              ->  TokenCache (tokenizer + memory-mapped ids; built once)
    (hub with sharded=true: open_or_build_sharded(...) instead; no split is ever joined in
     RAM, the ids live in shard files read through ShardedTokenArray, see attn_lm.data.sharded)
    RandomWindows / EvalWindows ->  DataLoaders of (x, y) int64 [B, T] batches

Hydra instantiates it from ``conf/data/<preset>.yaml`` (``_target_: attn_lm.data.LMDataModule``);
every key of that file is a constructor keyword. Configuration mistakes (unknown names, options
that do not apply to the source, bad sizes) raise in the constructor; data mistakes (missing or
empty files, non-UTF-8 text, a split shorter than one window) raise in ``prepare_data``/``setup``.
Both raise ``ValueError``/``FileNotFoundError`` with the offending value and the valid choices,
before any training step.

After ``setup()`` the model and the logger read:

* ``vocab_size``, ``tokenizer``;
* ``fingerprint``: JSON-serialisable description of the exact data (source, files, SHA-256 of
  every split, tokenizer, token counts), meant for ``results.json``;
* ``split_stats[split]``: ``tokens``, ``characters``, ``bytes``, ``words`` of each split;
* ``unit`` (what one token is: byte, char, word, or token for BPE) and
  ``extra_metrics(split, mean_loss)``: the mean next-token loss in bits per that unit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader

from .token_store import ShardedTokenArray, TokenArray, TokenCache, open_or_build
from .sharded import check_sharding, open_or_build_sharded
from .sources import SPLITS, PathSpec, check_source_options, load_corpus
from .tokenizers import Tokenizer, check_same_tokenizer, check_tokenizer_options
from .windows import EvalWindows, RandomWindows, training_loader

LN2 = math.log(2.0)


class LMDataModule(L.LightningDataModule):
    """Language-modelling data: a corpus, a tokenizer and windows of ``block_size`` tokens.

    General arguments:
        source: ``"stdlib"`` (default, embedded, offline), ``"text_files"``, ``"hub"``,
            ``"tinyshakespeare"`` or ``"wikitext2"`` (see :mod:`attn_lm.data.sources`).
        tokenizer: ``"char"``, ``"byte"``, ``"word"`` or ``"bpe"`` (see :mod:`attn_lm.data.tokenizers`).
        vocab_size: required for ``bpe``; optional cap for ``word`` (rarer words become ``<unk>``).
        block_size: context length ``T`` of every window.
        batch_size / eval_batch_size: windows per training / evaluation batch
            (``eval_batch_size`` defaults to ``batch_size``).
        samples_per_epoch: random training windows per epoch (a multiple of ``batch_size`` is
            tidiest: the last incomplete batch is dropped so every batch has the same shape).
        eval_stride: ``None`` = disjoint evaluation windows; ``s < block_size`` = sliding windows
            scoring the last ``s`` targets of each.
        max_eval_tokens: evaluate on only the first this-many tokens of validation/test (smoke
            runs); ``None`` = whole split.
        seed: seed of the training windows.
        num_workers: DataLoader worker processes.
        cache_dir: where token caches (and downloads) go; ``~`` is expanded.
        download: let ``tinyshakespeare`` / ``wikitext2`` fetch their corpus when no local copy
            is found (``hub`` datasets are fetched by ``datasets``; set ``HF_DATASETS_OFFLINE=1``
            to forbid that).

    Source options (``None`` = not set; setting one the source does not use is an error):
        root: local folder of ``tinyshakespeare`` / ``wikitext2``.
        train, validation, test: ``text_files``: a file, folder or list of them; ``hub``: split
            names. Missing validation/test are carved from the end of train.
        holdout_fraction: share of train carved for each missing split (default 0.05).
        max_chars: cap on characters per split (``stdlib``, ``text_files``, ``hub``).
        path, name, data_files, revision, text_field, streaming: ``hub`` only, passed to
            ``datasets.load_dataset``; ``text_field`` (default ``"text"``) is the text column.

    Large corpora (``hub`` only; see :mod:`attn_lm.data.sharded`):
        sharded: ``True`` tokenizes the dataset straight into shard memmaps (``Dataset.map`` with
            ``num_proc`` processes, or batch by batch for ``streaming=True``) and never holds a
            split in RAM; ``None``/``False`` = the in-memory path.
        num_proc: tokenizing processes (default 1); non-streaming, also shard files per split.
        shard_tokens: ``streaming=True`` only: roll-over size of shard files (default 100 M tokens).
        tokenizer_sample_chars: characters of train the tokenizer is trained on (default 10 M).
    """

    def __init__(
        self,
        source: str = "stdlib",
        tokenizer: str = "byte",
        vocab_size: Optional[int] = None,
        block_size: int = 256,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        samples_per_epoch: int = 10_240,
        eval_stride: Optional[int] = None,
        max_eval_tokens: Optional[int] = None,
        seed: int = 1337,
        num_workers: int = 0,
        cache_dir: Union[str, Path] = "~/.cache/attn_lm",
        download: bool = True,
        root: Optional[Union[str, Path]] = None,
        train: Optional[PathSpec] = None,
        validation: Optional[PathSpec] = None,
        test: Optional[PathSpec] = None,
        holdout_fraction: Optional[float] = None,
        max_chars: Optional[int] = None,
        path: Optional[str] = None,
        name: Optional[str] = None,
        data_files: Optional[Any] = None,
        revision: Optional[str] = None,
        text_field: Optional[str] = None,
        streaming: Optional[bool] = None,
        sharded: Optional[bool] = None,
        num_proc: Optional[int] = None,
        shard_tokens: Optional[int] = None,
        tokenizer_sample_chars: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_tokenizer_options(tokenizer, vocab_size)
        source_options = {
            "root": root,
            "train": train,
            "validation": validation,
            "test": test,
            "holdout_fraction": holdout_fraction,
            "max_chars": max_chars,
            "path": path,
            "name": name,
            "data_files": data_files,
            "revision": revision,
            "text_field": text_field,
            "streaming": streaming,
        }
        self.source_options = check_source_options(source, {k: _plain(v) for k, v in source_options.items()})
        self.sharding = check_sharding(source, sharded, num_proc, shard_tokens, tokenizer_sample_chars, streaming)
        for key, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("samples_per_epoch", samples_per_epoch),
        ):
            _require_positive(key, value)
        for key, value in (("eval_batch_size", eval_batch_size), ("max_eval_tokens", max_eval_tokens)):
            if value is not None:
                _require_positive(key, value)
        if eval_stride is not None and not 1 <= eval_stride <= block_size:
            raise ValueError(
                f"eval_stride must be in [1, block_size={block_size}] or null (= block_size), got {eval_stride}"
            )
        if samples_per_epoch < batch_size:
            raise ValueError(
                f"samples_per_epoch={samples_per_epoch} is smaller than batch_size={batch_size}: "
                "an epoch would have no batch"
            )
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.source = source
        self.tokenizer_kind = tokenizer
        self.requested_vocab_size = vocab_size
        self.block_size = block_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.samples_per_epoch = samples_per_epoch
        self.eval_stride = eval_stride
        self.max_eval_tokens = max_eval_tokens
        self.seed = seed
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser()
        self.download = download
        self._cache: Optional[TokenCache] = None
        self._corpus_fingerprint: dict[str, Any] = {}
        self._datasets: Optional[dict[str, Any]] = None

    # ---------------------------------------------------------------------------------------
    # Lightning hooks
    # ---------------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Read (or download) the corpus and build its token cache if needed. Idempotent."""
        self._open_cache()

    def setup(self, stage: Optional[str] = None) -> None:
        """Open the cache and build the datasets of all three splits; later calls return at once."""
        if self._datasets is not None:
            return
        cache = self._open_cache()
        tokens = {split: cache.tokens(split) for split in SPLITS}
        if self.max_eval_tokens is not None:
            tokens.update({split: tokens[split].head(self.max_eval_tokens) for split in ("validation", "test")})
        for split, array in tokens.items():
            self._check_length(split, array)
        self._datasets = {
            "train": RandomWindows(tokens["train"], self.block_size, self.samples_per_epoch, self.seed),
            "validation": EvalWindows(tokens["validation"], self.block_size, self.eval_stride),
            "test": EvalWindows(tokens["test"], self.block_size, self.eval_stride),
        }

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer itself (kind and state), so a checkpoint decodes and encodes text on its
        own; Lightning stores it under ``checkpoint["LMDataModule"]`` (the constructor's
        arguments, block size included, are ``checkpoint["datamodule_hyper_parameters"]``)."""
        return {"tokenizer": self.tokenizer.payload()} if self._cache is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming (or evaluating) a checkpoint: its tokenizer must be this data's."""
        if "tokenizer" in state_dict:
            check_same_tokenizer(state_dict["tokenizer"], self.tokenizer, "the checkpoint",
                                 f"the data (source={self.source!r})")

    def train_dataloader(self) -> DataLoader:
        return training_loader(self._dataset("train"), self.batch_size, self.samples_per_epoch,
                               getattr(self, "trainer", None), **self._loader_options())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Copy batches without blocking the host. Lightning's default ``.to(device)`` waits for
        the copy, i.e. for every kernel queued before it: a host sync per training step that idled
        the GPU while the next step was launched (+11% step time at the GPT-2-small shape on an
        H200). The loaders pin their batches on CUDA, so the copy really is asynchronous."""
        return apply_to_collection(batch, torch.Tensor, lambda t: t.to(device, non_blocking=True))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ---------------------------------------------------------------------------------------
    # What the model and the logger read after setup()
    # ---------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._ready().tokenizer

    @property
    def vocab_size(self) -> int:
        return self._ready().tokenizer.vocab_size

    @property
    def split_stats(self) -> dict[str, dict[str, int]]:
        """``{split: {"tokens", "characters", "bytes", "words"}}`` of the whole splits."""
        return self._ready().split_stats

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What exactly is being trained on, as a JSON-serialisable dict (for ``results.json``)."""
        cache = self._ready()
        fingerprint = dict(self._corpus_fingerprint)
        fingerprint["splits"] = {
            split: {**info, **cache.split_stats[split]} for split, info in self._corpus_fingerprint["splits"].items()
        }
        fingerprint["tokenizer"] = cache.meta["tokenizer"]
        fingerprint["cache"] = cache.directory.name
        return fingerprint

    @property
    def unit(self) -> str:
        """What one token of this tokenizer is (``byte``, ``char``, ``word`` or ``token`` for BPE):
        ``ppl`` is the perplexity per this unit."""
        return self._ready().tokenizer.unit

    def extra_metrics(self, split: str, mean_loss: float) -> dict[str, float]:
        """The mean next-token loss (nats) on ``split`` in bits per the tokenizer's unit, e.g.
        ``{"bits_per_char": ...}``. Only that unit: converting to another (a word perplexity of
        a byte model) depends on how that other unit is counted and misleads."""
        return {f"bits_per_{self.unit}": mean_loss / LN2}

    # ---------------------------------------------------------------------------------------
    # Internals
    # ---------------------------------------------------------------------------------------

    def _open_cache(self) -> TokenCache:
        if self._cache is None and self.sharding is not None:
            self._cache, self._corpus_fingerprint = open_or_build_sharded(
                self.tokenizer_kind, self.requested_vocab_size, self.cache_dir, self.sharding, **self.source_options
            )
        elif self._cache is None:
            corpus = load_corpus(self.source, cache_dir=self.cache_dir, download=self.download, **self.source_options)
            self._cache = open_or_build(corpus, self.tokenizer_kind, self.requested_vocab_size, self.cache_dir)
            self._corpus_fingerprint = corpus.fingerprint()
        return self._cache

    def _ready(self) -> TokenCache:
        if self._cache is None:
            raise RuntimeError("LMDataModule: call prepare_data() or setup() first; the corpus has not been loaded yet")
        return self._cache

    def _dataset(self, split: str) -> Any:
        if self._datasets is None:
            raise RuntimeError(f"LMDataModule: call setup() before asking for the {split} dataloader")
        return self._datasets[split]

    def _check_length(self, split: str, tokens: Union[TokenArray, ShardedTokenArray]) -> None:
        needed = self.block_size + 1
        if len(tokens) >= needed:
            return
        hint = f"use block_size <= {len(tokens) - 1}" if len(tokens) >= 2 else "this split is too small for any window"
        truncated = (
            split != "train"
            and self.max_eval_tokens is not None
            and self.max_eval_tokens < self.split_stats[split]["tokens"]
        )
        if truncated:
            hint += f", or raise max_eval_tokens (={self.max_eval_tokens})"
        raise ValueError(
            f"the {split} split of source {self.source!r} has {len(tokens)} tokens with the {self.tokenizer_kind!r} "
            f"tokenizer, fewer than block_size+1 = {needed}; {hint}"
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self._dataset(split), batch_size=self.eval_batch_size, shuffle=False, **self._loader_options()
        )

    def _loader_options(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }


def _plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes for lists and mappings) as plain Python objects."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
