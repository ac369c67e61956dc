#!/usr/bin/env bash
# The GPU benchmark as run on a lent H100/H200 machine (no compiler there, no network):
# - .whl/ carries cp312 wheels: iree-base-runtime (the runtime alone), mlx + mlx-cpu + mlx-lm
#   (to make the 4-bit checkpoints with the real `mlx_lm convert`);
# - .gpu/bundles/<model>/ carries bundles compiled on the CPU machine by
#   `iree-generate compile --target cuda --no-packed` (f16 weights: it runs the 4-bit and the f16
#   checkpoints); VARIANTS=packed adds rows for .gpu/bundles/<model>-packed/ (`--packed`, the CUDA
#   default), VARIANTS=nokernels for <model>-nokernels/ (--no-kernels: IREE's codegen alone,
#   without the hand-written kernels of compile/kernels).
# The machine's own torch, jax and transformers run the peers.
set -euo pipefail
OUT=${OUT:-/tmp/out}
source bench/gpu_env.sh
python3 bench/make_checkpoints.py --out /tmp/ckpts --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" >&2
python3 bench/run.py --ckpts /tmp/ckpts --bundles .gpu/bundles --device cuda --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" \
  --variants "${VARIANTS:-}" --peers "${PEERS:-jax,torch}" --json "$OUT/bench.json" | tee "$OUT/table.md"
