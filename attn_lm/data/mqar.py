"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"), generated in process.

A sequence of ``seq_len`` tokens holds ``num_kv_pairs`` key-value pairs first, then
``num_queries`` queries, each a key from those pairs at a random even slot of the rest (filler
token ``0`` everywhere else)::

    k1 v1 k2 v2 ... kP vP  0 0 k2 0 0 0 k1 0 ...

As in Zoology's generator, a query's value is never shown in the input: it is only the target.
``answers_in_input=True`` writes it after its key (``... k2 v2 ... k1 v1``), the layout this
module had before; there, with every key queried once, a model that predicts any pair's value
not yet shown answers the i-th of ``P`` queries with probability ``1 / (P - i + 1)`` without
recalling anything (``H_P / P``: 0.52 at 4 pairs, 0.21 at 16), which is where recurrent
mechanisms plateaued on the GPU (benchmarks/RESULTS.md 5e).

Keys are drawn from ``[1, vocab_size/2)``, values from ``[vocab_size/2, vocab_size)`` (as in
Zoology, so a key is never mistaken for a value). The target at a query's key position is its
value; every other target is ``-1`` (not scored), so the loss and the accuracy are recall alone.

Sequence ``i`` of a split is drawn from a generator seeded with ``(split, seed, i)``: training
follows the run seed (a different stream per seed), validation and test use ``eval_seed`` so every
run of a comparison is scored on the same sequences, and the three splits never share a stream.
"""
from __future__ import annotations

from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .datamodule import LMDataModule
from .windows import IGNORE_INDEX, training_loader

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


class MQARSequences(Dataset):
    """Item ``i``: ``(x, y)`` int64 tensors of ``seq_len``; depends only on ``(split, seed, i)``."""

    def __init__(self, split: str, seed: int, size: int, vocab_size: int, seq_len: int, num_kv_pairs: int,
                 num_queries: int, answers_in_input: bool = False) -> None:
        self.split_id, self.seed, self.size = SPLIT_IDS[split], seed, size
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_kv_pairs, self.num_queries = num_kv_pairs, num_queries
        self.answers_in_input = answers_in_input

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.split_id, self.seed, index))
        P, Q, half = self.num_kv_pairs, self.num_queries, self.vocab_size // 2
        keys = 1 + rng.choice(half - 1, P, replace=False)
        values = rng.integers(half, self.vocab_size, P)
        x = np.zeros(self.seq_len, dtype=np.int64)
        y = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        x[0 : 2 * P : 2], x[1 : 2 * P : 2] = keys, values
        asked = rng.choice(P, Q, replace=Q > P)  # every key once when Q == P
        free_slots = (self.seq_len - 2 * P) // 2  # query slots: pairs of positions after the pairs
        starts = 2 * P + 2 * np.sort(rng.choice(free_slots, Q, replace=False))
        x[starts] = keys[asked]
        if self.answers_in_input:  # the earlier layout: it leaks which values are still unasked (module docstring)
            x[starts + 1] = values[asked]
        y[starts] = values[asked]  # at the key, predict its value
        return torch.from_numpy(x), torch.from_numpy(y)


class MQARDataModule(L.LightningDataModule):
    """``data=mqar``: the data module of :mod:`attn_lm.data.mqar` (same interface as
    :class:`~attn_lm.data.LMDataModule` where the trainer reads it; no text, no tokenizer).

    ``num_kv_pairs`` / ``num_queries`` (``None`` = ``num_kv_pairs``) must fit:
    ``2 * num_kv_pairs + 2 * num_queries <= block_size``. ``samples_per_epoch`` training sequences
    per epoch (fresh ones every epoch), ``eval_examples`` validation and test sequences (at most
    ``max_eval_tokens // block_size`` when that is set). ``answers_in_input``: the earlier layout,
    which shows each query's value after its key (a shortcut, see the module docstring)."""

    #: Scored by accuracy on the queried values (``LitGPT`` reports ``val/accuracy``).
    reports_accuracy = True
    tokenizer = None
    unit = "token"

    def __init__(self, vocab_size: int = 8192, block_size: int = 256, num_kv_pairs: int = 16,
                 num_queries: Optional[int] = None, batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 samples_per_epoch: int = 100_000, eval_examples: int = 3_000, seed: int = 1337,
                 eval_seed: int = 0, num_workers: int = 0, max_eval_tokens: Optional[int] = None,
                 answers_in_input: bool = False) -> None:
        super().__init__()
        num_queries = num_kv_pairs if num_queries is None else num_queries
        if max_eval_tokens is not None:  # as for text data (debug=smoke): about that many evaluation tokens
            eval_examples = min(eval_examples, max(1, max_eval_tokens // block_size))
        for name, value in (("vocab_size", vocab_size), ("block_size", block_size), ("num_kv_pairs", num_kv_pairs),
                            ("num_queries", num_queries), ("batch_size", batch_size), ("eval_examples", eval_examples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"mqar: {name} must be a positive integer, got {value!r}")
        if 2 * num_kv_pairs + 2 * num_queries > block_size:
            raise ValueError(f"mqar: {num_kv_pairs} pairs and {num_queries} queries need 2*(pairs+queries) = "
                             f"{2 * (num_kv_pairs + num_queries)} positions, more than block_size={block_size}; "
                             "lower data.num_kv_pairs / data.num_queries or raise data.block_size")
        if num_kv_pairs > vocab_size // 2 - 1:
            raise ValueError(f"mqar: {num_kv_pairs} distinct keys need vocab_size >= {2 * num_kv_pairs + 2}, "
                             f"got {vocab_size}")
        self.source, self.vocab_size, self.block_size = "mqar", vocab_size, block_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.samples_per_epoch, self.num_workers = samples_per_epoch, num_workers
        shape = {"vocab_size": vocab_size, "seq_len": block_size, "num_kv_pairs": num_kv_pairs,
                 "num_queries": num_queries, "answers_in_input": bool(answers_in_input)}
        self.fingerprint = {"source": "mqar", **shape, "seed": seed, "eval_seed": eval_seed,
                            "eval_examples": eval_examples}
        self.datasets = {"train": MQARSequences("train", seed, samples_per_epoch, **shape),
                         "validation": MQARSequences("validation", eval_seed, eval_examples, **shape),
                         "test": MQARSequences("test", eval_seed, eval_examples, **shape)}

    # The loss per scored target (a queried value) in bits, as for text data.
    extra_metrics = LMDataModule.extra_metrics

    def train_dataloader(self) -> DataLoader:
        return training_loader(self.datasets["train"], self.batch_size, self.samples_per_epoch,
                               getattr(self, "trainer", None), **self._options())

    # Batches reach the GPU without a host sync per step (see LMDataModule).
    transfer_batch_to_device = LMDataModule.transfer_batch_to_device

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["validation"], batch_size=self.eval_batch_size, **self._options())

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.datasets["test"], batch_size=self.eval_batch_size, **self._options())

    def _options(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available(),
                "persistent_workers": self.num_workers > 0}
