"""Importing the loader must not drag in a framework: a CUDA server installs only the runtime."""

import json
import subprocess
import sys

FORBIDDEN = ("jax", "jaxlib", "torch", "mlx", "mlx_lm", "transformers")


def test_importing_weights_imports_no_framework():
    code = (
        "import json, sys; import iree_runner.weights; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)
    assert "numpy" in loaded and "ml_dtypes" in loaded
    assert not set(FORBIDDEN) & set(loaded)
