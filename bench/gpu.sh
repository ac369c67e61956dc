#!/usr/bin/env bash
# The GPU benchmark as run on a lent H100/H200 machine (no compiler there, no network):
# - .whl/ carries cp312 wheels: iree-base-runtime (the runtime alone), mlx + mlx-cpu + mlx-lm
#   (to make the 4-bit checkpoints with the real `mlx_lm convert`);
# - .gpu/bundles/<model>/ carries bundles compiled on the CPU machine by
#   `iree-generate compile --target cuda` from bench/configs/<model>.json.
# The machine's own torch, jax and transformers run the peers.
set -euo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# The package as setuptools maps it: compile/ and weights/ inside the iree_runner namespace.
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r iree_runner /tmp/pkg/ && cp -r compile /tmp/pkg/iree_runner/compile \
  && cp -r weights /tmp/pkg/iree_runner/weights
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 bench/make_checkpoints.py --out /tmp/ckpts --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" >&2
python3 bench/run.py --ckpts /tmp/ckpts --bundles .gpu/bundles --device cuda --models "${MODELS:-qwen3-0.6b,llama-3.2-1b}" \
  --variants "${VARIANTS:-}" --peers "${PEERS:-jax,torch}" --json "$OUT/bench.json" | tee "$OUT/table.md"
