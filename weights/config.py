"""config.json as found in the wild: transformers 4.x and 5.x keys, MLX quantization.

RoPE follows transformers 5.24 (`RotaryEmbeddingConfigMixin.convert_rope_params_to_dict`,
`Gemma3TextConfig.convert_rope_params_to_dict`): 5.x writes a `rope_parameters` dict (one per
layer type for gemma3); 4.x wrote `rope_theta`, `rope_scaling`, `partial_rotary_factor` and, for
gemma3, `rope_local_base_freq` for sliding layers. Quantization follows mlx_lm 0.32.2
(`utils.load_model`): `quantization` holds the defaults plus per-module entries (a dict, or
`false` for a module left unquantized); `quantization_config` is the HF-tree copy of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# mlx.nn.quantize's defaults per mode, used where a config leaves bits/group_size out.
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
_QUANT_KEYS = ("group_size", "bits", "mode")

# transformers' default_theta per model type (RotaryEmbeddingConfigMixin: 10000).
_DEFAULT_THETA = 10_000.0
_GEMMA3_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# StableLmConfig.__post_init__ assigns this for configs that leave it out.
_DEFAULT_PARTIAL_ROTARY = {"stablelm": 0.25}
_GEMMA3_TYPES = ("gemma3_text", "gemma3")
# RoPE types whose parameters include the pretraining context length.
_NEEDS_ORIGINAL_MAX = ("llama3", "yarn", "longrope")


@dataclass(frozen=True)
class QuantSpec:
    """How one module's weight was packed."""

    bits: int
    group_size: int
    mode: str = "affine"

    def check_supported(self, where: str) -> None:
        """Raise unless our affine dequantizer handles this spec; `where` names file and tensor."""
        if self.mode != "affine":
            raise CheckpointError(
                f"{where}: quantization mode {self.mode!r} is not supported; only MLX 'affine' "
                "(w = scales * q + biases) is (mxfp4, nvfp4 and mxfp8 are not)"
            )
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{where}: {self.bits}-bit quantization is not supported, expected bits in {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise CheckpointError(
                f"{where}: group size {self.group_size} is not supported, expected one of {SUPPORTED_GROUP_SIZES}"
            )


@dataclass(frozen=True)
class QuantizationConfig:
    """MLX `quantization`: defaults plus per-module overrides (`None` = left unquantized)."""

    default: QuantSpec
    overrides: dict[str, QuantSpec | None] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return self.default.bits

    @property
    def group_size(self) -> int:
        return self.default.group_size

    @property
    def mode(self) -> str:
        return self.default.mode

    def for_module(self, path: str) -> QuantSpec | None:
        """Spec for a module path such as "model.layers.0.mlp.down_proj"; None if unquantized."""
        return self.overrides.get(path, self.default)

    def is_listed(self, path: str) -> bool:
        return path in self.overrides


@dataclass(frozen=True)
class RopeParams:
    theta: float
    scaling: dict[str, Any] | None  # rope_type and its parameters; None for plain RoPE
    partial_rotary_factor: float


@dataclass(frozen=True)
class CheckpointConfig:
    raw: dict[str, Any]
    path: str  # the config.json it came from, for messages
    model_type: str | None
    quantization: QuantizationConfig | None

    @property
    def num_experts(self) -> int | None:
        """Experts per MoE layer: 5.x `num_local_experts` or 4.x `num_experts`."""
        for key in ("num_local_experts", "num_experts"):
            if self.raw.get(key) is not None:
                return int(self.raw[key])
        return None

    def rope(self, layer_type: str | None = None) -> RopeParams:
        """RoPE parameters, for gemma3 per layer type ("full_attention" or "sliding_attention")."""
        if self.model_type in _GEMMA3_TYPES:
            return self._gemma3_rope(layer_type or "full_attention")
        params = self.raw.get("rope_parameters")
        if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        # transformers: `rope_parameters = rope_scaling or rope_parameters`.
        params = dict(self.raw.get("rope_scaling") or params or {})
        params.setdefault("rope_theta", self.raw.get("rope_theta", _DEFAULT_THETA))
        factor = self.raw.get("partial_rotary_factor", _DEFAULT_PARTIAL_ROTARY.get(self.model_type, 1.0))
        params.setdefault("partial_rotary_factor", factor)
        if _rope_type(params) in _NEEDS_ORIGINAL_MAX and "original_max_position_embeddings" in self.raw:
            # transformers gives a top-level value (Phi3-style configs) priority.
            params["original_max_position_embeddings"] = self.raw["original_max_position_embeddings"]
        return self._rope_from_dict(params, "rope_parameters")

    def _gemma3_rope(self, layer_type: str) -> RopeParams:
        if layer_type not in _GEMMA3_DEFAULT_THETA:
            raise CheckpointError(
                f"{self.path}: gemma3 has no RoPE for layer type {layer_type!r}, "
                f"expected one of {sorted(_GEMMA3_DEFAULT_THETA)}"
            )
        nested = self.raw.get("rope_parameters") or {}
        params = dict(nested.get(layer_type) or {})
        if layer_type == "full_attention":
            # 4.x: rope_scaling applies to the global (full) layers only, theta is rope_theta.
            params = {**params, **(self.raw.get("rope_scaling") or {})}
            params.setdefault("rope_theta", self.raw.get("rope_theta", _GEMMA3_DEFAULT_THETA[layer_type]))
        else:
            params.setdefault("rope_theta", self.raw.get("rope_local_base_freq", _GEMMA3_DEFAULT_THETA[layer_type]))
        params.setdefault("partial_rotary_factor", self.raw.get("partial_rotary_factor", 1.0))
        return self._rope_from_dict(params, f"rope_parameters.{layer_type}")

    def _rope_from_dict(self, params: dict[str, Any], field_name: str) -> RopeParams:
        try:
            theta = float(params.pop("rope_theta"))
            factor = float(params.pop("partial_rotary_factor"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: {field_name} has a non-numeric rope_theta/partial_rotary_factor: {e}") from e
        rope_type = _rope_type(params)
        params.pop("rope_type", None), params.pop("type", None)
        if rope_type in _NEEDS_ORIGINAL_MAX and self.raw.get("max_position_embeddings") is not None:
            # transformers' standardize_rope_params: the pretraining length defaults to this.
            params.setdefault("original_max_position_embeddings", self.raw["max_position_embeddings"])
        scaling = None if rope_type == "default" and not params else {"rope_type": rope_type, **params}
        return RopeParams(theta=theta, scaling=scaling, partial_rotary_factor=factor)


def _rope_type(params: dict[str, Any]) -> str:
    # 4.x rope_scaling called it "type"; transformers reads it as "rope_type".
    return params.get("rope_type", params.get("type", "default"))


def read_config(model_dir: str | os.PathLike) -> CheckpointConfig:
    """Read `<model_dir>/config.json`; raises CheckpointError if missing, not JSON or malformed."""
    path = os.path.join(os.fspath(model_dir), "config.json")
    try:
        with open(path, "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: config.json is missing from the model directory") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config.json is not valid JSON: {e}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read config.json: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: config.json holds a {type(raw).__name__}, expected a JSON object")
    return CheckpointConfig(
        raw=raw, path=path, model_type=raw.get("model_type"), quantization=_read_quantization(raw, path)
    )


def _read_quantization(raw: dict, path: str) -> QuantizationConfig | None:
    # mlx_lm prefers "quantization"; "quantization_config" is its HF-tree copy, or an HF scheme.
    if raw.get("quantization") is not None:
        return _parse_mlx_quantization(raw["quantization"], path, "quantization")
    qc = raw.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: quantization_config is {qc!r}, expected a JSON object")
    method = qc.get("quant_method")
    if method is not None:
        raise CheckpointError(
            f"{path}: quantization_config.quant_method {method!r} is not supported; "
            "expected an MLX affine checkpoint (config.json 'quantization': {bits, group_size})"
        )
    return _parse_mlx_quantization(qc, path, "quantization_config")


def _parse_mlx_quantization(q, path: str, key: str) -> QuantizationConfig:
    if not isinstance(q, dict):
        raise CheckpointError(f"{path}: {key} is {q!r}, expected a JSON object with bits and group_size")
    default = _parse_spec(q, f"{path}: {key}")
    overrides: dict[str, QuantSpec | None] = {}
    for module, entry in q.items():
        if module in _QUANT_KEYS:
            continue
        if entry is False:
            overrides[module] = None
        elif isinstance(entry, dict):
            overrides[module] = _parse_spec(entry, f"{path}: {key}[{module!r}]")
        elif entry is True:
            overrides[module] = default
        # Anything else (e.g. "quant_method" in a copied block) is not a module entry.
    return QuantizationConfig(default=default, overrides=overrides)


def _parse_spec(entry: dict, where: str) -> QuantSpec:
    mode = entry.get("mode") or "affine"
    if mode not in MODE_DEFAULTS:
        raise CheckpointError(f"{where}: quantization mode {mode!r} is unknown, expected one of {sorted(MODE_DEFAULTS)}")
    default_group, default_bits = MODE_DEFAULTS[mode]
    # mlx_lm convert writes per-module entries with "group_size": null; mlx then uses the mode's
    # default (QuantizedLinear(group_size=None)), so a missing or null value means the same.
    bits = entry.get("bits") if entry.get("bits") is not None else default_bits
    group_size = entry.get("group_size") if entry.get("group_size") is not None else default_group
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, group_size)):
        raise CheckpointError(f"{where}: bits {bits!r} and group_size {group_size!r} must be integers")
    return QuantSpec(bits=bits, group_size=group_size, mode=mode)
