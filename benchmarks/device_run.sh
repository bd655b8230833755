#!/bin/sh
# One run on a lent GPU machine (issue 7), prepared and tried on CPU so that device minutes go to measuring.
# In order:
#   0. the GPU tests (tests/test_cuda_graphs.py, the Triton kernels' tests/test_triton_outer.py, and
#      `se3t train --cuda_graphs` == eager);
#   1. parity on the device in float64, outputs and gradients: FULL == NONE (positions included) and
#      EDGE_FRAME == NONE (features and parameters), in both kernel orders, and the model's float32 equivariance;
#   2. the paper model at batch 240, training and inference, each cell eager and replayed as CUDA graphs
#      (se3t.CUDAGraphStep). Real QM9 when DATA_FILE names a file of `python -m benchmarks pack-data --batch-sizes
#      240 --out .devdata/qm9-240.pt` (the image lacks ase and the QM9 cache: carry `.devdata`), else synthetic
#      molecule-like batches.
# The default grid (bf16 and fp32, EDGE_FRAME and FULL, low_memory off: 16 cells) took ~13 s a cell on an H200,
# ~4.5 minutes with the tests and parity: it fits a 15-minute lease with room for a rerun.
# Uses the image's own python3 (torch, e3nn, numpy, matplotlib, pytest are there); nothing is installed.
# Usage (repository root): OUT=/path DATA_FILE=.devdata/qm9-240.pt sh benchmarks/device_run.sh
# Env: DEVICE (cuda), BATCH (240), REPEATS (10), MODEL (paper), NAME (gpu-qm9 or gpu-qm9-synthetic), DATA_FILE,
# CELL_TIMEOUT (120), PRECISIONS (bf16,fp32; also tf32, fp16), LEVELS (EDGE_FRAME,FULL), LOW_MEMORY (off; on is
# 2.6x slower on the GPU and not capturable), GRAPHS (off,on), PARITY (1), TESTS (1), EXTRA (more benchmark
# arguments, e.g. --no-plots).
# Results: $OUT/$NAME.{json,md,png}, $OUT/parity.txt and $OUT/gpu-tests.txt.
set -eu
OUT=${OUT:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-240}
REPEATS=${REPEATS:-10}
MODEL=${MODEL:-paper}
DATA_FILE=${DATA_FILE:-}
if [ -n "$DATA_FILE" ]; then DATA="--data saved --data-file $DATA_FILE"; NAME=${NAME:-gpu-qm9}
else DATA="--data synthetic"; NAME=${NAME:-gpu-qm9-synthetic}; fi
CELL_TIMEOUT=${CELL_TIMEOUT:-120}
PRECISIONS=${PRECISIONS:-bf16,fp32}
LEVELS=${LEVELS:-EDGE_FRAME,FULL}
LOW_MEMORY=${LOW_MEMORY:-off}
GRAPHS=${GRAPHS:-off,on}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

if [ "${TESTS:-1}" = 1 ]; then  # a failing GPU test is reported, and the measurements still run
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_graphs.py tests/test_triton_outer.py \
        tests/runtime/test_training.py::test_cuda_graphs_training_equals_eager > "$OUT/gpu-tests.txt" 2>&1 || true
    tail -n 25 "$OUT/gpu-tests.txt"
fi

parity() {
"$PY" - "$DEVICE" > "$OUT/parity.txt" 2>&1 <<'EOF' || { cat "$OUT/parity.txt"; exit 1; }
import sys
import torch
import se3t
from se3t import ConvSE3, Fiber, FuseLevel
from se3t.basis import safe_norm
from se3t.testing import equivariance_error

dev = torch.device(sys.argv[1])
print("torch", torch.__version__, "device", dev, torch.cuda.get_device_name(dev) if dev.type == "cuda" else "")
g = torch.Generator().manual_seed(0)
N, E = 40, 200
src, dst = torch.randint(0, N, (E,), generator=g), torch.randint(0, N, (E,), generator=g)
keep = src != dst
ei = torch.stack([src[keep], dst[keep]]).to(dev)
pos = (torch.randn(N, 3, generator=g, dtype=torch.float64) * 2).to(dev).requires_grad_(True)
fin, fout = Fiber({0: 4, 1: 4, 2: 4}), Fiber({0: 4, 1: 4, 2: 4})
conv = ConvSE3(fin, fout, Fiber({0: 2}), self_interaction=True, use_layer_norm=True).double().to(dev)
x = {d: torch.randn(N, c, 2 * d + 1, generator=g, dtype=torch.float64).to(dev).requires_grad_(True) for d, c in fin}
e0 = torch.randn(ei.shape[1], 2, 1, generator=g, dtype=torch.float64).to(dev)


def run(level, p):
    conv.fuse_level = level
    rel = p[ei[1]] - p[ei[0]]
    out = conv(x, {0: e0}, torch.cat([e0.squeeze(-1), safe_norm(rel)[0]], -1), ei, se3t.get_basis(rel, 2))
    loss = sum((o.sin() * (d + 1)).sum() for d, o in out.items())
    wrt = ([p] if p.requires_grad else []) + [*x.values(), *conv.parameters()]
    return [*out.values(), *torch.autograd.grad(loss, wrt)]


from se3t.nn import fused
defaults = fused.ONE_ROW_OUTER, fused.ONE_ROW_OUTER_MIN_RATIO
for outer in (False, True):  # the kernel's one-row blocks in the R order, then all in the outer order
    fused.ONE_ROW_OUTER, fused.ONE_ROW_OUTER_MIN_RATIO = outer, (0 if outer else 2)
    for level, p in ((FuseLevel.FULL, pos), (FuseLevel.EDGE_FRAME, pos.detach())):  # frames: no position gradient
        worst = max(float((a - b).detach().abs().max()) for a, b in zip(run(FuseLevel.NONE, p), run(level, p)))
        print(f"{level.name} vs NONE ({'outer' if outer else 'R'} order), float64, outputs and gradients: "
              f"max abs difference {worst:.2e}")
        assert worst < 1e-9, worst
fused.ONE_ROW_OUTER, fused.ONE_ROW_OUTER_MIN_RATIO = defaults
model = se3t.SE3Transformer(2, Fiber({0: 4}), Fiber.create(3, 8), Fiber({0: 2, 1: 2}), 2, 2).to(dev)
xf = {0: torch.randn(N, 4, 1, generator=g).to(dev)}
err = equivariance_error(lambda a, p, e: model(a, ei, p), xf, pos.detach().float())
print("model equivariance error, float32:", err)
assert all(v < 1e-4 for v in err.values()), err
print("parity ok")
EOF
cat "$OUT/parity.txt"
}
if [ "${PARITY:-1}" = 1 ]; then parity; fi

"$PY" -m benchmarks qm9 --device "$DEVICE" $DATA --model "$MODEL" --batch-sizes "$BATCH" --levels "$LEVELS" \
    --low-memory-levels EDGE_FRAME --precisions "$PRECISIONS" --low-memory "$LOW_MEMORY" --cuda-graphs "$GRAPHS" \
    --scatter-backends torch --warmup 3 --repeats "$REPEATS" --num-batches 4 --cell-timeout "$CELL_TIMEOUT" \
    --out "$OUT" --name "$NAME" ${EXTRA:-}
