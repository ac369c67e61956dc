#!/usr/bin/env bash
# The GPU benchmark as run on a lent H100/H200 machine (no compiler there, no network):
# - .whl/ carries cp312 wheels: iree-base-runtime (the runtime alone), mlx + mlx-cpu + mlx-lm
#   (to make the 4-bit checkpoints with the real `mlx_lm convert`);
# - .gpu/bundles/<model>/ carries bundles compiled on the CPU machine by
#   `iree-generate compile --target cuda --no-packed` (f16 weights: it runs the 4-bit and the f16
#   checkpoints); VARIANTS=packed adds rows for .gpu/bundles/<model>-packed/ (`--packed`, the CUDA
#   default), VARIANTS=nokernels for <model>-nokernels/ (--no-kernels: IREE's codegen alone,
#   without the hand-written kernels of compile/kernels).
# The machine's own torch, jax and transformers run the peers. PEERS=...,mlx (mlx_lm on the MLX
# checkpoint) needs MLX's CUDA build: mlx and mlx-lm in .whl/ without mlx-cpu, and mlx-cuda-13's
# unpacked wheel as .gpu/mx/part.* (an xz'd tar, split: with libmlx.so stripped of symbols it is
# ~74 MB, over one call's carry, so the parts come in two calls to one machine held between them,
# as in stop 23), unpacked into the site here and linked against torch's CUDA 13 libraries.
set -euo pipefail
OUT=${OUT:-/tmp/out}
source bench/gpu_env.sh
if ls .gpu/mx/part.* > /dev/null 2>&1; then
  cat .gpu/mx/part.* | xz -d | tar xf - -C /tmp/site
  ln -sfn "$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia"))')" \
    /tmp/site/nvidia  # libmlx.so's RPATH: $ORIGIN/../../nvidia/{cu13,cudnn,nccl}/lib
fi
python3 bench/make_checkpoints.py --out /tmp/ckpts --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" >&2
python3 bench/run.py --ckpts /tmp/ckpts --bundles .gpu/bundles --device cuda --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" \
  --variants "${VARIANTS:-}" --peers "${PEERS:-jax,torch}" --json "$OUT/bench.json" | tee "$OUT/table.md"
