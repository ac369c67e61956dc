// A probe for issue 5 (run by gemv_probe.py; raw CUDA driver calls, no IREE; not part of a
// bundle): what bounds the one-token 4-bit matvecs of gemv.cu? Forms beside gemv.cu's kernels:
// - a grid of one wave, each warp looping over rows n, n + warps, ... with the next row's
//   pieces requested before this row is summed (are they bound by their waves of blocks?);
// - gemv_q4 with all of a row's pieces loaded ahead;
// - timing only: half or none of the values summed (are they bound by their arithmetic?);
// - gate mode with x staged in f32 (gemv.cu's gate before I8Row), two plain rows a warp;
// - the lm_head with other chunk sizes;
// - read_bytes: the same bytes read with nothing else to do (the ceiling).
// Results: bench/results/2026-11-27-h100-stop22.txt.
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
    out[n] = (GATE ? gated(a0, a1, flags) : a0) + res;
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

// (Two int8 parts, hi and lo, measured and dropped: bench/results/2026-11-27-h100-stop22.txt; the
// code is at fa06436.)

// Gate mode with x staged in f32 (Q4Row): gemv.cu's gate kernels before they took I8Row.
extern "C" __global__ void __launch_bounds__(NT, 3) gemv_q4_gate_f32x_bf16(Q4_ARGS) {
  gemv_kernel<true, Q4Row<true>, PFQG>([&](int n) { return Q4Row<true>(W, scales_biases, n, K); }, x, norm_w, bias,
                                       residual, out, N, K, flags, eps_bits, NEXT);
}

// Two rows a warp in plain mode (rows n and n + H, H = ceil(N / 2)), so that each staged x
// serves twice the sums, as in gate mode: with I8Row (dp4a) and with Q4Row (f32), to tell the
// pairing from the sums.
template <class Row, int AHEAD>
__device__ __forceinline__ void gemv_pair(const uint32_t* __restrict__ W, const uint32_t* __restrict__ SB,
                                          const float* __restrict__ x, const __half* __restrict__ norm_w,
                                          const float* __restrict__ residual, float* __restrict__ out, int N, int K,
                                          int flags, int eps_bits) {
  __shared__ __align__(16) float xs[MAX_K + MAX_K / 8];
  __shared__ float red[WARPS];
  const int lane = threadIdx.x % 32, H = (N + 1) / 2;
  const int n_raw = blockIdx.x * WARPS + threadIdx.x / 32, n = min(n_raw, H - 1), n2 = min(n + H, N - 1);
  Rows<Row, AHEAD> rows(Row(W, SB, n, K), Row(W, SB, n2, K), K, true, lane);
  const bool writes = lane == 0 && n_raw < H;
  const float r0 = writes && (flags & 8) ? residual[n] : 0.f, r1 = writes && (flags & 8) ? residual[n2] : 0.f;
  Row::stage(x, norm_w, K, flags, xs, red);
  float a0 = 0.f, a1 = 0.f;
  rows.dot(xs, true, lane, a0, a1);
  a0 = warp_sum(a0);
  a1 = warp_sum(a1);
  if (!writes) return;
  const float r = (flags & 1) ? inv_rms(red, K, eps_bits) : 1.f;
  out[n] = a0 * r + r0;
  if (n + H < N) out[n + H] = a1 * r + r1;
}
#define PAIR(name, ROW, AHEAD, BPS)                                                                          \
  extern "C" __global__ void __launch_bounds__(NT, BPS) name(Q4_ARGS) {                                     \
    gemv_pair<ROW, AHEAD>(W, scales_biases, x, norm_w, residual, out, N, K, flags, eps_bits);                 \
  }
PAIR(gemv_pair_i8_bf16, I8Row<true>, PFQG, 3)
PAIR(gemv_pair_f32_bf16, Q4Row<true>, PFQG, 3)
PAIR(gemv_pair_i8_a8_bf16, I8Row<true>, 8, 2)

// gemv.cu's lm_head with other chunk sizes (R rows).
#define LM_ARGS                                                                                              \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,   \
      const __half* __restrict__ norm_w, int* sync, float* __restrict__ out,                                  \
      int* __restrict__ argmax, float2* blocks, int N, int K, int flags, int eps_bits
#define LM_HEAD_R(name, KW, R)                                                                               \
  extern "C" __global__ void __launch_bounds__(NT, 2) name(LM_ARGS) {                                         \
    argmax_of_blocks(gemv_q4_many<32 * KW, R, true>(x, W, scales_biases, norm_w, out, N, flags, eps_bits), blocks, \
                     sync, argmax, N);                                                                        \
  }
LM_HEAD_R(lm_head_r2_k1024_bf16, 1, 2)
LM_HEAD_R(lm_head_r4_k2048_bf16, 2, 4)

// f16 weights (gemv.cu's gemv / gemv_gate: PF = 4 pieces of 8 values a lane ahead, the rest
// as the sum runs) with A pieces a lane ahead and BPS blocks per SM (python3 gemv_probe.py --f16).
#define F16_ARGS                                                                                             \
  const float* __restrict__ x, const __half* __restrict__ W, const __half* __restrict__ norm_w,              \
      const __half* __restrict__ bias, const float* __restrict__ residual, PF_ARGS, float* __restrict__ out,  \
      int N, int K, int flags, int eps_bits, PF_SIZES
#define F16_AHEAD(GATE, tag, A, BPS)                                                                         \
  extern "C" __global__ void __launch_bounds__(NT, BPS) gemv##tag##_f16_a##A##_b##BPS(F16_ARGS) {            \
    gemv_kernel<GATE, F16Row, A>([&](int n) { return F16Row(W, n, K); }, x, norm_w, bias, residual, out, N, K, \
                                 flags, eps_bits, NEXT);                                                     \
  }
F16_AHEAD(false, , 8, 2) F16_AHEAD(false, , 8, 3) F16_AHEAD(false, , 12, 2) F16_AHEAD(false, , 16, 2)
F16_AHEAD(true, _gate, 8, 2) F16_AHEAD(true, _gate, 6, 2)

// Split-K MLP (python3 gemv_probe.py --mlp): gate/up, SwiGLU and down in ONE kernel, no wait
// between blocks. Block b takes the intermediates [32 b, 32 b + 32): its 32 gate/up row pairs
// (P a warp, gemv_q4_gate's I8Row sums on the normed x), their activations into shared memory,
// then down's partial over them for every output row (the 16-byte piece b of each down row and
// its group's pair: Q4Row's f32 sums), added into acc [D] (f64, holding the residual before)
// by atomics: f64 sums of at most I / 32 f32 partials, so the f32 read back of acc depends on the
// blocks' order only where the sum falls within ~1e-14 of an f32 rounding boundary.
// KP: gate/up pieces a lane and row (D / 1024); DR: down rows a thread (D / NT).
template <int KP, int DR>
__device__ __forceinline__ void mlp_split(const float* __restrict__ x, const __half* __restrict__ norm_w,
                                          const uint32_t* __restrict__ gw, const uint32_t* __restrict__ gsb,
                                          const uint32_t* __restrict__ dw, const uint32_t* __restrict__ dsb,
                                          double* acc, int D, int I, int flags, int eps_bits) {
  constexpr int P = 32 / WARPS;  // gate/up pairs a warp
  using Row = I8Row<true>;
  __shared__ __align__(16) float xs[MAX_K / 32 * I8_PIECE_FLOATS];
  __shared__ float red[WARPS];
  __shared__ __align__(16) float acts[32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, i0 = blockIdx.x * 32;
  Q4Piece dp[DR];  // down's pieces first: the last used, and nothing they depend on
#pragma unroll
  for (int j = 0; j < DR; ++j) dp[j] = Q4Row<true>(dw, dsb, t + NT * j, I).load(blockIdx.x);
  Q4Piece gp[P][KP], upc[P][KP];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int k = 0; k < KP; ++k) {
      gp[p][k] = Row(gw, gsb, i0 + warp * P + p, D).load(lane + 32 * k);
      upc[p][k] = Row(gw, gsb, I + i0 + warp * P + p, D).load(lane + 32 * k);
    }
  Row::stage(x, norm_w, D, flags, xs, red);
  const float r = (flags & 1) ? inv_rms(red, D, eps_bits) : 1.f;
  const Row row(gw, gsb, 0, D);
#pragma unroll
  for (int p = 0; p < P; ++p) {
    float a0 = 0.f, a1 = 0.f;
#pragma unroll
    for (int k = 0; k < KP; ++k) {
      a0 += row.dot(gp[p][k], xs + Row::xoff(lane + 32 * k));
      a1 += row.dot(upc[p][k], xs + Row::xoff(lane + 32 * k));
    }
    a0 = warp_sum(a0);
    a1 = warp_sum(a1);
    if (lane == 0) acts[warp * P + p] = gated(a0 * r, a1 * r, flags);
  }
  __syncthreads();
  const Q4Row<true> drow(dw, dsb, 0, I);
#pragma unroll
  for (int j = 0; j < DR; ++j) atomicAdd(acc + t + NT * j, (double)drow.dot(dp[j], acts));
}
#define MLP_ARGS                                                                                             \
  const float* __restrict__ x, const __half* __restrict__ norm_w, const uint32_t* __restrict__ gw,           \
      const uint32_t* __restrict__ gsb, const uint32_t* __restrict__ dw, const uint32_t* __restrict__ dsb,    \
      double* acc, int D, int I, int flags, int eps_bits
#define MLP_SPLIT(name, KP, DR, BPS)                                                                         \
  extern "C" __global__ void __launch_bounds__(NT, BPS) name(MLP_ARGS) {                                      \
    mlp_split<KP, DR>(x, norm_w, gw, gsb, dw, dsb, acc, D, I, flags, eps_bits);                               \
  }
MLP_SPLIT(mlp_split_d1024, 1, 4, 2)
MLP_SPLIT(mlp_split_d2048, 2, 8, 1)
MLP_SPLIT(mlp_split_d2048_b2, 2, 8, 2)
