"""Prebuild the C++ kernels, so that no training run pays for the first-use compile.

    python -m lomt_kernels.build          # the CPU kernel (about a minute)
    python -m lomt_kernels.build --cuda   # and the CUDA kernel (about two minutes; needs nvcc, not a GPU)

The builds are cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/<python>_<cuda>/``), where later processes load them without
compiling; the command prints each library's path. A kernel built into the package at install
time (``LOMT_BUILD_EXT=1``, see ``setup.py``) is loaded from there instead. Exit status 1 if a
build fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lomt_kernels.build", description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA extension")
    args = parser.parse_args(argv)
    from .kernels import cpu, cuda
    from .kernels._extension import ExtensionUnavailable

    builders = [("cpu", cpu.build)] + ([("cuda", cuda.build)] if args.cuda else [])
    for name, build in builders:
        start = time.perf_counter()
        try:
            result = build()
        except ExtensionUnavailable as exc:
            print(f"{name}: failed: {exc}", file=sys.stderr)
            return 1
        library = Path(getattr(result, "__file__", result))
        print(f"{name}: ready in {time.perf_counter() - start:.0f} s ({library})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
