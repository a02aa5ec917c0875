"""Load the C++/CUDA extensions, prebuilt or built from ``csrc/`` on first use, once per process.

:func:`load_extension` looks for a library in this order:

1. one built ahead of time into the package (``LOMT_BUILD_EXT=1 pip install ...``, see
   ``setup.py``), in :data:`PREBUILT`;
2. one built before by :func:`torch.utils.cpp_extension.load`, cached in
   ``<TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/py3X_cuXY>/<name>_<key>``;
3. otherwise it compiles the sources there: the repository's ``csrc/`` in a source checkout
   (editable installs), else the copy that ``setup.py`` puts in the package (:data:`PACKAGE_CSRC`).

Both the prebuilt and the cached library are named ``<name>_<key>``, where ``key`` hashes the
sources, the flags, the torch version and the CPU (its vector ISA, and its model and feature
flags when the flags say ``-march=native``): a changed source or flag builds afresh rather than reusing a stale
library, and a library built on another CPU is never loaded where it might not run.

The first real compilation prints one line to stderr, so a first step that takes a minute is
explained. Loading is thread-safe, and a failure is remembered and raised again as
:class:`ExtensionUnavailable`, whose message is a short reason (the compiler's first errors)
fit for :func:`lomt_kernels.backends.unavailable_reason`.

:mod:`torch.utils.cpp_extension` is imported only to build, by :func:`cpp_extension`: its
import looks for a CUDA toolkit and logs a warning when there is no GPU, which says nothing
about the CPU kernel.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import platform
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import torch

#: The extension sources in a source checkout: ``csrc/`` at the repository root.
REPO_CSRC = Path(__file__).resolve().parents[2] / "csrc"
#: The copy of ``csrc/`` that ``setup.py`` puts in built packages (sdists and wheels).
PACKAGE_CSRC = Path(__file__).resolve().parents[1] / "csrc"
#: Where ``setup.py`` puts the libraries it builds ahead of time (``LOMT_BUILD_EXT=1``).
PREBUILT = Path(__file__).resolve().parent / "prebuilt"
#: Compiler errors quoted in a failure's reason.
_MAX_ERROR_LINES = 3


class ExtensionUnavailable(RuntimeError):
    """An extension could not be built or loaded; the message says why."""


_lock = threading.Lock()
_loaded: dict[str, ModuleType | str | ExtensionUnavailable] = {}


def build_failure(build: Callable[[], object]) -> str | None:
    """``None`` if ``build()`` (an extension's builder) succeeds, else why it failed: a backend's
    ``unavailable_reason`` once the device is right."""
    try:
        build()
    except ExtensionUnavailable as exc:
        return str(exc)
    return None


def cpp_extension() -> ModuleType:
    """:mod:`torch.utils.cpp_extension`, imported on first call without its no-GPU warning.

    Its import guesses ``CUDA_HOME`` and, on a machine without a GPU, logs "No CUDA runtime is
    found": noise for the CPU kernel, and the CUDA build finds its toolkit itself
    (:mod:`~lomt_kernels.kernels.cuda_toolkit`).
    """
    if "torch.utils.cpp_extension" not in sys.modules:
        logger = logging.getLogger("torch.utils.cpp_extension")
        no_runtime = _DropMessage("No CUDA runtime is found")
        logger.addFilter(no_runtime)
        try:
            import torch.utils.cpp_extension  # noqa: F401
        finally:
            logger.removeFilter(no_runtime)
    return sys.modules["torch.utils.cpp_extension"]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def source_paths(sources: Sequence[str]) -> list[Path]:
    """The paths of ``sources`` (names in ``csrc/``, or absolute paths): in the repository's
    ``csrc/`` when it has them all, else in the package's copy."""
    for directory in (REPO_CSRC, PACKAGE_CSRC):
        paths = [directory / s for s in sources]
        if all(p.is_file() for p in paths):
            return paths
    return [REPO_CSRC / s for s in sources]


@functools.cache
def _cpu_identity() -> tuple[str, ...]:
    """What ``-march=native`` code depends on: the CPU's model name and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return (platform.processor(),)
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return (fields.get("model name", ""), fields.get("flags", fields.get("Features", "")))


def build_key(sources: Sequence[Path], flags: Sequence[str]) -> str:
    """A short hash of everything that decides the built library's contents."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    machine = [platform.machine(), torch.backends.cpu.get_cpu_capability()]
    if "-march=native" in flags:
        machine.extend(_cpu_identity())
    for part in (*flags, torch.__version__, *machine):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:12]


def versioned_name(
    name: str, sources: Sequence[str], *, extra_cflags: Sequence[str] = (), extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
) -> str:
    """``<name>_<key>``: the name of the library built from ``sources`` with these flags, both
    prebuilt into the package and in the extension cache."""
    flags = [*extra_cflags, "|", *extra_cuda_cflags, "|", *extra_ldflags]
    return f"{name}_{build_key(source_paths(sources), flags)}"


def build_directory(name: str) -> Path:
    """The directory ``cpp_extension.load`` builds extension ``name`` in (created if missing)."""
    # The private helper is what load() itself uses, so the directory is the same.
    return Path(cpp_extension()._get_build_directory(name, verbose=False))


def load_extension(
    name: str,
    sources: Sequence[str],
    *,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_ldflags: Sequence[str] = (),
    python_module: bool = False,
    prepare_build: Callable[[], object] | None = None,
    verbose: bool = False,
) -> ModuleType | str:
    """Load the extension made of ``csrc/<sources>``: prebuilt, cached, or built now.

    Returns the Python module when ``python_module`` (a ``PYBIND11_MODULE``), else the path of
    the shared library, loaded with :func:`torch.ops.load_library` (an extension that only
    registers ``TORCH_LIBRARY`` ops). Calls after the first return the same result at once.
    ``prepare_build`` runs before :func:`torch.utils.cpp_extension.load` (not for a prebuilt
    library) and raises :class:`ExtensionUnavailable` if that cannot build. ``verbose`` prints the
    compilers' output (for instance ptxas's resource report) to stdout when it compiles.

    Raises:
        ExtensionUnavailable: the build or the load failed; the message is the reason, and a
            later call raises it again without retrying.
    """
    with _lock:
        if name not in _loaded:
            try:
                paths = source_paths(sources)
                missing = [str(p) for p in paths if not p.is_file()]
                if missing:
                    raise ExtensionUnavailable(
                        f"the sources of {name} are missing: {', '.join(missing)} (a lomt install without "
                        f"csrc/: reinstall from the repository or from a wheel built by its setup.py)"
                    )
                versioned = versioned_name(
                    name, sources, extra_cflags=extra_cflags, extra_cuda_cflags=extra_cuda_cflags,
                    extra_ldflags=extra_ldflags,
                )
                prebuilt = _prebuilt_library(versioned)
                if prebuilt is not None:
                    _loaded[name] = _load_library(versioned, prebuilt, python_module)
                else:
                    if prepare_build is not None:
                        prepare_build()
                    _loaded[name] = _build_and_load(
                        name, versioned, paths, list(extra_cflags), list(extra_cuda_cflags), list(extra_ldflags),
                        python_module, verbose,
                    )
            except ExtensionUnavailable as exc:
                _loaded[name] = exc
        result = _loaded[name]
    if isinstance(result, ExtensionUnavailable):
        raise result
    return result


def _prebuilt_library(versioned: str) -> Path | None:
    """The library ``setup.py`` built ahead of time for this key, if any."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (PREBUILT / f"{versioned}{suffix}").is_file():
            return PREBUILT / f"{versioned}{suffix}"
    return None


def _load_library(versioned: str, library: Path, python_module: bool) -> ModuleType | str:
    try:
        if not python_module:
            torch.ops.load_library(str(library))
            return str(library)
        spec = importlib.util.spec_from_file_location(versioned, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (OSError, ImportError) as exc:
        raise ExtensionUnavailable(f"loading the prebuilt {library} failed: {_summary(exc)}") from exc


def _build_and_load(
    name: str, versioned: str, sources: list[Path], cflags: list[str], cuda_cflags: list[str],
    ldflags: list[str], python_module: bool, verbose: bool = False,
) -> ModuleType | str:
    extension = cpp_extension()
    try:
        directory = build_directory(versioned)
    except OSError as exc:
        raise ExtensionUnavailable(f"cannot create the build directory for {name}: {exc}") from exc
    library = directory / f"{versioned}{extension.LIB_EXT}"
    newest_source = max(s.stat().st_mtime for s in sources)
    if not library.exists() or library.stat().st_mtime < newest_source:
        print(f"lomt_kernels: compiling {name} (first use, about a minute) ...", file=sys.stderr, flush=True)
    try:
        # load() takes the directory's file lock and lets ninja decide what to rebuild, so
        # concurrent processes build once and never load a half-written library.
        return extension.load(
            name=versioned,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            build_directory=str(directory),
            is_python_module=python_module,
            verbose=verbose,
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
