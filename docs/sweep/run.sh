#!/usr/bin/env bash
# The sweep of issue #21 on the synthetic NYU-v2 data, and its report (tables and figures) in docs/sweep/.
#
#   docs/sweep/run.sh [RUNS]       # from the repository root; RUNS defaults to runs/sweep
#
# lambda in {0, LAMBDAS} x seeds {0, 1, 2} x (the multi-task model seg,normal,depth and each task
# alone), with the synthetic preset's training made smaller so that the 48 runs fit a two-core
# machine: 48x48 images, 48 training images, 8 epochs (the preset: 64x64, 96, 8). Runs on the CPU
# and is deterministic: one machine gives the same figures each time. Finished runs are skipped,
# so an interrupted sweep continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS="${1:-runs/sweep}"
LAMBDAS=(0 1e-3 1e-2 1e-1)
SMALLER=(--image-size 48 --synthetic-images 48 --epochs 8)
SEEDS=(0 1 2)
for tasks in seg,normal,depth seg normal depth; do
    python -m lomt_train nyu --tasks "$tasks" --synthetic "${SMALLER[@]}" --device cpu --lambda "${LAMBDAS[@]}" \
        --seeds "${SEEDS[@]}" --out "$RUNS" --resume --no-progress
done
python -m lomt_train report "$RUNS" --out docs/sweep
