"""Where lomt keeps the files it generates, and how it knows they are current.

Everything lives under :func:`cache_home`: ``$LOMT_DATA_CACHE`` if set, else ``~/.cache/lomt``.
A generated dataset carries a marker file holding the parameters it was generated with; a
generator that finds a matching marker does nothing, and one that finds a different marker
deletes what it generated before and starts again. :func:`generate_cached` keeps one folder per
set of parameters and makes each appear whole, so concurrent runs never see a partial set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..atomic import atomic_write_bytes
from ..locking import hold_lock

MARKER_NAME = "lomt_synthetic.json"


def cache_home() -> Path:
    """``$LOMT_DATA_CACHE``, or ``~/.cache/lomt``."""
    env = os.environ.get("LOMT_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lomt"


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


def synthetic_root(name: str, **params: Any) -> Path:
    """The default folder of the synthetic dataset ``name`` (``"nyu"``, ``"celeba"``).

    ``cache_home()/synthetic/<name>``; with ``params`` (e.g. ``num_train=96``) the folder name
    gets a hash of them, ``<name>-<hash>``, so differently sized sets can live side by side
    instead of regenerating each other.
    """
    folder = f"{name}-{_digest(params)}" if params else name
    return cache_home() / "synthetic" / folder


def writable_home(root: Path, purpose: str) -> Path:
    """``root`` if we may write there, else a folder for ``purpose`` under :func:`cache_home`
    named after ``root``'s absolute path (for datasets on read-only storage)."""
    if os.access(root, os.W_OK):
        return root
    return cache_home() / purpose / _digest(str(root.resolve()))


def is_current(root: Path, params: dict[str, Any]) -> bool:
    """Whether ``root`` holds a generated dataset made with exactly ``params``."""
    marker = root / MARKER_NAME
    try:
        # Round-trip ``params`` through JSON so tuples compare equal to the stored lists.
        return json.loads(marker.read_text()) == json.loads(json.dumps(params))
    except (OSError, ValueError):
        return False


def clear_generated(root: Path, patterns: tuple[str, ...]) -> None:
    """Delete what a previous generation wrote into ``root`` (entries matching ``patterns``).

    Refuses to touch a non-empty folder without a marker: it may be a real dataset.
    """
    if not root.exists():
        return
    if not (root / MARKER_NAME).is_file() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and has no {MARKER_NAME}; refusing to write synthetic data over it")
    (root / MARKER_NAME).unlink(missing_ok=True)  # first, so an interrupted clear is not "current"
    for pattern in patterns:
        for entry in root.glob(pattern):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def mark_generated(root: Path, params: dict[str, Any]) -> None:
    """Record that ``root`` now holds data generated with ``params``; written last, so a
    generation that was interrupted is redone next time."""
    atomic_write_bytes(json.dumps(params, indent=2, sort_keys=True).encode(), root / MARKER_NAME)


def generate_cached(name: str, make: Callable[..., Path], **params: Any) -> Path:
    """The synthetic dataset ``make(root, **params)`` in its own cache folder, generated once.

    The folder is :func:`synthetic_root` ``(name, **params)`` (so every generation parameter
    keys it). Generation runs under a lock, into a temporary folder that is renamed into place
    when complete: a concurrent reader finds the whole set or waits for it, never a partial one.
    A temporary folder left by a killed generator is removed by the next one.
    """
    root = synthetic_root(name, **params)
    with hold_lock(root.with_name(f".{root.name}.lock"), wait=True, purpose=f"synthetic data {root}"):
        if not (root / MARKER_NAME).is_file():
            for orphan in root.parent.glob(f".{root.name}.*.tmp"):
                shutil.rmtree(orphan, ignore_errors=True)
            if root.exists():  # a partial set from before generation was atomic
                shutil.rmtree(root)
            tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
            try:
                make(tmp, **params)
                tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
                tmp.rename(root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        # A no-op check of the marker, unless the generator's version changed since.
        return make(root, **params)
