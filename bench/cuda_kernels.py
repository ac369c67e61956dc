"""The hand-written CUDA kernels (compile/kernels/*.cu) alone, checked against numpy on a GPU.

  python bench/cuda_kernels.py make DIR     # here: export each case with its kernel, compile for CUDA
  python bench/cuda_kernels.py check DIR    # GPU machine: run each case, compare with numpy (float64)

Inputs come from a seed, so only the .vmfb files and cases.json travel. Cases: the prefill
attention over cache rows and the chunk's own keys (several head layouts, starts, a sliding
window and a soft-cap; and the chunk's K/V it writes into the caches), the decode attention
(both forms), the 4-bit dequantization, 4-bit matvecs and lm_heads (their argmax too: ties,
NaN), and the one-token prologue (embedding row, rotary cos/sin). The whole steps are checked
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
# name -> (N, K, norm): 4-bit matvecs
GEMV = {"q4_4096x1024_norm": (4096, 1024, True), "q4_1024x3072": (1024, 3072, False),
        "q4_2048x8192_norm": (2048, 8192, True)}  # K past the pieces loaded ahead
# name -> (N, K, norm, special): 4-bit lm_heads (extern.lm_head: logits and their first argmax);
# special: "tie" (the best row copied to two lower rows in other blocks: the lowest wins),
# "nan" (a NaN in x: the argmax is N, out of range).
LM_HEAD = {"q4_151936x1024": (151936, 1024, False, None), "q4_32771x2048_norm": (32771, 2048, True, None),
           "q4_151936x1024_tie": (151936, 1024, False, "tie"), "q4_151936x1024_nan": (151936, 1024, False, "nan")}


# name -> (V, D, group, rot, token, position, rope scaling): the one-token prologue
# (extern.embed_rope: the embedding row dequantized, the rotary cos/sin)
PROLOGUE = {"qwen3_pos517": (1000, 1024, 64, 128, 777, 517, None),
            "llama3_scaled_pos40000": (600, 2048, 32, 64, 5, 40000,
                                        (("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                         ("original_max_position_embeddings", 8192), ("rope_type", "llama3")))}


def _prologue_inputs(V, D, group, rot, token, pos, scaling):
    from iree_runner.compile.layers import rope_inv_freq

    words, scales, biases = _dequant_inputs(V, D, group)
    inv = rope_inv_freq(rot, 500000.0, scaling)
    return [np.array([token], np.int32), np.array([pos], np.int32), inv, words, scales, biases]


def prologue_reference(token, pos, inv, words, scales, biases, group):
    """(the embedding row, cos, sin) in float64 (the angle is f32(pos) * inv_freq in f32, as JAX)."""
    t = int(token[0])
    q = ((words[t].view(np.uint32)[:, None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(-1)
    row = q.astype(np.float64) * np.repeat(scales[t], group) + np.repeat(biases[t], group)
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


def _dequant_inputs(N, K, group):
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2**32, (N, K // 8), dtype=np.uint32).view(np.int32)
    scales = rng.standard_normal((N, K // group), dtype=np.float32) * 0.01
    biases = rng.standard_normal((N, K // group), dtype=np.float32) * 0.05
    return [words, scales, biases]


def dequant_reference(words, scales, biases, group):
    w = words.view(np.uint32)
    q = ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(w.shape[0], -1).astype(np.float32)
    return (q * np.repeat(scales, group, axis=1) + np.repeat(biases, group, axis=1)).astype(np.float16)


def _gemv_inputs(N, K, norm):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(K, dtype=np.float32)
    w = rng.standard_normal(K, dtype=np.float32).astype(np.float16) if norm else None
    return [x, *_dequant_inputs(N, K, 64)] + ([w] if norm else [])


def _lm_head_inputs(N, K, norm, special):
    x, words, scales, biases, *norm_w = _gemv_inputs(N, K, norm)
    if special == "tie":  # row N - 5 much the largest, and copied to rows 9 and N // 2
        scales[N - 5], biases[N - 5] = 0.0, np.sign(x.sum()) * 1e3
        for r in (9, N // 2):
            words[r], scales[r], biases[r] = words[N - 5], scales[N - 5], biases[N - 5]
    if special == "nan":
        x[K // 3] = np.nan
    return [x, words, scales, biases, *norm_w]


def gemv_reference(x, words, scales, biases, norm_w=None):
    """dequant(w) x in float64, x RMS-normed (times norm_w) first when given."""
    w = words.view(np.uint32)
    q = ((w[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15).reshape(w.shape[0], -1).astype(np.float64)
    dense = q * np.repeat(scales, 64, axis=1) + np.repeat(biases, 64, axis=1)
    x = x.astype(np.float64)
    if norm_w is not None:
        x = x / np.sqrt(np.mean(x * x) + EPS) * norm_w.astype(np.float64)
    return dense @ x


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
        """The cases' 4-bit weight (int32 words, f32 scales and biases) as the kernels take it."""
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
        args = _dequant_inputs(N, K, group)

        def fn(words, scales, biases, group=group):
            w = packed(words, scales, biases, group)
            return extern.dequant_q4(w)
        out[f"dequant_{name}"] = _export(fn, args)
    for name, (N, K, norm) in GEMV.items():
        args = _gemv_inputs(N, K, norm)

        def fn(x, words, scales, biases, *norm_w):
            w = packed(words, scales, biases)
            return extern.gemv(x, w, norm=(norm_w[0], EPS, False) if norm_w else None)
        out[f"gemv_{name}"] = _export(fn, args)
    for name, (V, D, group, rot, token, pos, scaling) in PROLOGUE.items():
        args = _prologue_inputs(V, D, group, rot, token, pos, scaling)

        def fn(token, pos, words, scales, biases, group=group, inv=args[2]):  # inv_freq: a constant, as in a step
            w = packed(words, scales, biases, group)
            return extern.embed_rope(w, token, pos, inv)
        out[f"prologue_{name}"] = _export(fn, args[:2] + args[3:])
    for name, (N, K, norm, special) in LM_HEAD.items():
        args = _lm_head_inputs(N, K, norm, special)

        def fn(x, words, scales, biases, *norm_w):
            w = packed(words, scales, biases)
            return extern.lm_head(x, w, norm=(norm_w[0], EPS, False) if norm_w else None)
        out[f"lm_head_{name}"] = _export(fn, args)
    return out


def make(root: Path) -> None:
    from iree_runner.compile import iree_compile

    root.mkdir(parents=True, exist_ok=True)
    made = cases()
    for name, text in made.items():
        iree_compile.compile_mlir(text, root / f"{name}.vmfb", "cuda", label=name)
    (root / "cases.json").write_text(json.dumps(sorted(made)))


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
        a = _dequant_inputs(N, K, group)
        inputs[f"dequant_{name}"] = (a, dequant_reference(*a, group), None)
    for name, (N, K, norm) in GEMV.items():
        a = _gemv_inputs(N, K, norm)
        inputs[f"gemv_{name}"] = (a, gemv_reference(*a), 1e-5)
    for name, (N, K, norm, special) in LM_HEAD.items():
        a = _lm_head_inputs(N, K, norm, special)
        inputs[f"lm_head_{name}"] = (a, gemv_reference(*a), 1e-5)
    for name, (V, D, group, rot, token, pos, scaling) in PROLOGUE.items():
        a = _prologue_inputs(V, D, group, rot, token, pos, scaling)
        row, cos, sin = prologue_reference(*a, group)
        inputs[f"prologue_{name}"] = (a[:2] + a[3:], row, 1e-6, cos, sin)
    for name, (H, KVH, Dh, S, pos, window, softcap, qk_norm, rot) in DECODE.items():
        a = _decode_inputs(H, KVH, Dh, S, pos, rot, qk_norm)
        want, k, v = decode_reference(*a, H=H, window=window, softcap=softcap)
        inputs[f"decode_attn_{name}"] = (a, want, 1e-4, (k, v))
    for name in json.loads((root / "cases.json").read_text()):
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


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]))
    else:
        sys.exit(1 if check(Path(sys.argv[2])) else 0)
