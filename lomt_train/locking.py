"""Advisory locks on folders, so that two processes never write the same run or cache entry.

The lock is ``flock`` on a small file: the kernel releases it when the holder exits or dies,
so a lock is never left stale by a crash. The file records who holds it (pid, host, command),
which is what the error of a second process names.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class LockedError(FileExistsError):
    """Another live process holds the lock."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "an unknown process"
    except OSError:
        return "an unknown process"


@contextmanager
def hold_lock(path: str | Path, *, wait: bool = False, purpose: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if needed) for the ``with`` block.

    With ``wait=False`` a lock held by another process raises :class:`LockedError` naming that
    process and ``purpose`` (what the lock guards; by default the folder of ``path``); with
    ``wait=True`` the call blocks until it is released.
    """
    path = Path(path)
    purpose = purpose or f"folder {path.parent}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockedError(
                f"{purpose} is in use by {_holder(path)} (lock file {path}); wait for it to finish, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
