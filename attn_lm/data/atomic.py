"""Atomic file writes: readers see either the old file or the complete new one, never a part.

Data is written to a uniquely named temporary file in the destination folder and renamed over
the destination (``os.replace`` is atomic on POSIX and Windows within one file system). If the
writer fails, the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Open a binary file that replaces ``path`` when the ``with`` block exits without error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically."""
    with atomic_writer(path) as f:
        f.write(data)
