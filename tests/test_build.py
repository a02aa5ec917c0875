import os
import subprocess
import sys

from lomt_kernels.build import main


def test_prebuild_command_builds_the_cpu_kernel(capsys):
    assert main([]) == 0
    assert "cpu: ready" in capsys.readouterr().out


def test_no_cuda_word_on_import_or_cpu_build():
    """torch's extension machinery logs "No CUDA runtime is found" when imported without a GPU;
    the package imports it only to build, and then without that warning."""
    code = (
        "import sys, lomt_kernels, lomt_train\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules, 'imported on package import'\n"
        "from lomt_kernels.kernels import cpu\n"
        "cpu.build()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CUDA" not in result.stdout + result.stderr, result.stdout + result.stderr
