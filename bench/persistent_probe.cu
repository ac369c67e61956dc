// A probe for issue 5's roofline (run by persistent_probe.py; raw CUDA driver calls, no IREE; not
// part of a bundle): how fast do a decode layer's four 4-bit matvecs (qkv, o, gate/up, down;
// attention left out) run as ONE persistent kernel with grid-wide waits between them (layers_*),
// or as one kernel per layer for o, gate/up and down taking 8-row items from a counter
// (layer_tail), against launches of gemv.cu's kernels? Every form sums each row as gemv_q4 does.
#include "gemv.cu"

// gemv.cu's gate/up before its dp4a sums (stop 22): Q4Row's f32 sums, as the forms below sum, so
// that the launches they are checked against give the same bits.
extern "C" __global__ void __launch_bounds__(NT, 3) gemv_q4_gate_f32_bf16(
    const float* __restrict__ x, const uint32_t* __restrict__ W, const uint32_t* __restrict__ scales_biases,
    const __half* __restrict__ norm_w, const __half* __restrict__ bias, const float* __restrict__ residual,
    const void* pf0, const void* pf1, const void* pf2, float* __restrict__ out, int N, int K, int flags, int eps_bits,
    int pf0_bytes, int pf1_bytes, int pf2_bytes) {
  gemv_kernel<true, Q4Row<true>, PFQG>([&](int n) { return Q4Row<true>(W, scales_biases, n, K); }, x, norm_w, bias,
                                       residual, out, N, K, flags, eps_bits,
                                       Prefetch{pf0, pf1, pf2, pf0_bytes, pf1_bytes, pf2_bytes});
}

// Every block's writes before the call are visible to every block's reads after it (as
// cooperative groups' grid sync: barrier, one thread fences and counts, polls, fences).
// `target`: the count once every block has arrived (the counter only grows). waiter: the thread
// that fences, counts and polls.
__device__ __forceinline__ void grid_wait(unsigned* count, unsigned target, int waiter = 0) {
  __syncthreads();
  if (threadIdx.x == waiter) {
    __threadfence();
    atomicAdd(count, 1u);
    unsigned seen;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

// x (an activation written by other blocks in this kernel: read through L2, not L1) times the
// norm weight into xs, padded as Q4Row wants (4 floats after every 32); 1/RMS of x if norm.
// worker: whether this thread stages (layers_sync_*'s ninth warp does not; every thread reaches
// the barriers).
__device__ __forceinline__ float stage_l2(const float* x, const __half* norm_w, int K, float* xs, float* red,
                                          bool worker = true) {
  const int t = threadIdx.x;
  float ss = 0.f;
  for (int i = t; worker && i < K / 4; i += NT) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(x) + i);
    float4 w = make_float4(1.f, 1.f, 1.f, 1.f);
    if (norm_w) {
      const uint2 h = reinterpret_cast<const uint2*>(norm_w)[i];
      const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&h.x));
      const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&h.y));
      w = make_float4(a.x, a.y, b.x, b.y);
    }
    const int k = 4 * i;
    *reinterpret_cast<float4*>(xs + k + 4 * (k / 32)) = make_float4(v.x * w.x, v.y * w.y, v.z * w.z, v.w * w.w);
    ss += (v.x * v.x + v.y * v.y) + (v.z * v.z + v.w * v.w);
  }
  if (worker) {
    ss = warp_sum(ss);
    if (t % 32 == 0) red[t / 32] = ss;
  }
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) total += red[i];
  __syncthreads();  // red is reused by the next staging
  return rsqrtf(total / K + 1e-6f);
}

// One matvec of the chain: warp gw of TW takes rows gw, gw + TW, ... (ROWS at most), each row's
// pieces lane + 32 i (K / 1024 per lane), loaded by load() and summed by run() as gemv_q4 does
// (same pieces per lane, same order: bit-identical outputs).
using Row = Q4Row<true>;
template <int K, bool GATE, int ROWS>
struct Matvec {
  static constexpr int PPL = K / 1024;
  Q4Piece a[ROWS][PPL], b[ROWS][GATE ? PPL : 1];
  __device__ __forceinline__ void load(const uint32_t* W, const uint32_t* sb, int N, int gw, int TW) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int n = gw + j * TW;
      if (n < N) {
        const Row r0(W, sb, n, K);
#pragma unroll
        for (int i = 0; i < PPL; ++i) a[j][i] = r0.load(lane + 32 * i);
        if (GATE) {
          const Row r1(W, sb, n + N, K);
#pragma unroll
          for (int i = 0; i < PPL; ++i) b[j][i] = r1.load(lane + 32 * i);
        }
      }
    }
  }
  // Requests the pieces load() would read into L2 (a hint: nothing waits for it).
  __device__ __forceinline__ void prefetch(const uint32_t* W, const uint32_t* sb, int N, int gw, int TW) const {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int n = gw + j * TW;
      if (n < N)
#pragma unroll
        for (int g = 0; g < (GATE ? 2 : 1); ++g) {
          const Row r(W, sb, n + g * N, K);
#pragma unroll
          for (int i = 0; i < PPL; ++i) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(r.w + lane + 32 * i));
            if (lane % 2 == 0) asm volatile("prefetch.global.L2 [%0];" ::"l"(r.sb + (lane + 32 * i) / 2));
          }
        }
    }
  }
  // out[n] = (act(gate) * up, or the row's sum) * (norm ? inv : 1) + residual[n]
  __device__ __forceinline__ void run(const float* xs, float inv, const float* residual, float* out, int N, int gw,
                                      int TW) const {
    const int lane = threadIdx.x % 32;
    const Row row(nullptr, nullptr, 0, K);
#pragma unroll
    for (int j = 0; j < ROWS; ++j) {
      const int n = gw + j * TW;
      if (n >= N) break;
      float a0 = 0.f, a1 = 0.f;
#pragma unroll
      for (int i = 0; i < PPL; ++i) {
        a0 += row.dot(a[j][i], xs + Row::xoff(lane + 32 * i));
        if (GATE) a1 += row.dot(b[j][i], xs + Row::xoff(lane + 32 * i));
      }
      a0 = warp_sum(a0);
      if (GATE) a1 = warp_sum(a1);
      if (lane == 0) {
        float y = a0 * inv;
        if (GATE) {
          const float g = a0 * inv;
          y = g / (1.f + __expf(-g)) * (a1 * inv);
        }
        out[n] = residual ? y + __ldcg(residual + n) : y;
      }
    }
  }
};

// Qwen3-0.6B's matvecs (D 1024, 16 x 128 query heads, 8 KV heads, I 3072); layer l's weights
// at l times a layer's size in each stacked buffer. h [D] in and out (the residual stream).
#define D 1024
#define QKV 4096
#define ATT 2048
#define I 3072
struct Layers {
  const uint32_t *qkv_w, *qkv_sb, *o_w, *o_sb, *gu_w, *gu_sb, *down_w, *down_sb;
  const __half *norm1, *norm2;
};

// AHEAD: load the next matvec's pieces before waiting for its input (else after).
template <bool AHEAD, bool L2 = false>
__device__ __forceinline__ void layers_kernel(Layers L, int layers, float* h, float* qkv, float* h2, float* act,
                                              unsigned* count, unsigned base) {
  __shared__ __align__(16) float xs[I + I / 8];
  __shared__ float red[WARPS];
  const int TW = gridDim.x * WARPS, gw = blockIdx.x * WARPS + threadIdx.x / 32;
  unsigned waits = 0;
  auto wait = [&]() { grid_wait(count, base + (++waits) * gridDim.x); };
  Matvec<D, false, 4> mq;
  Matvec<ATT, false, 1> mo;
  Matvec<D, true, 3> mg;
  Matvec<I, false, 1> md;
  if (AHEAD) mq.load(L.qkv_w, L.qkv_sb, QKV, gw, TW);
  for (int l = 0; l < layers; ++l) {
    const size_t lq = (size_t)l * QKV, lo = (size_t)l * D, lg = (size_t)l * 2 * I, ld = (size_t)l * D;
    if (l > 0) wait();
    if (!AHEAD) mq.load(L.qkv_w + lq * D / 8, L.qkv_sb + lq * D / 64, QKV, gw, TW);
    if (L2) mo.prefetch(L.o_w + lo * ATT / 8, L.o_sb + lo * ATT / 64, D, gw, TW);
    float inv = stage_l2(h, L.norm1 + l * D, D, xs, red);
    if (AHEAD) mo.load(L.o_w + lo * ATT / 8, L.o_sb + lo * ATT / 64, D, gw, TW);
    mq.run(xs, inv, nullptr, qkv, QKV, gw, TW);
    wait();
    if (!AHEAD) mo.load(L.o_w + lo * ATT / 8, L.o_sb + lo * ATT / 64, D, gw, TW);
    if (L2) mg.prefetch(L.gu_w + lg * D / 8, L.gu_sb + lg * D / 64, I, gw, TW);
    stage_l2(qkv, nullptr, ATT, xs, red);
    if (AHEAD) mg.load(L.gu_w + lg * D / 8, L.gu_sb + lg * D / 64, I, gw, TW);
    mo.run(xs, 1.f, h, h2, D, gw, TW);
    wait();
    if (!AHEAD) mg.load(L.gu_w + lg * D / 8, L.gu_sb + lg * D / 64, I, gw, TW);
    if (L2) md.prefetch(L.down_w + ld * I / 8, L.down_sb + ld * I / 64, D, gw, TW);
    inv = stage_l2(h2, L.norm2 + l * D, D, xs, red);
    if (AHEAD) md.load(L.down_w + ld * I / 8, L.down_sb + ld * I / 64, D, gw, TW);
    mg.run(xs, inv, nullptr, act, I, gw, TW);
    wait();
    if (!AHEAD) md.load(L.down_w + ld * I / 8, L.down_sb + ld * I / 64, D, gw, TW);
    if (L2 && l + 1 < layers) mq.prefetch(L.qkv_w + (lq + QKV) * D / 8, L.qkv_sb + (lq + QKV) * D / 64, QKV, gw, TW);
    stage_l2(act, nullptr, I, xs, red);
    if (AHEAD && l + 1 < layers) mq.load(L.qkv_w + (lq + QKV) * D / 8, L.qkv_sb + (lq + QKV) * D / 64, QKV, gw, TW);
    md.run(xs, 1.f, h2, h, D, gw, TW);
  }
}

#define LAYERS_ARGS                                                                                          \
  const uint32_t *qkv_w, const uint32_t *qkv_sb, const uint32_t *o_w, const uint32_t *o_sb,                  \
      const uint32_t *gu_w, const uint32_t *gu_sb, const uint32_t *down_w, const uint32_t *down_sb,          \
      const __half *norm1, const __half *norm2, int layers, float *h, float *qkv, float *h2, float *act,     \
      unsigned *count, unsigned base
#define LAYERS_STRUCT Layers{qkv_w, qkv_sb, o_w, o_sb, gu_w, gu_sb, down_w, down_sb, norm1, norm2}
// _1: one block per SM (168 registers); _2: two (128 registers), for grids up to twice the SMs.
#define LAYERS_KERNEL(name, AHEAD, PER_SM, L2PF) \
  extern "C" __global__ void __launch_bounds__(NT, PER_SM) name(LAYERS_ARGS) { \
    layers_kernel<AHEAD, L2PF>(LAYERS_STRUCT, layers, h, qkv, h2, act, count, base); \
  }
LAYERS_KERNEL(layers_ahead_1, true, 1, false)
LAYERS_KERNEL(layers_after_1, false, 1, false)
LAYERS_KERNEL(layers_after_pf_1, false, 1, true)  // + the next matvec's pieces requested into L2
LAYERS_KERNEL(layers_ahead_2, true, 2, false)
LAYERS_KERNEL(layers_after_2, false, 2, false)

// The same with a ninth warp that loads nothing and makes the grid-wide waits (thread NT): the
// fence before a block's count then has no weight loads of its own to wait for, so the next
// matvec's pieces can be in flight across the wait (layers_ahead_1 loaded them ahead too, but
// its thread 0, which fences, had its own loads in flight). Workers: threads < NT, as above.
#define NT_S (NT + 32)
template <bool AHEAD>
__device__ __forceinline__ void layers_sync_kernel(Layers L, int layers, float* h, float* qkv, float* h2, float* act,
                                                   unsigned* count, unsigned base) {
  __shared__ __align__(16) float xs[I + I / 8];
  __shared__ float red[WARPS];
  const bool worker = threadIdx.x < NT;
  const int TW = gridDim.x * WARPS, gw = blockIdx.x * WARPS + threadIdx.x / 32;
  unsigned waits = 0;
  auto wait = [&]() { grid_wait(count, base + (++waits) * gridDim.x, NT); };
  Matvec<D, false, 4> mq;
  Matvec<ATT, false, 1> mo;
  Matvec<D, true, 3> mg;
  Matvec<I, false, 1> md;
  if (worker) mq.load(L.qkv_w, L.qkv_sb, QKV, gw, TW);
  if (worker && AHEAD) mo.load(L.o_w, L.o_sb, D, gw, TW);
  for (int l = 0; l < layers; ++l) {
    const size_t lq = (size_t)l * QKV, lo = (size_t)l * D, lg = (size_t)l * 2 * I, ld = (size_t)l * D;
    if (l > 0) wait();
    float inv = stage_l2(h, L.norm1 + l * D, D, xs, red, worker);
    if (worker) {
      if (!AHEAD) mo.load(L.o_w + lo * ATT / 8, L.o_sb + lo * ATT / 64, D, gw, TW);
      else mg.load(L.gu_w + lg * D / 8, L.gu_sb + lg * D / 64, I, gw, TW);
      mq.run(xs, inv, nullptr, qkv, QKV, gw, TW);
    }
    wait();
    stage_l2(qkv, nullptr, ATT, xs, red, worker);
    if (worker) {
      if (!AHEAD) mg.load(L.gu_w + lg * D / 8, L.gu_sb + lg * D / 64, I, gw, TW);
      else md.load(L.down_w + ld * I / 8, L.down_sb + ld * I / 64, D, gw, TW);
      mo.run(xs, 1.f, h, h2, D, gw, TW);
    }
    wait();
    inv = stage_l2(h2, L.norm2 + l * D, D, xs, red, worker);
    if (worker) {
      if (!AHEAD) md.load(L.down_w + ld * I / 8, L.down_sb + ld * I / 64, D, gw, TW);
      else if (l + 1 < layers) mq.load(L.qkv_w + (lq + QKV) * D / 8, L.qkv_sb + (lq + QKV) * D / 64, QKV, gw, TW);
      mg.run(xs, inv, nullptr, act, I, gw, TW);
    }
    wait();
    stage_l2(act, nullptr, I, xs, red, worker);
    if (worker) {
      if (!AHEAD && l + 1 < layers) mq.load(L.qkv_w + (lq + QKV) * D / 8, L.qkv_sb + (lq + QKV) * D / 64, QKV, gw, TW);
      else if (AHEAD && l + 1 < layers) mo.load(L.o_w + (lo + D) * ATT / 8, L.o_sb + (lo + D) * ATT / 64, D, gw, TW);
      md.run(xs, 1.f, h2, h, D, gw, TW);
    }
  }
}
// _s1: the pieces of the matvec after next requested as this one starts (two matvecs ahead,
// across a wait); _s0: the next one's (as layers_ahead_1).
#define LAYERS_S_KERNEL(name, AHEAD) \
  extern "C" __global__ void __launch_bounds__(NT_S, 1) name(LAYERS_ARGS) { \
    layers_sync_kernel<AHEAD>(LAYERS_STRUCT, layers, h, qkv, h2, act, count, base); \
  }
LAYERS_S_KERNEL(layers_sync_s0, false)
LAYERS_S_KERNEL(layers_sync_s1, true)

// The waits alone: `waits` grid-wide waits and nothing else.
extern "C" __global__ void __launch_bounds__(NT, 1) waits_only(int waits, unsigned* count, unsigned base) {
  for (int i = 1; i <= waits; ++i) grid_wait(count, base + i * gridDim.x);
}

#undef D
#undef QKV
#undef ATT
#undef I

// (gemv.cu's parameter macros, which it undefines at its end)
#define PF_ARGS const void *pf0, const void *pf1, const void *pf2
#define PF_SIZES int pf0_bytes, int pf1_bytes, int pf2_bytes
#define NEXT Prefetch{pf0, pf1, pf2, pf0_bytes, pf1_bytes, pf2_bytes}

// --- The queue form alone (measured as "qkv + layer_tail"): the rest of a decoder layer after its attention, in one kernel: the
// output projection plus the residual, h2 = o a + h; the MLP's RMSNorm, gate/up and activation,
// act = act(g h2n) * (u h2n); the down projection plus the residual, out = d act + h2. Three
// matvecs as gemv_q4 runs them (the same rows per warp and sums: bit-identical results), but
// one launch instead of three: a kernel boundary cost ~1.3 us more than an in-kernel wait in a
// chain of such matvecs on an H100 (bench/persistent_probe.py).
// The blocks take work items in order from a counter: 8 rows (a warp's each) of o, then of
// gate/up, then of down. An item of one matvec waits until every item of the one before is
// done, all of which were taken before it by blocks already running: no block waits for a
// block that has not started, so any grid is correct (the blocks need not all be resident).
// Each item's weights are requested before it waits; each takes its share of the next
// matvec's weights into L2 after its work (the last: the prefetch bindings', as gemv_q4).
// sync: [4] int32 of this layer (zero before the grid runs): the next item, o's and gate/up's items done.
__device__ __forceinline__ void wait_count(const int* count, int target) {
  if (threadIdx.x == 0) {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(seen) : "l"(count) : "memory");
    } while (seen < target);
  }
  __syncthreads();
}

template <bool BF16>
__device__ __forceinline__ void layer_tail(const float* __restrict__ a, const float* __restrict__ h,
                                           const uint32_t* __restrict__ ow, const uint32_t* __restrict__ osb,
                                           const __half* __restrict__ norm_w, const uint32_t* __restrict__ gw,
                                           const uint32_t* __restrict__ gsb, const uint32_t* __restrict__ dw,
                                           const uint32_t* __restrict__ dsb, int* sync, const Prefetch& next,
                                           float* h_out, float* h2, float* act, int D, int KO, int I, int flags,
                                           int eps_bits) {
  using Row = Q4Row<BF16>;
  __shared__ __align__(16) float xs[MAX_K + MAX_K / 8];
  __shared__ float red[WARPS];
  __shared__ int claimed;
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int n0 = (D + WARPS - 1) / WARPS, n1 = (I + WARPS - 1) / WARPS, total = 2 * n0 + n1;
  // The counters 128 bytes apart: the blocks polling one do not hold up the atomics on another.
  int *next_item = sync, *o_done = sync + 32, *gate_done = sync + 64;
#ifdef TAIL_FIRST_CLAIMED
  if (t == 0) claimed = atomicAdd(next_item, 1);
  __syncthreads();
  const int first = claimed, base = 0;
#else
  // A block's first item is its index; the blocks that finish one take the next from the counter.
  const int first = blockIdx.x, base = gridDim.x;
#endif
  for (int item = first; item < total;) {
    int taken = total;
    if (t == 0 && (base == 0 || gridDim.x < total)) taken = base + atomicAdd(next_item, 1);  // the next item, used at the end
    if (item < n0) {
      const int n_raw = item * WARPS + warp, n = min(n_raw, D - 1);
      Rows<Row, PFQ> rows(Row(ow, osb, n, KO), Row(ow, osb, n, KO), KO, false, lane);
      gemv_body<false>(rows, a, nullptr, nullptr, h, h2, n, n_raw, D, KO, 8, eps_bits, xs, red);
      prefetch_l2(gw, I * D, item * NT + t, n0 * NT);  // gate/up's words (2I x D/8 x 4 bytes)
      prefetch_l2(gsb, I * D / 8, item * NT + t, n0 * NT);
    } else if (item < n0 + n1) {
      const int c = item - n0, n_raw = c * WARPS + warp, n = min(n_raw, I - 1);
      Rows<Row, PFQG> rows(Row(gw, gsb, n, D), Row(gw, gsb, n + I, D), D, true, lane);
      wait_count(o_done, n0);
      gemv_body<true>(rows, h2, norm_w, nullptr, nullptr, act, n, n_raw, I, D, flags, eps_bits, xs, red);
      prefetch_l2(dw, D * I / 2, c * NT + t, n1 * NT);
      prefetch_l2(dsb, D * I / 16, c * NT + t, n1 * NT);
    } else {
      const int c = item - n0 - n1, n_raw = c * WARPS + warp, n = min(n_raw, D - 1);
      Rows<Row, PFQ> rows(Row(dw, dsb, n, I), Row(dw, dsb, n, I), I, false, lane);
      wait_count(gate_done, n1);
      gemv_body<false>(rows, act, nullptr, nullptr, h2, h_out, n, n_raw, D, I, 8, eps_bits, xs, red);
      prefetch_l2(next.p0, next.b0, c * NT + t, n0 * NT), prefetch_l2(next.p1, next.b1, c * NT + t, n0 * NT);
    }
    __syncthreads();  // the block's outputs written (and xs free for the next item)
    if (t == 0) {
      if (item < n0 + n1) {
        __threadfence();
        atomicAdd(item < n0 ? o_done : gate_done, 1);
      }
      claimed = taken;
    }
    __syncthreads();
    item = claimed;
  }
}

// Bindings: a [KO] f32 (the attention's output), h [D] f32 (the residual stream), o's words and
// scales_biases, the MLP norm weight [D] f16, gate/up's (rows [gate; up], 2I), down's, sync
// [layers x 4] int32 (written in place), three prefetch bindings; results: out [D], h2 [D],
// act [I] f32 (the last two: the intermediate values). Push constants: D, KO, I, flags of the
// gate/up matvec (1 norm, 2 norm as 1 + w, 16 gate, 32 GELU), eps bits, the layer (its sync),
// the prefetch bindings' sizes.
#ifndef TAIL_BLOCKS_PER_SM
#define TAIL_BLOCKS_PER_SM 3
#endif
#define LAYER_TAIL(name, BF16)                                                                                \
  extern "C" __global__ void __launch_bounds__(NT, TAIL_BLOCKS_PER_SM) name(                                                   \
      const float* __restrict__ a, const float* __restrict__ h, const uint32_t* __restrict__ ow,              \
      const uint32_t* __restrict__ osb, const __half* __restrict__ norm_w, const uint32_t* __restrict__ gw,   \
      const uint32_t* __restrict__ gsb, const uint32_t* __restrict__ dw, const uint32_t* __restrict__ dsb,    \
      int* sync, PF_ARGS, float* __restrict__ h_out, float* __restrict__ h2, float* __restrict__ act, int D,  \
      int KO, int I, int flags, int eps_bits, int layer, PF_SIZES) {                                          \
    layer_tail<BF16>(a, h, ow, osb, norm_w, gw, gsb, dw, dsb, sync + 96 * layer, NEXT, h_out, h2, act, D, KO, I, \
                     flags, eps_bits);                                                                         \
  }
LAYER_TAIL(layer_tail_q4_f16, false)
LAYER_TAIL(layer_tail_q4_bf16, true)
#undef LAYER_TAIL

