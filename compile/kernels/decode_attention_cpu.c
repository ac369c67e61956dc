// Decode attention (one query token) on the CPU against the f32 KV cache in [L, S, D, H] layout
// (compile/extern.py cpu_decode_attention), in two dispatches, split-softmax style:
// - decode_attn_cpu_partial: one workgroup per ROWS cached keys, for every query head: scores,
//   their max m, l = sum(exp(s - m)) and sum(exp(s - m) * v);
// - decode_attn_cpu_combine: one workgroup per query head: folds the partials together with the
//   token's own key and value (not in the cache yet: the step writes it after the layers).
// IREE's own code for this attention ran at ~0.5 ms per layer on 2 cores for 672 cache rows
// (a batched matmul of 8 x 2 heads; bench/results/2026-11-26-cpu-2core-packed.txt).
//
// In [L, S, D, H] each cached key (all features of all KV heads) is one contiguous run, and a
// block's keys are one run of ROWS * D * H floats: streamed, not D strided chunks as in
// [L, D, S, H] (~20 GB/s there against ~38 for a plain copy on this 2-core VM). Every loop runs
// over the KV heads innermost (vectorized), with q transposed to [D][G][H].
// Query heads are grouped as HF's GQA: head h * G + g reads KV head h.
//
// Called by IREE's llvm-cpu executable once per workgroup (extern.py's shim); bindings are byte
// pointers plus byte offsets. Push constants: S (cache rows), KVH, G, Dh, layer, window (0 =
// none: the query at position p sees keys in (p - window, p]), scale (f32 bits).
// Limits (extern.cpu_decode_attention_fits): H * Dh <= MAX_Q. Freestanding (no libc, no libm).
#include <stddef.h>
#include <stdint.h>

#define ROWS 32      // cached keys per partial workgroup
#define MAX_Q 4096   // H * Dh
#define MAX_H 64     // query heads
#define NEG (-1e30f) // masked / empty, as compile/layers.py MASKED

typedef float v8 __attribute__((vector_size(32)));  // the 8 KV heads of one row and feature

static inline v8 load8(const float* p) {
  v8 v;
  __builtin_memcpy(&v, p, sizeof v);  // unaligned: rows start at any multiple of 4 bytes
  return v;
}

static inline void store8(float* p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }

typedef union {
  float f;
  int32_t i;
} bits32;

// exp(x) to ~2 ulp: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 (Cody-Waite split of ln2,
// degree-6 Taylor polynomial: relative error < 2e-7 on that interval). exp(x) = 0 below -87.
static inline float exp_f32(float x) {
  if (x < -87.0f) return 0.0f;
  if (x > 88.0f) x = 88.0f;
  const float n = __builtin_rintf(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  bits32 scale = {.i = ((int32_t)n + 127) << 23};
  return p * scale.f;
}

static inline float f32_of(int32_t b) {
  bits32 u = {.i = b};
  return u.f;
}

// Rows [lo, hi) that the query at position p sees: the cached ones before p, within the window.
static inline void visible(int32_t p, int32_t window, int32_t* lo, int32_t* hi) {
  *lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
  *hi = p;
}

// partial: [blocks, H, Dh + 2] (m, l, then sum(exp(s - m) v) per head).
void decode_attn_cpu_partial_workgroup(const char* q_b, size_t q_o, const char* k_b, size_t k_o, const char* v_b,
                                       size_t v_o, const char* pos_b, size_t pos_o, char* out_b, size_t out_o,
                                       int32_t S, int32_t KVH, int32_t G, int32_t Dh, int32_t layer, int32_t window,
                                       int32_t scale_bits, size_t wg) {
  const float* restrict q = (const float*)(q_b + q_o);
  const float* restrict kc = (const float*)(k_b + k_o) + (size_t)layer * S * Dh * KVH;
  const float* restrict vc = (const float*)(v_b + v_o) + (size_t)layer * S * Dh * KVH;
  const int32_t p = *(const int32_t*)(pos_b + pos_o);
  const int32_t H = KVH * G, W = Dh + 2;
  float* restrict out = (float*)(out_b + out_o) + wg * (size_t)H * W;
  int32_t lo, hi;
  visible(p, window, &lo, &hi);
  const int32_t r0 = (int32_t)wg * ROWS > lo ? (int32_t)wg * ROWS : lo;
  const int32_t r1 = (int32_t)wg * ROWS + ROWS < hi ? (int32_t)wg * ROWS + ROWS : hi;
  if (r0 >= r1) {  // no visible key in this block
    for (int32_t h = 0; h < H; ++h) {
      out[h * W] = NEG;
      for (int32_t i = 1; i < W; ++i) out[h * W + i] = 0.0f;
    }
    return;
  }
  const int32_t n = r1 - r0;
  const float scale = f32_of(scale_bits);
  float qt[MAX_Q];  // [Dh][G][KVH], scaled
  for (int32_t h = 0; h < KVH; ++h)
    for (int32_t g = 0; g < G; ++g)
      for (int32_t d = 0; d < Dh; ++d) qt[(d * G + g) * KVH + h] = q[(h * G + g) * Dh + d] * scale;
  float s[ROWS * MAX_H];  // [row][G][KVH]
  for (int32_t i = 0; i < n * H; ++i) s[i] = 0.0f;
  if (KVH == 8) {  // one 8-float vector per feature of a key (Qwen3, Llama 3): no loop over heads
    for (int32_t r = 0; r < n; ++r) {
      const float* krow = kc + (size_t)(r0 + r) * Dh * 8;
      for (int32_t g = 0; g < G; ++g) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};  // four sums: no chain of dependent adds
        int32_t d = 0;
        for (; d + 4 <= Dh; d += 4) {
          a0 += load8(qt + (d * G + g) * 8) * load8(krow + d * 8);
          a1 += load8(qt + ((d + 1) * G + g) * 8) * load8(krow + (d + 1) * 8);
          a2 += load8(qt + ((d + 2) * G + g) * 8) * load8(krow + (d + 2) * 8);
          a3 += load8(qt + ((d + 3) * G + g) * 8) * load8(krow + (d + 3) * 8);
        }
        for (; d < Dh; ++d) a0 += load8(qt + (d * G + g) * 8) * load8(krow + d * 8);
        store8(s + (r * G + g) * 8, (a0 + a1) + (a2 + a3));
      }
    }
  } else {
    for (int32_t r = 0; r < n; ++r) {
      const float* krow = kc + (size_t)(r0 + r) * Dh * KVH;
      for (int32_t d = 0; d < Dh; ++d)
        for (int32_t g = 0; g < G; ++g)
          for (int32_t h = 0; h < KVH; ++h) s[(r * G + g) * KVH + h] += qt[(d * G + g) * KVH + h] * krow[d * KVH + h];
    }
  }
  float m[MAX_H], l[MAX_H];
  for (int32_t i = 0; i < H; ++i) m[i] = NEG, l[i] = 0.0f;
  for (int32_t r = 0; r < n; ++r)
    for (int32_t i = 0; i < H; ++i) m[i] = s[r * H + i] > m[i] ? s[r * H + i] : m[i];
  for (int32_t r = 0; r < n; ++r)
    for (int32_t i = 0; i < H; ++i) {
      const float e = exp_f32(s[r * H + i] - m[i]);
      s[r * H + i] = e;
      l[i] += e;
    }
  // Weights x V, into out's rows directly: out[(h * G + g) * W + 2 + d] += e[r, g, h] * v[r, d, h].
  float acc[MAX_Q];  // [Dh][G][KVH]
  for (int32_t i = 0; i < Dh * H; ++i) acc[i] = 0.0f;
  if (KVH == 8) {
    for (int32_t r = 0; r < n; ++r) {
      const float* vrow = vc + (size_t)(r0 + r) * Dh * 8;
      for (int32_t g = 0; g < G; ++g) {
        const v8 e = load8(s + (r * G + g) * 8);
        for (int32_t d = 0; d < Dh; ++d)
          store8(acc + (d * G + g) * 8, load8(acc + (d * G + g) * 8) + e * load8(vrow + d * 8));
      }
    }
  } else {
    for (int32_t r = 0; r < n; ++r) {
      const float* vrow = vc + (size_t)(r0 + r) * Dh * KVH;
      for (int32_t d = 0; d < Dh; ++d)
        for (int32_t g = 0; g < G; ++g)
          for (int32_t h = 0; h < KVH; ++h) acc[(d * G + g) * KVH + h] += s[(r * G + g) * KVH + h] * vrow[d * KVH + h];
    }
  }
  for (int32_t d = 0; d < Dh; ++d)
    for (int32_t g = 0; g < G; ++g)
      for (int32_t h = 0; h < KVH; ++h) out[(h * G + g) * W + 2 + d] = acc[(d * G + g) * KVH + h];
  for (int32_t g = 0; g < G; ++g)
    for (int32_t h = 0; h < KVH; ++h) {
      out[(h * G + g) * W] = m[g * KVH + h];
      out[(h * G + g) * W + 1] = l[g * KVH + h];
    }
}

// out: [H * Dh], query head wg of the attention output.
void decode_attn_cpu_combine_workgroup(const char* q_b, size_t q_o, const char* kn_b, size_t kn_o, const char* vn_b,
                                       size_t vn_o, const char* part_b, size_t part_o, char* out_b, size_t out_o,
                                       int32_t S, int32_t KVH, int32_t G, int32_t Dh, int32_t layer, int32_t window,
                                       int32_t scale_bits, size_t wg) {
  (void)layer;
  (void)window;
  const int32_t head = (int32_t)wg, kvh = head / G, H = KVH * G, W = Dh + 2;
  const float* restrict q = (const float*)(q_b + q_o) + head * Dh;
  const float* restrict kn = (const float*)(kn_b + kn_o) + kvh * Dh;
  const float* restrict vn = (const float*)(vn_b + vn_o) + kvh * Dh;
  const float* restrict part = (const float*)(part_b + part_o) + head * W;
  float* restrict out = (float*)(out_b + out_o) + head * Dh;
  const int32_t blocks = (S + ROWS - 1) / ROWS;
  float own = 0.0f;  // the token's own key: always visible
  for (int32_t d = 0; d < Dh; ++d) own += q[d] * kn[d];
  own *= f32_of(scale_bits);
  float mx = own;
  for (int32_t b = 0; b < blocks; ++b) mx = part[(size_t)b * H * W] > mx ? part[(size_t)b * H * W] : mx;
  const float e_own = exp_f32(own - mx);
  float l = e_own;
  for (int32_t d = 0; d < Dh; ++d) out[d] = e_own * vn[d];
  for (int32_t b = 0; b < blocks; ++b) {
    const float* pb = part + (size_t)b * H * W;
    if (pb[1] == 0.0f) continue;  // an empty block
    const float f = exp_f32(pb[0] - mx);
    l += f * pb[1];
    for (int32_t d = 0; d < Dh; ++d) out[d] += f * pb[2 + d];
  }
  const float inv = 1.0f / l;
  for (int32_t d = 0; d < Dh; ++d) out[d] *= inv;
}
