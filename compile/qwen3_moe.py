"""Qwen3-MoE: Qwen3 attention (q/k RMSNorm) with top-k routed SwiGLU experts.

Experts are stacked as MLX stores them: mlp.switch_mlp.{gate,up,down}_proj.weight [E, out, in];
the router is mlp.gate.weight [E, D]. Routing follows HF: softmax in f32 over all experts,
top-k, renormalised when norm_topk_prob.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from . import layers as L
from .family import config_fields, freeze, head_dim, kv_heads, layer_names

MODEL_TYPE = "qwen3_moe"
F32 = jnp.float32


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple | None
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    sparse_layers: tuple[bool, ...]
    attention_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_checkpoint(cls, cc) -> "Config":
        f = config_fields(cc, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                          "num_hidden_layers", "num_attention_heads", "rms_norm_eps", "num_experts_per_tok")
        experts = cc.num_experts
        if not experts:
            raise ValueError(f"{cc.path}: qwen3_moe needs num_experts (4.x) or num_local_experts (5.x)")
        step = cc.raw.get("decoder_sparse_step", 1)
        dense_only = set(cc.raw.get("mlp_only_layers") or [])
        sparse = tuple(i not in dense_only and (i + 1) % step == 0 for i in range(f["num_hidden_layers"]))
        rope = cc.rope()
        return cls(**f, num_key_value_heads=kv_heads(cc, f), head_dim=head_dim(cc, f),
                   rope_theta=rope.theta, rope_scaling=freeze(rope.scaling), num_experts=experts,
                   norm_topk_prob=bool(cc.raw.get("norm_topk_prob", False)), sparse_layers=sparse,
                   attention_bias=bool(cc.raw.get("attention_bias", False)),
                   tie_word_embeddings=bool(cc.raw.get("tie_word_embeddings", False)))


def weight_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    D, E, I = cfg.hidden_size, cfg.num_experts, cfg.moe_intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    for i, p in layer_names(cfg.num_hidden_layers):
        shapes |= {f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,)}
        shapes |= L.attention_shapes(p, D, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                     qkv_bias=cfg.attention_bias, o_bias=cfg.attention_bias, qk_norm=True)
        if cfg.sparse_layers[i]:
            shapes |= {f"{p}.mlp.gate.weight": (E, D),
                       f"{p}.mlp.switch_mlp.gate_proj.weight": (E, I, D),
                       f"{p}.mlp.switch_mlp.up_proj.weight": (E, I, D),
                       f"{p}.mlp.switch_mlp.down_proj.weight": (E, D, I)}
        else:
            shapes |= L.mlp_shapes(f"{p}.mlp", D, cfg.intermediate_size)
    return shapes


def cache_shape(cfg: Config, capacity: int) -> tuple[int, ...]:
    return L.kv_cache_shape(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity)


def moe(cfg: Config, w: dict, p: str, h):
    """h: [C, D] -> [C, D]. One token: gather its k experts (reads k/E of the weights).
    Several tokens: run every expert and weight by the routing (zero for unselected)."""
    C = h.shape[0]
    # Top-k of the router's logits, the same experts as of their softmax; only the k chosen
    # probabilities are formed. Taking it over the softmax needed a barrier (IREE's CUDA codegen
    # failed on the fused softmax + top-k), and a barrier makes IREE wait on the host per layer.
    logits = L.linear(h, w[f"{p}.gate.weight"])  # [C, E] f32
    top_l, top_i = L.top_k(logits, cfg.num_experts_per_tok)  # [C, k]
    top_p = jnp.exp(top_l - top_l[:, :1]) / jnp.sum(jnp.exp(logits - top_l[:, :1]), axis=-1, keepdims=True)
    if cfg.norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    wg, wu, wd = (w[f"{p}.switch_mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    x = h.astype(wg.dtype)
    dot = lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=F32)  # noqa: E731
    # Routing weights are folded into the activations so that the down projection contracts
    # over (expert, intermediate) at once: no dot_general with batch dimensions, which IREE
    # 3.13 computes wrongly on CUDA in f16 (bench/cuda_ops.py, H100).
    if C == 1:
        idx = top_i[0]
        g, u = dot("d,kid->ki", x[0], wg[idx]), dot("d,kid->ki", x[0], wu[idx])
        act = jax.nn.silu(g) * u * top_p[0][:, None]  # [k, I]
        return dot("ki,kdi->d", act.astype(wd.dtype), wd[idx])[None]
    # Routing weights [C, E] by one-hot sums, not a scatter (IREE's CUDA codegen fails on it).
    one_hot = top_i[..., None] == jnp.arange(cfg.num_experts, dtype=top_i.dtype)  # [C, k, E]
    route = jnp.sum(jnp.where(one_hot, top_p[..., None], 0.0), axis=1)
    g, u = dot("cd,eid->cei", x, wg), dot("cd,eid->cei", x, wu)
    act = jax.nn.silu(g) * u * route[..., None]  # [C, E, I], zero for experts not chosen
    return dot("cei,edi->cd", act.astype(wd.dtype), wd)


def forward(cfg: Config, w: dict, tokens, positions, k_cache, v_cache):
    x, cos, sin = L.embed_and_rope(w["model.embed_tokens.weight"], tokens, positions,
                                   L.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    kv = L.KVCache(k_cache, v_cache, positions)
    for i, p in layer_names(cfg.num_hidden_layers):
        h = L.pre_norm(x, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        x = L.self_attention(
            w, p, h, cos, sin, kv, i, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, scale=cfg.head_dim**-0.5,
            qk_norm_eps=cfg.rms_norm_eps, residual=x)
        h = L.rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        x = x + (moe(cfg, w, f"{p}.mlp", h) if cfg.sparse_layers[i] else L.gated_mlp(w, f"{p}.mlp", h))
    return (L.pre_norm(x, w["model.norm.weight"], cfg.rms_norm_eps), *kv.commit())


def lm_head(cfg: Config, w: dict, h):
    return L.lm_head(h, w["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"])
