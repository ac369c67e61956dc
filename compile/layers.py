"""Building blocks shared by the model families: norms, rotary embedding, cached attention.

Every function is pure and computes in float32 (weights may be f16 on CUDA; they are widened
at use and products accumulate in f32). Shapes: C = tokens in this call (a prefill chunk or 1),
S = KV cache capacity, H / KVH = query / key-value heads, Dh = head dim, D = hidden size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import extern
from .packed import Packed

F32 = jnp.float32
# Masked scores use a large finite value rather than -inf: a fully masked padded row then gives
# a harmless uniform softmax instead of NaN.
MASKED = -1e30
# Debug taps: bench/diag_cuda.py sets this to a list while exporting a probe, and gets every
# tapped intermediate back as an extra output (to find where CUDA and CPU part). None = no-op.
TAPS: list | None = None


def tap(name: str, x):
    if TAPS is not None:
        TAPS.append((name, x))
    return x


def linear(x, w, b=None, residual=None):
    """x: [..., in] · w: [out, in] (PyTorch layout, as stored) -> [..., out] in f32, plus
    `residual` if given. x may be a Normed (pre_norm): the norm is applied here. w may be
    Packed: a kernel reads it as it is where one fits, else the graph dequantizes it."""
    kernel = _one_row_kernel(x, w, residual)
    if kernel is not None:  # the norm, bias and residual folded in
        xv, norm = _gemv_input(x)
        y = kernel(xv, w, bias=b, norm=norm, residual=None if residual is None else residual.reshape(-1))
        return y.reshape(*x.shape[:-1], -1)
    if isinstance(x, Normed):
        x = x.value()
    if DECODE_KERNEL == "cpu" and x.ndim == 2 and extern.q4_gemm_fits(w):  # a prefill chunk
        y = extern.q4_gemm(x, w)
    else:
        if DECODE_KERNEL == "cuda" and extern.dequant_q4_fits(w):  # one dispatch, f16 out
            w = extern.dequant_q4(w)
        elif isinstance(w, Packed):
            w = w.dequantize()
        y = jax.lax.dot_general(
            x.astype(w.dtype), w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=F32
        )
    y = y if b is None else y + b.astype(F32)
    return y if residual is None else residual + y


def lm_head(h, w):
    """(logits [V] f32 of h [D] (or a Normed) · w, their first argmax where a kernel computes it
    with them, else None: the step takes it). On the one-token CUDA step a packed lm_head is one
    kernel with its norm and argmax (extern.lm_head)."""
    if DECODE_KERNEL == "cuda" and len(h.shape) == 1 and extern.lm_head_fits(w):
        x, norm = _gemv_input(h)
        return extern.lm_head(x, w, norm=norm)
    # Elsewhere the norm stays a dispatch of its own, as it was: the f16 gemv kernel has not
    # been measured against IREE's matmul on a whole lm_head.
    return linear(h.value() if isinstance(h, Normed) else h, w), None


def _one_row_kernel(x, w, residual):
    """The one-token linear kernel of the target that takes x · w, or None: CUDA's gemv (f16 or
    packed 4-bit weights; a plain f16 one only when there is a norm or residual to fold in), the
    CPU's q4_gemv (packed 4-bit)."""
    if x.shape[:-1] not in ((), (1,)):
        return None
    if DECODE_KERNEL == "cuda" and extern.gemv_fits(w) and (
            isinstance(w, Packed) or isinstance(x, Normed) or residual is not None):
        return extern.gemv
    if DECODE_KERNEL == "cpu" and extern.q4_gemv_fits(w):
        return extern.q4_gemv
    return None


def rms_norm(x, w, eps, *, one_plus=False):
    """RMSNorm in f32; Gemma scales by (1 + w) instead of w."""
    x = x.astype(F32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    w = w.astype(F32)
    return y * (1.0 + w if one_plus else w)


class Normed:
    """rms_norm(x, w, eps) not applied yet, for an input that only feeds linear layers: on a
    one-token step their kernel (compile/kernels/gemv.cu on CUDA, q4_gemv.c on the CPU)
    normalises x itself, so the norm is no dispatch of its own. Anywhere else, `value()` is the
    plain rms_norm."""

    def __init__(self, x, w, eps, one_plus):
        self.x, self.w, self.eps, self.one_plus = x, w, eps, one_plus
        self.shape = x.shape

    def value(self):
        return rms_norm(self.x, self.w, self.eps, one_plus=self.one_plus)


def pre_norm(x, w, eps, *, one_plus=False):
    """rms_norm of a layer input that feeds only linear layers (self_attention, gated_mlp)."""
    return Normed(x, w, eps, one_plus) if _one_token_kernel(x) else rms_norm(x, w, eps, one_plus=one_plus)


def _one_token_kernel(x) -> bool:
    """Whether x's linear layers may run a one-token kernel that takes a Normed input."""
    return DECODE_KERNEL in ("cuda", "cpu") and x.shape[0] == 1 and len(x.shape) == 2


def _gemv_input(x):
    """(x, norm) for extern.gemv from a [1, K] or [K] array or Normed."""
    if isinstance(x, Normed):
        return x.x.reshape(-1), (x.w, x.eps, x.one_plus)
    return x.reshape(-1), None


def embed(table, tokens):
    """Rows `tokens` of an embedding table (dense or Packed) in f32: [C, D]."""
    if isinstance(table, Packed):
        return table.rows(tokens).dequantize(F32)
    return table[tokens].astype(F32)


def embed_and_rope(table, tokens, positions, inv_freq: np.ndarray):
    """(embed(table, tokens), *rope_cos_sin(positions, inv_freq)); on the one-token CUDA step,
    one kernel where the table is packed 4-bit (extern.embed_rope)."""
    if DECODE_KERNEL == "cuda" and tokens.shape[0] == 1 and extern.embed_rope_fits(table):
        return extern.embed_rope(table, tokens, positions, inv_freq)
    return (embed(table, tokens), *rope_cos_sin(positions, inv_freq))


def layer_norm(x, w, b, eps):
    x = x.astype(F32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w.astype(F32) + b.astype(F32)


def gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ARGMAX_BLOCK = 4096


def max_and_first_index(x):
    """(max, lowest index holding it) over the last axis, with keepdims.

    Built from f32 max reductions only: the index is taken as n - max(n - i) over the maxima.
    IREE 3.13's CUDA codegen returned -1 for the plain min-of-indices formulation and
    jnp.argmax ran nearly serially (3.8 ms for 152k logits); bench/cuda_ops.py checks these.
    Exact while the axis is shorter than 2**24. No optimization_barrier on x: each one makes
    IREE wait on the host for the GPU. (Fused with a router's softmax, IREE's CUDA codegen
    failed to compile, so the router takes the top-k of its logits; see qwen3_moe.moe.)
    A long axis (logits) is reduced in blocks first: as one reduction it took 178 us on an
    H100 for 152k logits.
    """
    n = x.shape[-1]
    if n > ARGMAX_BLOCK:
        pad = -n % ARGMAX_BLOCK
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
        x = x.reshape(*x.shape[:-1], -1, ARGMAX_BLOCK)  # [..., blocks, ARGMAX_BLOCK]
        m = jnp.max(jnp.max(x, axis=-1), axis=-1, keepdims=True)  # [..., 1]
        rev = (jnp.float32(n + pad) - jnp.arange(n + pad, dtype=F32)).reshape(-1, ARGMAX_BLOCK)
        best = jnp.max(jnp.max(jnp.where(x == m[..., None], rev, 0.0), axis=-1), axis=-1, keepdims=True)
        return m, (jnp.float32(n + pad) - best).astype(jnp.int32)
    rev = jnp.float32(n) - jnp.arange(n, dtype=F32)
    m = jnp.max(x, axis=-1, keepdims=True)
    i = jnp.float32(n) - jnp.max(jnp.where(x == m, rev, 0.0), axis=-1, keepdims=True)
    return m, i.astype(jnp.int32)


def top_k(x, k: int):
    """Top-k over the last axis as k rounds of (max, lowest index holding it, mask it out).

    Same values, indices and tie order (lowest index first) as jax.lax.top_k, from plain
    reductions instead of IREE's topk op; cheap for a router's k of a few experts."""
    idx = jnp.arange(x.shape[-1], dtype=jnp.int32)
    values, indices = [], []
    for _ in range(k):
        m, i = max_and_first_index(x)
        values.append(m)
        indices.append(i)
        x = jnp.where(idx == i, -jnp.inf, x)
    return jnp.concatenate(values, axis=-1), jnp.concatenate(indices, axis=-1)


# --- rotary embedding ------------------------------------------------------------------------

def rope_inv_freq(rot_dim: int, theta: float, scaling: tuple | None) -> np.ndarray:
    """Inverse frequencies as transformers computes them (f32), for the rope types we support.

    `scaling` is the rope-scaling dict frozen to a sorted tuple of items (hashable config).
    """
    inv = (1.0 / (theta ** (np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32) / rot_dim))).astype(np.float32)
    params = dict(scaling or ())
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return (inv / np.float32(params["factor"])).astype(np.float32)
    if kind == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_ctx = params["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
        smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")


def rope_cos_sin(positions, inv_freq: np.ndarray):
    """positions: [C] int32 -> cos, sin: [C, rot_dim] (the HF 'rotate_half' layout)."""
    freqs = positions.astype(F32)[:, None] * jnp.asarray(inv_freq)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rms_norm_rope(x, w_rope, r, cos, sin, *, one_plus=False):
    """apply_rope(rms_norm(x, w), cos, sin) for x: [C, heads, Dh] under full rotary, given
    r = 1/RMS per head ([C, heads, 1]; self_attention takes q's and k's in one reduction).

    w_rope: [2, Dh], the norm weight w and w with its halves swapped (made when the weights
    load, iree_runner/resident.py). Written as r * (x*w*cos + rotate_half(x)*swap(w)*sin), the
    rotation reads x itself rather than the normalised intermediate, and IREE fuses norm and
    rotation into one dispatch after the sum of squares: 3 dispatches for q and k, not 6."""
    if cos.shape[-1] != x.shape[-1]:
        raise ValueError(f"q/k norm with partial rotary ({cos.shape[-1]} of {x.shape[-1]} features) is not supported")
    x = x.astype(F32)
    w, w_swapped = (t.astype(F32) for t in (w_rope[0], w_rope[1]))
    if one_plus:
        w, w_swapped = 1.0 + w, 1.0 + w_swapped
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return r * (x * w * cos[:, None, :] + rotated * w_swapped * sin[:, None, :])


def apply_rope(x, cos, sin):
    """x: [C, heads, Dh]; rotates the first rot_dim features (partial rotary keeps the rest)."""
    rot = cos.shape[-1]
    xr, xpass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos[:, None, :] + rotated * sin[:, None, :]
    return jnp.concatenate([out, xpass], axis=-1) if xpass.shape[-1] else out


# --- KV cache and attention ------------------------------------------------------------------

# The order of the KV cache's axes: S (rows, i.e. positions), L (layers), H (KV heads), D (head
# dim). One tensor each for K and V; the runtime only sees the shape. [L, D, S, H] gives each
# layer's keys in the layout IREE's CUDA scores matmul reads, so it no longer transposes them
# per layer: GPU time of a Qwen3-0.6B decode step 3.62 -> 2.83 ms against [S, L, H, D] (H100,
# bench/results/2026-11-26-h100-cache-ldsh.txt); on the CPU decode 116 -> 108 ms. Values in
# [L, S, H, D] instead made IREE's attention-times-V matmul slower (15 -> 27 us per layer,
# bench/results/2026-11-26-h100-v-layout.txt).
# The CPU's steps use [L, S, D, H] (set per target by export; iree_compile.CACHE_LAYOUT): its
# hand-written attention streams each block of keys as one run (compile/kernels/decode_attention_cpu.c).
CACHE_LAYOUT = "LDSH"
CACHE_LAYOUTS = ("LDSH", "LSDH")
# How commit() writes the cache: "scatter" or "slice" (set per target by export.export_step).
CACHE_WRITE = "slice"
CACHE_WRITES = ("scatter", "slice")
# Whose hand-written kernels a step runs where the shapes and dtypes fit them, set per target by
# export.export_step (compile/extern.py): "cuda" (one-token steps: attention from the raw qkv,
# and linear layers with their norm, residual and gate folded in, on f16 or packed 4-bit
# weights), "cpu" (one-token attention; linear layers on packed 4-bit weights, for one token or
# a prefill chunk) or None. The JAX graph stays the reference.
DECODE_KERNEL: str | None = None
# The positions a one-token step can be at (the bundle's max_context; set by export.export_step),
# None: all of the cache's rows. The CUDA decode attention launches blocks for these rows only:
# the rows past them hold a prefill chunk's padding, and blocks for them (which return at once)
# cost Qwen3-0.6B 0.8 us per layer on an H100 with the cache of a 512-token chunk (ncu).
DECODE_ROWS: int | None = None


def kv_cache_shape(layers: int, kv_heads: int, head_dim: int, capacity: int) -> tuple[int, ...]:
    dims = {"S": capacity, "L": layers, "H": kv_heads, "D": head_dim}
    return tuple(dims[a] for a in CACHE_LAYOUT)


class KVCache:
    """The caches for one call (axes in CACHE_LAYOUT order), read-only while the layers run.

    Each layer attends to the cached rows before this chunk plus the chunk's own keys. Where
    the CUDA attention kernels run, they write the layer's new K/V in place as they go
    (`kernel_wrote`: IREE's tied operands, no copy); elsewhere the new K/V of all layers are
    written once at the end (`commit`): writing each layer as it went in JAX made IREE copy the
    whole cache per layer (1.4 ms each for a 0.6B model on an H200).
    """

    def __init__(self, k_cache, v_cache, positions):
        self.k_cache, self.v_cache, self.positions = k_cache, v_cache, positions
        self.new_k, self.new_v = {}, {}
        self.written: set[int] = set()  # layers a kernel has written
        self.sync = None  # the CUDA decode attention's counters (extern.decode_attention)

    def kernel_wrote(self, layer: int, k_cache, v_cache) -> None:
        """A kernel wrote this layer's new K/V in place: these are the caches now."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.written.add(layer)

    def layer(self, layer: int):
        """This layer's cached K and V, [S, KVH, Dh] each."""
        order = CACHE_LAYOUT.replace("L", "")
        return tuple(jnp.transpose(jax.lax.index_in_dim(c, layer, CACHE_LAYOUT.index("L"), keepdims=False),
                                   [order.index(a) for a in "SHD"]) for c in (self.k_cache, self.v_cache))

    def commit(self):
        """Write every layer's chunk at rows start..start+C-1; returns the updated (k, v) caches.

        One write per cache, in place on the donated buffer, as CACHE_WRITE says:
        - "scatter" (CUDA): a dynamic_update_slice would make IREE read the device-held offset
          back to the host, a wait on the GPU mid-step, and a command buffer holding such a
          value cannot be reused from call to call;
        - "slice" (CPU): IREE's CPU codegen of that scatter overflowed its stack at prefill
          sizes, and on the CPU the read-back is a plain memory read.
        The runtime sizes the cache with a chunk of slack so the rows always fit."""
        if not self.new_k:  # the kernels wrote every layer
            return self.k_cache, self.v_cache
        if self.written:
            raise RuntimeError(f"layers {sorted(self.written)} were written by kernels and {sorted(self.new_k)} are "
                               "not: the cache write is all one or all the other")
        out = []
        for cache, new in ((self.k_cache, self.new_k), (self.v_cache, self.new_v)):
            stacked = jnp.stack([new[i] for i in range(len(new))], axis=1).astype(cache.dtype)  # [C, L, KVH, Dh]
            stacked = jnp.transpose(stacked, ["SLHD".index(a) for a in CACHE_LAYOUT])
            if CACHE_WRITE == "scatter":
                out.append(_scatter_rows(cache, stacked, self.positions, CACHE_LAYOUT))
            else:
                starts = [self.positions[0] if a == "S" else jnp.int32(0) for a in CACHE_LAYOUT]
                out.append(jax.lax.dynamic_update_slice(cache, stacked, starts))
        return tuple(out)


def _scatter_rows(cache, rows, positions, layout: str):
    """cache (axes in `layout`) with rows (the same axes, C long on S) written at S = positions.

    The axes up to S are indexed, the rest are the scatter's window: IREE's scatter wants the
    indexed axes leading, and a plain cache.at[..., positions, ...].set made it transpose both
    whole caches there and back (4 x 97 us per decode step of Qwen3-0.6B on an H100)."""
    n = layout.index("S") + 1
    axes = [positions if a == "S" else jnp.arange(size, dtype=jnp.int32) for a, size in zip(layout[:n], rows.shape)]
    idx = jnp.stack(jnp.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, n)
    window = rows.shape[n:]
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, 1 + len(window))),
                                           inserted_window_dims=tuple(range(n)),
                                           scatter_dims_to_operand_dims=tuple(range(n)))
    return jax.lax.scatter(cache, idx, rows.reshape(-1, *window), dims, indices_are_sorted=True,
                           unique_indices=True)


def _own_heads(x, head_axis: int):
    """x[..., k, ..., k'] (k' last) -> x with k' == k kept: each query head's own KV head.

    As a mask-and-sum: IREE turned static slices of the diagonal into one copy each."""
    kvh = x.shape[-1]
    shape = [1] * x.ndim
    shape[head_axis], shape[-1] = kvh, kvh
    return jnp.sum(x * jnp.eye(kvh, dtype=x.dtype).reshape(shape), axis=-1)


def attention(q, k, v, kv: KVCache, layer: int, scale: float, window: int | None = None,
              softcap: float | None = None):
    """q: [C, H, Dh]; k, v: [C, KVH, Dh] of this chunk. Returns [C, H * Dh] in f32. The chunk's
    k and v go to `kv`: written in place by the CUDA prefill kernel, else kept for kv.commit.

    Keys are the cached rows before this chunk (rows >= its start are stale) and the chunk's
    own, causal over absolute positions; with `window`, a query at p sees keys in
    (p - window, p]. `softcap` squashes scores as softcap * tanh(scores / softcap).
    The softmax runs over the two key sets without concatenating them (IREE generated a very
    slow kernel for the concatenated, odd-sized row). Products accumulate in f32. Scores stay
    in [C, KVH, G, keys] order throughout, the order of the query rows.

    A one-token CPU step runs a hand-written kernel instead (extern.cpu_decode_attention), and
    so does a CUDA prefill chunk with an f16 cache (extern.prefill_attention: one pass with an
    online softmax, which also writes the chunk's K/V into the caches in place).
    Against the cache, two forms. With an f32 cache (the CPU), per KV head plain 2-D matmuls in f32.
    With an f16 cache (CUDA), plain 2-D f16 matmuls of all query heads against all KV heads,
    keeping each head's own block: KVH times the flops, but IREE 3.13 on CUDA computes f16
    matmuls with batch dimensions wrongly (bench/cuda_ops.py) and its f32 ones for these shapes
    slowly (240 + 83 us per layer for one token over a 704-row cache, H100). The chunk's own
    keys are few and always go through f32.
    """
    C, H, Dh = q.shape
    if (C > 1 and DECODE_KERNEL == "cuda" and kv.k_cache.dtype == jnp.float16 and CACHE_LAYOUT == "LDSH"
            and extern.prefill_attention_fits(Dh)):
        a, k_cache, v_cache = extern.prefill_attention(q, k, v, kv.k_cache, kv.v_cache, kv.positions, layer=layer,
                                                       scale=scale, window=window, softcap=softcap)
        kv.kernel_wrote(layer, k_cache, v_cache)
        return a
    kv.new_k[layer], kv.new_v[layer] = k, v  # for commit to write
    if (C == 1 and DECODE_KERNEL == "cpu" and kv.k_cache.dtype == jnp.float32 and CACHE_LAYOUT == "LSDH"
            and extern.cpu_decode_attention_fits(H, Dh, softcap)):
        return extern.cpu_decode_attention(q[0], k[0], v[0], kv.k_cache, kv.v_cache, kv.positions, layer=layer,
                                           scale=scale, window=window)[None]
    k_old, v_old = kv.layer(layer)  # [S, KVH, Dh]
    S, KVH, _ = k_old.shape
    G = H // KVH
    all_heads = k_old.dtype == jnp.float16
    dt = k_old.dtype if all_heads else F32
    dot = lambda eq, a, b: jnp.einsum(eq, a, b, preferred_element_type=F32)  # noqa: E731
    qg = q.reshape(C, KVH, G, Dh)
    if all_heads:
        s_old = dot("rd,skd->rsk", qg.reshape(C * KVH * G, Dh).astype(dt), k_old).reshape(C, KVH, G, S, KVH)
        s_old = _own_heads(s_old, 1) * scale  # [C, KVH, G, S]
    else:  # per KV head, plain 2-D matmuls: IREE's CPU code for the batched einsum ran at ~5 GFLOP/s
        s_old = jnp.stack([dot("rd,sd->rs", qg[:, h].reshape(C * G, Dh).astype(dt), k_old[:, h].astype(dt))
                           .reshape(C, G, S) for h in range(KVH)], axis=1) * scale  # [C, KVH, G, S]
    s_new = dot("ckgd,jkd->ckgj", qg.astype(F32), k.astype(F32)) * scale  # [C, KVH, G, C]
    if softcap is not None:
        s_old, s_new = (jnp.tanh(x / softcap) * softcap for x in (s_old, s_new))
    positions = kv.positions
    q_pos = positions[:, None]
    old_pos = jnp.arange(S, dtype=jnp.int32)[None, :]
    old_ok = old_pos < positions[0]
    new_ok = positions[None, :] <= q_pos
    if window is not None:
        old_ok = old_ok & (old_pos > q_pos - window)
        new_ok = new_ok & (positions[None, :] > q_pos - window)
    s_old = jnp.where(old_ok[:, None, None, :], s_old, MASKED)
    s_new = jnp.where(new_ok[:, None, None, :], s_new, MASKED)
    tap("attn.s_old", s_old), tap("attn.s_new", s_new)
    m = tap("attn.max", jnp.maximum(s_old.max(-1, keepdims=True), s_new.max(-1, keepdims=True)))
    # The cached part's weights are made in the matmul's dtype at once (the cast had a
    # dispatch of its own); the denominator sums those same rounded weights. It sums them as
    # products with ones: as a reduction, IREE fused exp into it and its CUDA codegen failed at
    # prefill sizes ("failed to distribute"), and the optimization_barrier that prevented that
    # made IREE wait on the host for the GPU at every layer (29 waits in a decode step).
    e_old, e_new = jnp.exp(s_old - m).astype(dt), jnp.exp(s_new - m)
    denom = dot("ckgs,s->ckg", e_old, jnp.ones((S,), dt)) + dot("ckgj,j->ckg", e_new, jnp.ones((C,), F32))
    tap("attn.denom", denom)  # [C, KVH, G]
    if all_heads:
        out_old = dot("rs,skd->rkd", e_old.reshape(C * KVH * G, S), v_old).reshape(C, KVH, G, KVH, Dh)
        out_old = _own_heads(jnp.moveaxis(out_old, 3, -1), 1)  # [C, KVH, G, Dh]
    else:
        out_old = jnp.stack([dot("rs,sd->rd", e_old[:, h].reshape(C * G, S), v_old[:, h].astype(dt))
                             .reshape(C, G, Dh) for h in range(KVH)], axis=1)
    out = out_old + dot("ckgj,jkd->ckgd", e_new, v.astype(F32))
    return (out / denom[..., None]).reshape(C, H * Dh)


def self_attention(w: dict, p: str, h, cos, sin, kv: KVCache, layer: int, *, heads: int, kv_heads: int,
                   head_dim: int, scale: float, window: int | None = None, qk_norm_eps: float | None = None,
                   qk_norm_one_plus: bool = False, softcap: float | None = None, residual=None):
    """The attention half of a decoder layer, on normed input h: [C, D] -> [C, D] (plus
    `residual` if given: the one-token CUDA step adds it inside the output projection's kernel).
    h may be a Normed (pre_norm).

    Weights under prefix `p`: self_attn.qkv_proj.{weight,bias?} (HF's q/k/v_proj stacked along
    the output axis when loaded: one matvec instead of three), self_attn.o_proj.{weight,bias?}
    and, when qk_norm_eps is set, self_attn.{q,k}_norm.weight (per-head RMSNorm before
    rotary). The layer's new K/V go to `kv`: written in place by the CUDA kernels, else when the
    caller commits it.
    """
    C = h.shape[0]
    g = lambda name: w.get(f"{p}.self_attn.{name}")  # noqa: E731 - absent biases are None
    qkv = linear(h, g("qkv_proj.weight"), g("qkv_proj.bias"))
    if (DECODE_KERNEL == "cuda" and C == 1 and kv.k_cache.dtype == jnp.float16 and CACHE_LAYOUT == "LDSH"
            and extern.decode_attention_fits(heads, kv_heads, head_dim, kv.k_cache.shape[2])):
        # The hand-written kernels take qkv as it is: q/k norm, rotary and attention in one dispatch
        # (extern.fused_kernel's shapes), or two.
        qk_norm = None if qk_norm_eps is None else (g("q_norm.weight_rope"), g("k_norm.weight_rope"),
                                                    qk_norm_eps, qk_norm_one_plus)
        a, k_cache, v_cache, kv.sync = extern.decode_attention(
            qkv[0], cos[0], sin[0], kv.k_cache, kv.v_cache, kv.positions, heads=heads, layer=layer, scale=scale,
            window=window, softcap=softcap, qk_norm=qk_norm, sync=kv.sync, rows=DECODE_ROWS)
        kv.kernel_wrote(layer, k_cache, v_cache)
        return linear(a[None], g("o_proj.weight"), g("o_proj.bias"), residual)
    q, k, v = jnp.split(qkv, [heads * head_dim, (heads + kv_heads) * head_dim], axis=-1)
    q, k, v = q.reshape(C, heads, head_dim), k.reshape(C, kv_heads, head_dim), v.reshape(C, kv_heads, head_dim)
    if qk_norm_eps is not None:
        # Both heads' sums of squares in one reduction over the q and k heads together.
        qk = qkv[:, :(heads + kv_heads) * head_dim].reshape(C, heads + kv_heads, head_dim).astype(F32)
        r = jax.lax.rsqrt(jnp.mean(qk * qk, axis=-1, keepdims=True) + qk_norm_eps)
        q = rms_norm_rope(q, g("q_norm.weight_rope"), r[:, :heads], cos, sin, one_plus=qk_norm_one_plus)
        k = rms_norm_rope(k, g("k_norm.weight_rope"), r[:, heads:], cos, sin, one_plus=qk_norm_one_plus)
    else:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attention(q, k, v, kv, layer, scale, window, softcap)
    return linear(a, g("o_proj.weight"), g("o_proj.bias"), residual)


def gated_mlp(w: dict, p: str, h, act=jax.nn.silu, residual=None):
    """SwiGLU-style MLP: {p}.gate_up_proj (HF's gate_proj and up_proj stacked when loaded) and
    {p}.down_proj, each .weight and optional .bias; plus `residual` if given. h may be a Normed.
    On the one-token CUDA step, gate_up, its activation and the product are one kernel."""
    g = lambda name: w.get(f"{p}.{name}")  # noqa: E731
    gate_act = {jax.nn.silu: "silu", gelu_tanh: "gelu_tanh"}.get(act)
    if DECODE_KERNEL == "cuda" and _one_token_kernel(h) and gate_act and extern.gemv_fits(g("gate_up_proj.weight")):
        x, norm = _gemv_input(h)
        y = extern.gemv(x, g("gate_up_proj.weight"), bias=g("gate_up_proj.bias"), norm=norm, gate=gate_act)
        return linear(y[None], g("down_proj.weight"), g("down_proj.bias"), residual)
    gate, up = jnp.split(linear(h, g("gate_up_proj.weight"), g("gate_up_proj.bias")), 2, axis=-1)  # h: Normed too
    return linear(act(gate) * up, g("down_proj.weight"), g("down_proj.bias"), residual)


def attention_shapes(p: str, D: int, H: int, KVH: int, Dh: int, *, qkv_bias: bool = False,
                     o_bias: bool = False, qk_norm: bool = False) -> dict:
    shapes = {f"{p}.self_attn.qkv_proj.weight": ((H + 2 * KVH) * Dh, D), f"{p}.self_attn.o_proj.weight": (D, H * Dh)}
    if qkv_bias:
        shapes[f"{p}.self_attn.qkv_proj.bias"] = ((H + 2 * KVH) * Dh,)
    if o_bias:
        shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
    if qk_norm:  # each norm weight with its halves-swapped copy (rms_norm_rope)
        shapes |= {f"{p}.self_attn.q_norm.weight_rope": (2, Dh), f"{p}.self_attn.k_norm.weight_rope": (2, Dh)}
    return shapes


def mlp_shapes(p: str, D: int, I: int, *, bias: bool = False) -> dict:
    shapes = {f"{p}.gate_up_proj.weight": (2 * I, D), f"{p}.down_proj.weight": (D, I)}
    if bias:
        shapes |= {f"{p}.gate_up_proj.bias": (2 * I,), f"{p}.down_proj.bias": (D,)}
    return shapes
