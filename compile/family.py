"""What every model family module provides, and the registry that finds one by `model_type`.

A family module (compile/<model_type>.py) defines:
  MODEL_TYPE, Config (frozen dataclass, `Config.from_checkpoint(checkpoint_config)`),
  weight_shapes(cfg) -> {name: shape}   names as MLX checkpoints store them,
  cache_shape(cfg, capacity) -> shape of the K (and V) cache,
  forward(cfg, w, tokens, positions, k_cache, v_cache) -> (hidden [C, D] after the final norm
    (a layers.Normed where one-token kernels apply it: layers.pre_norm), k_cache, v_cache),
  lm_head(cfg, w, h [D] or a layers.Normed) -> (logits [V], their argmax or None).
Families do not inherit from each other; shared pieces live in layers.py.
"""

from __future__ import annotations

import importlib
from types import ModuleType

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe", "gemma3_text", "stablelm")


class UnsupportedModel(ValueError):
    pass


def family_module(model_type: str) -> ModuleType:
    if model_type not in SUPPORTED:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return importlib.import_module(f"{__package__}.{model_type}")


def config_fields(cc, *names: str) -> dict:
    """Required config.json fields; a missing one is an error naming the field and file."""
    missing = [n for n in names if cc.raw.get(n) is None]
    if missing:
        raise ValueError(f"{cc.path}: config.json lacks required field(s) {', '.join(missing)} "
                         f"for model_type {cc.model_type!r}")
    return {n: cc.raw[n] for n in names}


def kv_heads(cc, f: dict) -> int:
    """num_key_value_heads, defaulting (as HF does) to the query heads: no GQA."""
    return cc.raw.get("num_key_value_heads") or f["num_attention_heads"]


def head_dim(cc, f: dict) -> int:
    """head_dim, defaulting (as HF does) to hidden_size / num_attention_heads."""
    return cc.raw.get("head_dim") or f["hidden_size"] // f["num_attention_heads"]


def freeze(obj):
    """A dict (possibly nested) as a sorted tuple of items, so configs stay hashable."""
    if isinstance(obj, dict):
        return tuple(sorted((k, freeze(v)) for k, v in obj.items()))
    if isinstance(obj, list):
        return tuple(freeze(v) for v in obj)
    return obj


def layer_names(n: int):
    return [(i, f"model.layers.{i}") for i in range(n)]
