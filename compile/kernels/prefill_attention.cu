// Attention of a prefill chunk (C query tokens) against an f16 KV cache in [L, D, S, H] layout
// plus the chunk's own keys, flash-attention style: one pass over the keys in tiles of KT with
// an online softmax, so no [C, H, S] score tensor is ever written. It replaces IREE's
// all-heads f16 matmuls of compile/layers.py attention (KVH times the flops) and the f32
// batched matmuls of the chunk's own keys, ~55% of a Qwen3-0.6B prefill chunk on an H100.
//
// One block per (tile of ROWS query rows, KV head); a query row is (query token, one of the G
// query heads of that KV head). Each warp owns RW rows through the whole pass: it computes their
// scores with a lane per key, keeps the softmax state in registers and the output with a lane
// per 32nd feature, so only the K/V tiles in shared memory need block barriers.
// Everything is f32 in shared memory and registers (the cache's f16 rows widen exactly; the
// chunk's own keys and values stay f32, as in the JAX attention: rounding them to f16 as the
// cache stores them flipped near-tied greedy tokens of the gemma3 and stablelm test checkpoints).
// Each thread loads its share of the next tile while the warp computes on this one.
//
// Arguments, as IREE's CUDA HAL passes them: the bindings (operands, then the result not
// written in place) as pointers, then the push constants as 32-bit ints:
//   q [C, H, Dh] f32 (normed, rotated), k, v [C, KVH, Dh] f32 (this chunk's);
//   the caches [L, Dh, S, KVH] f16: rows < positions[0] valid; the chunk's keys and values are
//     written at rows `positions`, in place (read-write bindings tied to IREE's results);
//   positions [C] i32 (consecutive); out [C, H * Dh] f32;
//   C, S, KVH, G, Dh, layer, window (0 = none: a query at p sees keys in (p - window, p]),
//   scale and softcap (f32 bits; softcap 0 = none).
// Two entry points: prefill_attn (Dh <= 128: 16 query rows a block, tiles of 32 keys) and
// prefill_attn_d256 (Dh <= 256, Gemma3's 256: 8 rows a block, tiles of 16 keys with two lanes a
// key, so that its shared memory stays within the 48 KB a block may declare statically).
// Limits (checked at export, extern.prefill_attention_fits): Dh % 32 == 0, Dh <= 256.
// Regenerate the PTX with `make ptx` (needs nvcc).
#include "common.cuh"

#define NT 256
#define WARPS (NT / 32)

// A tile's keys and values in a thread's registers: key k0 + t % KT (if below k_end), features
// t / KT + (NT / KT) j (KT 32: the thread's lane and warp). Cached rows come from the caches,
// the chunk's from k_new / v_new.
template <int MAX_DH, int KT>
struct Tile {
  static constexpr int SPT = MAX_DH * KT / NT;  // a thread's keys (and values) of a tile
  float k[SPT], v[SPT];
  __device__ __forceinline__ void load(bool cached, int k0, int k_end, const __half* __restrict__ kc,
                                       const __half* __restrict__ vc, size_t base, size_t plane, int KVH,
                                       const float* __restrict__ k_new, const float* __restrict__ v_new, int kvh,
                                       int Dh) {
    const int key = k0 + threadIdx.x % KT, d0 = threadIdx.x / KT;
#pragma unroll
    for (int j = 0; j < SPT; ++j) {
      const int d = d0 + NT / KT * j;
      k[j] = v[j] = 0.f;
      if (d < Dh && key < k_end) {
        if (cached) {
          const size_t at = base + (size_t)d * plane + (size_t)key * KVH;
          k[j] = __half2float(kc[at]);
          v[j] = __half2float(vc[at]);
        } else {
          const size_t at = ((size_t)key * KVH + kvh) * Dh + d;
          k[j] = k_new[at];
          v[j] = v_new[at];
        }
      }
    }
  }
};

// MAX_DH: the largest head dim; RW: query rows a warp; KT: keys a tile, 32 / KT lanes a key (the
// lanes of one key sum every (32 / KT)-th group of 4 features of its score).
template <int MAX_DH, int RW, int KT>
__device__ __forceinline__ void prefill_attn_body(
    const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,
    __half* __restrict__ kc, __half* __restrict__ vc, const int* __restrict__ positions,
    float* __restrict__ out, int C, int S, int KVH, int G, int Dh, int layer, int window, int scale_bits,
    int softcap_bits, float* qs, float* kt, float* vs) {
  constexpr int ROWS = WARPS * RW, NI = MAX_DH / 32, SPT = Tile<MAX_DH, KT>::SPT, LPK = 32 / KT;
  static_assert(KT * LPK == 32 && SPT * NT == MAX_DH * KT, "tile shape");
  // qs: the block's query rows [ROWS][Dh]; kt: a key tile, transposed [Dh][KT]; vs: a value tile
  // [KT][Dh + 1] (no bank conflicts).
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int kvh = blockIdx.x % KVH, r0 = (blockIdx.x / KVH) * ROWS, H = KVH * G, n_rows = C * G;
  const float scale = __int_as_float(scale_bits), cap = __int_as_float(softcap_bits);
  const int VS = Dh + 1;

  // The block's rows: query token r / G, head kvh * G + r % G.
  for (int i = t; i < ROWS * Dh; i += NT) {
    const int r = r0 + i / Dh, d = i % Dh;
    qs[(i / Dh) * Dh + d] = r < n_rows ? q[((size_t)(r / G) * H + kvh * G + r % G) * Dh + d] : 0.f;
  }
  int qpos[RW];
#pragma unroll
  for (int j = 0; j < RW; ++j) qpos[j] = positions[min(r0 + warp * RW + j, n_rows - 1) / G];
  const int start = positions[0];
  const int q_first = r0 / G, q_last = min(C - 1, (r0 + ROWS - 1) / G);
  const int c_lo = window > 0 ? max(0, positions[q_first] - window + 1) : 0;

  float m[RW], l[RW], o[RW][NI];
#pragma unroll
  for (int j = 0; j < RW; ++j) {
    m[j] = -1e30f;  // finite: a tile with no visible key leaves the state as it is
    l[j] = 0.f;
#pragma unroll
    for (int i = 0; i < NI; ++i) o[j][i] = 0.f;
  }
  const size_t plane = (size_t)S * KVH, base = (size_t)layer * Dh * plane + kvh;

  // Tiles of cached rows [c_lo, start), then of the chunk's keys [0, q_last].
  const int n_cache_tiles = start > c_lo ? (start - c_lo + KT - 1) / KT : 0;
  const int n_tiles = n_cache_tiles + q_last / KT + 1;
  auto first_of = [&](int tile) { return tile < n_cache_tiles ? c_lo + tile * KT : (tile - n_cache_tiles) * KT; };
  auto end_of = [&](int tile) { return tile < n_cache_tiles ? start : q_last + 1; };
  Tile<MAX_DH, KT> next;
  next.load(0 < n_cache_tiles, first_of(0), end_of(0), kc, vc, base, plane, KVH, k_new, v_new, kvh, Dh);
  for (int tile = 0; tile < n_tiles; ++tile) {
    const bool cached = tile < n_cache_tiles;
    const int k0 = first_of(tile), k_end = end_of(tile);
    __syncthreads();  // the previous tile is used up
#pragma unroll
    for (int j = 0; j < SPT; ++j) {
      const int d = t / KT + NT / KT * j;
      if (d < Dh) {
        kt[d * KT + t % KT] = next.k[j];
        vs[(t % KT) * VS + d] = next.v[j];
      }
    }
    __syncthreads();
    if (tile + 1 < n_tiles)
      next.load(tile + 1 < n_cache_tiles, first_of(tile + 1), end_of(tile + 1), kc, vc, base, plane, KVH, k_new,
                v_new, kvh, Dh);

    // Scores of the warp's rows against key lane % KT (its LPK lanes: every LPK-th 4 features).
    float s[RW];
#pragma unroll
    for (int j = 0; j < RW; ++j) s[j] = 0.f;
    const float4* q4 = reinterpret_cast<const float4*>(qs + warp * RW * Dh);
    const int kl = lane % KT;
#pragma unroll 2
    for (int d = 4 * (lane / KT); d < Dh; d += 4 * LPK) {
      const float k0f = kt[d * KT + kl], k1f = kt[(d + 1) * KT + kl];
      const float k2f = kt[(d + 2) * KT + kl], k3f = kt[(d + 3) * KT + kl];
#pragma unroll
      for (int j = 0; j < RW; ++j) {
        const float4 qv = q4[(j * Dh + d) / 4];
        s[j] += qv.x * k0f + qv.y * k1f + qv.z * k2f + qv.w * k3f;
      }
    }
#pragma unroll
    for (int o = KT; o < 32; o *= 2)
#pragma unroll
      for (int j = 0; j < RW; ++j) s[j] += __shfl_xor_sync(0xffffffffu, s[j], o);
    const int key = k0 + lane;  // lanes past KT: no key (their score is lane % KT's)
    const int kpos = cached ? key : (key < C ? positions[key] : 0x7fffffff);
    float p[RW];
#pragma unroll
    for (int j = 0; j < RW; ++j) {
      const bool valid = lane < KT && key < k_end && kpos <= qpos[j] && (window <= 0 || kpos > qpos[j] - window);
      float x = s[j] * scale;
      if (cap > 0.f) x = tanhf(x / cap) * cap;
      x = valid ? x : -INFINITY;
      const float m_new = fmaxf(m[j], warp_reduce<true>(x));
      const float alpha = __expf(m[j] - m_new);
      p[j] = valid ? __expf(x - m_new) : 0.f;
      l[j] = l[j] * alpha + warp_sum(p[j]);
      m[j] = m_new;
#pragma unroll
      for (int i = 0; i < NI; ++i) o[j][i] *= alpha;
    }
    // Weights x values: key kk's weights broadcast from its lane.
    const int kk_end = min(KT, k_end - k0);
    for (int kk = 0; kk < kk_end; ++kk) {
      float v[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) v[i] = lane + 32 * i < Dh ? vs[kk * VS + lane + 32 * i] : 0.f;
#pragma unroll
      for (int j = 0; j < RW; ++j) {
        const float pk = __shfl_sync(0xffffffffu, p[j], kk);
#pragma unroll
        for (int i = 0; i < NI; ++i) o[j][i] += pk * v[i];
      }
    }
  }

#pragma unroll
  for (int j = 0; j < RW; ++j) {
    const int r = r0 + warp * RW + j;
    if (r >= n_rows) continue;
    if (r % G == 0) {  // the chunk's key and value into the caches, by the warp of its first head
      // (rows >= positions[0]: no block of this kernel reads them). Rounded as JAX's write rounds.
      const size_t src = ((size_t)(r / G) * KVH + kvh) * Dh, row = base + (size_t)positions[r / G] * KVH;
      for (int d = lane; d < Dh; d += 32) {
        kc[row + (size_t)d * plane] = __float2half(k_new[src + d]);
        vc[row + (size_t)d * plane] = __float2half(v_new[src + d]);
      }
    }
    float* dst = out + ((size_t)(r / G) * H + kvh * G + r % G) * Dh;
    const float inv = 1.f / l[j];
#pragma unroll
    for (int i = 0; i < NI; ++i)
      if (lane + 32 * i < Dh) dst[lane + 32 * i] = o[j][i] * inv;
  }
}

#define PREFILL_ARGS                                                                                       \
  const float* __restrict__ q, const float* __restrict__ k_new, const float* __restrict__ v_new,           \
      __half* __restrict__ kc, __half* __restrict__ vc, const int* __restrict__ positions,                 \
      float* __restrict__ out, int C, int S, int KVH, int G, int Dh, int layer, int window, int scale_bits, \
      int softcap_bits
#define PREFILL_KERNEL(name, MAX_DH, RW, KT)                                                                \
  extern "C" __global__ void __launch_bounds__(NT) name(PREFILL_ARGS) {                                     \
    __shared__ __align__(16) float qs[WARPS * RW * MAX_DH];                                                 \
    __shared__ float kt[MAX_DH * KT];                                                                       \
    __shared__ float vs[KT * (MAX_DH + 1)];                                                                 \
    prefill_attn_body<MAX_DH, RW, KT>(q, k_new, v_new, kc, vc, positions, out, C, S, KVH, G, Dh, layer, window, \
                                      scale_bits, softcap_bits, qs, kt, vs);                                \
  }
// Shared memory (q rows + key tile + value tile): 8 + 16 + 16.1 KB each. (Dh 256 with the first
// one's 16 rows and 32 keys a tile would take 80 KB.)
PREFILL_KERNEL(prefill_attn, 128, 2, 32)       // 16 query rows a block, a lane a key
PREFILL_KERNEL(prefill_attn_d256, 256, 1, 16)  // 8 query rows a block, two lanes a key
