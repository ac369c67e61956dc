"""Qwen3 (dense): the dense decoder plus a per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from .dense import cache_shape, forward, lm_head, weight_shapes  # noqa: F401 - the family interface
from .dense import config_from_checkpoint

MODEL_TYPE = "qwen3"


class Config:
    @staticmethod
    def from_checkpoint(cc):
        bias = bool(cc.raw.get("attention_bias", False))
        return config_from_checkpoint(cc, qkv_bias=bias, o_bias=bias, qk_norm=True)
