"""A wheel built by ``setup.py`` carries the kernels' sources, and installed on its own (no
checkout beside it) ``backend="auto"`` still finds the fused CPU kernel."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh"))


def can_build_wheels() -> bool:
    """setuptools with its own ``bdist_wheel``, or the ``wheel`` package beside it."""
    return importlib.util.find_spec("setuptools") is not None and (
        importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
        or importlib.util.find_spec("wheel") is not None
    )


@pytest.mark.slow
@pytest.mark.skipif(not can_build_wheels(), reason="needs setuptools with bdist_wheel to build the wheel offline")
def test_wheel_carries_the_sources_and_its_install_runs_the_fused_kernel(tmp_path):
    """``pip wheel .`` (without the ahead-of-time flag), installed into an empty folder and
    imported from another: the kernel compiles from the package's copy of ``csrc/``."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOMT_BUILD_EXT", "PYTHONPATH")}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )
    (wheel,) = (tmp_path / "dist").glob("lomt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert SOURCES and all(f"lomt_kernels/csrc/{name}" in names for name in SOURCES), names

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )
    code = (
        "import warnings, torch, lomt_kernels\n"
        "from lomt_kernels import backends\n"
        "warnings.simplefilter('error')\n"
        "print(lomt_kernels.__file__)\n"
        "print(backends.resolve('auto', torch.device('cpu'))[0])\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=900,
        env={**env, "PYTHONPATH": str(target), "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module_file, backend = result.stdout.split()
    assert Path(module_file).is_relative_to(target) and backend == "cpu", result.stdout + result.stderr
    assert "compiling group_prox_adam_cpu" in result.stderr
