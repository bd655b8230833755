#!/bin/sh
# The lent-GPU check of the Triton block kernels (issue 7), in the order that matters if time runs out:
#   1. their tests on the device (kernels against float64 einsum; conv with the kernels == PyTorch paths, fp32 and
#      bf16 autocast);
#   2. one profiled bf16 training step (kernel count, summed kernel time, CUDA-graph replay);
#   3. the paper model at batch 240 of real QM9 with CUDA graphs: EDGE_FRAME bf16/fp16/TF32 and FULL bf16 with
#      the kernels, then EDGE_FRAME bf16 with SE3T_TRITON=never (the PyTorch path) in the same command;
#   4. the CUDA-graph tests.
# Usage (repository root): OUT=/path DATA_FILE=.devdata/qm9-240.pt sh benchmarks/device_triton.sh
OUT=${OUT:-/tmp/se3t-triton}
DATA_FILE=${DATA_FILE:-.devdata/qm9-240.pt}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
bench() {  # NAME LEVELS PRECISIONS
    "$PY" -m benchmarks qm9 --device cuda --data saved --data-file "$DATA_FILE" --model paper --batch-sizes 240 \
        --levels "$2" --precisions "$3" --low-memory off --cuda-graphs on --scatter-backends torch --warmup 3 \
        --repeats 10 --num-batches 4 --cell-timeout 150 --no-plots --out "$OUT" --name "$1" 2>&1 \
        | grep -E "mol/s|rror|failed" | tail -12
}
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_triton_outer.py > "$OUT/gpu-triton-tests.txt" 2>&1
tail -n 4 "$OUT/gpu-triton-tests.txt"
"$PY" -m benchmarks.profile_step --device cuda --data-file "$DATA_FILE" --batch-size 240 --precision bf16 \
    --mode train --top 30 --out "$OUT/profile-bf16-train-triton.txt" 2>&1 | grep -E "^(eager|device|ops|CUDA|Trace)" 
bench gpu-h200-qm9-triton EDGE_FRAME bf16,fp16,tf32
bench gpu-h200-qm9-triton-full FULL bf16
SE3T_TRITON=never bench gpu-h200-qm9-pytorch-path EDGE_FRAME bf16
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py \
    tests/runtime/test_training.py::test_cuda_graphs_training_equals_eager > "$OUT/gpu-tests.txt" 2>&1
tail -n 3 "$OUT/gpu-tests.txt"
