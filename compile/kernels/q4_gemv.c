// One-token linear layer on the CPU from MLX affine 4-bit weights as the checkpoint stores them
// (compile/extern.py q4_gemv): y = dequant(packed, scales_biases) @ x, w = s * q + b per group
// of 64 inputs. Measured against IREE's own codegen in bench/q4_gemv_cpu.py.
//
// Called by IREE's llvm-cpu executable once per workgroup (extern.py's shim): rows
// [wg * TILE, wg * TILE + TILE) of the output. Bindings are byte pointers plus byte offsets:
// packed [N, K/8] u32, scales_biases [N, K/64, 2] (scale, bias: f32, or F16 / BF16 as the
// checkpoint stores them, flags PAIRS_F16 / PAIRS_BF16: half the bytes, widened here), x [K] f32,
// norm [K] f32, bias [N] f32, residual [N] f32, y [N] f32. Push constants: N, K, flags, eps (f32 bits).
// As the CUDA gemv (extern.gemv's flags): NORM: x is RMS-normed first with weight norm (1 + norm
// with ONE_PLUS); BIAS, RESIDUAL: added to y. Each folded step is a dispatch fewer: a CPU decode
// step had ~470, each paying the task system's wake-ups.
// Limits (extern.q4_gemv_fits): group 64, K % 128 == 0, K <= KMAX.
// Freestanding: IREE links the object into its embedded ELF, which has no libc.
#include <stddef.h>
#include <stdint.h>

#define TILE 64  // rows per workgroup (measured: 64 ~8 ms per token's matvecs, 32 ~9 ms, 128 noisier)
#define KMAX 8192
enum { NORM = 1, ONE_PLUS = 2, BIAS = 4, RESIDUAL = 8, PAIRS_F16 = 64, PAIRS_BF16 = 128 };  // extern.py's flags
enum { F32, F16, BF16 };  // the pairs' dtype (PAIRS)
// 16 lanes = one AVX-512 register = 16 packed words = two 64-wide groups of one row.
typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64), aligned(4)));  // rows are only 4-byte aligned

typedef int32_t vi __attribute__((vector_size(64)));

// The 16 lanes' sum as a tree (4 shuffles and adds): a row's sum lane by lane was a chain of 16
// dependent adds, as long as the row's own loop for K = 1024 (perf, 2026-11-26).
static inline float hsum(vf v) {
  v += __builtin_shuffle(v, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, (vi){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, (vi){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, (vi){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}

// A 16-bit float's bits widened to f32 (exact either way). F16 through F16C where the target has
// it (-march=native), else by hand: no libgcc call in a freestanding object.
static inline float bf16_f32(uint32_t h) {
  union { uint32_t u; float f; } v = {.u = h << 16};
  return v.f;
}
static inline float f16_f32(uint32_t h) {
#ifdef __F16C__
  _Float16 f;
  const uint16_t b = (uint16_t)h;
  __builtin_memcpy(&f, &b, 2);
  return (float)f;
#else
  const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 31, m = h & 1023;
  union { uint32_t u; float f; } v;
  if (e == 31) v.u = sign | 0x7f800000u | (m << 13);  // inf, NaN
  else if (e) v.u = sign | ((e + 112) << 23) | (m << 13);
  else {  // zero or subnormal: m * 2^-24
    v.f = (float)m * 0x1p-24f;
    v.u |= sign;
  }
  return v.f;
#endif
}

// Group g's (scale, bias) of a row's pairs (sb: the row's first), as PAIRS says they are stored.
// Through volatile loads: as plain ones gcc's SLP vectorizer took the f32 (s0, b0, s1, b1) as
// one 16-byte vector and permuted it, 2.6x slower per row (0.36 against 0.135 ms per 6144 x 1024
// matvec on this machine's core).
static inline __attribute__((always_inline)) void pair(const char* sb, size_t g, int pairs, float* s, float* b) {
  if (pairs == F32) {
    const volatile float* p = (const volatile float*)sb + 2 * g;
    *s = p[0], *b = p[1];
    return;
  }
  const uint32_t w = ((const volatile uint32_t*)sb)[g];  // scale in the low half
  *s = pairs == BF16 ? bf16_f32(w & 0xffffu) : f16_f32(w & 0xffffu);
  *b = pairs == BF16 ? bf16_f32(w >> 16) : f16_f32(w >> 16);
}

typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v8h __attribute__((vector_size(16)));

// Groups g and g + 1's (s0, b0, s1, b1), widened in vector registers: two 16-bit pairs (8
// bytes) become four f32 lanes in one shuffle (BF16: each value's bits in a lane's high half)
// or one F16C conversion. (Widened one value at a time in general registers, the BF16 rows took
// 1.14 ms per 6144 x 1024 matvec against 1.04 with f32 pairs on this machine.)
static inline __attribute__((always_inline)) v4f two_pairs(const char* sb, size_t g, int pairs) {
  if (pairs == F32) {
    float s0, b0, s1, b1;
    pair(sb, g, F32, &s0, &b0);
    pair(sb, g + 1, F32, &s1, &b1);
    return (v4f){s0, b0, s1, b1};
  }
  uint64_t bits;
  __builtin_memcpy(&bits, sb + 4 * g, 8);
  const v8h h = (v8h)(__attribute__((vector_size(16))) uint64_t){bits, 0};
  if (pairs == BF16) return (v4f)__builtin_shuffle((v8h){0}, h, (v8h){0, 8, 1, 9, 2, 10, 3, 11});
#ifdef __F16C__
  return __builtin_ia32_vcvtph2ps((__attribute__((vector_size(16))) short)h);
#else
  return (v4f){f16_f32(h[0]), f16_f32(h[1]), f16_f32(h[2]), f16_f32(h[3])};
#endif
}

static inline size_t pair_bytes(int pairs) { return pairs == F32 ? 8 : 4; }

static inline int pairs_of(int32_t flags) { return flags & PAIRS_BF16 ? BF16 : flags & PAIRS_F16 ? F16 : F32; }

static inline vf loadv(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Rows r0 .. r1 - 1 of y, from x reordered (xt) and its group sums (xs).
static inline __attribute__((always_inline)) void q4_rows(const uint32_t* restrict packed, const char* restrict sb,
                                                          int pairs, const vf* restrict xt, const float* restrict xs,
                                                          size_t k, size_t r0, size_t r1, const float* restrict bias,
                                                          const float* restrict res, float* restrict y) {
  const size_t ng = k / 64;
  for (size_t r = r0; r < r1; ++r) {
    const uint32_t* p = packed + r * (k / 8);
    const char* sbr = sb + r * ng * pair_bytes(pairs);  // (scale, bias) per group
    vf acc = {0};
    float bacc = 0.0f;
    for (size_t g = 0; g < ng; g += 2) {  // two groups (128 weights, one cache line) per step
      // Software prefetch 8 KB ahead: with the hardware prefetcher alone a core streamed ~15 GB/s
      // and stalled; this took two cores from ~45 to ~63 Gweights/s in a standalone harness.
      __builtin_prefetch(p + 8 * g + 2048);
      vu w = *(const vu*)(p + 8 * g);
      const vf* xg = xt + 4 * g;
      vf d = {0};  // and, convert, fma per 16 weights
      for (unsigned t = 0; t < 8; ++t) d += __builtin_convertvector(w & (15u << (4 * t)), vf) * xg[t];
      const v4f sb2 = two_pairs(sbr, g, pairs);  // s0, b0, s1, b1
      const float s0 = sb2[0], s1 = sb2[2];
      vf sv = {s0, s0, s0, s0, s0, s0, s0, s0, s1, s1, s1, s1, s1, s1, s1, s1};
      acc += sv * d;
      bacc += sb2[1] * xs[g] + sb2[3] * xs[g + 1];
    }
    float s = bacc + hsum(acc);
    if (bias) s += bias[r];
    y[r] = res ? res[r] + s : s;
  }
}

void q4_gemv_workgroup(const char* packed_base, size_t packed_off, const char* sb_base, size_t sb_off,
                       const char* x_base, size_t x_off,
                       const char* norm_base, size_t norm_off, const char* bias_base, size_t bias_off,
                       const char* res_base, size_t res_off, char* y_base, size_t y_off, int32_t n_i32,
                       int32_t k_i32, int32_t flags, int32_t eps_bits, size_t wg) {
  const uint32_t* restrict packed = (const uint32_t*)(packed_base + packed_off);
  const float* restrict x_in = (const float*)(x_base + x_off);
  float* restrict y = (float*)(y_base + y_off);
  const size_t n = (size_t)n_i32, k = (size_t)k_i32;
  size_t ng = k / 64, r0 = wg * TILE, r1 = r0 + TILE < n ? r0 + TILE : n;
  float xn[KMAX];  // x, RMS-normed when NORM (every workgroup redoes it: K floats, cheap next to its rows)
  const float* restrict x = x_in;
  if (flags & NORM) {  // 16 lanes at a time: a scalar sum is one chain of K dependent adds
    const float* restrict w = (const float*)(norm_base + norm_off);
    union { int32_t i; float f; } eps = {.i = eps_bits};
    vf ss = {0};
    for (size_t i = 0; i < k; i += 16) {
      const vf v = loadv(x_in + i);
      ss += v * v;
    }
    const float r = 1.0f / __builtin_sqrtf(hsum(ss) / (float)k + eps.f);
    const float one = (flags & ONE_PLUS) ? 1.0f : 0.0f;
    for (size_t i = 0; i < k; i += 16) {
      const vf v = loadv(x_in + i) * r * (loadv(w + i) + one);
      __builtin_memcpy(xn + i, &v, sizeof v);
    }
    x = xn;
  }
  const float* restrict bias = (flags & BIAS) ? (const float*)(bias_base + bias_off) : 0;
  const float* restrict res = (flags & RESIDUAL) ? (const float*)(res_base + res_off) : 0;
  // x reordered once per workgroup: lane j of xt[i/16 + t] is x[i + 8j + t] * 16^-t, the element
  // nibble t of word j multiplies when masked in place (w & 0xF << 4t): no shift in the row loop.
  vf xt[KMAX / 16];
  float xs[KMAX / 64];  // group sums of x: sum_k (s*q + b) x = s * sum(q x) + b * sum(x)
  for (size_t i = 0; i < k; i += 128)
    for (size_t t = 0; t < 8; ++t)
      for (size_t j = 0; j < 16; ++j) xt[i / 16 + t][j] = x[i + 8 * j + t] * (1.0f / (float)(1u << (4 * t)));
  for (size_t g = 0; g < ng; ++g)
    xs[g] = hsum((loadv(x + 64 * g) + loadv(x + 64 * g + 16)) + (loadv(x + 64 * g + 32) + loadv(x + 64 * g + 48)));
  const char* sb = sb_base + sb_off;
  switch (pairs_of(flags)) {  // the row loop compiled once per pairs dtype
    case F32: q4_rows(packed, sb, F32, xt, xs, k, r0, r1, bias, res, y); break;
    case F16: q4_rows(packed, sb, F16, xt, xs, k, r0, r1, bias, res, y); break;
    default: q4_rows(packed, sb, BF16, xt, xs, k, r0, r1, bias, res, y);
  }
}

// Several tokens (a prefill chunk) at once: Y[C, N] = X[C, K] @ dequant(W)^T. Each pair of rows
// is dequantized once into f32 on the stack (2 * K floats, K <= GEMM_KMAX), then the tokens'
// rows of X (kept in cache: C * K floats) are dotted with both, four tokens at a time: the
// weights are read once per chunk instead of once per token.
#define GEMM_TILE 32  // rows per workgroup
#define GEMM_KMAX 4096

static inline __attribute__((always_inline)) void dequant_row(const uint32_t* restrict p, const char* restrict sb,
                                                              int pairs, size_t k, float* restrict out) {
  for (size_t g = 0; g < k / 64; ++g) {  // 8 words per group of 64
    float s, b;
    pair(sb, g, pairs, &s, &b);
    for (size_t i = 8 * g; i < 8 * g + 8; ++i) {
      const uint32_t w = p[i];
      for (unsigned t = 0; t < 8; ++t) out[8 * i + t] = s * (float)((w >> (4 * t)) & 15u) + b;
    }
  }
}

// Rows r0 .. r1 - 1 of Y (pairs: the dtype of the scale/bias pairs, a constant once inlined).
static inline __attribute__((always_inline)) void q4_gemm_rows(const uint32_t* restrict packed, const char* restrict sb,
                                                               int pairs, const float* restrict x, float* restrict y,
                                                               size_t n, size_t k, size_t c, size_t r0, size_t r1) {
  const size_t row_pairs = (k / 64) * pair_bytes(pairs);
  float w0[GEMM_KMAX], w1[GEMM_KMAX];
  for (size_t r = r0; r < r1; r += 2) {
    const int two = r + 1 < r1;
    dequant_row(packed + r * (k / 8), sb + r * row_pairs, pairs, k, w0);
    if (two) dequant_row(packed + (r + 1) * (k / 8), sb + (r + 1) * row_pairs, pairs, k, w1);
    else
      for (size_t i = 0; i < k; ++i) w1[i] = 0.0f;  // a lone last row: the second is computed and dropped
    size_t t = 0;
    for (; t + 4 <= c; t += 4) {  // 4 tokens x 2 rows: 6 loads feed 8 FMAs
      const float* xt = x + t * k;
      vf a[4][2] = {{{0}}};
      for (size_t i = 0; i < k; i += 16) {  // k % 64 == 0
        const vf u0 = loadv(w0 + i), u1 = loadv(w1 + i);
        for (size_t j = 0; j < 4; ++j) {
          const vf xv = loadv(xt + j * k + i);
          a[j][0] += u0 * xv;
          a[j][1] += u1 * xv;
        }
      }
      for (size_t j = 0; j < 4; ++j) {
        y[(t + j) * n + r] = hsum(a[j][0]);
        if (two) y[(t + j) * n + r + 1] = hsum(a[j][1]);
      }
    }
    for (; t < c; ++t) {
      const float* xt = x + t * k;
      vf a0 = {0}, a1 = {0};
      for (size_t i = 0; i < k; i += 16) {
        const vf xv = loadv(xt + i);
        a0 += loadv(w0 + i) * xv;
        a1 += loadv(w1 + i) * xv;
      }
      y[t * n + r] = hsum(a0);
      if (two) y[t * n + r + 1] = hsum(a1);
    }
  }
}

void q4_gemm_workgroup(const char* packed_base, size_t packed_off, const char* sb_base, size_t sb_off,
                       const char* x_base, size_t x_off,
                       char* y_base, size_t y_off, int32_t n_i32, int32_t k_i32, int32_t c_i32, int32_t flags,
                       size_t wg) {
  const uint32_t* restrict packed = (const uint32_t*)(packed_base + packed_off);
  const char* restrict sb = sb_base + sb_off;
  const float* restrict x = (const float*)(x_base + x_off);
  float* restrict y = (float*)(y_base + y_off);
  const size_t n = (size_t)n_i32, k = (size_t)k_i32, c = (size_t)c_i32;
  const size_t r0 = wg * GEMM_TILE, r1 = r0 + GEMM_TILE < n ? r0 + GEMM_TILE : n;
  switch (pairs_of(flags)) {  // compiled once per pairs dtype
    case F32: q4_gemm_rows(packed, sb, F32, x, y, n, k, c, r0, r1); break;
    case F16: q4_gemm_rows(packed, sb, F16, x, y, n, k, c, r0, r1); break;
    default: q4_gemm_rows(packed, sb, BF16, x, y, n, k, c, r0, r1);
  }
}
