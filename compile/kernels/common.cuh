// What the CUDA kernels share: warp reductions, and the chain of phases that lets one launch
// run several dependent steps (compile/kernels/decode_layer.cu).
// A .cu that includes this (or any "*.cuh" here) hashes it into its PTX's digest
// (compile/extern.py _source_digest), so an edit here makes every stale PTX refuse to link.
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

// --- phases chained inside one launch -----------------------------------------------------
// A launch's blocks take tickets in the order they start; ticket ranges are phases (one
// virtual block each), and a phase's block waits until every block of the phase before it
// has counted itself done. Tickets, not blockIdx, so a waiting block only ever waits on blocks
// that already run (CUDA does not promise to start blocks in blockIdx order): no deadlock
// whatever the residency. A block requests what does not depend on the phase before (its
// weights, cached keys) before it waits, so those loads overlap that phase.
// Counters: [0] the next ticket, [1 + p] blocks of phase p done; zero at launch (the step
// passes a zeroed buffer, compile/extern.py decode_layer).

#ifndef CHAIN_SLEEP
#define CHAIN_SLEEP 32
#endif
#ifndef CHAIN_TICKETS
#define CHAIN_TICKETS 1
#endif
__device__ __forceinline__ int chain_ticket(int* counters, int* shared_slot) {
  if (!CHAIN_TICKETS) return blockIdx.x;
  if (threadIdx.x == 0) *shared_slot = atomicAdd(counters, 1);
  __syncthreads();
  return *shared_slot;
}

__device__ __forceinline__ int load_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Wait until `target` blocks of phase p are done. Data they wrote is then read with __ldcg
// (from L2): this SM's L1 may hold older lines of the same addresses.
__device__ __forceinline__ void chain_wait(const int* counters, int phase, int target) {
  if (threadIdx.x == 0)
    while (load_acquire(counters + 1 + phase) < target) __nanosleep(CHAIN_SLEEP);
  __syncthreads();
}

// This block's writes are done: publish them, then count the block.
#ifndef CHAIN_ONE_FENCE
#define CHAIN_ONE_FENCE 0
#endif
__device__ __forceinline__ void chain_done(int* counters, int phase) {
  if (CHAIN_ONE_FENCE) {
    __syncthreads();  // the block's writes, then one thread's fence (cumulative) and count
    if (threadIdx.x == 0) {
      __threadfence();
      atomicAdd(counters + 1 + phase, 1);
    }
  } else {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(counters + 1 + phase, 1);
  }
}

// No phase before: for the kernels that run alone.
struct NoWait {
  static constexpr bool chained = false;
  __device__ __forceinline__ void operator()() const {}
};

// A chained phase's wait for the phase before it.
struct ChainWait {
  static constexpr bool chained = true;
  const int* counters;
  int phase, target;
  __device__ __forceinline__ void operator()() const { chain_wait(counters, phase, target); }
};
