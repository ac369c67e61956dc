"""Checkpoint loading: safetensors (single and sharded), MLX affine dequantization.

Installed as `iree_runner.weights`; needs only numpy, safetensors and ml_dtypes.
"""
