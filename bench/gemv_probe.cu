// A probe for issue 5 (run by gemv_probe.py; raw CUDA driver calls, no IREE; not part of a
// bundle): are the one-token 4-bit matvecs of gemv.cu bound by their waves of short-lived
// blocks? gemv_q4 gives each warp one row (two in gate mode): Llama-3.2-1B's gate/up launches
// 1024 blocks, about three waves, each staging x and waiting for its rows before the next wave
// starts. Here a grid of one wave stages x once per block and each warp loops over rows
// n, n + warps, ..., the next row's pieces requested before this row is summed (two rows in
// flight), every row summed in gemv_q4's order (bit-identical). read_bytes: the same bytes read
// with nothing else to do (the ceiling).
#include "gemv.cu"

// A warp's row (and its gate-mode partner n + N): all P pieces per lane (K = 1024 P), with the
// epilogue's operands, requested at once.
template <int P, bool GATE, bool BF16>
struct WarpRow {
  Q4Piece a[P], b[P];
  float res, b0, b1;
  __device__ __forceinline__ void load(const uint32_t* W, const uint32_t* SB, const __half* bias,
                                       const float* residual, int n, int N, int K, int flags, int lane) {
    const Q4Row<BF16> r0(W, SB, n, K);
#pragma unroll
    for (int j = 0; j < P; ++j) a[j] = r0.load(lane + 32 * j);
    if (GATE) {
      const Q4Row<BF16> r1(W, SB, n + N, K);
#pragma unroll
      for (int j = 0; j < P; ++j) b[j] = r1.load(lane + 32 * j);
    }
    res = (flags & 8) ? residual[n] : 0.f;
    b0 = (flags & 4) ? __half2float(bias[n]) : 0.f;
    b1 = (flags & 4) && GATE ? __half2float(bias[n + N]) : 0.f;
  }
  __device__ __forceinline__ void finish(const float* xs, float r, float* out, int n, int flags, int lane) const {
    const Q4Row<BF16> row(nullptr, nullptr, 0, 0);  // dot uses only the piece and x
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int j = 0; j < P; ++j) {
      const int p = lane + 32 * j;
      a0 += row.dot(a[j], xs + Q4Row<BF16>::xoff(p));
      if (GATE) a1 += row.dot(b[j], xs + Q4Row<BF16>::xoff(p));
    }
    a0 = warp_sum(a0);
    if (GATE) a1 = warp_sum(a1);
    if (lane != 0) return;
    a0 = a0 * r + b0;
    a1 = a1 * r + b1;
    float y = a0;
    if (GATE) {
      const float g = a0;
      const float act = (flags & 32) ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                     : g / (1.f + __expf(-g));
      y = act * a1;
    }
    out[n] = y + res;
  }
};

template <int P, bool GATE, bool BF16>
__device__ __forceinline__ void gemv_q4_loop(const float* __restrict__ x, const uint32_t* __restrict__ W,
                                             const uint32_t* __restrict__ SB, const __half* __restrict__ norm_w,
                                             const __half* __restrict__ bias, const float* __restrict__ residual,
                                             float* __restrict__ out, int N, int K, int flags, int eps_bits) {
  __shared__ __align__(16) float xs[MAX_K + MAX_K / 8];
  __shared__ float red[WARPS];
  const int lane = threadIdx.x % 32, warps = gridDim.x * WARPS;
  int n = blockIdx.x * WARPS + threadIdx.x / 32;
  WarpRow<P, GATE, BF16> c, d;
  if (n < N) c.load(W, SB, bias, residual, n, N, K, flags, lane);
  stage_x<4>(x, norm_w, K, flags, xs, red);
  const float r = (flags & 1) ? inv_rms(red, K, eps_bits) : 1.f;
  while (n < N) {
    const int n1 = n + warps;
    if (n1 < N) d.load(W, SB, bias, residual, n1, N, K, flags, lane);
    c.finish(xs, r, out, n, flags, lane);
    if (n1 >= N) break;
    n = n1 + warps;
    if (n < N) c.load(W, SB, bias, residual, n, N, K, flags, lane);
    d.finish(xs, r, out, n1, flags, lane);
  }
}

#define LOOP_ARGS                                                                                            \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ SB,             \
      const __half* __restrict__ norm_w, const __half* __restrict__ bias, const float* __restrict__ residual, \
      float* __restrict__ out, int N, int K, int flags, int eps_bits
#define LOOP(P, GATE, BPS, tag)                                                                              \
  extern "C" __global__ void __launch_bounds__(NT, BPS) gemv_q4_loop##tag##_p##P##_b##BPS##_bf16(LOOP_ARGS) { \
    gemv_q4_loop<P, GATE, true>(x, W, SB, norm_w, bias, residual, out, N, K, flags, eps_bits);               \
  }
#define LOOPS(P, BPS) LOOP(P, false, BPS, ) LOOP(P, true, BPS, _gate)
LOOPS(1, 2) LOOPS(1, 3) LOOPS(1, 4)
LOOPS(2, 2) LOOPS(2, 3) LOOPS(2, 4)
LOOPS(3, 2) LOOPS(3, 3)
LOOPS(8, 1) LOOPS(8, 2)

// Reads n 16-byte words (4 in flight per thread), for the ceiling of a matvec's bytes.
extern "C" __global__ void __launch_bounds__(NT) read_bytes(const uint4* __restrict__ p, long long n,
                                                            uint32_t* __restrict__ sink) {
  const long long stride = (long long)gridDim.x * NT;
  uint32_t acc = 0;
  long long i = (long long)blockIdx.x * NT + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
    acc ^= a.x ^ b.y ^ c.z ^ d.w;
  }
  for (; i < n; i += stride) acc ^= p[i].x;
  if (acc == 0x9e3779b9u) sink[0] = acc;  // never, but the loads stay
}

// gemv_q4 with all of a row's pieces loaded ahead (K = 1024 A), fewer blocks per SM.
#define AHEAD_ALL(A, BPS)                                                                                    \
  extern "C" __global__ void __launch_bounds__(NT, BPS) gemv_q4_a##A##_b##BPS##_bf16(Q4_ARGS) {             \
    gemv_kernel<false, Q4Row<true>, A>([&](int n) { return Q4Row<true>(W, scales_biases, n, K); }, x, norm_w, \
                                       bias, residual, out, N, K, flags, eps_bits, NEXT);                    \
  }
#define PF_ARGS const void *pf0, const void *pf1, const void *pf2
#define PF_SIZES int pf0_bytes, int pf1_bytes, int pf2_bytes
#define NEXT Prefetch{pf0, pf1, pf2, pf0_bytes, pf1_bytes, pf2_bytes}
#define Q4_ARGS                                                                                              \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,   \
      const __half* __restrict__ norm_w, const __half* __restrict__ bias,                                     \
      const float* __restrict__ residual, PF_ARGS, float* __restrict__ out, int N, int K, int flags,          \
      int eps_bits, PF_SIZES
AHEAD_ALL(8, 2) AHEAD_ALL(8, 3) AHEAD_ALL(3, 3)

// Timing only (wrong sums): is gemv_q4 bound by its arithmetic? MODE 1 sums 4 of a word's 8
// values, MODE 2 none (a word's bits and one x: the loads, staging and reductions remain).
template <int MODE>
struct Q4RowX : Q4Row<true> {
  using Q4Row<true>::Q4Row;
  __device__ __forceinline__ float dot(Piece p, const float* x) const {
    if (MODE == 2) return __uint_as_float((p.w.x ^ p.w.y ^ p.w.z ^ p.w.w ^ p.sb) & 0x3f7fffffu) * x[0];
    const uint32_t w4[4] = {p.w.x, p.w.y, p.w.z, p.w.w};
    float dq = 0.f, dx = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float4 xa = *reinterpret_cast<const float4*>(x + 8 * u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float xv = j == 0 ? xa.x : j == 1 ? xa.y : j == 2 ? xa.z : xa.w;
        dq += (float)((w4[u] >> (4 * j)) & 15u) * xv;
        dx += xv;
      }
    }
    const float2 g = scale_bias(p.sb, true);
    return g.x * dq + g.y * dx;
  }
};
#define TIMING(MODE)                                                                                          \
  extern "C" __global__ void __launch_bounds__(NT, 3) gemv_q4_gate_x##MODE##_bf16(Q4_ARGS) {                 \
    gemv_kernel<true, Q4RowX<MODE>, PFQG>([&](int n) { return Q4RowX<MODE>(W, scales_biases, n, K); }, x,     \
                                          norm_w, bias, residual, out, N, K, flags, eps_bits, NEXT);         \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(NT, 4) gemv_q4_x##MODE##_bf16(Q4_ARGS) {                      \
    gemv_kernel<false, Q4RowX<MODE>, PFQ>([&](int n) { return Q4RowX<MODE>(W, scales_biases, n, K); }, x,     \
                                          norm_w, bias, residual, out, N, K, flags, eps_bits, NEXT);         \
  }
TIMING(1) TIMING(2)

// x as two int8 parts per 32-value piece (gemv.cu's I8Row takes three) (x ~ d (hi + lo / 254), d = max|x| / 127), summed with
// the packed nibbles by dp4a: a word's values 0,2,4,6 (w & 0x0F0F0F0F) and 1,3,5,7 (w >> 4) as
// bytes against x's bytes in that order. A piece of x in shared memory (80 bytes, conflict-free
// for 16-byte reads 80 bytes apart): for each of its 4 words {hi 0,2,4,6; hi 1,3,5,7; lo 0,2,4,6;
// lo 1,3,5,7}, then d and sum(x) (f32, exact: the bias term keeps NaN and Inf).
#define Q8_PIECE_FLOATS 20

// x times the norm weight (as stage_x), quantized per piece into xs; each warp's share of x's sum
// of squares into red. Thread t takes word t % 4 of piece t / 4 (8 values), per NT / 4 pieces.
__device__ __forceinline__ void stage_x_q8(const float* __restrict__ x, const __half* __restrict__ norm_w, int K,
                                           int flags, float* xs, float* red) {
  const int t = threadIdx.x;
  float ss = 0.f;
  for (int base = 0; base < K; base += NT * 8) {  // K % 32 == 0: the 4 threads of a piece run together
    const int i = base + 8 * t;
    const bool in = i < K;
    float v[8];
    const float4 a = in ? reinterpret_cast<const float4*>(x + i)[0] : make_float4(0.f, 0.f, 0.f, 0.f);
    const float4 b = in ? reinterpret_cast<const float4*>(x + i)[1] : make_float4(0.f, 0.f, 0.f, 0.f);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    if ((flags & 1) && in) {
      const uint4 h = *reinterpret_cast<const uint4*>(norm_w + i);
      const __half2* h2 = reinterpret_cast<const __half2*>(&h);
      const float one = (flags & 2) ? 1.f : 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(h2[j]);
        ss += v[2 * j] * v[2 * j] + v[2 * j + 1] * v[2 * j + 1];
        v[2 * j] *= f.x + one;
        v[2 * j + 1] *= f.y + one;
      }
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
    }
    float m = 0.f, s = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j])), s += v[j];
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    const float d = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
    int hi[8], lo[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float y = v[j] * inv, h = rintf(y);
      hi[j] = (int)h;
      lo[j] = (int)rintf((y - h) * 254.f);
    }
    if (in) {
      float* piece = xs + (i / 32) * Q8_PIECE_FLOATS;
      reinterpret_cast<uint4*>(piece)[t % 4] = make_uint4(pack_bytes(hi[0], hi[2], hi[4], hi[6]), pack_bytes(hi[1], hi[3], hi[5], hi[7]),
                                                          pack_bytes(lo[0], lo[2], lo[4], lo[6]), pack_bytes(lo[1], lo[3], lo[5], lo[7]));
      if (t % 4 == 0) reinterpret_cast<float2*>(piece + 16)[0] = make_float2(d, s);
    }
  }
  ss = warp_sum(ss);
  if (t % 32 == 0) red[t / 32] = ss;
  __syncthreads();
}

struct Q8Row : Q4Row<true> {
  static constexpr auto stage = stage_x_q8;
  using Q4Row<true>::Q4Row;
  __device__ __forceinline__ static int xoff(int p) { return p * Q8_PIECE_FLOATS; }
  __device__ __forceinline__ float dot(Piece p, const float* x) const {
    const uint4* xq = reinterpret_cast<const uint4*>(x);
    const uint32_t w4[4] = {p.w.x, p.w.y, p.w.z, p.w.w};
    int sh = 0, sl = 0;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint4 q = xq[u];
      const int e = (int)(w4[u] & 0x0F0F0F0Fu), o = (int)((w4[u] >> 4) & 0x0F0F0F0Fu);
      sh = __dp4a(e, (int)q.x, sh);
      sh = __dp4a(o, (int)q.y, sh);
      sl = __dp4a(e, (int)q.z, sl);
      sl = __dp4a(o, (int)q.w, sl);
    }
    const float2 ds = reinterpret_cast<const float2*>(x + 16)[0];
    const float dq = ds.x * fmaf((float)sl, 1.f / 254.f, (float)sh);
    const float2 g = scale_bias(p.sb, true);
    return g.x * dq + g.y * ds.y;
  }
};
#define GEMV_Q8(name, GATE, AHEAD, BPS)                                                                      \
  extern "C" __global__ void __launch_bounds__(NT, BPS) name(Q4_ARGS) {                                     \
    gemv_kernel<GATE, Q8Row, AHEAD>([&](int n) { return Q8Row(W, scales_biases, n, K); }, x, norm_w, bias,   \
                                    residual, out, N, K, flags, eps_bits, NEXT);                             \
  }
GEMV_Q8(gemv_q8x_bf16, false, PFQ, 4)
GEMV_Q8(gemv_q8x_gate_bf16, true, PFQG, 3)
GEMV_Q8(gemv_q8x_a8_bf16, false, 8, 2)
GEMV_Q8(gemv_q8x_gate_a4_bf16, true, 4, 2)

// Gate mode with x staged in f32 (Q4Row): gemv.cu's gate kernels before they took I8Row.
extern "C" __global__ void __launch_bounds__(NT, 3) gemv_q4_gate_f32x_bf16(Q4_ARGS) {
  gemv_kernel<true, Q4Row<true>, PFQG>([&](int n) { return Q4Row<true>(W, scales_biases, n, K); }, x, norm_w, bias,
                                       residual, out, N, K, flags, eps_bits, NEXT);
}
