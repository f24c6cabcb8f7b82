"""Text <-> token ids: four tokenizers behind one small interface.

``char``
    The sorted set of characters of the training text, plus ``<unk>`` (last id) for characters
    never seen in it. Natural metric: bits per character.
``byte``
    The 256 byte values of the UTF-8 encoding; nothing to train. Bits per byte.
``word``
    ``<eos>`` (id 0), ``<unk>`` (id 1), then the training words by decreasing frequency;
    ``<eos>`` ends every line. Word-level perplexity.
``bpe``
    Byte-level BPE (HF ``tokenizers``) trained on the training text, ``vocab_size`` entries.
    Bits per byte.

Every tokenizer is *line-local*: ``encode(a + b) == concat(encode(a), encode(b))`` whenever ``a``
ends with ``"\\n"``. That lets the cache encode a corpus in chunks cut at line boundaries and get
exactly the ids of encoding it whole (the byte-level BPE gets this from a pre-tokenizer that cuts
after each newline, so a newline never merges with the next line).

``word`` follows the convention of the published WikiText/PTB statistics: whitespace-separated
words, one ``<eos>`` per line, so ``decode`` normalises whitespace. The other three round-trip
any text exactly (``char`` except for characters absent from its training text).

A tokenizer is fully described by a JSON file (:meth:`Tokenizer.save` / :func:`load_tokenizer`),
which the cache stores next to the token ids.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np

from ..rundir import write_atomic

TOKENIZERS = ("char", "byte", "word", "bpe")
UNK = "<unk>"
EOS = "<eos>"
#: Shown by ``decode`` for the char tokenizer's ``<unk>`` id.
REPLACEMENT_CHAR = "\ufffd"

TokenIds = Union[Sequence[int], np.ndarray]


class Tokenizer(ABC):
    """Common interface; use :func:`build_tokenizer` to train one and :func:`load_tokenizer` to reload it."""

    kind: ClassVar[str]
    #: What one token is: the unit of the reported perplexity and bits (byte, char, word, token).
    unit: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; every id is in ``[0, vocab_size)``."""

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D ``int64`` array."""

    @abstractmethod
    def decode(self, ids: TokenIds) -> str:
        """Text of a sequence of ids."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """JSON-serialisable state from which :meth:`from_state` rebuilds the tokenizer."""

    @classmethod
    @abstractmethod
    def from_state(cls, state: dict[str, Any]) -> "Tokenizer":
        """Inverse of :meth:`state`."""

    def settings(self) -> dict[str, Any]:
        """What a results file should say about the tokenizer."""
        return {"kind": self.kind, "vocab_size": self.vocab_size}

    def unknown(self, text: str) -> list[str]:
        """The distinct pieces of ``text`` (characters, words) that would become ``<unk>``;
        none for byte-level tokenizers, which encode any text."""
        return []

    def payload(self) -> dict[str, Any]:
        """Kind and state: what :func:`tokenizer_from_payload` rebuilds it from (files, checkpoints)."""
        return {"kind": self.kind, "state": self.state()}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the tokenizer as JSON, atomically (temporary file, then rename)."""
        write_atomic(Path(path), json.dumps(self.payload()).encode("utf-8"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """The UTF-8 bytes of the text: 256 ids, nothing to train, nothing unknown."""

    kind = "byte"
    unit = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: TokenIds) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "ByteTokenizer":
        return cls()


class VocabularyTokenizer(Tokenizer):
    """A tokenizer whose whole state is its vocabulary: the attribute named by ``vocabulary``,
    which is also the one argument of its constructor."""

    vocabulary: ClassVar[str]

    def state(self) -> dict[str, Any]:
        return {self.vocabulary: getattr(self, self.vocabulary)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "VocabularyTokenizer":
        return cls(state[cls.vocabulary])


class CharTokenizer(VocabularyTokenizer):
    """One id per Unicode character of the training text (sorted by code point), then ``<unk>``."""

    kind = "char"
    unit = "char"
    vocabulary = "chars"

    def __init__(self, chars: str) -> None:
        """``chars``: any text; its distinct characters are the vocabulary."""
        self.chars = "".join(sorted(set(chars)))
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def unk_id(self) -> int:
        return len(self.chars)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> np.ndarray:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        idx = np.minimum(np.searchsorted(self._codepoints, codepoints), len(self.chars) - 1)
        known = self._codepoints[idx] == codepoints
        return np.where(known, idx, self.unk_id).astype(np.int64)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text) - set(self.chars))

    def decode(self, ids: TokenIds) -> str:
        table = self.chars + REPLACEMENT_CHAR
        return "".join(table[i] for i in np.asarray(ids).tolist())


class WordTokenizer(VocabularyTokenizer):
    """Whitespace-separated words plus ``<eos>`` at the end of every line.

    The vocabulary is ``<eos>``, ``<unk>`` and the training words by decreasing count (ties in
    code-point order), optionally capped at ``vocab_size`` entries in total; capped-out and unseen
    words map to ``<unk>``. A literal ``<unk>`` in the text (WikiText has them) is that same id.
    """

    kind = "word"
    unit = "word"
    vocabulary = "words"
    eos_id = 0
    unk_id = 1

    def __init__(self, words: Sequence[str]) -> None:
        if list(words[:2]) != [EOS, UNK]:
            raise ValueError(f"a word vocabulary starts with {EOS!r}, {UNK!r}; got {list(words[:2])}")
        self.words = list(words)
        self._index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def train(cls, text: str, vocab_size: Optional[int] = None) -> "WordTokenizer":
        counts = Counter(text.split())
        for special in (EOS, UNK):
            counts.pop(special, None)
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        if vocab_size is not None:
            ranked = ranked[: vocab_size - 2]
        return cls([EOS, UNK] + [w for w, _ in ranked])

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> np.ndarray:
        lookup, unk, eos = self._index.get, self.unk_id, self.eos_id
        ids: list[int] = []
        for line in split_lines(text):
            ids.extend([lookup(w, unk) for w in line.split()])
            ids.append(eos)
        return np.array(ids, dtype=np.int64)

    def unknown(self, text: str) -> list[str]:
        return sorted(set(text.split()) - set(self._index))

    def decode(self, ids: TokenIds) -> str:
        out: list[str] = []
        line: list[str] = []
        for i in np.asarray(ids).tolist():
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.words[i])
        out.append(" ".join(line))
        return "".join(out)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) from HF ``tokenizers``, trained on the training text.

    Pre-tokenization first cuts after every ``"\\n"`` (keeping the tokenizer line-local), then
    applies the GPT-2 byte-level regex. No special tokens: documents are separated by newlines.
    ``vocab_size`` counts the 256 byte symbols plus the learned merges; a small corpus may run out
    of merges first, so read :attr:`vocab_size` rather than assuming the requested size.
    """

    kind = "bpe"
    unit = "token"  # a BPE token
    #: Lines are batched into pieces of about this many characters for (parallel) encoding.
    ENCODE_PIECE_CHARS = 1 << 16

    def __init__(self, model: Any) -> None:
        self._model = model

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        model = HFTokenizer(models.BPE())
        model.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="merged_with_previous"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        model.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        model.train_from_iterator(split_at_lines(text, cls.ENCODE_PIECE_CHARS), trainer)
        return cls(model)

    @property
    def vocab_size(self) -> int:
        return self._model.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        pieces = split_at_lines(text, self.ENCODE_PIECE_CHARS)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self._model.encode_batch(pieces)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: TokenIds) -> str:
        return self._model.decode(np.asarray(ids).tolist())

    def state(self) -> dict[str, Any]:
        return {"hf_tokenizer": self._model.to_str()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(state["hf_tokenizer"]))


_CLASSES: dict[str, type[Tokenizer]] = {
    cls.kind: cls for cls in (CharTokenizer, ByteTokenizer, WordTokenizer, BPETokenizer)
}


def check_tokenizer_options(kind: str, vocab_size: Optional[int]) -> None:
    """Reject unknown kinds and ``vocab_size`` values the kind cannot honour (``ValueError``)."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown tokenizer {kind!r}; valid tokenizers: {list(TOKENIZERS)}")
    if kind == "bpe" and vocab_size is None:
        raise ValueError("tokenizer='bpe' needs vocab_size (e.g. 8192): the number of byte symbols + merges to learn")
    if kind == "bpe" and vocab_size <= 256:
        raise ValueError(f"tokenizer='bpe' needs vocab_size > 256 (the 256 byte symbols plus merges), got {vocab_size}")
    if kind == "word" and vocab_size is not None and vocab_size < 3:
        raise ValueError(
            f"tokenizer='word' needs vocab_size >= 3 (<eos>, <unk> and one word) or null, got {vocab_size}"
        )
    if kind in ("char", "byte") and vocab_size is not None:
        raise ValueError(
            f"tokenizer={kind!r} takes no vocab_size (its vocabulary is fixed by the "
            f"{'training text' if kind == 'char' else 'byte values'}), got {vocab_size}; leave it null"
        )


def build_tokenizer(kind: str, train_text: str, vocab_size: Optional[int] = None) -> Tokenizer:
    """Build (train, where there is something to learn) a tokenizer of ``kind`` on ``train_text``."""
    check_tokenizer_options(kind, vocab_size)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.train(train_text)
    if kind == "word":
        return WordTokenizer.train(train_text, vocab_size)
    return BPETokenizer.train(train_text, vocab_size)


def load_tokenizer(path: Union[str, os.PathLike]) -> Tokenizer:
    """Read a tokenizer written by :meth:`Tokenizer.save`."""
    return tokenizer_from_payload(json.loads(Path(path).read_text(encoding="utf-8")))


def tokenizer_from_payload(payload: dict[str, Any]) -> Tokenizer:
    """Inverse of :meth:`Tokenizer.payload`."""
    return _CLASSES[payload["kind"]].from_state(payload["state"])


def check_same_tokenizer(saved: dict[str, Any], current: Tokenizer, saved_name: str, current_name: str) -> None:
    """``ValueError`` naming both sides unless ``current`` is the tokenizer of payload ``saved``
    (same kind, same size, same vocabulary: a BPE trained on other text has other merges)."""
    other = tokenizer_from_payload(saved)
    if other.settings() != current.settings():
        raise ValueError(f"{saved_name} has a {other.kind} tokenizer with {other.vocab_size} tokens but {current_name} "
                         f"has a {current.kind} tokenizer with {current.vocab_size} tokens")
    if saved != current.payload():
        raise ValueError(f"{saved_name} and {current_name} both have a {current.kind} tokenizer of {current.vocab_size} "
                         "tokens, but not the same vocabulary (built from other text)")


def split_lines(text: str) -> list[str]:
    """Lines of ``text`` without their ``"\\n"``; a final line without one still counts."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def split_at_lines(text: str, piece_chars: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of about ``piece_chars`` characters.

    Every cut is just after a ``"\\n"`` (so line-local tokenizers encode the pieces exactly like
    the whole); a piece is longer when a line is.
    """
    pieces: list[str] = []
    start = 0
    while start < len(text):
        newline = text.find("\n", start + piece_chars - 1)
        stop = len(text) if newline == -1 else newline + 1
        pieces.append(text[start:stop])
        start = stop
    return pieces


def count_units(text: str) -> dict[str, int]:
    """Characters, UTF-8 bytes and words of ``text``: the units metrics are reported in.

    "Words" are whitespace-separated tokens plus one per line, i.e. the number of tokens a
    word-level model with an ``<eos>`` per line predicts (exactly what :class:`WordTokenizer`
    produces), so ``exp(loss * tokens / words)`` of any model is a perplexity comparable with
    published word-level ones.
    """
    lines = text.count("\n") + (1 if text and not text.endswith("\n") else 0)
    return {"characters": len(text), "bytes": len(text.encode("utf-8")), "words": len(text.split()) + lines}
