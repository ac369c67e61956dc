"""The hand-written CUDA kernels (compile/kernels/*.cu) alone, checked against numpy on a GPU.

  python bench/cuda_kernels.py make DIR [PREFIX]  # here: export each case (named PREFIX...) with its kernel, compile
  python bench/cuda_kernels.py check DIR    # GPU machine: run each case, compare with numpy (float64)

Inputs come from a seed, so only the .vmfb files and cases.json travel. Cases: the prefill
attention over cache rows and the chunk's own keys (several head layouts, starts, a sliding
window and a soft-cap; and the chunk's K/V it writes into the caches), the decode attention
(both forms), the 4-bit dequantization, 4-bit matvecs and lm_heads (their argmax too: ties,
NaN), the one-token prologue (embedding row, rotary cos/sin), and sampling (against the
host's draw at the same uniform numbers). The whole steps are checked
against the HF oracle by bench/gpu_agreement.py; these cases reach what its short prompts do not
(a chunk after hundreds of cached rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

# name -> (C, H, KVH, Dh, S, start, window, softcap)
ATTENTION = {
    "qwen3_start0": (128, 16, 8, 128, 768, 0, 0, 0.0),
    "qwen3_start384": (128, 16, 8, 128, 768, 384, 0, 0.0),
    "llama_start200": (128, 32, 8, 64, 768, 200, 0, 0.0),
    "g7_window": (64, 14, 2, 64, 320, 150, 96, 0.0),
    "g1_softcap": (32, 4, 4, 32, 128, 37, 0, 30.0),
    "g4_window_softcap": (64, 4, 1, 128, 256, 100, 40, 20.0),
    # prefill_attn_d256 (head dims past 128): Gemma3-1B's shape from the start and past its window
    # of 512 with an earlier cache, and a head dim of 192 with a soft-cap.
    "gemma3_1b_start0": (128, 4, 1, 256, 768, 0, 512, 0.0),
    "gemma3_1b_start450_window": (128, 4, 1, 256, 768, 450, 512, 0.0),
    "d192_g2_softcap": (64, 4, 2, 192, 256, 70, 0, 30.0),
}
LAYERS, LAYER = 3, 1
# name -> (H, KVH, Dh, S, pos, window, softcap, qk norm, rotary features)
DECODE = {
    "qwen3_pos512": (16, 8, 128, 768, 512, 0, 0.0, True, 128),
    "qwen3_pos1100": (16, 8, 128, 1280, 1100, 0, 0.0, True, 128),  # 69 partial blocks: past the combine's 64 loaded ahead
    "g4_d128_pos700": (32, 8, 128, 768, 700, 0, 0.0, False, 128),
    "llama_pos300": (32, 8, 64, 768, 300, 0, 0.0, False, 64),
    "kvh3_window_softcap_partial_rope": (6, 3, 64, 256, 200, 50, 20.0, True, 32),
    "g1_pos5": (4, 4, 32, 128, 5, 0, 0.0, False, 32),
    "gemma3_1b_pos300": (4, 1, 256, 768, 300, 512, 0.0, True, 256),  # one KV head of 256: a block's 4096 halves
    # The specialized shapes' one kernel: no cached key (its one block folds only the token's own),
    # one cached key, a window, a soft-cap, more partial blocks than a fold round (U) several times.
    "qwen3_pos0": (16, 8, 128, 768, 0, 0, 0.0, True, 128),
    "qwen3_pos1_softcap": (16, 8, 128, 768, 1, 0, 30.0, True, 128),
    "qwen3_window1": (16, 8, 128, 768, 200, 1, 0.0, True, 128),
    "llama_pos740_window300": (32, 8, 64, 768, 740, 300, 0.0, False, 64),
    "gemma3_1b_pos700_window512": (4, 1, 256, 768, 700, 512, 0.0, True, 256),
}
EPS = 1e-6
DEQUANT = {"q4_6144x1024_g64": (6144, 1024, 64), "q4_96x256_g32": (96, 256, 32)}
# name -> (N, K, norm, gate): 4-bit matvecs; gate: [gate; up] rows, SiLU(gate) * up [N] (gemv.cu's
# gate mode: x staged in int8 parts, summed by dp4a), K past one round of its staging at 8192
GEMV = {"q4_4096x1024_norm": (4096, 1024, True, False), "q4_1024x3072": (1024, 3072, False, False),
        "q4_2048x8192_norm": (2048, 8192, True, False),  # K past the pieces loaded ahead
        "q4_8192x2048_norm_gate": (8192, 2048, True, True), "q4_3072x1024_gate": (3072, 1024, False, True),
        "q4_640x8192_norm_gate": (640, 8192, True, True)}
# name -> (N, K, norm, special): 4-bit lm_heads (extern.lm_head: logits and their first argmax);
# special: "tie" (the best row copied to two lower rows in other blocks: the lowest wins),
# "nan" (a NaN in x: the argmax is N, out of range).
LM_HEAD = {"q4_151936x1024": (151936, 1024, False, None), "q4_32771x2048_norm": (32771, 2048, True, None),
           "q4_151936x1024_tie": (151936, 1024, False, "tie"), "q4_151936x1024_nan": (151936, 1024, False, "nan"),
           # hidden sizes that leave lanes idle in the last round of pieces: Gemma3-1B's, Qwen2.5-0.5B's
           "q4_262144x1152_norm": (262144, 1152, True, None), "q4_40003x896": (40003, 896, False, None),
           "q4_32771x1536_nan": (32771, 1536, True, "nan")}
# name -> (V, logit scale, temperature, top_k, top_p, min_p, special): sampling on the device
# (extern.sample_token) at SAMPLE_POSITIONS positions each, against the host's draw_at.
# special: "cluster" (the 40 largest logits in one block of the kernel's: its candidates cannot
# decide top-k 30, status 1), "ties" (logits rounded: ties at the top-k border), "nan", "rp<x>"
# (repetition penalty x over a history of SAMPLE_HISTORY tokens, half of them among the 64
# best: position p has seen history[:p] and the step's token).
SAMPLE = {"v151936_t0.6_k20_p0.95": (151936, 3.0, 0.6, 20, 0.95, 0.0, None),
          "v151936_t1_k64": (151936, 1.0, 1.0, 64, 1.0, 0.0, None),
          "v128256_t0.7_k50_p0.9_minp0.05": (128256, 4.0, 0.7, 50, 0.9, 0.05, None),
          "v300_t1.3_k5": (300, 1.0, 1.3, 5, 1.0, 0.0, None),
          "v2050_t1_k8": (2050, 1.0, 1.0, 8, 1.0, 0.0, None),  # a last block of 2 tokens
          "v151936_flat_k20": (151936, 0.0, 1.0, 20, 1.0, 0.0, None),  # all tied: status 1
          "v262144_t0.8_k40_p0.8": (262144, 3.0, 0.8, 40, 0.8, 0.0, None),
          "v151936_cluster_k30": (151936, 3.0, 1.0, 30, 1.0, 0.0, "cluster"),
          "v151936_ties_k10_p0.9": (151936, 1.0, 1.0, 10, 0.9, 0.0, "ties"),
          "v151936_nan": (151936, 3.0, 1.0, 20, 1.0, 0.0, "nan"),
          "v151936_greedy": (151936, 3.0, 0.0, 0, 1.0, 0.0, None),
          # top-k off: the nucleus or min-p over the whole vocabulary
          "v151936_t0.6_p0.9": (151936, 3.0, 0.6, 0, 0.9, 0.0, None),
          "v151936_t0.8_p0.8_minp0.05": (151936, 3.0, 0.8, 0, 0.8, 0.05, None),
          "v128256_t0.7_minp0.1": (128256, 4.0, 0.7, 0, 1.0, 0.1, None),
          "v151936_t1_p0.95_flat": (151936, 1.0, 1.0, 0, 0.95, 0.0, None),  # a nucleus past the candidates: status 1
          # a plain temperature: the whole vocabulary (the tokens' CDF edges ~1e-5 apart)
          "v151936_t0.8_plain": (151936, 3.0, 0.8, 0, 1.0, 0.0, None),
          "v151936_t1_plain": (151936, 1.0, 1.0, 0, 1.0, 0.0, None),
          "v2050_t1.3_plain": (2050, 1.0, 1.3, 0, 1.0, 0.0, None),
          "v151936_flat_plain": (151936, 0.0, 1.0, 0, 1.0, 0.0, None),  # every weight 1: exact sums
          "v151936_nan_plain": (151936, 3.0, 1.0, 0, 1.0, 0.0, "nan"),
          # the repetition penalty, with each filter form: top-k, the nucleus, plain, a boost (< 1)
          "v151936_t0.8_k20_rp1.3": (151936, 3.0, 0.8, 20, 1.0, 0.0, "rp1.3"),
          "v151936_t0.7_p0.9_rp1.2": (151936, 3.0, 0.7, 0, 0.9, 0.0, "rp1.2"),
          "v151936_t1_plain_rp1.5": (151936, 3.0, 1.0, 0, 1.0, 0.0, "rp1.5"),
          "v128256_t0.8_k40_minp0.05_rp0.8": (128256, 3.0, 0.8, 40, 1.0, 0.05, "rp0.8"),
          "v151936_greedy_rp1.3": (151936, 3.0, 0.0, 0, 1.0, 0.0, "rp1.3")}  # greedy: the penalized argmax
SAMPLE_POSITIONS, SAMPLE_SEED, SAMPLE_HISTORY = 200, 2026, 256


# name -> (V, D, group, rot, token, position, rope scaling): the one-token prologue
# (extern.embed_rope: the embedding row dequantized, the rotary cos/sin)
PROLOGUE = {"qwen3_pos517": (1000, 1024, 64, 128, 777, 517, None),
            "llama3_scaled_pos40000": (600, 2048, 32, 64, 5, 40000,
                                        (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                         ("original_max_position_embeddings", 8192), ("rope_type", "llama3")))}


def _prologue_inputs(V, D, group, rot, token, pos, scaling, pairs):
    from iree_runner.compile.layers import rope_inv_freq

    words, scales, biases = _dequant_inputs(V, D, group, pairs)
    inv = rope_inv_freq(rot, 500000.0, scaling)
    return [np.array([token], np.int32), np.array([pos], np.int32), inv, words, scales, biases]


def prologue_reference(token, pos, inv, words, scales, biases, group):
    """(the embedding row, cos, sin) in float64 (the angle is f32(pos) * inv_freq in f32, as JAX)."""
    t = int(token[0])
    q = ((words[t].view(np.uint32)[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(-1)
    row = q.astype(np.float64) * np.repeat(scales[t].astype(np.float64), group) + np.repeat(biases[t].astype(np.float64), group)
    angle = (np.float32(pos[0]) * inv).astype(np.float64)
    return row, np.tile(np.cos(angle), 2), np.tile(np.sin(angle), 2)


def _attention_inputs(C, H, KVH, Dh, S, start):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((C, H, Dh), dtype=np.float32)
    k, v = (rng.standard_normal((C, KVH, Dh), dtype=np.float32) for _ in range(2))
    kc, vc = (rng.standard_normal((LAYERS, Dh, S, KVH), dtype=np.float32).astype(np.float16) for _ in range(2))
    positions = (start + np.arange(C)).astype(np.int32)
    return [q, k, v, kc, vc, positions]


def attention_reference(q, k, v, kc, vc, positions, window, softcap):
    """Causal attention in float64 over the layer's cached rows and the chunk's own keys."""
    C, H, Dh = q.shape
    KVH, start = k.shape[1], int(positions[0])
    keys = np.concatenate([kc[LAYER, :, :start].transpose(1, 2, 0).astype(np.float64), k])
    vals = np.concatenate([vc[LAYER, :, :start].transpose(1, 2, 0).astype(np.float64), v])
    kpos = np.concatenate([np.arange(start), positions])
    G = H // KVH
    s = np.einsum("chd,shd->chs", q.astype(np.float64), np.repeat(keys, G, axis=1)) / np.sqrt(Dh)
    if softcap:
        s = np.tanh(s / softcap) * softcap
    ok = kpos[None, :] <= positions[:, None]
    if window:
        ok &= kpos[None, :] > positions[:, None] - window
    s = np.where(ok[:, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("chs,shd->chd", p, np.repeat(vals, G, axis=1)).reshape(C, H * Dh)


def _decode_inputs(H, KVH, Dh, S, pos, rot, qk_norm):
    """qkv, cos, sin, the caches, positions, and with qk_norm the q and k norm weights."""
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal(((H + 2 * KVH) * Dh,), dtype=np.float32)
    angles = rng.uniform(0, 6.3, rot // 2).astype(np.float32)
    cos, sin = np.tile(np.cos(angles), 2), np.tile(np.sin(angles), 2)
    kc, vc = (rng.standard_normal((LAYERS, Dh, S, KVH), dtype=np.float32).astype(np.float16) for _ in range(2))
    wq, wk = (np.stack([w, np.roll(w, Dh // 2)]).astype(np.float16)  # weight_rope: w and w with halves swapped
              for w in (rng.uniform(0.5, 1.5, Dh).astype(np.float32) for _ in range(2)))
    return [qkv, cos, sin, kc, vc, np.array([pos], np.int32)] + ([wq, wk] if qk_norm else [])


def _norm_rope(x, w, cos, sin, qk_norm):
    """x [heads, Dh] float64: per-head RMSNorm (weight w) if qk_norm, then rotate_half rotary."""
    if qk_norm:
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w.astype(np.float64)
    rot = cos.shape[0]
    half = rot // 2
    r = x[:, :rot]
    rotated = np.concatenate([-r[:, half:], r[:, :half]], axis=-1)
    return np.concatenate([r * cos + rotated * sin, x[:, rot:]], axis=-1)


def decode_reference(qkv, cos, sin, kc, vc, positions, wq=None, wk=None, *, H, window, softcap):
    """(attention output [H * Dh], the token's key [KVH, Dh], value) in float64."""
    KVH, Dh, pos = kc.shape[3], kc.shape[1], int(positions[0])
    x = qkv.astype(np.float64)
    qk_norm = wq is not None
    q = _norm_rope(x[:H * Dh].reshape(H, Dh), wq[0] if qk_norm else None, cos, sin, qk_norm)
    k = _norm_rope(x[H * Dh:(H + KVH) * Dh].reshape(KVH, Dh), wk[0] if qk_norm else None, cos, sin, qk_norm)
    v = x[(H + KVH) * Dh:].reshape(KVH, Dh)
    keys = np.concatenate([kc[LAYER, :, :pos].transpose(1, 2, 0).astype(np.float64), k[None]])  # [pos + 1, KVH, Dh]
    vals = np.concatenate([vc[LAYER, :, :pos].transpose(1, 2, 0).astype(np.float64), v[None]])
    G = H // KVH
    s = np.einsum("hd,shd->hs", q, np.repeat(keys, G, axis=1)) / np.sqrt(Dh)
    if softcap:
        s = np.tanh(s / softcap) * softcap
    if window:
        s[:, :max(0, pos - window + 1)] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hs,shd->hd", p, np.repeat(vals, G, axis=1)).reshape(-1), k, v


# The 4-bit cases' scales and biases are BF16 as the CUDA steps take them (the checkpoint's),
# these cases' F16 (compile/packed.py: the kernels widen either).
F16_PAIRS = {"dequant_q4_96x256_g32", "gemv_q4_1024x3072", "gemv_q4_3072x1024_gate", "lm_head_q4_32771x2048_norm", "prologue_llama3_scaled_pos40000"}


def _pairs(case: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(np.float16) if case in F16_PAIRS else np.dtype(ml_dtypes.bfloat16)


def _dequant_inputs(N, K, group, pairs):
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32).view(np.int32)
    scales = (rng.standard_normal((N, K // group), dtype=np.float32) * 0.01).astype(pairs)
    biases = (rng.standard_normal((N, K // group), dtype=np.float32) * 0.05).astype(pairs)
    return [words, scales, biases]


def dequant_reference(words, scales, biases, group):
    w = words.view(np.uint32)
    q = ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(w.shape[0], -1).astype(np.float32)
    s, b = (np.repeat(a.astype(np.float32), group, axis=1) for a in (scales, biases))
    return (q * s + b).astype(np.float16)


def _gemv_inputs(N, K, norm, pairs, gate=False):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(K, dtype=np.float32)
    w = rng.standard_normal(K, dtype=np.float32).astype(np.float16) if norm else None
    return [x, *_dequant_inputs(2 * N if gate else N, K, 64, pairs)] + ([w] if norm else [])


def _lm_head_inputs(N, K, norm, special, pairs):
    x, words, scales, biases, *norm_w = _gemv_inputs(N, K, norm, pairs)
    if special == "tie":  # row N - 5 much the largest, and copied to rows 9 and N // 2
        scales[N - 5], biases[N - 5] = 0.0, np.sign(x.sum()) * 1e3
        for r in (9, N // 2):
            words[r], scales[r], biases[r] = words[N - 5], scales[N - 5], biases[N - 5]
    if special == "nan":
        x[K // 3] = np.nan
    return [x, words, scales, biases, *norm_w]


def gemv_reference(x, words, scales, biases, norm_w=None, gate=False):
    """dequant(w) x in float64, x RMS-normed (times norm_w) first when given; with gate, the
    rows are [gate; up] and the result SiLU(gate) * up."""
    w = words.view(np.uint32)
    q = ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(w.shape[0], -1).astype(np.float64)
    dense = q * np.repeat(scales.astype(np.float64), 64, axis=1) + np.repeat(biases.astype(np.float64), 64, axis=1)
    x = x.astype(np.float64)
    if norm_w is not None:
        x = x / np.sqrt(np.mean(x * x) + EPS) * norm_w.astype(np.float64)
    y = dense @ x
    if gate:
        g, up = np.split(y, 2)
        return g / (1 + np.exp(-g)) * up
    return y


def _sample_inputs(V, scale, temperature, top_k, top_p, min_p, special):
    """logits [V] f32, their argmax (V if one is NaN), the step's sampling argument, the
    settings, the token history [SAMPLE_HISTORY] and the step's token [1]."""
    from iree_runner.sampling import SamplingParams, device_params

    logits = (np.random.default_rng(V).standard_normal(V) * scale).astype(np.float32)
    if special == "cluster":
        logits[4096:4136] = logits.max() + 1 + np.arange(40, dtype=np.float32) / 8
    if special == "ties":
        logits = np.round(logits * 2) / 2
    if special == "nan":
        logits[777] = np.nan
    argmax = np.int32(V if np.isnan(logits).any() else np.argmax(logits))
    penalty = float(special[2:]) if special and special.startswith("rp") else 1.0
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty)
    rng = np.random.default_rng(V + 1)
    best = np.argsort(np.nan_to_num(logits, nan=-np.inf))[::-1][:64]
    history = np.where(rng.random(SAMPLE_HISTORY) < 0.5, rng.choice(best, SAMPLE_HISTORY),
                       rng.integers(0, V, SAMPLE_HISTORY)).astype(np.int32)
    return logits, argmax, device_params(params, SAMPLE_SEED), params, history, best[1:2].astype(np.int32)


def cdf_gap(values: np.ndarray, u: float) -> float:
    """How far uniform number u lies from the nearest boundary of the inverse CDF over the
    survivors' logits (in token-id order, as sampling._draw walks them), in float64."""
    w = np.exp(values.astype(np.float64) - values.max())
    return float(np.abs(np.cumsum(w) / w.sum() - u).min())


def sample_reference(logits, params, position, seen=()):
    """(token, status) the kernel must give, and whether a different token is excusable: the
    uniform number within 1e-5 of a boundary of the host's inverse CDF (float sums in another
    order). Status 1 where the kernel's candidates (the 16 best of each 2048) cannot decide
    the top-k set. seen: the sequence so far (the repetition penalty's)."""
    from iree_runner import sampling as S

    V = len(logits)
    if params.plain_argmax:
        return int(np.argmax(logits)), 0, False
    if np.isnan(logits).any():
        return V, 1, False
    if params.greedy:  # the first best of the penalized logits
        return int(np.argmax(S._penalize(logits, seen, params.repetition_penalty))), 0, False
    scaled = S._scaled(logits, seen, params)
    # A plain temperature: every token survives, and the kernel sums each f32 weight in double
    # as the host does, so only a draw within float rounding of a boundary may differ.
    plain = not params.top_k and params.top_p >= 1 and params.min_p <= 0
    undecided, near = (False, False) if plain else _candidates_undecided(scaled, params)
    if undecided:
        return int(np.argmax(logits)), 1, False
    ids, values = S._survivors(scaled, params)
    u = S.uniform(SAMPLE_SEED, position)
    return S._draw(ids, values, V, u), 0, near or cdf_gap(values, u) < (2e-7 if plain else 1e-5)


def _candidates_undecided(scaled, params) -> tuple[bool, bool]:
    """Whether the kernel's candidates (the 16 best of each 2048) cannot decide the filters (it
    leaves the draw to the host), and whether a filter's border lies within float error of a
    token (the host sums in float32)."""
    blocks = np.concatenate([scaled, np.full(-len(scaled) % 2048, -np.inf, np.float32)]).reshape(-1, 2048)
    m = np.sort(blocks, axis=1)[:, -16].max()
    cand = np.sort(np.sort(blocks, axis=1)[:, -16:].reshape(-1))[::-1]
    if params.top_k:
        return not cand[params.top_k - 1] > m, False
    # The candidates above m must decide the nucleus, or min-p's cut.
    above = cand[cand > m].astype(np.float64)
    M = float(scaled.max())
    q = np.exp(above - M) / np.exp(scaled.astype(np.float64) - M).sum()
    near = False
    if params.top_p < 1:
        heads = np.concatenate([[0.0], np.cumsum(q)])
        if heads[-1] < params.top_p:
            return True, False
        near = bool(np.abs(heads - params.top_p).min() < 1e-5)
    elif not np.exp(np.float64(m) - M) < params.min_p:
        return True, False
    if params.min_p > 0:
        near |= bool(np.abs(np.exp(above - M) / params.min_p - 1).min() < 1e-5)
    return False, near


def _export(fn, args) -> str:
    import jax

    from iree_runner.compile import extern

    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    text = jax.export.export(jax.jit(fn), disabled_checks=extern.disabled_checks())(*specs).mlir_module()
    return extern.link(text)


def cases() -> dict:
    """name -> the case's function exported with its kernel (check makes the inputs again)."""
    import jax.numpy as jnp

    from iree_runner.compile import extern
    from iree_runner.compile.packed import Packed

    def packed(words, scales, biases, group=64):
        """The cases' 4-bit weight (int32 words, F16 or BF16 scales and biases) as the kernels take it."""
        return Packed.of(jnp.asarray(words).view(jnp.uint32), scales, biases, 4, group, np.dtype("float16"))

    out = {}
    for name, (C, H, KVH, Dh, S, start, window, softcap) in ATTENTION.items():
        args = _attention_inputs(C, H, KVH, Dh, S, start)

        def fn(q, k, v, kc, vc, positions, window=window, softcap=softcap, Dh=Dh):
            return extern.prefill_attention(q, k, v, kc, vc, positions, layer=LAYER, scale=1 / np.sqrt(Dh),
                                            window=window or None, softcap=softcap or None)
        out[f"prefill_attn_{name}"] = _export(fn, args)
    for name, (H, KVH, Dh, S, pos, window, softcap, qk_norm, rot) in DECODE.items():
        args = _decode_inputs(H, KVH, Dh, S, pos, rot, qk_norm)

        def fn(qkv, cos, sin, kc, vc, positions, *norm, H=H, Dh=Dh, window=window, softcap=softcap):
            return extern.decode_attention(qkv, cos, sin, kc, vc, positions, heads=H, layer=LAYER, scale=1 / np.sqrt(Dh),
                                           window=window or None, softcap=softcap or None,
                                           qk_norm=(*norm, EPS, False) if norm else None)[:3]
        out[f"decode_attn_{name}"] = _export(fn, args)
    for name, (N, K, group) in DEQUANT.items():
        args = _dequant_inputs(N, K, group, _pairs(f"dequant_{name}"))

        def fn(words, scales, biases, group=group):
            w = packed(words, scales, biases, group)
            return extern.dequant_q4(w)
        out[f"dequant_{name}"] = _export(fn, args)
    for name, (N, K, norm, gate) in GEMV.items():
        args = _gemv_inputs(N, K, norm, _pairs(f"gemv_{name}"), gate)

        def fn(x, words, scales, biases, *norm_w, gate=gate):
            w = packed(words, scales, biases)
            return extern.gemv(x, w, norm=(norm_w[0], EPS, False) if norm_w else None, gate="silu" if gate else None)
        out[f"gemv_{name}"] = _export(fn, args)
    for name, (V, D, group, rot, token, pos, scaling) in PROLOGUE.items():
        args = _prologue_inputs(V, D, group, rot, token, pos, scaling, _pairs(f"prologue_{name}"))

        def fn(token, pos, words, scales, biases, group=group, inv=args[2]):  # inv_freq: a constant, as in a step
            w = packed(words, scales, biases, group)
            return extern.embed_rope(w, token, pos, inv)
        out[f"prologue_{name}"] = _export(fn, args[:2] + args[3:])
    for name, (N, K, norm, special) in LM_HEAD.items():
        args = _lm_head_inputs(N, K, norm, special, _pairs(f"lm_head_{name}"))

        def fn(x, words, scales, biases, *norm_w):
            w = packed(words, scales, biases)
            return extern.lm_head(x, w, norm=(norm_w[0], EPS, False) if norm_w else None)
        out[f"lm_head_{name}"] = _export(fn, args)
    for name, case in SAMPLE.items():
        logits, argmax, sampling, _, history, token = _sample_inputs(*case)
        out[f"sample_{name}"] = _export(extern.sample_token,
                                        [logits, argmax, sampling, np.int32(0), np.int32(0), token, history])
    return out


def make(root: Path, prefix: str = "") -> None:
    """Compile the cases (those whose names start with prefix) into root, adding to its list."""
    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    made = {name: text for name, text in cases().items() if name.startswith(prefix)}
    for name, text in made.items():
        iree_compile.compile_mlir(text, root / f"{name}.vmfb", "cuda", label=name)
    for name, (V, D, group, rot, token, pos, scaling) in PROLOGUE.items():
        if f"prologue_{name}" in made:  # the inv_freq baked into the case, for check's reference
            np.save(root / f"prologue_{name}_inv.npy", _prologue_inputs(V, D, group, rot, token, pos, scaling, np.float32)[2])
    listed = root / "cases.json"
    old = json.loads(listed.read_text()) if listed.exists() else []
    listed.write_text(json.dumps(sorted(set(old) | set(made))))


def _f16_steps(a: np.ndarray, b: np.ndarray) -> int:
    """How many f16 steps apart two f16 arrays are at most."""
    return int(np.abs(a.view(np.int16).astype(np.int32) - b.view(np.int16).astype(np.int32)).max())


def check(root: Path) -> int:
    """Prints each case's error; returns how many were wrong."""
    import iree.runtime as rt

    from iree_runner.session import DRIVERS

    config = rt.Config(DRIVERS["cuda"])
    wrong = 0
    inputs = {}
    for name, (C, H, KVH, Dh, S, start, window, softcap) in ATTENTION.items():
        a = _attention_inputs(C, H, KVH, Dh, S, start)
        inputs[f"prefill_attn_{name}"] = (a, attention_reference(*a, window, softcap), 1e-4)
    for name, (N, K, group) in DEQUANT.items():
        a = _dequant_inputs(N, K, group, _pairs(f"dequant_{name}"))
        inputs[f"dequant_{name}"] = (a, dequant_reference(*a, group), None)
    for name, (N, K, norm, gate) in GEMV.items():
        a = _gemv_inputs(N, K, norm, _pairs(f"gemv_{name}"), gate)
        inputs[f"gemv_{name}"] = (a, gemv_reference(*a, gate=gate), 1e-5)
    for name, (N, K, norm, special) in LM_HEAD.items():
        a = _lm_head_inputs(N, K, norm, special, _pairs(f"lm_head_{name}"))
        inputs[f"lm_head_{name}"] = (a, gemv_reference(*a), 1e-5)
    for name, (V, D, group, rot, token, pos, scaling) in PROLOGUE.items():
        a = _prologue_inputs(V, D, group, rot, token, pos, scaling, _pairs(f"prologue_{name}"))
        # The case's own inv_freq: float32 pow differs in the last bit between machines' numpy
        # (SIMD paths), and at position 40000 one ulp of inv_freq moves cos by 1e-3.
        baked = root / f"prologue_{name}_inv.npy"
        if baked.exists():
            a[2] = np.load(baked)
        row, cos, sin = prologue_reference(*a, group)
        inputs[f"prologue_{name}"] = (a[:2] + a[3:], row, 1e-6, cos, sin)
    for name, (H, KVH, Dh, S, pos, window, softcap, qk_norm, rot) in DECODE.items():
        a = _decode_inputs(H, KVH, Dh, S, pos, rot, qk_norm)
        want, k, v = decode_reference(*a, H=H, window=window, softcap=softcap)
        inputs[f"decode_attn_{name}"] = (a, want, 1e-4, (k, v))
    names = json.loads((root / "cases.json").read_text())
    for name in (n for n in names if n.startswith("sample_")):
        wrong += _check_sample(config, root, name)
    for name in (n for n in names if not n.startswith("sample_")):
        xs, want, tol, *new_kv = inputs[name]
        ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / f"{name}.vmfb"))],
                               config=config)
        mod = next(m for n, m in ctx.modules.items() if n.startswith("jit_"))
        results = mod["main"](*xs)
        results = results if isinstance(results, (list, tuple)) else [results]
        got = np.asarray(results[0].to_host())
        if name.startswith("prologue"):  # the rotary cos and sin too
            for part, want_p, got_p in (("cos", new_kv[0], results[1]), ("sin", new_kv[1], results[2])):
                err_p = float(np.abs(np.asarray(got_p.to_host())[0] - want_p).max())
                print(f"{name + ' ' + part:36s} max|err| {err_p:.3g} {'OK' if err_p <= 1e-6 else 'WRONG'}")
                wrong += not err_p <= 1e-6
            got = got[0]
        elif len(results) == 3:  # the attention's caches, written in place
            if new_kv:  # decode: the token's key (normed, rotated) and value
                _, _, _, kc, vc, positions = xs[:6]
                k, v = (x[None] for x in new_kv[0])
            else:
                _, k, v, kc, vc, positions = xs
            for name_c, old, new, got_c in (("k", kc, k, results[1]), ("v", vc, v, results[2])):
                want_c = old.copy()
                want_c[LAYER][:, positions] = new.astype(np.float16).transpose(2, 0, 1)
                # decode's reference key is float64: one f16 step apart where its rounding differs
                same = _f16_steps(np.asarray(got_c.to_host()), want_c) <= (1 if new_kv else 0)
                print(f"{name + ' ' + name_c + ' cache':36s} {'OK' if same else 'WRONG'}")
                wrong += not same
        if name.startswith("lm_head"):  # the first argmax of its own logits (N if one is NaN)
            N = got.shape[0]
            argmax, first = int(np.asarray(results[1].to_host()).reshape(-1)[0]), int(np.argmax(got))
            expect = N if np.isnan(got).any() else first
            same = argmax == expect and (not name.endswith("_tie") or argmax == 9)
            print(f"{name + ' argmax':36s} {argmax} (want {expect}) {'OK' if same else 'WRONG'}")
            wrong += not same
        if tol is None:  # f16 results: equal, or one f16 step apart (an FMA rounds once)
            steps = _f16_steps(got, want)
            ok = got.shape == want.shape and steps <= 1
            print(f"{name:36s} max f16 steps apart {steps} {'OK' if ok else 'WRONG'}", flush=True)
        elif np.isnan(want).any():  # NaN in, NaN out
            ok = bool(np.array_equal(np.isnan(got), np.isnan(want)))
            print(f"{name:36s} NaN where the reference has NaN: {'OK' if ok else 'WRONG'}", flush=True)
        else:
            err = float(np.abs(got - want).max())
            ok = got.shape == want.shape and err <= tol * max(1.0, float(np.abs(want).max()))
            print(f"{name:36s} max|err| {err:.3g} max|ref| {float(np.abs(want).max()):.3g} {'OK' if ok else 'WRONG'}",
                  flush=True)
        wrong += not ok
    return wrong


def _check_sample(config, root: Path, name: str) -> int:
    """A sampling case: the kernel's [token, status] at SAMPLE_POSITIONS positions against
    sample_reference; returns 1 if any is wrong."""
    import iree.runtime as rt

    logits, argmax, sampling, params, history, step_token = _sample_inputs(*SAMPLE[name.removeprefix("sample_")])
    ctx = rt.SystemContext(vm_modules=[rt.VmModule.mmap(config.vm_instance, str(root / f"{name}.vmfb"))], config=config)
    main = next(m for n, m in ctx.modules.items() if n.startswith("jit_"))["main"]
    x = rt.asdevicearray(config.device, logits)
    bad = excused = left = 0
    seen = set()
    for pos in range(SAMPLE_POSITIONS):
        out, written = main(x, argmax, sampling, np.int32(pos), np.int32(0), step_token, history)
        token, status = (int(v) for v in np.asarray(out.to_host()))
        # The step's token goes into the history at its position, the rest as it was.
        want_history = history.copy()
        want_history[pos] = step_token[0]
        if not np.array_equal(np.asarray(written.to_host()), want_history):
            bad += 1
            print(f"  {name} position {pos}: the history written is not the one before with the step's token at {pos}")
        want, want_status, excusable = sample_reference(logits, params, pos, [*history[:pos], *step_token])
        seen.add(token)
        left += status
        if (token, status) != (want, want_status):
            if status == want_status == 0 and excusable:
                excused += 1
            else:
                bad += 1
                if bad <= 3:
                    print(f"  {name} position {pos}: got {token, status}, want {want, want_status}")
    print(f"{name:36s} {SAMPLE_POSITIONS} draws: {len(seen)} distinct tokens, {left} left to the host, "
          f"{excused} differing at a float edge, {bad} wrong {'OK' if not bad else 'WRONG'}", flush=True)
    return int(bad > 0)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), *sys.argv[3:4])
    else:
        sys.exit(1 if check(Path(sys.argv[2])) else 0)
