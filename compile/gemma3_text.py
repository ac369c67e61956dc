"""Gemma 3 (text): embeddings x sqrt(hidden), (1 + w) RMSNorms (four per layer, plus q/k norms),
interleaved sliding-window and global attention with their own rope bases,
query_pre_attn_scalar, gelu-tanh MLP, optional logit soft-capping."""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax.numpy as jnp

from . import layers as L
from .family import config_fields, freeze, kv_heads, layer_names

MODEL_TYPE = "gemma3_text"
SLIDING, GLOBAL = "sliding_attention", "full_attention"


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
    query_pre_attn_scalar: float
    sliding_window: int
    layer_types: tuple[str, ...]
    rope: tuple  # ((layer_type, theta, frozen scaling), ...)
    tie_word_embeddings: bool
    attention_bias: bool
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None

    @classmethod
    def from_checkpoint(cls, cc) -> "Config":
        f = config_fields(cc, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "head_dim", "sliding_window")
        n = f["num_hidden_layers"]
        types = cc.raw.get("layer_types")
        if types is None:  # transformers 4.x: every `sliding_window_pattern`-th layer is global
            pattern = cc.raw.get("sliding_window_pattern", 6)
            types = [SLIDING if (i + 1) % pattern else GLOBAL for i in range(n)]
        if len(types) != n or set(types) - {SLIDING, GLOBAL}:
            raise ValueError(f"{cc.path}: layer_types must list {n} entries of {SLIDING!r}/{GLOBAL!r}, got {types}")
        act = cc.raw.get("hidden_activation") or cc.raw.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"{cc.path}: hidden_activation {act!r} is not supported (expected gelu_pytorch_tanh)")
        rope = []
        for t in (SLIDING, GLOBAL):
            r = cc.rope(t)
            if r.partial_rotary_factor != 1.0:
                raise ValueError(f"{cc.path}: partial rotary is not supported for gemma3 ({t})")
            rope.append((t, r.theta, freeze(r.scaling)))
        return cls(**f, num_key_value_heads=kv_heads(cc, f),
                   rms_norm_eps=cc.raw.get("rms_norm_eps", 1e-6),
                   query_pre_attn_scalar=cc.raw.get("query_pre_attn_scalar", 256),  # HF default
                   layer_types=tuple(types), rope=tuple(rope),
                   tie_word_embeddings=bool(cc.raw.get("tie_word_embeddings", True)),
                   attention_bias=bool(cc.raw.get("attention_bias", False)),
                   attn_logit_softcapping=cc.raw.get("attn_logit_softcapping"),
                   final_logit_softcapping=cc.raw.get("final_logit_softcapping"))


NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def weight_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    D = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for _, p in layer_names(cfg.num_hidden_layers):
        shapes |= {f"{p}.{n}.weight": (D,) for n in NORMS}
        shapes |= L.attention_shapes(p, D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm=True)
        shapes |= L.mlp_shapes(f"{p}.mlp", D, cfg.intermediate_size)
    return shapes


def cache_shape(cfg: Config, capacity: int) -> tuple[int, ...]:
    return L.kv_cache_shape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity)


def forward(cfg: Config, w: dict, tokens, positions, k_cache, v_cache):
    rope = {t: L.rope_cos_sin(positions, L.rope_inv_freq(cfg.head_dim, theta, scaling))
            for t, theta, scaling in cfg.rope}
    norm = lambda x, name: L.rms_norm(x, w[name], cfg.rms_norm_eps, one_plus=True)  # noqa: E731
    pre_norm = lambda x, name: L.pre_norm(x, w[name], cfg.rms_norm_eps, one_plus=True)  # noqa: E731
    # HF multiplies by sqrt(hidden) cast to the weights' dtype; on f32 weights that is f32.
    x = L.embed(w["model.embed_tokens.weight"], tokens) * jnp.float32(math.sqrt(cfg.hidden_size))
    kv = L.KVCache(k_cache, v_cache, positions)
    for i, p in layer_names(cfg.num_hidden_layers):
        kind = cfg.layer_types[i]
        cos, sin = rope[kind]
        a = L.self_attention(
            w, p, pre_norm(x, f"{p}.input_layernorm.weight"), cos, sin, kv, i,
            heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
            scale=cfg.query_pre_attn_scalar**-0.5, window=cfg.sliding_window if kind == SLIDING else None,
            qk_norm_eps=cfg.rms_norm_eps, qk_norm_one_plus=True, softcap=cfg.attn_logit_softcapping)
        x = x + norm(a, f"{p}.post_attention_layernorm.weight")
        m = L.gated_mlp(w, f"{p}.mlp", pre_norm(x, f"{p}.pre_feedforward_layernorm.weight"), act=L.gelu_tanh)
        x = x + norm(m, f"{p}.post_feedforward_layernorm.weight")
    return (pre_norm(x, "model.norm.weight"), *kv.commit())


def lm_head(cfg: Config, w: dict, h):
    logits, argmax = L.lm_head(h, w["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"])
    if cfg.final_logit_softcapping is not None:  # its argmax is the step's to take: tanh may tie rows
        return jnp.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping, None
    return logits, argmax
