# Sourced on the GPU machine (no compiler, no network): installs the carried cp312 wheels
# (.whl/: iree-base-runtime, plus whatever else a run carries) and puts the package on the path
# as setuptools maps it (compile/ and weights/ inside the iree_runner namespace).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r iree_runner /tmp/pkg/ && cp -r compile /tmp/pkg/iree_runner/compile \
  && cp -r weights /tmp/pkg/iree_runner/weights
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
