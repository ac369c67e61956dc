// One-token linear layers (f32 activations) with what IREE keeps in dispatches of their own
// folded in (compile/extern.py gemv):
// - the input RMSNorm: every block recomputes 1/RMS of x (K values), so the norm's reduction
//   is no longer a dispatch before the matvec;
// - a bias and a residual added to the output;
// - gate mode: rows n and n + N of W are a gate and an up projection, out[n] = act(gate) * up
//   (SwiGLU, or GeGLU with the tanh GELU), so the activation is no extra dispatch.
// One warp per output row (two weight rows in gate mode). (Sharing long rows among 2-8 warps
// was slower on an H100: bench/results/2026-11-26-h100-hand-kernels.txt.) Two weight formats:
// - gemv: f16 W [N, K], 16-byte loads;
// - gemv_q4: MLX affine 4-bit W as the checkpoint stores it (compile/packed.py), packed words
//   [N, K/8] u32 (value i of a row in bits 4i..4i+3 of word i/8), scales and biases [N, K/64]
//   f32, w = s * q + b. Per word: sum(w x) = s * sum(q x) + b * sum(x) over its 8 inputs.
//
// Bindings: x [K] f32, the weight (W; or words, scales, biases), norm weight [K] f16, bias
// [N or 2N] f16, residual [N] f32, out [N] f32 (absent ones are one-element dummies). Push
// constants: N (outputs), K, flags (1 norm, 2 norm as 1 + w, 4 bias, 8 residual, 16 gate mode,
// 32 GELU instead of SiLU), eps (f32 bits).
// Limits (checked at export, extern.gemv_fits): K % 8 == 0 (f16), K % 64 == 0 (4-bit), K <= MAX_K.
#include "gemv.cuh"

// The block's rows (make_row(n): the Row of weight row n; AHEAD: pieces per lane loaded ahead).
template <bool GATE, class Row, int AHEAD, class MakeRow>
__device__ __forceinline__ void gemv_kernel(MakeRow make_row, const float* __restrict__ x,
                                            const __half* __restrict__ norm_w, const __half* __restrict__ bias,
                                            const float* __restrict__ residual, float* __restrict__ out, int N, int K,
                                            int flags, int eps_bits) {
  __shared__ __align__(16) float xs[MAX_K];
  __shared__ float red[WARPS];
  gemv_rows<GATE, Row, AHEAD>(blockIdx.x, make_row, NoWait(), x, norm_w, bias, residual, out, N, K, flags, eps_bits,
                              xs, red);
}

#define F16_ARGS                                                                                             \
  const float* __restrict__ x, const __half* __restrict__ W, const __half* __restrict__ norm_w,              \
      const __half* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ out, int N,   \
      int K, int flags, int eps_bits
#define Q4_ARGS                                                                                              \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const float* __restrict__ scales,             \
      const float* __restrict__ biases, const __half* __restrict__ norm_w, const __half* __restrict__ bias,  \
      const float* __restrict__ residual, float* __restrict__ out, int N, int K, int flags, int eps_bits
#define F16_ROW [&](int n) { return F16Row(W, n, K); }
#define Q4_ROW [&](int n) { return Q4Row(W, scales, biases, n, K); }
extern "C" __global__ void __launch_bounds__(NT, 4) gemv(F16_ARGS) {
  gemv_kernel<false, F16Row, PF>(F16_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits);
}
extern "C" __global__ void __launch_bounds__(NT) gemv_gate(F16_ARGS) {
  gemv_kernel<true, F16Row, PF>(F16_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits);
}
extern "C" __global__ void __launch_bounds__(NT, 4) gemv_q4(Q4_ARGS) {
  gemv_kernel<false, Q4Row, PFQ>(Q4_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits);
}
extern "C" __global__ void __launch_bounds__(NT) gemv_q4_gate(Q4_ARGS) {
  gemv_kernel<true, Q4Row, PFQ>(Q4_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits);
}
#undef F16_ROW
#undef Q4_ROW
#undef F16_ARGS

// A 4-bit matvec with many rows and a short K (an lm_head: 151936 x 1024 for Qwen3-0.6B).
// gemv_q4's warp per row left 4 words per lane in flight and staged x for only 8 rows per
// block: 89 us for that lm_head on an H100, 35% of the bandwidth. Here each block stages x
// once and its warps take chunks of R rows (global warp w: chunks w, w + warps, ...), all R
// rows' words requested before any is used: 16 words per lane in flight. KPL: words per lane
// and row (K / 256), a compile-time constant. Flags: the norm only (no bias, residual, gate).
// Grid: any; one wave (extern.GEMV_MANY_GRID) balances the chunks best.
template <int KPL>
__device__ __forceinline__ void gemv_q4_many(const float* __restrict__ x, const uint32_t* __restrict__ W,
                                             const float* __restrict__ scales, const float* __restrict__ biases,
                                             const __half* __restrict__ norm_w, float* __restrict__ out, int N,
                                             int K, int flags, int eps_bits) {
  constexpr int R = 16 / KPL;
  __shared__ __align__(16) float xs[32 * 8 * KPL];
  __shared__ float red[WARPS];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float ss = 0.f;
  for (int k = t; k < K; k += NT) {
    const float v = x[k];
    float w = 1.f;
    if (flags & 1) {
      w = __half2float(norm_w[k]);
      if (flags & 2) w += 1.f;
    }
    xs[k] = v * w;
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  float r = 1.f;
  if (flags & 1) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += red[i];
    r = rsqrtf(total / K + __int_as_float(eps_bits));
  }
  const int warps = gridDim.x * WARPS, chunks = (N + R - 1) / R;
  for (int c = blockIdx.x * WARPS + warp; c < chunks; c += warps) {
    Q4Piece p[R][KPL];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const Q4Row row(W, scales, biases, min(c * R + i, N - 1), K);
#pragma unroll
      for (int j = 0; j < KPL; ++j) p[i][j] = row.load(lane + 32 * j);
    }
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      acc[i] = 0.f;
#pragma unroll
      for (int j = 0; j < KPL; ++j) acc[i] += Q4Row::dot(p[i][j], xs + (lane + 32 * j) * 8);
      acc[i] = warp_sum(acc[i]);
    }
    if (lane == 0)
#pragma unroll
      for (int i = 0; i < R; ++i)
        if (c * R + i < N) out[c * R + i] = acc[i] * r;
  }
}

#define MANY_KERNEL(name, kpl)                                                                                \
  extern "C" __global__ void __launch_bounds__(NT, 2) name(Q4_ARGS) {                                         \
    gemv_q4_many<kpl>(x, W, scales, biases, norm_w, out, N, K, flags, eps_bits);                               \
  }
MANY_KERNEL(gemv_q4_many_kpl4, 4)
MANY_KERNEL(gemv_q4_many_kpl8, 8)
#undef MANY_KERNEL
#undef Q4_ARGS

// A 4-bit weight dequantized to f16 [N, K] (w = s * q + b, in f32, then rounded), for the
// several-token steps (a prefill chunk), whose matmuls IREE generates from f16 weights. One
// thread per packed word: 4 bytes in, 16 out. (In the graph, IREE made two dispatches of it
// with an f32 intermediate: ~64 us for a 6144 x 1024 weight on an H100.)
// Bindings: words [N, K/8] u32, scales, biases [N, K/group] f32, out [N, K] f16. Push
// constants: N, K, group (a multiple of 8).
extern "C" __global__ void __launch_bounds__(NT) dequant_q4(
    const uint32_t* __restrict__ W, const float* __restrict__ scales, const float* __restrict__ biases,
    __half* __restrict__ out, int N, int K, int group) {
  const size_t w = (size_t)blockIdx.x * NT + threadIdx.x, K8 = K / 8;
  if (w >= (size_t)N * K8) return;
  const size_t row = w / K8, g = (w % K8) * 8 / group, groups = K / group;
  const float s = scales[row * groups + g], b = biases[row * groups + g];
  const uint32_t q = W[w];
  __half2 h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    h[j] = __floats2half2_rn(s * (float)((q >> (8 * j)) & 15u) + b, s * (float)((q >> (8 * j + 4)) & 15u) + b);
  reinterpret_cast<uint4*>(out)[w] = *reinterpret_cast<const uint4*>(h);
}
