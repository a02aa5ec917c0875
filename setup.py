"""Build lomt. The metadata is in ``pyproject.toml``; this file adds the C++/CUDA kernels.

    pip install -e .                                      # quick: the kernels compile on first use
    LOMT_BUILD_EXT=1 pip install --no-build-isolation .   # compile them now, into the package

Every build copies ``csrc/`` into the package (``lomt_kernels/csrc/``), so that an install from
a wheel or an sdist can compile the kernels on first use as a source checkout does (an editable
install reads ``csrc/`` in place).

With ``LOMT_BUILD_EXT=1`` the C++ CPU kernel, and the CUDA kernel where a CUDA toolkit is found
(:mod:`lomt_kernels.kernels.cuda_toolkit`; ``TORCH_CUDA_ARCH_LIST`` picks the GPUs), are built
with torch's ``BuildExtension`` into ``lomt_kernels/kernels/prebuilt/``, where the loader looks
first. They are built against the torch of the build environment, hence
``--no-build-isolation`` (with ``setuptools`` and ``ninja`` installed beside torch). A library
is named after the key of its sources, flags, torch version and CPU
(:func:`lomt_kernels.kernels._extension.versioned_name`), so the loader takes it only where it
was built for, and compiles from the sources elsewhere.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """``build_py`` that also puts the kernels' sources, ``csrc/``, in the package."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            shutil.copytree(ROOT / "csrc", Path(self.build_lib) / "lomt_kernels" / "csrc", dirs_exist_ok=True)


def ahead_of_time_extensions() -> tuple[list, dict]:
    """The ``ext_modules`` and ``cmdclass`` entries that build the kernels at install time."""
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit(
            "LOMT_BUILD_EXT=1 builds the kernels against the installed torch, which this build "
            "environment lacks: install torch, setuptools and ninja, then run "
            "`LOMT_BUILD_EXT=1 pip install --no-build-isolation .`"
        )
    sys.path.insert(0, str(ROOT))
    from lomt_kernels.kernels import cpu, cuda, cuda_toolkit
    from lomt_kernels.kernels._extension import ExtensionUnavailable, cpp_extension, versioned_name

    extension = cpp_extension()
    package = "lomt_kernels.kernels.prebuilt"
    flags = cpu.build_flags()
    modules = [
        extension.CppExtension(
            f"{package}.{versioned_name(cpu.EXTENSION_NAME, cpu.SOURCES, **flags)}",
            [f"csrc/{s}" for s in cpu.SOURCES],
            extra_compile_args=flags["extra_cflags"],
            extra_link_args=flags["extra_ldflags"],
        )
    ]
    try:
        home = cuda_toolkit.use_cuda_home()
    except ExtensionUnavailable as exc:
        print(f"setup.py: the CUDA kernel is left to compile on first use: {exc}", file=sys.stderr)
    else:
        print(f"setup.py: building the CUDA kernel with the toolkit in {home}", file=sys.stderr)
        flags = cuda.build_flags()
        modules.append(
            extension.CUDAExtension(
                f"{package}.{versioned_name(cuda.EXTENSION_NAME, cuda.SOURCES, **flags)}",
                [f"csrc/{s}" for s in cuda.SOURCES],
                extra_compile_args={"cxx": flags["extra_cflags"], "nvcc": flags["extra_cuda_cflags"]},
            )
        )
    return modules, {"build_ext": extension.BuildExtension}


ext_modules, cmdclass = [], {}
if os.environ.get("LOMT_BUILD_EXT", "0") not in ("", "0"):
    ext_modules, cmdclass = ahead_of_time_extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
