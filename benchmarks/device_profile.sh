#!/bin/sh
# A short profiling run on a lent GPU (issue 7): where the paper model's step spends device time, before changing
# code. Per precision, one eager training step under torch.profiler (kernel count, summed kernel time, top ops and
# kernels) and the same step replayed as a CUDA graph; then the graphed cells of the benchmark at EDGE_FRAME.
# Usage (repository root): OUT=/path DATA_FILE=.devdata/qm9-240.pt sh benchmarks/device_profile.sh
# Env: PRECISIONS (bf16,fp32), LEVEL (EDGE_FRAME), BATCH (240), BENCH (1: also the graphed benchmark cells).
set -eu
OUT=${OUT:-/tmp/se3t-profile}
DATA_FILE=${DATA_FILE:-.devdata/qm9-240.pt}
BATCH=${BATCH:-240}
LEVEL=${LEVEL:-EDGE_FRAME}
PRECISIONS=${PRECISIONS:-bf16,fp32}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
for p in $(echo "$PRECISIONS" | tr ',' ' '); do
    "$PY" -m benchmarks.profile_step --device cuda --data-file "$DATA_FILE" --batch-size "$BATCH" --level "$LEVEL" \
        --precision "$p" --mode train --top 45 --out "$OUT/profile-$p-train.txt" 2>&1 \
        | grep -v "^USDT\|^STAGE" | head -12
done
if [ "${BENCH:-1}" = 1 ]; then
    "$PY" -m benchmarks qm9 --device cuda --data saved --data-file "$DATA_FILE" --model paper --batch-sizes "$BATCH" \
        --levels "$LEVEL" --precisions "$PRECISIONS" --low-memory off --cuda-graphs on --scatter-backends torch \
        --warmup 3 --repeats 10 --num-batches 4 --cell-timeout 120 --no-plots --out "$OUT" --name gpu-h200-profile-run \
        2>&1 | grep -E "mol/s|error|Error" | tail -20
fi
