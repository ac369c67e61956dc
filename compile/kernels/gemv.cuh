// The one-token linear layer's device code (compile/kernels/gemv.cu says what it computes),
// shared by gemv.cu's kernels and the chained layer kernels of decode_layer.cu.
#pragma once
#include "common.cuh"

#define NT 256
#define WARPS (NT / 32)
#define MAX_K 8192
#define PF 4  // f16: 16-byte weight pieces per lane and row loaded ahead
#define PFQ 8  // 4-bit: words per lane and row loaded ahead (K = 2048 is all in flight)

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

// One weight row in pieces of 8 inputs per lane and load. f16: a 16-byte piece.
struct F16Row {
  using Piece = uint4;
  const uint4* w;
  __device__ __forceinline__ F16Row(const __half* W, int row, int K) : w(reinterpret_cast<const uint4*>(W) + (size_t)row * (K / 8)) {}
  __device__ __forceinline__ Piece load(int k8) const { return w[k8]; }
  __device__ __forceinline__ float dot(Piece p, const float* x, int) const { return dot8(p, x); }
};

// 4-bit: one packed word, s * sum(q x) + b * sum(x) over its 8 inputs. A piece carries its
// group's scale and bias, so they are requested with the word, not after the block's barrier
// (a global load is not moved across __syncthreads).
struct Q4Piece {
  uint32_t w;
  float s, b;
};

struct Q4Row {
  using Piece = Q4Piece;
  const uint32_t* w;
  const float *s, *b;
  __device__ __forceinline__ Q4Row(const uint32_t* W, const float* scales, const float* biases, int row, int K)
      : w(W + (size_t)row * (K / 8)), s(scales + (size_t)row * (K / 64)), b(biases + (size_t)row * (K / 64)) {}
  __device__ __forceinline__ Piece load(int k8) const { return {w[k8], s[k8 / 8], b[k8 / 8]}; }  // 8 words per group of 64
  __device__ static __forceinline__ float dot(Piece p, const float* x, int = 0) {
    const float4 xa = *reinterpret_cast<const float4*>(x), xb = *reinterpret_cast<const float4*>(x + 4);
    const float xv[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    float dq = 0.f, dx = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      dq += (float)((p.w >> (4 * j)) & 15u) * xv[j];
      dx += xv[j];
    }
    return p.s * dq + p.b * dx;
  }
};

// A warp's row (two in gate mode): AHEAD pieces per lane are loaded before x is staged (they
// do not depend on it, and the weight stream is what the kernel waits for), the rest as the
// sum runs.
template <class Row, int AHEAD>
struct Rows {
  Row r0, r1;
  int K8;
  typename Row::Piece p0[AHEAD], p1[AHEAD];
  __device__ __forceinline__ Rows(Row row0, Row row1, int K, bool gate, int lane) : r0(row0), r1(row1), K8(K / 8) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int k8 = j * 32 + lane;
      if (k8 < K8) {
        p0[j] = r0.load(k8);
        if (gate) p1[j] = r1.load(k8);
      }
    }
  }
  __device__ __forceinline__ void dot(const float* xs, bool gate, int lane, float& a0, float& a1) {
#pragma unroll
    for (int j = 0; j < AHEAD; ++j) {
      const int k8 = j * 32 + lane;
      if (k8 < K8) {
        a0 += r0.dot(p0[j], xs + k8 * 8, k8);
        if (gate) a1 += r1.dot(p1[j], xs + k8 * 8, k8);
      }
    }
#pragma unroll 4
    for (int k8 = AHEAD * 32 + lane; k8 < K8; k8 += 32) {
      a0 += r0.dot(r0.load(k8), xs + k8 * 8, k8);
      if (gate) a1 += r1.dot(r1.load(k8), xs + k8 * 8, k8);
    }
  }
};

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
  // x times the norm weight, and x's sum of squares: the matvec of the normed x is then
  // 1/RMS times the matvec of x * w, so x is read and written once.
  float ss = 0.f;
  for (int k = t; k < K; k += NT) {
    const float v = __ldcg(x + k);  // written by a phase before, in a chained launch
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

  float a0 = 0.f, a1 = 0.f;
  rows.dot(xs, gate, lane, a0, a1);
  a0 = warp_sum(a0);
  if (gate) a1 = warp_sum(a1);
  if (!writes) return;
  if (flags & 1) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += red[i];
    const float r = rsqrtf(total / K + __int_as_float(eps_bits));
    a0 *= r;
    a1 *= r;
  }
  a0 += b0;
  a1 += b1;
  float y = a0;
  if (gate) {
    const float g = a0;
    const float act = (flags & 32) ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                   : g / (1.f + __expf(-g));
    y = act * a1;
  }
  out[n] = y + res;
}

// Virtual block vb's rows (make_row(n): the Row of weight row n; AHEAD: pieces per lane
// loaded ahead), its weights requested before `wait` (a chained launch's wait for x).
template <bool GATE, class Row, int AHEAD, class MakeRow, class Wait>
__device__ __forceinline__ void gemv_rows(int vb, MakeRow make_row, Wait wait, const float* __restrict__ x,
                                          const __half* __restrict__ norm_w, const __half* __restrict__ bias,
                                          const float* __restrict__ residual, float* __restrict__ out, int N, int K,
                                          int flags, int eps_bits, float* xs, float* red) {
  const int n_raw = vb * WARPS + threadIdx.x / 32, n = min(n_raw, N - 1);  // a spare warp redoes the last row
  Rows<Row, AHEAD> rows(make_row(n), make_row(n + N), K, GATE, threadIdx.x % 32);
  wait();
  gemv_body<GATE>(rows, x, norm_w, bias, residual, out, n, n_raw, N, K, flags, eps_bits, xs, red);
}
