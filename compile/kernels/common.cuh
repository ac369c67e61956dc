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

// A 4-bit group's scale and bias from their 16-bit pair (MLX affine: w = s * q + b), the
// scale in the low half: F16, or with bf16 the BF16 bits. Exact in f32 either way.
__device__ __forceinline__ float2 scale_bias(uint32_t pair, bool bf16) {
  if (bf16) return make_float2(__uint_as_float(pair << 16), __uint_as_float(pair & 0xffff0000u));
  const __half2 h = *reinterpret_cast<const __half2*>(&pair);
  return __half22float2(h);
}

// Counts the calling block as done in *count (zero before the grid runs; all of the block's
// threads call this): true in the last block to finish. The block's writes before the call are
// visible to that last block's reads after it. One thread fences (release before its count,
// acquire after the last one), ordered with the others' accesses by the barriers, as
// cooperative groups' grid sync does: a fence in every thread (a MEMBAR.SC.GPU each, waiting for
// that thread's own stores) took ~0.5 us of each fused decode attention on an H100.
__device__ __forceinline__ bool last_block_done(int* count, int blocks) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(count, 1) == blocks - 1;
    if (last) __threadfence();
  }
  __syncthreads();
  return last;
}

// Copies 4 bytes from global to shared memory without passing through registers (sm_80's
// cp.async): the copies a thread issues are all in flight until cp_async_wait_all, so staging
// from several sources takes one memory round trip instead of one per source.
__device__ __forceinline__ void cp_async4(void* shared, const void* global) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(shared)),
               "l"(global));
}

// Waits for the calling thread's cp_async4 copies (a barrier must follow before other threads read them).
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Requests [p, p + bytes) into L2 (a hint: nothing waits for it), one 32-byte sector per
// request, thread i of n taking every n-th. (In 128-byte steps, Qwen3-0.6B's weights so
// requested saved 13 us per decode step on an H100; in 32-byte steps, 23.)
__device__ __forceinline__ void prefetch_l2(const void* p, int bytes, int i, int n) {
  const char* c = static_cast<const char*>(p);
  for (int o = i * 32; o < bytes; o += n * 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
}
