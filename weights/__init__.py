"""Checkpoint loading: safetensors (single and sharded), MLX affine dequantization.

Installed as `iree_runner.weights`; needs only numpy, safetensors and ml_dtypes.

    ckpt = open_checkpoint(model_dir)      # config, index and headers validated here
    ckpt.names(), ckpt.shape(name), ckpt.is_quantized(name)
    arrays = ckpt.load_all(np.float16)     # dequantized, threaded; f32 is bit-exact with mlx
"""

from .checkpoint import Checkpoint, QuantizedWeight, open_checkpoint
from .config import CheckpointConfig, QuantizationConfig, QuantSpec, RopeParams, read_config
from .dequant import check_affine_layout, dequantize_affine
from .errors import CheckpointError
from .safetensors_file import MappedFile, TensorInfo, read_header

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointError",
    "MappedFile",
    "QuantSpec",
    "QuantizationConfig",
    "QuantizedWeight",
    "RopeParams",
    "TensorInfo",
    "check_affine_layout",
    "dequantize_affine",
    "open_checkpoint",
    "read_config",
    "read_header",
]
