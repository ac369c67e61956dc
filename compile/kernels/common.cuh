// What the CUDA kernels share. A .cu that includes a header here hashes it into its PTX's
// digest (compile/extern.py _source_digest), so an edit here makes every stale PTX refuse to link.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

// Sum or max over a warp, every lane getting the result.
template <bool MAX>
__device__ __forceinline__ float warp_reduce(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = MAX ? fmaxf(x, y) : x + y;
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce<false>(v); }
