#!/usr/bin/env bash
# Every GPU check in one call of about five minutes, for a machine with a CUDA device (from the
# repository root):
#
#   bash benchmarks/gpu_checks.sh [OUTDIR]
#
# Stages, each under its own time limit and logged to OUTDIR/<stage>.log (default gpu-checks/),
# with its exit code and last lines in OUTDIR/summary.log:
#   1. the device, versions, and the traffic model's predictions for it (benchmarks.traffic_model);
#   2. the Triton GPU tests: parity with the float64 reference, ten repeats bit-identical, no host
#      sync in a steady-state step, CUDA-graph capture (the CUDA extension builds meanwhile, and
#      its build log holds ptxas's registers and spills per kernel);
#   3. kernel time and wall time of the Triton and CUDA backends beside fused Adam on the ResNet-50
#      set and the NYU model (benchmarks.device_time, after the CUDA build), and DRAM bytes per
#      param of one whole step of each backend under ncu where it is installed;
#   4. the report, interleaved wall time against fused Adam and the unfused steps, written to
#      OUTDIR/RESULTS-cuda.md (copy it to benchmarks/);
#   5. the CUDA backend's tests;
#   6. a two-epoch `lomt_train --paper` run (ResNet-50, 256x256) on the synthetic NYU data, with
#      its training images/s.
# Set TORCH_CUDA_ARCH_LIST (default 9.0) for other GPUs; REPORT_ARGS narrows stage 4.
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
# pytest-xdist, where installed, compiles and runs the many small parity tests in parallel.
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
    $python -c "import sys, torch, triton; p = torch.cuda.get_device_properties(0); print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, p.name, p.multi_processor_count, 'SMs', getattr(p, 'L2_cache_size', 0) // 2**20, 'MiB L2')"
    $python -c "from lomt_kernels.kernels.cuda_toolkit import find_cuda_home; print('CUDA toolkit', find_cuda_home())"
    echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
} 2>&1 | tee "$out/summary.log"
sms=$($python -c "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)")
l2=$($python -c "import torch; print(getattr(torch.cuda.get_device_properties(0), 'L2_cache_size', 50e6) / 1e6)")

TAIL_LINES=10 stage traffic_model 60 $python -m benchmarks.traffic_model --sms "$sms" --l2-mb "$l2"
stage cuda_build 240 $python -m lomt_kernels.kernels.cuda --compile-only &
build=$!
stage triton_tests 150 $python -m pytest -q -p no:cacheprovider $parallel -k triton tests/test_kernels_triton.py tests/test_parity.py
wait $build  # the CUDA backend's rows below need its extension built
TAIL_LINES=30 stage device_time_resnet50 45 $python -m benchmarks.device_time --set resnet50-convs --repeats 5 --output "$out/device_time_resnet50.md"
TAIL_LINES=30 stage device_time_nyu 45 $python -m benchmarks.device_time --set nyu-3task --repeats 5 --output "$out/device_time_nyu.md"
if command -v ncu >/dev/null; then
    # One whole step (every launch of it) between cudaProfilerStart and Stop, after two warm steps.
    for backend in triton cuda; do
        for prox in group group_weighted; do
            TAIL_LINES=16 stage "ncu_${backend}_$prox" 40 ncu --profile-from-start off \
                --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
                $python -c "import torch; from benchmarks.baselines import Method, fused_spec; from benchmarks.params import build_set; m = Method(fused_spec('$backend', '$prox'), build_set('resnet50-convs', 'cuda')); [m.timed_step() for _ in range(2)]; m.restore(); torch.cuda.cudart().cudaProfilerStart(); m.step(); torch.cuda.cudart().cudaProfilerStop(); print('params', m.pset.numel)"
        done
    done
fi
stage report 75 $python -m benchmarks.report --device cuda ${REPORT_ARGS:---sets resnet50-convs,nyu-3task --repeats 9} --output "$out/RESULTS-cuda.md"
stage cuda_tests 100 $python -m pytest -q -p no:cacheprovider $parallel -k "cuda and not extension_compiles" tests/test_kernels_cuda.py tests/test_parity.py
TAIL_LINES=6 stage paper_training 90 $python -m lomt_train nyu --tasks seg,normal,depth --synthetic --paper --seeds 0 \
    --epochs 2 --lambda 1e-4 --out "$out/paper-run"
$python - "$out" <<'EOF' | tee -a "$out/summary.log"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
items = re.search(r"(\d+) training items", (out / "paper_training.log").read_text())
for history in (out / "paper-run").rglob("history.json"):
    rows = json.loads(history.read_text())
    seconds = sum(row["seconds"] for row in rows)
    n = int(items.group(1)) * len(rows) if items else 0
    print(f"paper_training: {len(rows)} epochs, {n} training images in {seconds:.1f} s of epochs "
          f"(validation included): {n / seconds:.1f} images/s")
EOF
