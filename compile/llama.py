"""Llama (2/3.x): RMSNorm, GQA, SwiGLU MLP, rotary with optional llama3 / linear scaling."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import layers as L
from .family import config_fields, freeze, layer_names

MODEL_TYPE = "llama"


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_checkpoint(cls, cc) -> "Config":
        f = config_fields(cc, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "rms_norm_eps")
        rope = cc.rope()
        return cls(
            **f,
            num_key_value_heads=cc.raw.get("num_key_value_heads") or f["num_attention_heads"],
            head_dim=cc.raw.get("head_dim") or f["hidden_size"] // f["num_attention_heads"],
            rope_theta=float(rope.theta),
            rope_scaling=freeze(rope.scaling),
            tie_word_embeddings=bool(cc.raw.get("tie_word_embeddings", False)),
            attention_bias=bool(cc.raw.get("attention_bias", False)),
            mlp_bias=bool(cc.raw.get("mlp_bias", False)),
        )


def weight_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    D, H, KVH, Dh, I = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                        cfg.head_dim, cfg.intermediate_size)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i, p in layer_names(cfg.num_hidden_layers):
        shapes |= {
            f"{p}.input_layernorm.weight": (D,),
            f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (H * Dh, D),
            f"{p}.self_attn.k_proj.weight": (KVH * Dh, D),
            f"{p}.self_attn.v_proj.weight": (KVH * Dh, D),
            f"{p}.self_attn.o_proj.weight": (D, H * Dh),
            f"{p}.mlp.gate_proj.weight": (I, D),
            f"{p}.mlp.up_proj.weight": (I, D),
            f"{p}.mlp.down_proj.weight": (D, I),
        }
        if cfg.attention_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (H * Dh,), f"{p}.self_attn.k_proj.bias": (KVH * Dh,),
                       f"{p}.self_attn.v_proj.bias": (KVH * Dh,), f"{p}.self_attn.o_proj.bias": (D,)}
        if cfg.mlp_bias:
            shapes |= {f"{p}.mlp.gate_proj.bias": (I,), f"{p}.mlp.up_proj.bias": (I,),
                       f"{p}.mlp.down_proj.bias": (D,)}
    return shapes


def cache_shape(cfg: Config, capacity: int) -> tuple[int, ...]:
    return (cfg.num_hidden_layers, capacity, cfg.num_key_value_heads, cfg.head_dim)


def forward(cfg: Config, w: dict, tokens, positions, k_cache, v_cache):
    """tokens, positions: [C] -> hidden states [C, D] after the final norm, updated caches."""
    inv_freq = L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = L.rope_cos_sin(positions, inv_freq)
    C = tokens.shape[0]
    H, KVH, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = w["model.embed_tokens.weight"][tokens].astype(jnp.float32)  # [C, D]
    for i, p in layer_names(cfg.num_hidden_layers):
        g = lambda name: w.get(f"{p}.{name}")  # noqa: E731 - bias lookups may be None
        h = L.rms_norm(x, g("input_layernorm.weight"), cfg.rms_norm_eps)
        q = L.linear(h, g("self_attn.q_proj.weight"), g("self_attn.q_proj.bias")).reshape(C, H, Dh)
        k = L.linear(h, g("self_attn.k_proj.weight"), g("self_attn.k_proj.bias")).reshape(C, KVH, Dh)
        v = L.linear(h, g("self_attn.v_proj.weight"), g("self_attn.v_proj.bias")).reshape(C, KVH, Dh)
        q, k = L.apply_rope(q, cos, sin), L.apply_rope(k, cos, sin)
        k_cache = L.write_cache(k_cache, i, positions, k)
        v_cache = L.write_cache(v_cache, i, positions, v)
        a = L.attention(q, k_cache[i], v_cache[i], positions, Dh**-0.5)
        x = x + L.linear(a, g("self_attn.o_proj.weight"), g("self_attn.o_proj.bias"))
        h = L.rms_norm(x, g("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate = L.linear(h, g("mlp.gate_proj.weight"), g("mlp.gate_proj.bias"))
        up = L.linear(h, g("mlp.up_proj.weight"), g("mlp.up_proj.bias"))
        x = x + L.linear(jax.nn.silu(gate) * up, g("mlp.down_proj.weight"), g("mlp.down_proj.bias"))
    return L.rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps), k_cache, v_cache


def lm_head(cfg: Config, w: dict, h):
    """h: [D] -> logits [V] in f32."""
    head = w["model.embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    return L.linear(h, head)
