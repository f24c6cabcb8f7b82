"""Where the text comes from: every corpus becomes three strings plus a fingerprint.

A *source* is a function returning a :class:`Corpus`: the raw text of the ``train``,
``validation`` and ``test`` splits and enough provenance (files, Python version, hub arguments)
to say exactly what a model was trained on. Tokenization and caching happen later
(:mod:`attn_lm.data.token_store`), so every source only has to produce text.

Sources (the names accepted by :func:`load_corpus`):

``stdlib``
    The embedded default. The running interpreter's own standard-library ``*.py`` files: always
    present, no network, a few MB of real, structured text. Test suites, ``site-packages`` and the
    machine-specific ``_sysconfigdata*`` module are skipped. Files are taken in the order of a
    hash of their relative path (a ``max_chars`` cap keeps a representative sample of the library,
    not its alphabetical beginning), each capped at 20k characters so that no module dominates,
    and each goes whole to one split so that the splits are 90% / 5% / 5% by size.
``text_files``
    Local files or folders (searched recursively, sorted, hidden entries skipped); ``.gz`` files
    are decompressed transparently. Missing validation/test splits are carved from the end of
    train (see :func:`carve_holdout`).
``hub``
    Anything ``datasets.load_dataset`` reads: a Hub dataset (``path="wikitext"``) or local files
    through a packaged builder (``path="parquet"``/``"json"``/``"text"`` with ``data_files``).
    Rows of ``text_field`` are joined, one row per line. (With the data module's ``sharded=True``
    they are never joined: :mod:`attn_lm.data.sharded` tokenizes them batch by batch into shards.)
``tinyshakespeare``
    Karpathy's 1.1 MB Shakespeare file, split like nanoGPT: first 90% of the characters train,
    last 10% validation. It has no test split, so ``test`` is the validation text (say so when
    reporting).
``wikitext2``
    The tokenized WikiText-2 files ``wiki.{train,valid,test}.tokens`` (optionally ``.gz``) from a
    local folder, else the Hub's ``wikitext``/``wikitext-2-v1``.

All files must be UTF-8; a file that is not is reported with its path and the byte offset of the
first invalid byte. Options a source does not use are rejected rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import inspect
import os
import platform
import sys
import sysconfig
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ..rundir import write_atomic

SPLITS = ("train", "validation", "test")

PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
#: nanoGPT's split point: the first 90% of the characters are training text.
TINYSHAKESPEARE_TRAIN_FRACTION = 0.9

WIKITEXT2_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens", "test": "wiki.test.tokens"}

#: Share of the stdlib corpus (by size) per split.
STDLIB_SHARES = {"train": 0.90, "validation": 0.05, "test": 0.05}
#: Characters taken from one stdlib file (its first lines): no module dominates the corpus (the
#: whole of pydoc_data/topics.py would be three quarters of a 1M-character training text).
STDLIB_MAX_FILE_CHARS = 20_000
STDLIB_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass
class Corpus:
    """Raw text of the three splits and where it came from.

    ``files[split]`` names what each split was read from (paths, or ``path/name:split`` for hub
    datasets); ``details`` holds the source-specific provenance (Python version, URL, how a split
    was carved, ...). Both must be JSON-serialisable: they end up in ``results.json``.
    """

    source: str
    texts: dict[str, str]
    files: dict[str, list[str]]
    details: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def sha256(self) -> dict[str, str]:
        """SHA-256 of each split's UTF-8 text: the identity of the content, whatever its path."""
        return {split: hashlib.sha256(text.encode("utf-8")).hexdigest() for split, text in self.texts.items()}

    def fingerprint(self) -> dict[str, Any]:
        """JSON-serialisable description: source, provenance and per-split files, hash and size."""
        splits = {
            split: {"files": self.files[split], "sha256": self.sha256[split], "characters": len(self.texts[split])}
            for split in SPLITS
        }
        return {"source": self.source, **self.details, "splits": splits}


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def read_text_file(path: Path) -> str:
    """Read a UTF-8 file (``.gz`` decompressed transparently).

    Raises ``ValueError`` naming the file and the offset of the first byte that is not UTF-8
    (counted in the decompressed stream for ``.gz`` files).
    """
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path} ends in .gz but is not a gzip file ({err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = "of the decompressed data " if path.suffix == ".gz" else ""
        raise ValueError(
            f"{path} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} {where}({err.reason}); "
            "convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def expand_paths(spec: PathSpec, role: str) -> list[tuple[Path, bool]]:
    """Turn a path, or a list of paths, into the files it names, each with "named explicitly".

    Folders are searched recursively in sorted order; hidden files and folders (``.git``,
    ``.DS_Store``) are skipped. A path that does not exist, or a folder without files, is an
    error naming it. Nothing is read yet.
    """
    entries = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not entries:
        raise ValueError(f"`{role}` is an empty list; give at least one file or folder")
    files: list[tuple[Path, bool]] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise FileNotFoundError(f"{role} folder {path} contains no (non-hidden) files")
            files.extend((p, False) for p in found)
        elif path.is_file():
            files.append((path, True))
        else:
            raise FileNotFoundError(f"{role} path {path} does not exist (expected a text file, a .gz file or a folder)")
    return files


def read_files(files: Sequence[tuple[Path, bool]], role: str, max_chars: Optional[int]) -> tuple[str, list[Path]]:
    """Concatenate ``files`` (each ending in a newline) up to ``max_chars`` characters.

    Files are read lazily, so a cap stops the reading early. Empty files are skipped, except those
    named explicitly, which are an error. Returns the text and the files that contributed to it.
    """
    used: list[Path] = []

    def pieces() -> Iterator[str]:
        for path, explicit in files:
            text = read_text_file(path)
            if not text and explicit:
                raise ValueError(f"{role} file {path} is empty")
            if text:
                used.append(path)
                yield _as_lines(text)

    text, n_used = join_capped(pieces(), max_chars)
    return text, used[:n_used]


def join_capped(pieces: Iterable[str], max_chars: Optional[int]) -> tuple[str, int]:
    """Concatenate ``pieces`` until ``max_chars`` characters (``None`` = no cap).

    The piece that crosses the cap is cut, and the remaining pieces are never read (which keeps a
    streamed dataset from being downloaded in full). Returns the text and the number of pieces used.
    """
    out: list[str] = []
    total = 0
    for piece in pieces:
        if max_chars is not None and total + len(piece) >= max_chars:
            out.append(piece[: max_chars - total])
            break
        out.append(piece)
        total += len(piece)
    return "".join(out), len(out)


def _as_lines(text: str) -> str:
    """Terminate ``text`` with a newline so that concatenated pieces never glue two lines."""
    return text if text.endswith("\n") else text + "\n"


def carve_holdout(train: str, missing: Sequence[str], fraction: float) -> dict[str, str]:
    """Cut the missing evaluation splits off the end of the training text.

    With both splits missing the text becomes ``train | validation | test`` with the last two
    parts ``fraction`` of the characters each; with one missing, only that part is cut. Cut
    points move forward to the next line start, so no line is split between two splits.
    Returns the new texts of ``"train"`` and of every missing split.
    """
    if not 0.0 < fraction < 0.5:
        raise ValueError(f"holdout_fraction must be in (0, 0.5), got {fraction}")
    size = int(len(train) * fraction)
    bounds = [len(train) - size * (len(missing) - k) for k in range(len(missing))]
    cuts = [_next_line_start(train, b) for b in bounds] + [len(train)]
    if size == 0 or cuts[0] == 0 or any(a >= b for a, b in zip(cuts, cuts[1:])):
        raise ValueError(
            f"the training text ({len(train)} characters) is too small to carve {list(missing)} "
            f"({fraction:.0%} each) from it; give the split(s) explicitly"
        )
    carved = {"train": train[: cuts[0]]}
    carved.update({role: train[a:b] for role, a, b in zip(missing, cuts, cuts[1:])})
    return carved


def _next_line_start(text: str, pos: int) -> int:
    """Smallest line start >= ``pos`` (``pos`` itself when no line starts after it)."""
    newline = text.find("\n", pos - 1) if pos > 0 else -1
    return newline + 1 if newline != -1 else pos


def _corpus_with_holdout(source: str, texts: dict[str, str], files: dict[str, list[str]], details: dict[str, Any],
                         missing: Sequence[str], holdout_fraction: float) -> Corpus:
    """The corpus of ``source``, with the ``missing`` evaluation splits carved from train."""
    if missing:
        texts.update(carve_holdout(texts["train"], missing, holdout_fraction))
        files.update({role: files["train"] for role in missing})
        details.update(carved_from_train=list(missing), holdout_fraction=holdout_fraction)
    _require_text(source, texts)
    return Corpus(source, texts, files, details)


def _require_text(source: str, texts: Mapping[str, str]) -> None:
    for split in SPLITS:
        if not texts[split]:
            raise ValueError(f"source {source!r}: the {split} split is empty (no characters read)")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def load_stdlib(max_chars: Optional[int] = 2_000_000) -> Corpus:
    """The interpreter's own standard library: ``max_chars`` characters of training text (``None``:
    all), validation and test 5 % each, so the splits are 90/5/5 by size.

    Files are taken whole (up to :data:`STDLIB_MAX_FILE_CHARS`, cut at a line end) in the order of a
    hash of their path; each goes to the split furthest below its share, so every file is in one
    split only and the last file of a full split is cut."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    caps = {s: None if max_chars is None else round(max_chars * share / STDLIB_SHARES["train"])
            for s, share in STDLIB_SHARES.items()}
    pieces: dict[str, list[str]] = {split: [] for split in SPLITS}
    used: dict[str, list[str]] = {split: [] for split in SPLITS}
    sizes = dict.fromkeys(SPLITS, 0)
    for rel in sorted((p.relative_to(stdlib).as_posix() for p in _stdlib_modules(stdlib)),
                      key=lambda rel: hashlib.sha256(rel.encode()).hexdigest()):
        open_splits = [s for s in SPLITS if caps[s] is None or sizes[s] < caps[s]]
        if not open_splits:
            break
        text = _head_lines(read_text_file(stdlib / rel), STDLIB_MAX_FILE_CHARS)
        if text:
            total = sum(sizes.values()) + len(text)
            split = max(open_splits, key=lambda s: STDLIB_SHARES[s] * total - sizes[s])
            pieces[split].append(text)
            used[split].append(rel)
            sizes[split] += len(text)
    texts: dict[str, str] = {}
    files: dict[str, list[str]] = {}
    for split in SPLITS:
        texts[split], n_used = join_capped(pieces[split], caps[split])
        files[split] = used[split][:n_used]
    _require_text("stdlib", texts)
    details = {
        "python_version": platform.python_version(),
        "implementation": sys.implementation.name,
        "stdlib_dir": str(stdlib),
        "max_chars": max_chars,
        "max_file_chars": STDLIB_MAX_FILE_CHARS,
    }
    return Corpus("stdlib", texts, files, details)


def _head_lines(text: str, limit: int) -> str:
    """The lines of ``text`` that fit in ``limit`` characters (a newline-terminated prefix)."""
    if len(text) <= limit:
        return _as_lines(text) if text else text
    return text[: text.rfind("\n", 0, limit) + 1] or text[:limit] + "\n"


def _stdlib_modules(stdlib: Path) -> Iterator[Path]:
    """``*.py`` files under ``stdlib``, not descending into test suites or installed packages."""
    for folder, subfolders, names in os.walk(stdlib):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIPPED_DIRS]
        for name in names:
            if name.endswith(".py") and not name.startswith("_sysconfigdata"):
                yield Path(folder) / name


def load_text_files(
    train: PathSpec,
    validation: Optional[PathSpec] = None,
    test: Optional[PathSpec] = None,
    holdout_fraction: float = 0.05,
    max_chars: Optional[int] = None,
) -> Corpus:
    """Local text files or folders; an omitted validation/test split is carved from train."""
    given = {"train": train, "validation": validation, "test": test}
    resolved = {role: expand_paths(spec, role) for role, spec in given.items() if spec is not None}
    texts: dict[str, str] = {}
    files: dict[str, list[str]] = {}
    for role, paths in resolved.items():
        texts[role], used = read_files(paths, role, max_chars)
        files[role] = [str(p) for p in used]
    missing = [role for role in SPLITS if role not in texts]
    return _corpus_with_holdout("text_files", texts, files, {"max_chars": max_chars}, missing, holdout_fraction)


def load_hub(
    path: str,
    name: Optional[str] = None,
    data_files: Optional[Union[str, Sequence[str], Mapping[str, Any]]] = None,
    revision: Optional[str] = None,
    train: str = "train",
    validation: Optional[str] = None,
    test: Optional[str] = None,
    text_field: str = "text",
    streaming: bool = False,
    holdout_fraction: float = 0.05,
    max_chars: Optional[int] = None,
) -> Corpus:
    """A dataset read by ``datasets.load_dataset(path, name=..., data_files=..., streaming=...)``.

    ``train``/``validation``/``test`` are *split names* of that dataset. Left at ``None``,
    validation is the first of ``validation``/``valid``/``dev`` that exists and test is ``test``;
    a split that does not exist is carved from the end of train. ``max_chars`` caps each split
    (with ``streaming=True`` only that much is ever downloaded).
    """
    dataset, chosen = open_hub(path, name, data_files, revision, streaming, train, validation, test)
    read: dict[str, str] = {}
    for split in dict.fromkeys(s for s in chosen.values() if s is not None):
        read[split], _ = join_capped(_hub_rows(dataset[split], text_field, path), max_chars)
    texts = {role: read[split] for role, split in chosen.items() if split is not None}
    files = {role: hub_files(path, name, data_files, split) for role, split in chosen.items() if split is not None}
    details: dict[str, Any] = {
        "path": path,
        "name": name,
        "revision": revision,
        "splits": chosen,
        "text_field": text_field,
        "max_chars": max_chars,
    }
    missing = [role for role, split in chosen.items() if split is None]
    return _corpus_with_holdout("hub", texts, files, details, missing, holdout_fraction)


def open_hub(path: str, name: Optional[str], data_files: Any, revision: Optional[str], streaming: bool,
             train: str, validation: Optional[str], test: Optional[str]) -> tuple[Any, dict[str, Optional[str]]]:
    """The dataset (``datasets.load_dataset``) and the split each role reads: the one asked for,
    else the conventional name that exists, else ``None`` (carved from train). Both the in-memory
    and the sharded (:mod:`attn_lm.data.sharded`) paths open a hub dataset this way."""
    import datasets  # heavy import, only needed for this source

    dataset = datasets.load_dataset(path, name=name, data_files=data_files, revision=revision, streaming=streaming)
    available = list(dataset.keys())
    return dataset, {
        "train": _pick_split(path, "train", train, (), available),
        "validation": _pick_split(path, "validation", validation, ("validation", "valid", "dev"), available),
        "test": _pick_split(path, "test", test, ("test",), available),
    }


def _pick_split(
    path: str, role: str, requested: Optional[str], conventional: Sequence[str], available: list[str]
) -> Optional[str]:
    if requested is not None:
        if requested not in available:
            raise ValueError(
                f"hub dataset {path!r} has no split {requested!r} (asked for as {role}); available: {available}"
            )
        return requested
    return next((s for s in conventional if s in available), None)


def _hub_rows(dataset: Any, text_field: str, path: str) -> Iterator[str]:
    """The rows of ``text_field`` in order, each as a line (see :func:`hub_row_pieces`)."""
    check_text_column(dataset, text_field, path)
    for batch in dataset.iter(batch_size=1024):
        yield from hub_row_pieces(batch[text_field], text_field, path)


def check_text_column(dataset: Any, text_field: str, path: str) -> None:
    """``ValueError`` naming the columns when ``dataset`` (whose columns are known) lacks ``text_field``."""
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"hub dataset {path!r} has no column text_field={text_field!r}; columns: {columns}")


def hub_row_pieces(values: Iterable[Any], text_field: str, path: str) -> Iterator[str]:
    """How hub rows become text: each value of ``text_field`` is one line (a newline is added
    unless it ends with one); a value that is not a string is a ``ValueError``. Both the
    in-memory and the sharded (:mod:`attn_lm.data.sharded`) paths use it, so they see the same text."""
    for value in values:
        if not isinstance(value, str):
            raise ValueError(
                f"hub dataset {path!r}: column {text_field!r} holds {type(value).__name__} values, not text"
            )
        yield _as_lines(value)


def hub_files(path: str, name: Optional[str], data_files: Any, split: str) -> list[str]:
    """The files (or ``path/name:split``) that a split was read from, for the corpus description."""
    if isinstance(data_files, Mapping) and split in data_files:
        entry = data_files[split]
        return [str(entry)] if isinstance(entry, (str, os.PathLike)) else [str(e) for e in entry]
    return [f"{path}{'/' + name if name else ''}:{split}"]


def load_tinyshakespeare(
    root: Optional[Union[str, os.PathLike]] = None, *, cache_dir: Path, download: bool = True
) -> Corpus:
    """Tiny Shakespeare with nanoGPT's 90/10 character split; ``test`` is the validation text.

    Reads ``<root>/input.txt`` or ``<root>/tinyshakespeare/input.txt``. Without ``root``, uses a
    copy downloaded earlier into ``<cache_dir>/downloads/`` or downloads it (checked against its
    published SHA-256) when ``download`` is true.
    """
    if root is not None:
        base = Path(root).expanduser()
        candidates = [base / "input.txt", base / "tinyshakespeare" / "input.txt"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"tinyshakespeare: neither {candidates[0]} nor {candidates[1]} exists; set root to the folder "
                "holding input.txt (or its parent), or root=null to download it"
            )
    else:
        path = Path(cache_dir).expanduser() / "downloads" / "tinyshakespeare" / "input.txt"
        if not path.is_file():
            if not download:
                raise FileNotFoundError(
                    f"tinyshakespeare: no root given, {path} does not exist and download=False; "
                    "set root to a folder holding input.txt or allow the download"
                )
            _download(TINYSHAKESPEARE_URL, path, TINYSHAKESPEARE_SHA256)
    text = read_text_file(path)
    cut = int(len(text) * TINYSHAKESPEARE_TRAIN_FRACTION)
    texts = {"train": text[:cut], "validation": text[cut:], "test": text[cut:]}
    _require_text("tinyshakespeare", texts)
    files = {split: [str(path)] for split in SPLITS}
    details = {
        "url": TINYSHAKESPEARE_URL,
        "split": "nanoGPT: first 90% of characters train, last 10% validation; test = validation",
    }
    return Corpus("tinyshakespeare", texts, files, details)


def _download(url: str, dest: Path, sha256: str) -> None:
    """Fetch ``url`` into ``dest`` (atomically) after checking its SHA-256."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except (urllib.error.URLError, TimeoutError) as err:
        raise FileNotFoundError(f"could not download {url} ({err}); pass root=<folder with a local copy>") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise ValueError(f"download of {url} has sha256 {actual}, expected {sha256}; not using it")
    write_atomic(dest, data)


def load_wikitext2(root: Optional[Union[str, os.PathLike]] = None, *, download: bool = True) -> Corpus:
    """WikiText-2 (tokenized, ``wikitext-2-v1``) from ``root`` or, without it, from the Hub.

    ``root`` may hold the three ``wiki.*.tokens`` files (each optionally ``.gz``) directly or in
    a ``wikitext-2/`` subfolder.
    """
    if root is None:
        if not download:
            raise FileNotFoundError(
                "wikitext2: no root given and download=False; set root to the folder holding wiki.train.tokens"
            )
        return dataclasses.replace(load_hub("wikitext", name="wikitext-2-v1"), source="wikitext2")
    base = Path(root).expanduser()
    folders = [base, base / "wikitext-2"]
    paths = {split: _find_wikitext_file(folders, stem) for split, stem in WIKITEXT2_FILES.items()}
    texts = {split: read_text_file(path) for split, path in paths.items()}
    _require_text("wikitext2", texts)
    files = {split: [str(path)] for split, path in paths.items()}
    return Corpus("wikitext2", texts, files, {"variant": "wikitext-2-v1 (tokenized)"})


def _find_wikitext_file(folders: Sequence[Path], stem: str) -> Path:
    candidates = [folder / name for folder in folders for name in (stem, stem + ".gz")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise FileNotFoundError(f"wikitext2: {stem} not found; looked for {', '.join(map(str, candidates))}")
    return found


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Corpus]] = {
    "stdlib": load_stdlib,
    "text_files": load_text_files,
    "hub": load_hub,
    "tinyshakespeare": load_tinyshakespeare,
    "wikitext2": load_wikitext2,
}
#: Arguments every source may receive from the data module; a source takes those it declares.
CONTEXT_ARGS = ("cache_dir", "download")


def check_source_options(source: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the options meant for ``source`` and return those that are set (not ``None``).

    Unknown source names, options the source does not use and missing required options are
    ``ValueError``\\ s naming the valid choices.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; valid sources: {sorted(SOURCES)}")
    params = inspect.signature(SOURCES[source]).parameters
    accepted = [p for p in params if p not in CONTEXT_ARGS]
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(set(given) - set(accepted))
    if unused:
        raise ValueError(f"option(s) {unused} do not apply to source {source!r}; it accepts: {accepted}")
    required = [p for p in accepted if params[p].default is inspect.Parameter.empty and p not in given]
    if required:
        raise ValueError(f"source {source!r} needs option(s) {required} (got none)")
    return given


def load_corpus(
    source: str, *, cache_dir: Union[str, os.PathLike] = "~/.cache/attn_lm", download: bool = True, **options: Any
) -> Corpus:
    """Load the text of ``source`` (one of :data:`SOURCES`) with its ``options``.

    ``None`` options mean "not set". ``cache_dir`` (where downloads go) and ``download`` are
    passed to the sources that use them.
    """
    given = check_source_options(source, options)
    loader = SOURCES[source]
    params = inspect.signature(loader).parameters
    context = {"cache_dir": Path(cache_dir).expanduser(), "download": download}
    return loader(**given, **{k: v for k, v in context.items() if k in params})
