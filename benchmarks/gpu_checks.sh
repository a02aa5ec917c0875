#!/usr/bin/env bash
# Every GPU check in one call, for a machine with a CUDA device (from the repository root):
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]
#
# builds the CUDA extension (in the background, while the Triton tests run), runs the GPU tests
# of both GPU backends, then the kernel-time split (benchmarks.device_time), the full report
# (benchmarks.report --device cuda) and the Triton tile-plan variants (benchmarks.triton_tiles).
# Each stage writes OUTDIR/<stage>.log (default gpu-checks/) and has a time limit, so one that
# hangs or fails costs only itself; OUTDIR/summary.log has each stage's exit code and last
# lines. Set TORCH_CUDA_ARCH_LIST (default 9.0) for other GPUs.
set -u
out=$(mkdir -p "${1:-gpu-checks}" && cd "${1:-gpu-checks}" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
python=${PYTHON:-python3}
$python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" || {
    echo "gpu_checks.sh: torch sees no CUDA device here; run it on a machine with one" >&2
    exit 2
}
# pytest-xdist, where installed, runs the many small parity tests in parallel.
parallel=$($python -c "import xdist" 2>/dev/null && echo "-n 8")

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, log it, summarise it
    local name=$1 limit=$2
    shift 2
    echo "=== $name: start $(date +%T)" | tee -a "$out/summary.log"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "=== $name: exit $? at $(date +%T)" | tee -a "$out/summary.log"
    tail -n "${TAIL_LINES:-8}" "$out/$name.log" | tee -a "$out/summary.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
    $python -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
    $python -c "from lomt_kernels.kernels.cuda_toolkit import find_cuda_home; print('CUDA toolkit', find_cuda_home())"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} 2>&1 | tee "$out/summary.log"

stage cuda_build 300 $python -m lomt_kernels.kernels.cuda --compile-only &
build=$!
stage triton_tests 300 $python -m pytest -q -p no:cacheprovider $parallel tests/test_kernels_triton.py
wait $build
stage cuda_tests 300 $python -m pytest -q -p no:cacheprovider $parallel -k "not extension_compiles" tests/test_kernels_cuda.py
TAIL_LINES=40 stage device_time 300 $python -m benchmarks.device_time --output "$out/device_time.md"
# REPORT_ARGS and TILES_ARGS narrow the last two stages where device time is short.
stage report 600 $python -m benchmarks.report --device cuda ${REPORT_ARGS:---repeats 15} --output "$out/RESULTS-cuda.md"
TAIL_LINES=45 stage triton_tiles 400 $python -m benchmarks.triton_tiles ${TILES_ARGS:-}
