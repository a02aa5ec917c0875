"""Files that are either written whole or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a unique temporary file beside ``path``; on success fsync it and rename it over ``path``.

    The rename is atomic on POSIX, so a crash at any moment leaves the old file or the new one,
    never a truncated one, and concurrent writers (DataLoader workers caching the same derived
    file) each write their own temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_open` left in ``folder`` when a writer was killed
    mid-write (``.<name>.<random>.tmp``); returns them. Call it only while no other process may
    be writing there (e.g. holding the folder's lock)."""
    removed = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
