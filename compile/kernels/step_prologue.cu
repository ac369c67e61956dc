// What a one-token step does before its first layer, in one kernel (compile/extern.py
// embed_rope): the token's embedding row, dequantized from MLX affine 4-bit (w = s * q + b),
// and the rotary cos/sin of its position. IREE made 6 dispatches of these, ~17 us of a
// Qwen3-0.6B decode step on an H100 (ncu), most of it per-dispatch cost.
//
// Bindings: token [1] int32, position [1] int32, inv_freq [rot / 2] f32 (the family's, scaled
// as transformers computes them: layers.rope_inv_freq), words [V, D / 8] u32, scales_biases
// [V, D / group] (16-bit pairs, common.cuh scale_bias); results x [D] f32, cos and sin [rot]
// f32 (HF's rotate_half layout: the rot / 2 angles twice). Push constants: D, rot / 2, group
// (a multiple of 8), bf16 (1: BF16 pairs, 0: F16).
// One block; a thread per packed word (8 values), then per angle.
#include "common.cuh"

#define NT 256

extern "C" __global__ void __launch_bounds__(NT) embed_rope_q4(
    const int* __restrict__ token_p, const int* __restrict__ pos_p, const float* __restrict__ inv_freq,
    const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,
    float* __restrict__ x, float* __restrict__ cos_out, float* __restrict__ sin_out, int D, int half, int group,
    int bf16) {
  const int t = threadIdx.x;
  const size_t row = (size_t)token_p[0];
  const float pos = (float)pos_p[0];  // f32(position) * inv_freq, as layers.rope_cos_sin
  for (int j = t; j < half; j += NT) {
    float s, c;
    sincosf(pos * inv_freq[j], &s, &c);
    cos_out[j] = cos_out[j + half] = c;
    sin_out[j] = sin_out[j + half] = s;
  }
  const int words = D / 8, groups = D / group;
  for (int w = t; w < words; w += NT) {
    const uint32_t q = W[row * words + w];
    const float2 sb = scale_bias(scales_biases[row * groups + w * 8 / group], bf16);
    const float s = sb.x, b = sb.y;
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) v[u] = s * (float)((q >> (4 * u)) & 15u) + b;
    reinterpret_cast<float4*>(x)[2 * w] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(x)[2 * w + 1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}
