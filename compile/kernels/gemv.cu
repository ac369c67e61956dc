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
//   [N, K/8] u32 (value i of a row in bits 4i..4i+3 of word i/8), scales_biases [N, K/64]
//   (each group's scale and bias as the checkpoint stores them, F16 or BF16: the entry point's
//   suffix, one 4-byte load), w = s * q + b. Per 16-byte piece of 4
//   words (32 inputs, half a group): sum(w x) = s * sum(q x) + b * sum(x).
//   Gate mode sums q x by dp4a against x staged in three int8 parts (I8Row: f32-grade).
//
// Bindings: x [K] f32, the weight (W; or words, scales_biases), norm weight [K] f16, bias
// [N or 2N] f16, residual [N] f32, three prefetch bindings, out [N] f32 (absent ones are
// one-element dummies). Push constants: N (outputs), K, flags (1 norm, 2 norm as 1 + w, 4 bias,
// 8 residual, 16 gate mode, 32 GELU instead of SiLU), eps (f32 bits), the prefetch bindings'
// sizes in bytes. extern.link fills the prefetch bindings with the next matvec's weights, which
// this kernel requests into L2 after its own work (prefetch_l2), so that kernel reads them from
// L2, not DRAM; size 0 where none.
// Limits (checked at export, extern.gemv_fits): K % 8 == 0 (f16), K % 64 == 0 (4-bit), K <= MAX_K.
#include "common.cuh"

#define NT 256
#define WARPS (NT / 32)
#define MAX_K 8192
#define PF 4  // f16: 16-byte weight pieces per lane and row loaded ahead
#define PFQ 3  // 4-bit: 16-byte pieces per lane and row loaded ahead (K <= 3072 is all in flight; 4 spilled)
#define PFQG 2  // the same in gate mode, two rows (K <= 2048; 4 spilled at 3 blocks per SM)

__device__ __forceinline__ float dot8(uint4 w, const float* x) {
  const __half2* h = reinterpret_cast<const __half2*>(&w);
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(h[j]);
    acc += f.x * x[2 * j] + f.y * x[2 * j + 1];
  }
  return acc;
}

struct Prefetch {
  const void *p0, *p1, *p2;
  int b0, b1, b2;
  __device__ __forceinline__ void issue() const {
    const int i = blockIdx.x * NT + threadIdx.x, n = gridDim.x * NT;
    prefetch_l2(p0, b0, i, n);
    prefetch_l2(p1, b1, i, n);
    prefetch_l2(p2, b2, i, n);
  }
};

// x times the norm weight (flags 1; as 1 + w with flags 2) into xs (PAD floats after every 32),
// and each warp's share of x's sum of squares into red, for the whole block: the matvec of the
// normed x is then 1/RMS (inv_rms) times the matvec of x * w, so x is read and written once.
// 16-byte loads, 4 per thread ahead: K <= 4096 in one round trip (K = 2048 took two with
// 4-byte loads).
template <int PAD>
__device__ __forceinline__ void stage_x(const float* __restrict__ x, const __half* __restrict__ norm_w, int K,
                                        int flags, float* xs, float* red) {
  const int t = threadIdx.x;
  float ss = 0.f;
#pragma unroll 4
  for (int i = t; i < K / 4; i += NT) {
    const float4 v = reinterpret_cast<const float4*>(x)[i];
    float4 w = make_float4(1.f, 1.f, 1.f, 1.f);
    if (flags & 1) {
      const uint2 h = reinterpret_cast<const uint2*>(norm_w)[i];
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&h.y));
      const float one = (flags & 2) ? 1.f : 0.f;
      w = make_float4(a.x + one, a.y + one, b.x + one, b.y + one);
    }
    const int k = 4 * i;
    *reinterpret_cast<float4*>(xs + k + PAD * (k / 32)) = make_float4(v.x * w.x, v.y * w.y, v.z * w.z, v.w * w.w);
    ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
  }
  ss = warp_sum(ss);
  if (t % 32 == 0) red[t / 32] = ss;
  __syncthreads();
}

// One weight row in pieces of VALUES inputs, a piece per lane and load; xoff(p): where piece
// p's inputs start in the staged x (stage_x<PAD>). f16: a 16-byte piece of 8 values.
struct F16Row {
  using Piece = uint4;
  static constexpr int VALUES = 8, PAD = 0;
  static constexpr auto stage = stage_x<PAD>;
  const uint4* w;
  __device__ __forceinline__ F16Row(const __half* W, int row, int K) : w(reinterpret_cast<const uint4*>(W) + (size_t)row * (K / 8)) {}
  __device__ __forceinline__ static int xoff(int p) { return p * 8; }
  __device__ __forceinline__ Piece load(int p) const { return w[p]; }
  __device__ __forceinline__ float dot(Piece p, const float* x) const { return dot8(p, x); }
};

// acc + sum(q x) over one packed 4-bit word's 8 values q (value j in bits 4j..4j+3) and x[0..7].
__device__ __forceinline__ float nibble_dot(uint32_t w, const float* x, float acc = 0.f) {
#pragma unroll
  for (int j = 0; j < 8; ++j) acc += (float)((w >> (4 * j)) & 15u) * x[j];
  return acc;
}

// 4-bit: a piece is 4 packed words (32 values, half a group of 64) as one 16-byte load, with its
// group's scale and bias: s * sum(q x) + b * sum(x). (A piece of one word, as three 4-byte
// loads, left a Qwen3-0.6B down_proj's last 4 words per lane to a second round trip after the
// first 8, and took 4.7 us per o_proj on an H100.) x is staged with 4 floats of padding after
// every 32, so the lanes' 16-byte reads of their pieces' x (32 floats apart) hit distinct banks.
struct Q4Piece {
  uint4 w;
  uint32_t sb;  // its group's 16-bit scale and bias, widened where used (one register, not two)
};

template <bool BF16>  // the pairs' dtype: BF16, else F16
struct Q4Row {
  using Piece = Q4Piece;
  static constexpr int VALUES = 32, PAD = 4;
  static constexpr auto stage = stage_x<PAD>;
  const uint4* w;
  const uint32_t* sb;
  __device__ __forceinline__ Q4Row(const uint32_t* W, const uint32_t* scales_biases, int row, int K)
      : w(reinterpret_cast<const uint4*>(W) + (size_t)row * (K / 32)), sb(scales_biases + (size_t)row * (K / 64)) {}
  __device__ __forceinline__ static int xoff(int p) { return p * (32 + PAD); }
  __device__ __forceinline__ Piece load(int p) const { return {w[p], sb[p / 2]}; }
  __device__ __forceinline__ float dot(Piece p, const float* x) const {
    const uint32_t w4[4] = {p.w.x, p.w.y, p.w.z, p.w.w};
    float dq = 0.f, dx = 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float4 xa = *reinterpret_cast<const float4*>(x + 8 * u), xb = *reinterpret_cast<const float4*>(x + 8 * u + 4);
      const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
      dq = nibble_dot(w4[u], xv, dq);
#pragma unroll
      for (int j = 0; j < 8; ++j) dx += xv[j];
    }
    const float2 g = scale_bias(p.sb, BF16);
    return g.x * dq + g.y * dx;
  }
};

// x staged as three int8 parts per 32-value piece, for the 4-bit rows' sums by dp4a (I8Row).
// A piece's x ~ d (h + (m + l / 254) / 254) with d = max|x| / 127 over the piece: the error is
// at most max|x| / 127 / 2 / 254^2, 6e-8 of the piece's largest value (f32 rounding's order).
// Its 112 bytes in xs (16-byte reads 112 bytes apart hit distinct banks): per word u of the
// piece, {h of values 0,2,4,6; h of 1,3,5,7; m ...; m ...} (bytes 16u..), then per word {l ...;
// l ...} (64 + 8u..), then d and sum(x) (f32, unquantized: the bias term keeps NaN and Inf).
// Thread t quantizes word t % 4 of piece t / 4 (8 values), NT / 4 pieces per round.
#define I8_PIECE_FLOATS 28
__device__ __forceinline__ uint32_t pack_bytes(int a, int b, int c, int d) {
  return (uint32_t)(a & 255) | (uint32_t)(b & 255) << 8 | (uint32_t)(c & 255) << 16 | (uint32_t)(d & 255) << 24;
}

// One word's 8 values of x (times inv = 127 / max|x| of the piece) as three int8 parts, each as
// two words of bytes in the packed nibbles' order: [0] values 0,2,4,6, [1] values 1,3,5,7.
struct I8Word {
  uint32_t h[2], m[2], l[2];
  I8Word() = default;
  __device__ __forceinline__ I8Word(const float* v, float inv) {
    int ph[8], pm[8], pl[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float y = v[j] * inv, hi = rintf(y), r = (y - hi) * 254.f, mid = rintf(r);
      ph[j] = (int)hi, pm[j] = (int)mid, pl[j] = (int)rintf((r - mid) * 254.f);
    }
    h[0] = pack_bytes(ph[0], ph[2], ph[4], ph[6]), h[1] = pack_bytes(ph[1], ph[3], ph[5], ph[7]);
    m[0] = pack_bytes(pm[0], pm[2], pm[4], pm[6]), m[1] = pack_bytes(pm[1], pm[3], pm[5], pm[7]);
    l[0] = pack_bytes(pl[0], pl[2], pl[4], pl[6]), l[1] = pack_bytes(pl[1], pl[3], pl[5], pl[7]);
  }
};

// sum(q x) over 4-bit words against x's int8 parts, exact in integers until value(d).
struct I8Sums {
  int h = 0, m = 0, l = 0;
  // A packed word (values 0,2,4,6 as w & 0x0F0F0F0F, 1,3,5,7 as (w >> 4) & 0x0F0F0F0F) against
  // the parts' bytes in that order.
  __device__ __forceinline__ void add(uint32_t w, uint32_t h0, uint32_t h1, uint32_t m0, uint32_t m1, uint32_t l0,
                                      uint32_t l1) {
    const int e = (int)(w & 0x0F0F0F0Fu), o = (int)((w >> 4) & 0x0F0F0F0Fu);
    h = __dp4a(e, (int)h0, h), h = __dp4a(o, (int)h1, h);
    m = __dp4a(e, (int)m0, m), m = __dp4a(o, (int)m1, m);
    l = __dp4a(e, (int)l0, l), l = __dp4a(o, (int)l1, l);
  }
  __device__ __forceinline__ float value(float d) const {
    return d * fmaf(fmaf((float)l, 1.f / 254.f, (float)m), 1.f / 254.f, (float)h);
  }
};

// x[i .. i + 8) (zeros where !in) times the norm weight (flags 1; 1 + w with flags 2) into v,
// their squares (before the norm weight) added to ss.
__device__ __forceinline__ void load_normed8(const float* __restrict__ x, const __half* __restrict__ norm_w, int i,
                                             bool in, int flags, float (&v)[8], float& ss) {
  const float4 a = in ? reinterpret_cast<const float4*>(x + i)[0] : make_float4(0.f, 0.f, 0.f, 0.f);
  const float4 b = in ? reinterpret_cast<const float4*>(x + i)[1] : make_float4(0.f, 0.f, 0.f, 0.f);
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
#pragma unroll
  for (int j = 0; j < 8; ++j) ss += v[j] * v[j];
  if ((flags & 1) && in) {
    const uint4 h = *reinterpret_cast<const uint4*>(norm_w + i);
    const __half2* h2 = reinterpret_cast<const __half2*>(&h);
    const float one = (flags & 2) ? 1.f : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __half22float2(h2[j]);
      v[2 * j] *= f.x + one;
      v[2 * j + 1] *= f.y + one;
    }
  }
}

__device__ __forceinline__ void stage_x_i8(const float* __restrict__ x, const __half* __restrict__ norm_w, int K,
                                           int flags, float* xs, float* red) {
  const int t = threadIdx.x;
  float ss = 0.f;
  for (int base = 0; base < K; base += NT * 8) {  // K % 32 == 0: a piece's 4 threads are all in or all out
    const int i = base + 8 * t;
    const bool in = i < K;
    float v[8];
    load_normed8(x, norm_w, i, in, flags, v, ss);
    float m = 0.f, s = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) m = fmaxf(m, fabsf(v[j])), s += v[j];
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      s += __shfl_xor_sync(0xffffffffu, s, o);
    }
    const I8Word q(v, m > 0.f ? 127.f / m : 0.f);
    if (in) {
      float* piece = xs + (i / 32) * I8_PIECE_FLOATS;
      const int u = t % 4;
      reinterpret_cast<uint4*>(piece)[u] = make_uint4(q.h[0], q.h[1], q.m[0], q.m[1]);
      reinterpret_cast<uint2*>(piece + 16)[u] = make_uint2(q.l[0], q.l[1]);
      if (u == 0) reinterpret_cast<float2*>(piece + 24)[0] = make_float2(m / 127.f, s);
    }
  }
  ss = warp_sum(ss);
  if (t % 32 == 0) red[t / 32] = ss;
  __syncthreads();
}

// A 4-bit row summed against stage_x_i8's x by dp4a: a word's values 0,2,4,6 (w & 0x0F0F0F0F)
// and 1,3,5,7 ((w >> 4) & 0x0F0F0F0F) as bytes, exact integer sums of each x part, so
// s * d (h + (m + l / 254) / 254) + b * sum(x) per piece. About 1.2 instructions a value where
// Q4Row takes ~5: in gate mode (two rows on one staged x) Llama-3.2-1B's gate/up went from 13.9
// to 11.7 us on an H100 (bench/gemv_probe.py), its output within 1e-6 of Q4Row's RMS. Rows with
// one output a warp gained nothing (the staging costs what the sums save), so only gate mode
// takes it.
template <bool BF16>
struct I8Row : Q4Row<BF16> {
  using Piece = Q4Piece;
  static constexpr auto stage = stage_x_i8;
  using Q4Row<BF16>::Q4Row;
  __device__ __forceinline__ static int xoff(int p) { return p * I8_PIECE_FLOATS; }
  __device__ __forceinline__ float dot(Piece p, const float* x) const {
    const uint4* hm = reinterpret_cast<const uint4*>(x);
    const uint2* lo = reinterpret_cast<const uint2*>(x + 16);
    const uint32_t w4[4] = {p.w.x, p.w.y, p.w.z, p.w.w};
    I8Sums sums;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint4 q = hm[u];
      const uint2 r = lo[u];
      sums.add(w4[u], q.x, q.y, q.z, q.w, r.x, r.y);
    }
    const float2 ds = reinterpret_cast<const float2*>(x + 24)[0];
    const float2 g = scale_bias(p.sb, BF16);
    return g.x * sums.value(ds.x) + g.y * ds.y;
  }
};

// A warp's row (two in gate mode): AHEAD pieces per lane are loaded before x is staged (they
// do not depend on it, and the weight stream is what the kernel waits for), the rest as the
// sum runs.
template <class Row, int AHEAD>
struct Rows {
  using RowT = Row;
  Row r0, r1;
  int NP;  // pieces per row
  typename Row::Piece p0[AHEAD], p1[AHEAD];
  __device__ __forceinline__ Rows(Row row0, Row row1, int K, bool gate, int lane)
      : r0(row0), r1(row1), NP(K / Row::VALUES) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int p = j * 32 + lane;
      if (p < NP) {
        p0[j] = r0.load(p);
        if (gate) p1[j] = r1.load(p);
      }
    }
  }
  __device__ __forceinline__ void dot(const float* xs, bool gate, int lane, float& a0, float& a1) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int p = j * 32 + lane;
      if (p < NP) {
        a0 += r0.dot(p0[j], xs + Row::xoff(p));
        if (gate) a1 += r1.dot(p1[j], xs + Row::xoff(p));
      }
    }
#pragma unroll 4
    for (int p = AHEAD * 32 + lane; p < NP; p += 32) {
      a0 += r0.dot(r0.load(p), xs + Row::xoff(p));
      if (gate) a1 += r1.dot(r1.load(p), xs + Row::xoff(p));
    }
  }
};

__device__ __forceinline__ float inv_rms(const float* red, int K, int eps_bits) {
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) total += red[i];
  return rsqrtf(total / K + __int_as_float(eps_bits));
}

// Gate mode's output: act(gate) * up, act SiLU or (flags 32) the tanh GELU.
__device__ __forceinline__ float gated(float g, float up, int flags) {
  const float act = (flags & 32) ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                 : g / (1.f + __expf(-g));
  return act * up;
}

// Stage x (times the norm weight), run the rows' dot products, then the epilogue. GATE: gate
// mode, as a compile-time constant (each kernel has a gate and a plain entry point), so the
// plain one holds no second row's pieces: 64 registers, 4 blocks per SM.
template <bool GATE, class Rows>
__device__ __forceinline__ void gemv_body(Rows& rows, const float* __restrict__ x, const __half* __restrict__ norm_w,
                                          const __half* __restrict__ bias, const float* __restrict__ residual,
                                          float* __restrict__ out, int n, int n_raw, int N, int K, int flags,
                                          int eps_bits, float* xs, float* red) {
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  constexpr bool gate = GATE;
  // The epilogue's operands are requested now, with the weights (not after the barrier).
  const bool writes = lane == 0 && n_raw < N;
  const float res = writes && (flags & 8) ? residual[n] : 0.f;
  const float b0 = writes && (flags & 4) ? __half2float(bias[n]) : 0.f;
  const float b1 = writes && (flags & 4) && gate ? __half2float(bias[n + N]) : 0.f;
  Rows::RowT::stage(x, norm_w, K, flags, xs, red);

  float a0 = 0.f, a1 = 0.f;
  rows.dot(xs, gate, lane, a0, a1);
  a0 = warp_sum(a0);
  if (gate) a1 = warp_sum(a1);
  if (!writes) return;
  if (flags & 1) {
    const float r = inv_rms(red, K, eps_bits);
    a0 *= r;
    a1 *= r;
  }
  a0 += b0;
  a1 += b1;
  out[n] = (gate ? gated(a0, a1, flags) : a0) + res;
}

// The block's rows (make_row(n): the Row of weight row n; AHEAD: pieces per lane loaded ahead).
template <bool GATE, class Row, int AHEAD, class MakeRow>
__device__ __forceinline__ void gemv_kernel(MakeRow make_row, const float* __restrict__ x,
                                            const __half* __restrict__ norm_w, const __half* __restrict__ bias,
                                            const float* __restrict__ residual, float* __restrict__ out, int N, int K,
                                            int flags, int eps_bits, const Prefetch& next) {
  __shared__ __align__(16) float xs[MAX_K + MAX_K / 8];  // x, padded (stage_x)
  __shared__ float red[WARPS];
  const int n_raw = blockIdx.x * WARPS + threadIdx.x / 32, n = min(n_raw, N - 1);  // a spare warp redoes the last row
  Rows<Row, AHEAD> rows(make_row(n), make_row(n + N), K, GATE, threadIdx.x % 32);
  gemv_body<GATE>(rows, x, norm_w, bias, residual, out, n, n_raw, N, K, flags, eps_bits, xs, red);
  // After this block's own work. Qwen3-0.6B's decode step on an H100, kernel time: 987 us
  // with no requests; in 128-byte steps, 976 with them made before the work, 974 after it.
  next.issue();
}

#define PF_ARGS const void *pf0, const void *pf1, const void *pf2
#define PF_SIZES int pf0_bytes, int pf1_bytes, int pf2_bytes
#define NEXT Prefetch{pf0, pf1, pf2, pf0_bytes, pf1_bytes, pf2_bytes}
#define F16_ARGS                                                                                             \
  const float* __restrict__ x, const __half* __restrict__ W, const __half* __restrict__ norm_w,              \
      const __half* __restrict__ bias, const float* __restrict__ residual, PF_ARGS, float* __restrict__ out,  \
      int N, int K, int flags, int eps_bits, PF_SIZES
#define Q4_ARGS                                                                                              \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,   \
      const __half* __restrict__ norm_w, const __half* __restrict__ bias,                                     \
      const float* __restrict__ residual, PF_ARGS, float* __restrict__ out, int N, int K, int flags,          \
      int eps_bits, PF_SIZES
#define F16_ROW [&](int n) { return F16Row(W, n, K); }
extern "C" __global__ void __launch_bounds__(NT, 4) gemv(F16_ARGS) {
  gemv_kernel<false, F16Row, PF>(F16_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits, NEXT);
}
extern "C" __global__ void __launch_bounds__(NT) gemv_gate(F16_ARGS) {
  gemv_kernel<true, F16Row, PF>(F16_ROW, x, norm_w, bias, residual, out, N, K, flags, eps_bits, NEXT);
}
// 4-bit: the pairs' dtype is the kernel's own (_f16, _bf16), as for the lm_head below.
// Gate mode sums by dp4a (I8Row), one row a warp as Q4Row.
#define GEMV_Q4(name, GATE, ROW, AHEAD, BLOCKS_PER_SM)                                                      \
  extern "C" __global__ void __launch_bounds__(NT, BLOCKS_PER_SM) name(Q4_ARGS) {                           \
    gemv_kernel<GATE, ROW, AHEAD>([&](int n) { return ROW(W, scales_biases, n, K); }, x, norm_w, bias,       \
                                  residual, out, N, K, flags, eps_bits, NEXT);                               \
  }
GEMV_Q4(gemv_q4_f16, false, Q4Row<false>, PFQ, 4)
GEMV_Q4(gemv_q4_bf16, false, Q4Row<true>, PFQ, 4)
GEMV_Q4(gemv_q4_gate_f16, true, I8Row<false>, PFQG, 3)
GEMV_Q4(gemv_q4_gate_bf16, true, I8Row<true>, PFQG, 3)
#undef GEMV_Q4
#undef F16_ROW
#undef F16_ARGS

// A 4-bit matvec with many rows and K = 32 P (an lm_head: 151936 x 1024 for Qwen3-0.6B).
// gemv_q4's warp per row left 4 words per lane in flight, as three 4-byte loads each, and
// staged x for only 8 rows per block: 89 us for that lm_head on an H100, 35% of the
// bandwidth. Here a lane reads 4 words (32 values, half a group of 64) as one 16-byte load
// with one scale and one bias, so sum(w x) = s sum(q x) + b sum(x), whose sum(x) is the same
// for every row; x stays in registers; each block stages x once and its warps take chunks of
// R rows (global warp w: chunks w, w + warps, ...), all R rows requested before any is used,
// and the warp's next chunk requested before this one is summed (two chunks of 4 rows, or 2
// at K = 2048, in flight; one chunk of 8 or 4 took 45.9 us for Qwen3-0.6B's lm_head and 72.7
// for Llama-3.2-1B's on an H100, two take 43.1 and 65.7). The sums run by dp4a on x in int8 parts
// held in registers (LaneX): Qwen3-0.6B's lm_head 46.8 -> 41.0 us, Llama-3.2-1B's 67.3 -> 63.9
// (bench/gemv_probe.py --lm-head-only; the f32 sums took ~3 instructions a value).
// Flags: the norm only (no bias, residual, gate). K is the kernel's own (the push constant is
// the one extern.lm_head checked). Grid: any; one wave (extern.LM_HEAD_GRID) balances the chunks best.

// The largest logit seen and its lowest index (i < 0: a NaN was seen, and the argmax is N,
// out of range, as layers.max_and_first_index gives it).
struct Best {
  float v = -INFINITY;
  int i = 0x7fffffff;
  __device__ __forceinline__ void take(float x, int j) {
    if (x != x || i < 0) i = -1;
    else if (x > v || (x == v && j < i)) v = x, i = j;
  }
  __device__ __forceinline__ void take(const Best& o) {
    if (o.i < 0) i = -1;
    else take(o.v, o.i);
  }
};

// R rows of a matvec with P 16-byte pieces a row (K = 32 P), a lane's pieces lane + 32 j of
// each, j < KW (chunk c: rows c R ... c R + R - 1; rows past N (or chunks past the last) are
// requested as row N - 1). Where P is not a multiple of 32 the last round's lanes past P hold
// zeros (scale and bias 0: they add nothing).
template <int P>
constexpr int pieces_per_lane() { return (P + 31) / 32; }
template <int P>
__device__ __forceinline__ bool has_piece(int lane, int j) { return P % 32 == 0 || lane + 32 * j < P; }

template <int P, int R>
struct Chunk {
  static constexpr int KW = pieces_per_lane<P>();
  uint4 q[R][KW];
  uint32_t sb[R][KW];  // 16-bit scale and bias, widened in sum
  __device__ __forceinline__ void load(const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,
                                       int c, int N) {
    constexpr int G = P / 2;  // groups of 64 a row
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const size_t n = min(c * R + i, N - 1);
#pragma unroll
      for (int j = 0; j < KW; ++j) {
        const int piece = lane + 32 * j;
        const bool in = has_piece<P>(lane, j);
        q[i][j] = in ? reinterpret_cast<const uint4*>(W)[n * P + piece] : make_uint4(0, 0, 0, 0);
        sb[i][j] = in ? scales_biases[n * G + piece / 2] : 0u;
      }
    }
  }
  // out[rows] = r * (rows . x): s sum(q x) + b sum(x) per piece (sum(q x) by dp4a on the
  // lane's x in int8 parts), summed over the warp; lane 0 keeps the best row so far in `best`
  // (the rows come in increasing order).
  template <class X>
  __device__ __forceinline__ void sum(const X& x, float r, int c, int N, float* __restrict__ out, Best& best,
                                      bool bf16) const {
    float acc[R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      acc[i] = 0.f;
#pragma unroll
      for (int j = 0; j < KW; ++j) {
        const uint32_t w4[4] = {q[i][j].x, q[i][j].y, q[i][j].z, q[i][j].w};
        I8Sums sums;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const I8Word& xw = x.words[j][u];
          sums.add(w4[u], xw.h[0], xw.h[1], xw.m[0], xw.m[1], xw.l[0], xw.l[1]);
        }
        const float2 g = scale_bias(sb[i][j], bf16);
        acc[i] += g.x * sums.value(x.d[j]) + g.y * x.sum[j];
      }
      acc[i] = warp_sum(acc[i]);
    }
    if (threadIdx.x % 32 == 0)
#pragma unroll
      for (int i = 0; i < R; ++i)
        if (c * R + i < N) {
          out[c * R + i] = acc[i] * r;
          best.take(acc[i] * r, c * R + i);
        }
  }
};

// A lane's pieces of x (piece lane + 32 i covers x[32 (lane + 32 i) ...], i < KW) in int8 parts
// (24 words a piece where f32 takes 32), with each piece's d and sum(x); zeros past P.
template <int P>
struct LaneX {
  static constexpr int KW = pieces_per_lane<P>();
  I8Word words[KW][4];
  float d[KW], sum[KW];
  __device__ __forceinline__ LaneX(const float* xs, int lane) {
#pragma unroll
    for (int i = 0; i < KW; ++i) {
      if (!has_piece<P>(lane, i)) {
#pragma unroll
        for (int u = 0; u < 4; ++u) words[i][u] = I8Word{};
        d[i] = sum[i] = 0.f;
        continue;
      }
      const float* v = xs + 32 * (lane + 32 * i);
      float m = 0.f, s = 0.f;
#pragma unroll
      for (int j = 0; j < 32; ++j) m = fmaxf(m, fabsf(v[j])), s += v[j];
      const float inv = m > 0.f ? 127.f / m : 0.f;
#pragma unroll
      for (int u = 0; u < 4; ++u) words[i][u] = I8Word(v + 8 * u, inv);
      d[i] = m / 127.f, sum[i] = s;
    }
  }
};

template <int P, int R, bool BF16>
__device__ __forceinline__ Best gemv_q4_many(const float* __restrict__ x, const uint32_t* __restrict__ W,
                                             const uint32_t* __restrict__ scales_biases,
                                             const __half* __restrict__ norm_w, float* __restrict__ out, int N,
                                             int flags, int eps_bits) {
  constexpr int K = 32 * P;
  __shared__ __align__(16) float xs[K];
  __shared__ float red[WARPS];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  stage_x<0>(x, norm_w, K, flags, xs, red);
  const float r = (flags & 1) ? inv_rms(red, K, eps_bits) : 1.f;
  const LaneX<P> xq(xs, lane);
  const int warps = gridDim.x * WARPS, chunks = (N + R - 1) / R;
  constexpr bool bf16 = BF16;
  // Two chunks in flight per warp: the next one's rows are requested before this one's sums.
  int c = blockIdx.x * WARPS + warp;
  Chunk<P, R> a, b;
  Best best;
  a.load(W, scales_biases, c, N);
  while (c < chunks) {
    const int c1 = c + warps;
    b.load(W, scales_biases, c1, N);
    a.sum(xq, r, c, N, out, best, bf16);
    if (c1 >= chunks) break;
    c = c1 + warps;
    a.load(W, scales_biases, c, N);
    b.sum(xq, r, c1, N, out, best, bf16);
  }
  return best;  // lane 0's
}

// The lm_head's argmax: each block's best row into `blocks` ([grid] value, index), then the
// last block to finish (an atomic count in `sync`, zero) picks the first best of them all.
// (IREE's argmax after the lm_head took 4 dispatches, ~12.6 us per Qwen3-0.6B step on an H100.)
__device__ __forceinline__ void argmax_of_blocks(const Best& warp_best, float2* blocks, int* sync, int* argmax,
                                                 int N) {
  __shared__ Best warps[WARPS];
  const int t = threadIdx.x, lane = t % 32;
  if (lane == 0) warps[t / 32] = warp_best;
  __syncthreads();
  if (t == 0) {
    Best b = warps[0];
#pragma unroll
    for (int w = 1; w < WARPS; ++w) b.take(warps[w]);
    blocks[blockIdx.x] = make_float2(b.v, __int_as_float(b.i));
  }
  if (!last_block_done(sync, gridDim.x)) return;
  // Every thread requests its blocks' entries at once (written by other blocks during this
  // kernel: read past L1), then a warp and a block reduction. (One warp looping over them
  // waited for each load in turn.)
  constexpr int PER = 4;  // entries per thread: grids up to 1024 blocks
  float2 e[PER];
#pragma unroll
  for (int j = 0; j < PER; ++j)
    e[j] = t + j * NT < gridDim.x ? __ldcg(blocks + t + j * NT) : make_float2(-INFINITY, __int_as_float(0x7fffffff));
  Best b;
#pragma unroll
  for (int j = 0; j < PER; ++j) b.take(Best{e[j].x, __float_as_int(e[j].y)});
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) b.take(Best{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)});
  __syncthreads();  // warps[] is reused
  if (lane == 0) warps[t / 32] = b;
  __syncthreads();
  if (t == 0) {
#pragma unroll
    for (int w = 1; w < WARPS; ++w) b.take(warps[w]);
    argmax[0] = b.i < 0 ? N : b.i;
  }
}

// K = 1024 and 2048 (Qwen3-0.6B's, Llama-3.2-1B's), and other hidden sizes of the families' small
// models, whose last round of pieces leaves some lanes idle: 896 (Qwen2.5-0.5B), 1152 (Gemma3-1B),
// 1536 (Qwen2.5-1.5B). 128 bytes of weights per lane in flight (R rows x the lane's pieces).
// Bindings: x [K] f32, words, scales_biases, norm weight [K] f16, sync [1] int32 (zero;
// written in place), then the results: logits [N] f32, argmax [1] int32, the blocks' best
// [grid] (f32 value, int index bits). Push constants: N, K, flags (the norm only), eps bits.
#define LM_ARGS                                                                                              \
  const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,   \
      const __half* __restrict__ norm_w, int* sync, float* __restrict__ out,                                  \
      int* __restrict__ argmax, float2* blocks, int N, int K, int flags, int eps_bits
// The pairs' dtype is the kernel's own too (_f16, _bf16): as a runtime flag, Llama-3.2-1B's
// lm_head took 70.0 us on an H100 instead of 65.4, Qwen3-0.6B's 47.8 instead of 46.5.
#define LM_HEAD(K, R)                                                                                        \
  extern "C" __global__ void __launch_bounds__(NT, 2) lm_head_q4_k##K##_f16(LM_ARGS) {                        \
    argmax_of_blocks(gemv_q4_many<K / 32, R, false>(x, W, scales_biases, norm_w, out, N, flags, eps_bits),     \
                     blocks, sync, argmax, N);                                                                \
  }                                                                                                          \
  extern "C" __global__ void __launch_bounds__(NT, 2) lm_head_q4_k##K##_bf16(LM_ARGS) {                       \
    argmax_of_blocks(gemv_q4_many<K / 32, R, true>(x, W, scales_biases, norm_w, out, N, flags, eps_bits),      \
                     blocks, sync, argmax, N);                                                                \
  }
LM_HEAD(896, 4)
LM_HEAD(1024, 4)
LM_HEAD(1152, 2)
LM_HEAD(1536, 2)
LM_HEAD(2048, 2)
#undef LM_HEAD
#undef LM_ARGS

#undef Q4_ARGS
#undef PF_ARGS
#undef PF_SIZES
#undef NEXT

// A 4-bit weight dequantized to f16 [N, K] (w = s * q + b, in f32, then rounded), for the
// several-token steps (a prefill chunk), whose matmuls IREE generates from f16 weights. One
// thread per packed word: 4 bytes in, 16 out. (In the graph, IREE made two dispatches of it
// with an f32 intermediate: ~64 us for a 6144 x 1024 weight on an H100.)
// Bindings: words [N, K/8] u32, scales_biases [N, K/group] (16-bit pairs), out [N, K] f16.
// Push constants: N, K, group (a multiple of 8), bf16 (1: BF16 pairs, 0: F16).
extern "C" __global__ void __launch_bounds__(NT) dequant_q4(
    const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,
    __half* __restrict__ out, int N, int K, int group, int bf16) {
  const size_t w = (size_t)blockIdx.x * NT + threadIdx.x, K8 = K / 8;
  if (w >= (size_t)N * K8) return;
  const size_t row = w / K8, g = (w % K8) * 8 / group, groups = K / group;
  const float2 sb = scale_bias(scales_biases[row * groups + g], bf16);
  const float s = sb.x, b = sb.y;
  const uint32_t q = W[w];
  __half2 h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    h[j] = __floats2half2_rn(s * (float)((q >> (8 * j)) & 15u) + b, s * (float)((q >> (8 * j + 4)) & 15u) + b);
  reinterpret_cast<uint4*>(out)[w] = *reinterpret_cast<const uint4*>(h);
}
