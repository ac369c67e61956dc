// Decode attention (one query token) against an f16 KV cache in [L, D, S, H] layout, from the
// qkv projection's raw output, in two kernels:
// - decode_attn_partial: one block per CH cached keys and KB KV heads: their q heads' RMSNorm and
//   rotary, scores, softmax, weights x V, relative to the block's own max. (One block for all KV
//   heads took 12.3 us per Qwen3-0.6B layer after 512 tokens on an H100, most of it in each
//   block's work on all 16 q heads, and left 100 of the 132 SMs idle.)
// - decode_attn_combine: one block per 32 features of a query head: norms and rotates the q head and the token's
//   own key, writes that key and the token's value into the caches (in place: IREE passes them
//   as read-write bindings tied to its results), and folds the blocks' partials together with
//   them, split-softmax style.
// They replace ~11 of IREE's dispatches per layer (compile/extern.py, compile/layers.py).
//
// Arguments, as IREE's CUDA HAL passes them: the bindings (operands, then the result) as
// pointers, then the push constants as 32-bit ints:
//   S (cache rows), KVH, G (query heads per KV head), Dh, layer, CH (keys per partial block),
//   window (0 = none: a query at p sees keys in (p - window, p]), scale and softcap (f32 bits;
//   softcap 0 = none), qk (1: q/k RMSNorm before rotary, 2: its weight as 1 + w), eps (f32 bits),
//   rot (rotary features, <= Dh), KB (KV heads per partial block, dividing KVH; the combine
//   ignores it).
// Limits below (MAX_*), checked when the step is exported (extern.decode_attention_fits), which
// otherwise keeps the attention in JAX.
// Regenerate the PTX with `make ptx` (needs nvcc).
#include "decode_attention.cuh"

// One kernel per form (compile/extern.py picks by G): one kernel holding all three forms ran
// the runtime-G one at 17.1 us per Llama-3.2-1B layer instead of 12.4 (H100).
#define PARTIAL_KERNEL(name, gt)                                                                              \
  extern "C" __global__ void __launch_bounds__(NT) name(                                                      \
      const float* __restrict__ qkv, const __half* __restrict__ wq, const float* __restrict__ cos,            \
      const float* __restrict__ sin, const __half* __restrict__ kc, const __half* __restrict__ vc,            \
      const int* __restrict__ pos_p, float* __restrict__ part, int S, int KVH, int G, int Dh, int layer,     \
      int CH, int window, int scale_bits, int softcap_bits, int qk, int eps_bits, int rot, int KB) {          \
    __shared__ PartialSmem sm;                                                                                \
    const int pos = pos_p[0];                                                                                 \
    int lo, hi;                                                                                               \
    block_keys(blockIdx.x / (KVH / KB), CH, pos, window, &lo, &hi);                                           \
    if (lo >= hi) return; /* the combine skips this block as well */                                          \
    partial_body<gt>(blockIdx.x, NoWait(), qkv, wq, cos, sin, kc, vc, pos, part, S, KVH, G, Dh, layer, CH,    \
                     window, __int_as_float(scale_bits), __int_as_float(softcap_bits), qk,                    \
                     __int_as_float(eps_bits), rot, KB, sm);                                                  \
  }
PARTIAL_KERNEL(decode_attn_partial, 0)
PARTIAL_KERNEL(decode_attn_partial_g1, 1)
PARTIAL_KERNEL(decode_attn_partial_g2, 2)
PARTIAL_KERNEL(decode_attn_partial_g4, 4)
#undef PARTIAL_KERNEL

// Grid H * Dh / 32: a block of 128 threads per combine group (query head, 32 features).
extern "C" __global__ void __launch_bounds__(128) decode_attn_combine(
    const float* __restrict__ qkv, const __half* __restrict__ wq, const __half* __restrict__ wk,
    const float* __restrict__ cos, const float* __restrict__ sin, const int* __restrict__ pos_p,
    const float* __restrict__ part, __half* __restrict__ kc, __half* __restrict__ vc, float* __restrict__ out,
    int S, int KVH, int G, int Dh, int layer, int CH, int window, int scale_bits, int softcap_bits,
    int qk, int eps_bits, int rot, int /* KB: the partial's */) {
  __shared__ CombineSmem sm;
  combine_body(blockIdx.x, threadIdx.x, qkv, wq, wk, cos, sin, pos_p[0], part, kc, vc, out, S, KVH, G, Dh, layer,
               CH, window, __int_as_float(scale_bits), __int_as_float(softcap_bits), qk, __int_as_float(eps_bits),
               rot, sm);
}
