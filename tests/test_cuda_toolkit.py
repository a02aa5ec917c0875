"""Finding the CUDA toolkit behind ``CUDA_HOME``, a symlinked or wrapped ``nvcc``, or the default."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lomt_kernels.kernels import cuda_toolkit
from lomt_kernels.kernels._extension import ExtensionUnavailable


@pytest.fixture(autouse=True)
def clean_search(monkeypatch, tmp_path):
    """No CUDA variables, an empty PATH and no default toolkit, unless a test adds them."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(cuda_toolkit, "DEFAULT_CUDA_HOME", tmp_path / "no-default")
    cuda_toolkit.find_cuda_home.cache_clear()
    yield
    cuda_toolkit.find_cuda_home.cache_clear()


def make_toolkit(root: Path) -> Path:
    """A folder laid out as a toolkit: ``bin/nvcc`` and the runtime header."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("")
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime_api.h").write_text("")
    return root


def test_cuda_home_is_taken_as_given(monkeypatch, tmp_path):
    home = make_toolkit(tmp_path / "cuda-12.4")
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert cuda_toolkit.find_cuda_home() == home


def test_a_cuda_home_without_headers_is_no_toolkit(monkeypatch, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(ExtensionUnavailable, match=r"CUDA_HOME=.* is not a CUDA toolkit .*cuda_runtime_api\.h"):
        cuda_toolkit.find_cuda_home()


def test_a_symlinked_nvcc_leads_to_its_toolkit(monkeypatch, tmp_path):
    home = make_toolkit(tmp_path / "cuda-13.0")
    (home / "bin" / "nvcc").chmod(0o755)
    (tmp_path / "usr-local-bin").mkdir()
    (tmp_path / "usr-local-bin" / "nvcc").symlink_to(home / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "usr-local-bin"))
    assert cuda_toolkit.find_cuda_home() == home


def test_no_nvcc_and_no_default_is_no_toolkit_with_the_fix():
    with pytest.raises(ExtensionUnavailable, match="no CUDA toolkit found .*no nvcc on the PATH.*set CUDA_HOME"):
        cuda_toolkit.find_cuda_home()


def test_the_default_folder(monkeypatch, tmp_path):
    home = make_toolkit(tmp_path / "cuda")
    monkeypatch.setattr(cuda_toolkit, "DEFAULT_CUDA_HOME", home)
    assert cuda_toolkit.find_cuda_home() == home


def real_toolkit() -> Path | None:
    """The toolkit of this machine's real nvcc, if it has one with headers."""
    nvcc = shutil.which("nvcc")
    home = Path(nvcc).resolve().parent.parent if nvcc else None
    for candidate in (home, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))):
        if candidate is not None and cuda_toolkit.is_toolkit(candidate):
            return candidate.resolve()
    return None


REAL_TOOLKIT = real_toolkit()
ORIGINAL_PATH = os.environ.get("PATH", "")


@pytest.mark.skipif(REAL_TOOLKIT is None, reason="needs a CUDA toolkit (the real nvcc is asked where it runs from)")
def test_a_wrapper_script_is_seen_through(monkeypatch, tmp_path):
    """``/usr/local/bin/nvcc`` as a script that execs the real one: torch's guess is the folder
    above the script, with no headers; the real compiler names its own folder."""
    bin_dir = tmp_path / "local" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "nvcc").write_text(f'#!/bin/sh\nexec {REAL_TOOLKIT / "bin" / "nvcc"} "$@"\n')
    (bin_dir / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), ORIGINAL_PATH]))  # nvcc runs the host compiler
    assert cuda_toolkit.find_cuda_home().resolve() == REAL_TOOLKIT
