// One-token linear layers (f16 weights [N, K], f32 activations) with what IREE keeps in
// dispatches of their own folded in (compile/extern.py gemv):
// - the input RMSNorm: every block recomputes 1/RMS of x (K values), so the norm's reduction
//   is no longer a dispatch before the matvec;
// - a bias and a residual added to the output;
// - gate mode: rows n and n + N of W are a gate and an up projection, out[n] = act(gate) * up
//   (SwiGLU, or GeGLU with the tanh GELU), so the activation is no extra dispatch.
// One warp per output row (two weight rows in gate mode), 16-byte weight loads. (Sharing long
// rows among 2-8 warps was slower on an H100: bench/results/2026-11-26-h100-hand-kernels.txt.)
//
// Bindings: x [K] f32, W f16, norm weight [K] f16, bias [N or 2N] f16, residual [N] f32, out [N]
// f32 (absent ones are one-element dummies). Push constants: N (outputs), K, flags (1 norm,
// 2 norm as 1 + w, 4 bias, 8 residual, 16 gate mode, 32 GELU instead of SiLU), eps (f32 bits).
// Limits (checked at export, extern.gemv_fits): K % 8 == 0, K <= MAX_K.
#include <cuda_fp16.h>

#define NT 256
#define WARPS (NT / 32)
#define MAX_K 8192
#define PF 4  // 16-byte weight pieces per lane and row loaded ahead

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

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

extern "C" __global__ void __launch_bounds__(NT) gemv(
    const float* __restrict__ x, const __half* __restrict__ W, const __half* __restrict__ norm_w,
    const __half* __restrict__ bias, const float* __restrict__ residual, float* __restrict__ out,
    int N, int K, int flags, int eps_bits) {
  __shared__ __align__(16) float xs[MAX_K];
  __shared__ float red[WARPS];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int n_raw = blockIdx.x * WARPS + warp, n = min(n_raw, N - 1);  // a spare warp redoes the last row
  const bool gate = flags & 16;
  const int K8 = K / 8;
  const uint4* w0 = reinterpret_cast<const uint4*>(W) + (size_t)n * K8;
  const uint4* w1 = reinterpret_cast<const uint4*>(W) + (size_t)(n + N) * K8;
  // The first PF 16-byte pieces per lane are loaded before x is staged: they do not depend on
  // it, and the weight stream is what the kernel waits for.
  uint4 p0[PF], p1[PF];
#pragma unroll
  for (int j = 0; j < PF; ++j) {
    const int k8 = j * 32 + lane;
    if (k8 < K8) {
      p0[j] = w0[k8];
      if (gate) p1[j] = w1[k8];
    }
  }
  // x times the norm weight, and x's sum of squares: the matvec of the normed x is then
  // 1/RMS times the matvec of x * w, so x is read and written once.
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

  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int j = 0; j < PF; ++j) {
    const int k8 = j * 32 + lane;
    if (k8 < K8) {
      a0 += dot8(p0[j], xs + k8 * 8);
      if (gate) a1 += dot8(p1[j], xs + k8 * 8);
    }
  }
#pragma unroll 4
  for (int k8 = PF * 32 + lane; k8 < K8; k8 += 32) {
    const float* xk = xs + k8 * 8;
    a0 += dot8(w0[k8], xk);
    if (gate) a1 += dot8(w1[k8], xk);
  }
  a0 = warp_sum(a0);
  if (gate) a1 = warp_sum(a1);
  if (lane != 0 || n_raw >= N) return;
  if (flags & 1) {
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < WARPS; ++i) total += red[i];
    const float r = rsqrtf(total / K + __int_as_float(eps_bits));
    a0 *= r;
    a1 *= r;
  }
  if (flags & 4) {
    a0 += __half2float(bias[n]);
    if (gate) a1 += __half2float(bias[n + N]);
  }
  float y = a0;
  if (gate) {
    const float g = a0;
    const float act = (flags & 32) ? 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)))
                                   : g / (1.f + __expf(-g));
    y = act * a1;
  }
  if (flags & 8) y += residual[n];
  out[n] = y;
}
