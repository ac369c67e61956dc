#!/usr/bin/env bash
# CUDA correctness on the GPU machine, from what was prepared on the CPU machine:
# - .gpu/cuda_ops: `bench/cuda_ops.py make` (single ops: argmax forms, f16 matmuls, top-k);
# - .gpu/kern: `bench/cuda_kernels.py make` (the hand-written kernels alone against numpy);
# - .gpu/ckpts/*: test checkpoints with oracle.npz (`bench/gpu_agreement.py oracle`);
# - .gpu/agree, .gpu/agreepk, .gpu/agree32: their CUDA bundles with f16 weights (--no-packed),
#   packed 4-bit ones (--packed, the default) and f32 ones (--weight-dtype f32);
# - .gpu/diag/* (optional): `bench/diag_cuda.py make` outputs, CUDA against CPU per step.
set -uo pipefail
OUT=${OUT:-/tmp/out}
source bench/gpu_env.sh
python3 bench/cuda_ops.py check .gpu/cuda_ops 2>&1 | tee "$OUT/ops.txt"
python3 bench/cuda_kernels.py check .gpu/kern 2>&1 | tee "$OUT/kernels.txt"
for d in .gpu/diag/*/; do [ -d "$d" ] && python3 bench/diag_cuda.py check "$d" 2>&1 | tee -a "$OUT/diag.txt"; done
python3 bench/gpu_agreement.py check .gpu/ckpts "$OUT/agreement.json" .gpu/agree .gpu/agreepk .gpu/agree32 2>&1 | tee "$OUT/agreement.txt"
