"""Qwen2 / Qwen2.5: the dense decoder with biases on the q, k and v projections (not on o)."""

from __future__ import annotations

from .dense import cache_shape, forward, lm_head, weight_shapes  # noqa: F401 - the family interface
from .dense import config_from_checkpoint

MODEL_TYPE = "qwen2"


class Config:
    @staticmethod
    def from_checkpoint(cc):
        return config_from_checkpoint(cc, qkv_bias=True)
