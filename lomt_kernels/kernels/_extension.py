"""Build and load the C++/CUDA extensions in the repository's ``csrc/``, once per process.

:func:`load_extension` compiles with :func:`torch.utils.cpp_extension.load` on first use and
loads the cached build afterwards. The build directory is
``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/py3X_cuXY>/<name>_<key>``, where ``key``
hashes the sources, the flags, the torch version and the CPU capability: a changed source or
flag builds afresh rather than reusing a stale library, and a cache shared between machines
never hands ``-march=native`` code to a CPU that cannot run it.

The first real compilation prints one line to stderr, so a first step that takes a minute is
explained. Loading is thread-safe, and a failure is remembered and raised again as
:class:`ExtensionUnavailable`, whose message is a short reason (the compiler's first errors)
fit for :func:`lomt_kernels.backends.unavailable_reason`.
"""

from __future__ import annotations

import hashlib
import platform
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

#: The extension sources, in ``csrc/`` at the repository root (editable installs).
CSRC = Path(__file__).resolve().parents[2] / "csrc"
#: Compiler errors quoted in a failure's reason.
_MAX_ERROR_LINES = 3


class ExtensionUnavailable(RuntimeError):
    """An extension could not be built or loaded; the message says why."""


_lock = threading.Lock()
_loaded: dict[str, ModuleType | str | ExtensionUnavailable] = {}


def build_key(sources: Sequence[Path], flags: Sequence[str]) -> str:
    """A short hash of everything that decides the built library's contents."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for part in (*flags, torch.__version__, platform.machine(), torch.backends.cpu.get_cpu_capability()):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:12]


def build_directory(name: str) -> Path:
    """The directory ``cpp_extension.load`` builds extension ``name`` in (created if missing)."""
    from torch.utils import cpp_extension

    # The private helper is what load() itself uses, so the directory is the same.
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def load_extension(
    name: str,
    sources: Sequence[str],
    *,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    python_module: bool = False,
) -> ModuleType | str:
    """Build (first use) and load the extension made of ``csrc/<sources>``.

    Returns the Python module when ``python_module`` (a ``PYBIND11_MODULE``), else the path of
    the shared library, loaded with :func:`torch.ops.load_library` (an extension that only
    registers ``TORCH_LIBRARY`` ops). Calls after the first return the same result at once.

    Raises:
        ExtensionUnavailable: the build or the load failed; the message is the reason, and a
            later call raises it again without retrying.
    """
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build_and_load(
                    name, [CSRC / s for s in sources], list(extra_cflags), list(extra_cuda_cflags),
                    list(extra_ldflags), python_module,
                )
            except ExtensionUnavailable as exc:
                _loaded[name] = exc
        result = _loaded[name]
    if isinstance(result, ExtensionUnavailable):
        raise result
    return result


def _build_and_load(
    name: str, sources: list[Path], cflags: list[str], cuda_cflags: list[str], ldflags: list[str],
    python_module: bool,
) -> ModuleType | str:
    from torch.utils import cpp_extension

    missing = [str(s) for s in sources if not s.is_file()]
    if missing:
        raise ExtensionUnavailable(f"the sources of {name} are missing: {', '.join(missing)}")
    versioned = f"{name}_{build_key(sources, [*cflags, '|', *cuda_cflags, '|', *ldflags])}"
    try:
        directory = build_directory(versioned)
    except OSError as exc:
        raise ExtensionUnavailable(f"cannot create the build directory for {name}: {exc}") from exc
    library = directory / f"{versioned}{cpp_extension.LIB_EXT}"
    newest_source = max(s.stat().st_mtime for s in sources)
    if not library.exists() or library.stat().st_mtime < newest_source:
        print(f"lomt_kernels: compiling {name} (first use, about a minute) ...", file=sys.stderr, flush=True)
    try:
        # load() takes the directory's file lock and lets ninja decide what to rebuild, so
        # concurrent processes build once and never load a half-written library.
        return cpp_extension.load(
            name=versioned,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=python_module,
            verbose=False,
        )
    except Exception as exc:  # compiler missing, compile errors, loader errors: all a reason
        raise ExtensionUnavailable(f"building {name} failed: {_summary(exc)} (build directory {directory})") from exc


def _summary(exc: Exception) -> str:
    """The compiler's first diagnostics (``file:line:col: error: ...``) in ``exc``'s message, or
    its first line (e.g. "Ninja is required to load C++ extensions")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r":\s*(fatal )?error:", line)]
    if errors:
        return "; ".join(errors[:_MAX_ERROR_LINES])
    return lines[0] if lines else type(exc).__name__
