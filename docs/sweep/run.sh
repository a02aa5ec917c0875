#!/usr/bin/env bash
# The sweep of issue #21 on the synthetic NYU-v2 data, and its report (tables and figures) in docs/sweep/.
#
#   docs/sweep/run.sh [RUNS]       # from anywhere; RUNS (default: runs/sweep) is relative to the repository root
#
# lambda in {0, 3e-3, 1e-2, 1e-1} x seeds {0, 1, 2} x (the multi-task model seg,normal,depth and each
# task alone): 48 runs. Training is the synthetic preset's (small backbone, batch 16, Adam at 2e-3,
# cosine schedule, uncertainty weighting, weighted group prox) made smaller so that the sweep fits
# a two-core machine: 48x48 images, 48 training images, 8 epochs (the preset: 64x64, 96, 8).
# The four models train side by side, one CPU thread each, so the figures do not depend on the
# machine's core count. Finished runs are skipped: an interrupted sweep continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${1:-runs/sweep}"
LAMBDAS=(0 3e-3 1e-2 1e-1)
SEEDS=(0 1 2)
SMALLER=(--image-size 48 --synthetic-images 48 --epochs 8)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$RUNS"
pids=()
for tasks in seg,normal,depth seg normal depth; do
    python -m lomt_train nyu --tasks "$tasks" --synthetic "${SMALLER[@]}" --device cpu --lambda "${LAMBDAS[@]}" \
        --seeds "${SEEDS[@]}" --out "$RUNS" --resume --no-progress > "$RUNS/$tasks.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
python -m lomt_train report "$RUNS" --out docs/sweep
