"""Find the CUDA toolkit that builds the ``"cuda"`` extension.

torch's own guess (``torch.utils.cpp_extension.CUDA_HOME``) is the folder above the first
``nvcc`` on the ``PATH``. That is wrong when this ``nvcc`` is a wrapper script or a symlink:
``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc`` gives ``/usr/local``, which
has no CUDA headers. :func:`find_cuda_home` looks, in order, at

1. ``CUDA_HOME``, then ``CUDA_PATH``, when set (the user's choice, taken as given);
2. the toolkit of the real ``nvcc`` behind the one on the ``PATH``: symlinks are resolved, and
   ``nvcc --dryrun`` names the folder the real compiler runs from (its ``_HERE_`` line), which
   sees through wrapper scripts;
3. ``/usr/local/cuda``.

A folder counts as a toolkit only if it has ``bin/nvcc`` and ``include/cuda_runtime_api.h``,
which every CUDA extension build needs; one without them is "no toolkit", with the reason.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from ._extension import ExtensionUnavailable, cpp_extension

#: The header every CUDA extension build includes.
RUNTIME_HEADER = Path("include") / "cuda_runtime_api.h"
#: Where the toolkit is installed when nothing else says.
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def is_toolkit(home: Path) -> bool:
    """Whether ``home`` holds a CUDA toolkit an extension can be built with."""
    return (home / "bin" / "nvcc").is_file() and (home / RUNTIME_HEADER).is_file()


@functools.cache
def find_cuda_home() -> Path:
    """The CUDA toolkit's root folder (see the module docstring for where it looks).

    Raises:
        ExtensionUnavailable: no toolkit was found; the message says where it looked and how
            to point at one.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            home = Path(os.environ[variable])
            if not is_toolkit(home):
                raise ExtensionUnavailable(
                    f"{variable}={home} is not a CUDA toolkit (it needs bin/nvcc and {RUNTIME_HEADER}): "
                    f"set {variable} to the toolkit's folder, e.g. {DEFAULT_CUDA_HOME}"
                )
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        for home in (Path(nvcc).resolve().parent.parent, _nvcc_own_home(nvcc)):
            if home is not None and is_toolkit(home):
                return home
    if is_toolkit(DEFAULT_CUDA_HOME):
        return DEFAULT_CUDA_HOME
    found = f"nvcc on the PATH is {nvcc}, but no toolkit with {RUNTIME_HEADER} is behind it" if nvcc else (
        "no nvcc on the PATH"
    )
    raise ExtensionUnavailable(
        f"no CUDA toolkit found ({found}, and none in {DEFAULT_CUDA_HOME}): install the CUDA toolkit "
        f"or set CUDA_HOME to its folder"
    )


def use_cuda_home() -> Path:
    """Point :mod:`torch.utils.cpp_extension` at :func:`find_cuda_home`'s toolkit, and return it.

    torch's builders read the module's ``CUDA_HOME``, guessed at import from ``nvcc``'s folder.
    """
    home = find_cuda_home()
    cpp_extension().CUDA_HOME = str(home)
    return home


def _nvcc_own_home(nvcc: str) -> Path | None:
    """The toolkit the real compiler behind ``nvcc`` (perhaps a wrapper script) runs from."""
    try:
        result = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", result.stdout + result.stderr, flags=re.MULTILINE)
    return Path(match.group(1).strip()).parent if match else None
