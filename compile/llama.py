"""Llama (2/3.x): the dense decoder, rotary with optional llama3 / linear scaling; HF's
`attention_bias` puts biases on q, k, v and o, `mlp_bias` on the MLP."""

from __future__ import annotations

from .dense import cache_shape, forward, lm_head, weight_shapes  # noqa: F401 - the family interface
from .dense import config_from_checkpoint

MODEL_TYPE = "llama"


class Config:
    @staticmethod
    def from_checkpoint(cc):
        bias = bool(cc.raw.get("attention_bias", False))
        return config_from_checkpoint(cc, qkv_bias=bias, o_bias=bias, mlp_bias=bool(cc.raw.get("mlp_bias", False)))
