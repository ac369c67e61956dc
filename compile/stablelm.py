"""StableLM (2): LayerNorm with bias, partial rotary, optional qkv bias, optional parallel residual."""

from __future__ import annotations

from dataclasses import dataclass


from . import layers as L
from .family import config_fields, freeze, kv_heads, layer_names

MODEL_TYPE = "stablelm"


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None
    rotary_dim: int
    use_qkv_bias: bool
    use_parallel_residual: bool
    tie_word_embeddings: bool

    @classmethod
    def from_checkpoint(cls, cc) -> "Config":
        f = config_fields(cc, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads")
        if cc.raw.get("qk_layernorm"):
            raise ValueError(f"{cc.path}: qk_layernorm (per-head LayerNorm, StableLM 2 12B) is not supported yet")
        rope = cc.rope()
        dh = f["hidden_size"] // f["num_attention_heads"]  # HF's StableLM has no head_dim key
        return cls(**f, num_key_value_heads=kv_heads(cc, f),
                   head_dim=dh, layer_norm_eps=cc.raw.get("layer_norm_eps", 1e-5),
                   rope_theta=rope.theta, rope_scaling=freeze(rope.scaling),
                   rotary_dim=int(dh * rope.partial_rotary_factor),
                   use_qkv_bias=bool(cc.raw.get("use_qkv_bias", False)),
                   use_parallel_residual=bool(cc.raw.get("use_parallel_residual", False)),
                   tie_word_embeddings=bool(cc.raw.get("tie_word_embeddings", False)))


def _ln_shapes(name: str, D: int) -> dict:
    return {f"{name}.weight": (D,), f"{name}.bias": (D,)}


def weight_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    D = cfg.hidden_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), **_ln_shapes("model.norm", D)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for _, p in layer_names(cfg.num_hidden_layers):
        shapes |= _ln_shapes(f"{p}.input_layernorm", D)
        if not cfg.use_parallel_residual:
            shapes |= _ln_shapes(f"{p}.post_attention_layernorm", D)
        shapes |= L.attention_shapes(p, D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     qkv_bias=cfg.use_qkv_bias)
        shapes |= L.mlp_shapes(f"{p}.mlp", D, cfg.intermediate_size)
    return shapes


def cache_shape(cfg: Config, capacity: int) -> tuple[int, ...]:
    return L.kv_cache_shape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity)


def forward(cfg: Config, w: dict, tokens, positions, k_cache, v_cache):
    x, cos, sin = L.embed_and_rope(w["model.embed_tokens.weight"], tokens, positions,
                                   L.rope_inv_freq(cfg.rotary_dim, cfg.rope_theta, cfg.rope_scaling))
    norm = lambda x, name: L.layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], cfg.layer_norm_eps)  # noqa: E731
    kv = L.KVCache(k_cache, v_cache, positions)
    for i, p in layer_names(cfg.num_hidden_layers):
        h = norm(x, f"{p}.input_layernorm")
        a = L.self_attention(
            w, p, h, cos, sin, kv, i, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5)
        if cfg.use_parallel_residual:  # both branches read the same normed input
            x = x + a + L.gated_mlp(w, f"{p}.mlp", h)
        else:
            x = x + a
            x = x + L.gated_mlp(w, f"{p}.mlp", norm(x, f"{p}.post_attention_layernorm"))
    return (norm(x, "model.norm"), *kv.commit())


def lm_head(cfg: Config, w: dict, h):
    return L.lm_head(h, w["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"])
