// A one-token decoder layer (pre-norm, RMSNorm, SwiGLU/GeGLU; 4-bit packed weights) in two
// launches instead of six: each runs its steps as chained phases (common.cuh), so a phase's
// blocks request their weights (or cached keys) while the phase before still runs, and no
// step pays a launch of its own. (Six launches, one per step, took ~38 us per Qwen3-0.6B layer
// on an H100, most of it per-launch latency: ~2.5 us floor, weights requested only once the
// launch starts.)
//
// decode_layer_attn_g<G>: x -> x + o_proj(attention(qkv_proj(rms_norm(x)))), phases:
//   0 qkv: gemv rows of the qkv projection, x normed (gemv.cuh);
//   1 partial: decode attention's partial blocks (decode_attention.cuh), keys and values
//     requested before the wait;
//   2 combine: two combine groups per block; writes the token's K/V into the caches in place;
//   3 o: gemv rows of o_proj plus the residual x, weights requested before the wait.
// decode_layer_mlp: x -> x + down(act(gate(rms_norm(x))) * up(rms_norm(x))), phases:
//   0 gate_up: gemv rows in gate mode; 1 down: gemv rows plus the residual.
//
// Buffers: each launch writes one f32 scratch buffer whose first D values are its output x, so
// the next launch reads x at offset 0 of it (one binding: IREE's CUDA HAL takes at most 16).
//   attn scratch: [x (D) | qkv (NQKV) | attention out (H Dh) | partials (blocks, H, Dh + 2)],
//   mlp scratch: [x (D) | act(gate) * up (I)], each part starting at a multiple of ALIGN floats.
// counters: int32, zero at the step's start, 8 per layer: [0..4] the attn launch's ticket and
// phases, [5..7] the mlp launch's.
// Limits (checked at export, extern.decode_layer_fits): D, H Dh <= MAX_K_ATTN; I <= MAX_K;
// K % 64 == 0; H Dh / 32 even; the decode attention kernels' limits.
#include "decode_attention.cuh"
#include "gemv.cuh"

#define ALIGN 64
#define MAX_K_ATTN 4096
#define MIN_BLOCKS 4  // attn launch, per SM: one wave of Qwen3-0.6B's 512 qkv blocks (8 bytes spilled)
#ifndef MLP_MIN_BLOCKS
#define MLP_MIN_BLOCKS 3  // 4 spilled 40 bytes
#endif

__device__ __forceinline__ int aligned(int n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

__device__ __forceinline__ auto q4_rows(const uint32_t* W, const float* s, const float* b, int K) {
  return [=](int n) { return Q4Row(W, s, b, n, K); };
}

template <int GT>
__device__ __forceinline__ void attn_layer(
    const float* __restrict__ x, const uint32_t* __restrict__ qkv_w, const float* __restrict__ qkv_s,
    const float* __restrict__ qkv_b, const uint32_t* __restrict__ o_w, const float* __restrict__ o_s,
    const float* __restrict__ o_b, const __half* __restrict__ in_norm, const __half* __restrict__ wq,
    const __half* __restrict__ wk, const float* __restrict__ rope, __half* __restrict__ kc,
    __half* __restrict__ vc, int* __restrict__ counters, float* __restrict__ scratch, int D, int NQKV,
    int norm_flags, int eps_bits, int S, int KVH, int Dh, int layer, int CH, int window, int scale_bits,
    int softcap_bits, int qk, int qk_eps_bits, int rot, int KB) {
  __shared__ int ticket;
  __shared__ union {
    struct {
      __align__(16) float xs[MAX_K_ATTN];
      float red[WARPS];
    } g;
    PartialSmem p;
    CombineSmem c[2];
  } sm;
  int* ctr = counters + layer * 8;
  const int vb = chain_ticket(ctr, &ticket);
  const int G = GT, H = KVH * G, HD = H * Dh;
  const int nA = (NQKV + WARPS - 1) / WARPS, nB = S / CH * (KVH / KB), nC = HD / 64;
  const float *cos = rope, *sin = rope + rot;
  const int pos = __float_as_int(rope[2 * rot]);
  float* qkv = scratch + aligned(D);
  float* attn = qkv + aligned(NQKV);
  float* part = attn + aligned(HD);
  if (vb < nA) {
    gemv_rows<false, Q4Row, PFQ>(vb, q4_rows(qkv_w, qkv_s, qkv_b, D), NoWait(), x, in_norm, in_norm, x, qkv, NQKV,
                                 D, norm_flags, eps_bits, sm.g.xs, sm.g.red);
    chain_done(ctr, 0);
  } else if (vb < nA + nB) {
    const int v = vb - nA;
    int lo, hi;
    block_keys(v / (KVH / KB), CH, pos, window, &lo, &hi);
    if (lo < hi)  // else nothing to do (the combine skips the block too); counted all the same
      partial_body<GT>(v, ChainWait{ctr, 0, nA}, qkv, wq, cos, sin, kc, vc, pos, part, S, KVH, G, Dh, layer, CH,
                       window, __int_as_float(scale_bits), __int_as_float(softcap_bits), qk,
                       __int_as_float(qk_eps_bits), rot, KB, sm.p);
    chain_done(ctr, 1);
  } else if (vb < nA + nB + nC) {
    chain_wait(ctr, 0, nA);  // qkv: a skipped partial block counted itself without waiting for it
    chain_wait(ctr, 1, nB);
    const int v = vb - nA - nB, group = threadIdx.x / 128;
    combine_body(2 * v + group, threadIdx.x % 128, qkv, wq, wk, cos, sin, pos, part, kc, vc, attn, S, KVH, G, Dh,
                 layer, CH, window, __int_as_float(scale_bits), __int_as_float(softcap_bits), qk,
                 __int_as_float(qk_eps_bits), rot, sm.c[group]);
    chain_done(ctr, 2);
  } else {  // the output x; no phase waits for it
    gemv_rows<false, Q4Row, PFQ>(vb - nA - nB - nC, q4_rows(o_w, o_s, o_b, HD), ChainWait{ctr, 2, nC}, attn,
                                 in_norm, in_norm, x, scratch, D, HD, 8 /* residual */, eps_bits, sm.g.xs, sm.g.red);
  }
}

#define ATTN_KERNEL(name, gt)                                                                                    \
  extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) name(                                             \
      const float* __restrict__ x, const uint32_t* __restrict__ qkv_w, const float* __restrict__ qkv_s,          \
      const float* __restrict__ qkv_b, const uint32_t* __restrict__ o_w, const float* __restrict__ o_s,          \
      const float* __restrict__ o_b, const __half* __restrict__ in_norm, const __half* __restrict__ wq,          \
      const __half* __restrict__ wk, const float* __restrict__ rope, __half* __restrict__ kc,                    \
      __half* __restrict__ vc, int* __restrict__ counters, float* __restrict__ scratch, int D, int NQKV,         \
      int norm_flags, int eps_bits, int S, int KVH, int G, int Dh, int layer, int CH, int window,               \
      int scale_bits, int softcap_bits, int qk, int qk_eps_bits, int rot, int KB) {                              \
    attn_layer<gt>(x, qkv_w, qkv_s, qkv_b, o_w, o_s, o_b, in_norm, wq, wk, rope, kc, vc, counters, scratch, D,   \
                   NQKV, norm_flags, eps_bits, S, KVH, Dh, layer, CH, window, scale_bits, softcap_bits, qk,      \
                   qk_eps_bits, rot, KB);                                                                        \
  }
ATTN_KERNEL(decode_layer_attn_g1, 1)
ATTN_KERNEL(decode_layer_attn_g2, 2)
ATTN_KERNEL(decode_layer_attn_g4, 4)
#undef ATTN_KERNEL

// flags: the gate phase's gemv flags (norm, 1 + w, gate, GELU).
extern "C" __global__ void __launch_bounds__(NT, MLP_MIN_BLOCKS) decode_layer_mlp(
    const float* __restrict__ x, const uint32_t* __restrict__ gu_w, const float* __restrict__ gu_s,
    const float* __restrict__ gu_b, const uint32_t* __restrict__ down_w, const float* __restrict__ down_s,
    const float* __restrict__ down_b, const __half* __restrict__ post_norm, int* __restrict__ counters,
    float* __restrict__ scratch, int D, int I, int flags, int eps_bits, int layer) {
  __shared__ int ticket;
  __shared__ __align__(16) float xs[MAX_K];
  __shared__ float red[WARPS];
  int* ctr = counters + layer * 8 + 5;
  const int vb = chain_ticket(ctr, &ticket);
  const int nE = (I + WARPS - 1) / WARPS;
  float* h = scratch + aligned(D);
  if (vb < nE) {
    gemv_rows<true, Q4Row, PFQ>(vb, q4_rows(gu_w, gu_s, gu_b, D), NoWait(), x, post_norm, post_norm, x, h, I, D,
                                flags, eps_bits, xs, red);
    chain_done(ctr, 0);
  } else {
    gemv_rows<false, Q4Row, PFQ>(vb - nE, q4_rows(down_w, down_s, down_b, I), ChainWait{ctr, 0, nE}, h, post_norm,
                                 post_norm, x, scratch, D, I, 8 /* residual */, eps_bits, xs, red);
  }
}
