"""The pre-norm dense decoder that Llama, Qwen2 and Qwen3 share; they differ only in flags.

x += attn(rms_norm(x)); x += swiglu(rms_norm(x)); logits = lm_head(rms_norm(x)).
Flags: biases on q/k/v (Qwen2), on o_proj and the MLP (Llama options), per-head q/k RMSNorm
(Qwen3). Each family module builds a DenseConfig from config.json with its own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import layers as L
from .family import config_fields, freeze, head_dim, kv_heads, layer_names


@dataclass(frozen=True)
class DenseConfig:
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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False


def config_from_checkpoint(cc, **flags) -> DenseConfig:
    f = config_fields(cc, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "rms_norm_eps")
    rope = cc.rope()
    if rope.partial_rotary_factor != 1.0:
        raise ValueError(f"{cc.path}: partial_rotary_factor {rope.partial_rotary_factor} is not supported "
                         f"for model_type {cc.model_type!r} (expected 1.0)")
    return DenseConfig(
        **f,
        num_key_value_heads=kv_heads(cc, f),
        head_dim=head_dim(cc, f),
        rope_theta=rope.theta,
        rope_scaling=freeze(rope.scaling),
        tie_word_embeddings=bool(cc.raw.get("tie_word_embeddings", False)),
        **flags,
    )


def weight_shapes(cfg: DenseConfig) -> dict[str, tuple[int, ...]]:
    D = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for _, p in layer_names(cfg.num_hidden_layers):
        shapes |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)}
        shapes |= L.attention_shapes(p, D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm)
        shapes |= L.mlp_shapes(f"{p}.mlp", D, cfg.intermediate_size, bias=cfg.mlp_bias)
    return shapes


def cache_shape(cfg: DenseConfig, capacity: int) -> tuple[int, ...]:
    return L.kv_cache_shape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity)


def forward(cfg: DenseConfig, w: dict, tokens, positions, k_cache, v_cache):
    """tokens, positions: [C] -> hidden states [C, D] after the final norm, updated caches."""
    x, cos, sin = L.embed_and_rope(w["model.embed_tokens.weight"], tokens, positions,  # [C, D], [C, Dh]
                                   L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    kv = L.KVCache(k_cache, v_cache, positions)
    for i, p in layer_names(cfg.num_hidden_layers):
        h = L.pre_norm(x, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        x = L.self_attention(
            w, p, h, cos, sin, kv, i, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None, residual=x)
        h = L.pre_norm(x, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        x = L.gated_mlp(w, f"{p}.mlp", h, residual=x)
    return (L.pre_norm(x, w["model.norm.weight"], cfg.rms_norm_eps), *kv.commit())


def lm_head(cfg: DenseConfig, w: dict, h):
    """h: [D] (or a Normed) -> (logits [V] in f32, their argmax or None: layers.lm_head)."""
    return L.lm_head(h, w["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"])
