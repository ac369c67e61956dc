// The next token, drawn on the device from a step's logits as iree_runner/sampling.py draws it
// on the host: temperature, then top-k (0 = off), top-p and min-p, then an inverse-CDF draw
// over the survivors in token-id order, with the uniform number of (seed, position)
// (sampling.uniform). With top-k off, the survivors are the candidates whose share of the whole
// vocabulary's softmax passes top-p or min-p, or with neither (a plain temperature) the whole
// vocabulary, drawn from as sampling._draw draws (draw_whole). So a sampled token
// feeds the next step on the device, as greedy's argmax does, and generation stays pipelined.
//
// Phase 1, every block: its PER_BLOCK logits / temperature, its TOP best (value down, id up)
// as candidates. Phase 2, the last block to finish (an atomic count): the filters and the draw.
// Every token outside the candidates is <= the largest of the blocks' TOP-th values (m), so
// when at least k candidates lie above m, the top-k set is theirs (ties included) and the rest
// is exact arithmetic on it. With top-k off, the same holds when the candidates above m carry
// the nucleus' mass (top-p), or when m falls below min-p's cut. When not (some block holds more
// than TOP of the top k, ties reach m, a flat distribution's nucleus), or the logits hold a
// NaN, the kernel does not guess: it writes status 1 and the host samples that step from its
// logits. Each phase sorts only what can matter (a few dozen pairs): sorting all of a block's
// 2048, then all the candidates, took the kernel 65 us per Qwen3-0.6B token on an H100.
//
// The repetition penalty (params[6], 1 = off) comes first, as sampling._penalize applies it:
// a token seen in the sequence so far (history[0 .. start) and this step's tokens[0 .. last])
// has its logit x made x * penalty where x < 0, else x / penalty. Every step writes its tokens
// into history[start ..], in place, so the history of the next step is on the device too.
// Greedy with a penalty (temperature 0, top-k 1) takes the first best of the penalized logits.
//
// Bindings: logits [V] f32, argmax [1] int32 (the step's, N on NaN), params [8] u32 (sampling.
// device_params: temperature f32 bits, top_k, top_p bits, min_p bits, seed low, seed high,
// repetition penalty bits), start [1], last [1] int32 (the sampled row's position is start +
// last), count [1] int32 (zero; written), tokens [C] int32 (the step's), history [S] int32 (the
// sequence's tokens by position; written), then the results: out [2] int32: token, status (0:
// drawn here; 1: the host must sample; temperature 0 gives the argmax, 0), candidates [blocks *
// TOP] float2 (value, id bits; scratch), sums [blocks * 2] double (with top-k off: each block's
// best and its sum of exp(x - best), the f32 weights summed in double as the host sums them;
// scratch).
// Push constant: V. Grid: ceil(V / PER_BLOCK) <= MAX_BLOCKS.
// Regenerate the PTX with `make ptx` (needs nvcc).
#include "common.cuh"

#define NT 1024
#define PER_BLOCK 2048  // logits per block: 2 per thread
#define TOP 16          // candidates per block
#define MAXC 2048       // candidates in all
#define MAX_BLOCKS (MAXC / TOP)

// Value down, then id up: the order of the candidate lists. Pads are (-inf, INT_MAX).
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) { return va > vb || (va == vb && ia < ib); }

// Bitonic sort of n pairs (n a power of two) in shared memory by `before`, all NT threads
// taking part.
__device__ void sort_pairs(float* v, int* id, int n) {
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < n / 2; i += NT) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool down = (lo & size) == 0;  // this run's direction (the last run's: all down)
        if (down ? before(v[hi], id[hi], v[lo], id[lo]) : before(v[lo], id[lo], v[hi], id[hi])) {
          const float tv = v[lo];
          const int ti = id[lo];
          v[lo] = v[hi], id[lo] = id[hi], v[hi] = tv, id[hi] = ti;
        }
      }
    }
  __syncthreads();
}

// sampling.uniform: the top 24 bits of splitmix64(seed + (position + 1) * golden), times 2^-24.
__device__ __forceinline__ double uniform(uint64_t seed, uint64_t position) {
  uint64_t z = seed + (position + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (double)(z >> 40) * (1.0 / 16777216.0);
}

// Pads v[c .. np) with (-inf, INT_MAX) and sorts v[0 .. np) (np: the power of two >= c and
// >= at_least).
__device__ void sort_first(float* v, int* id, int c, int at_least) {
  int np = 2;
  while (np < c || np < at_least) np <<= 1;
  for (int i = c + threadIdx.x; i < np; i += NT) v[i] = -INFINITY, id[i] = 0x7fffffff;
  sort_pairs(v, id, np);  // (its first barrier publishes the pads)
}

// The largest over the block of each thread's x (every thread gets it); red: NT / 32 floats.
__device__ float block_max(float x, float* red) {
  x = warp_reduce<true>(x);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  x = red[0];
  for (int w = 1; w < NT / 32; ++w) x = fmaxf(x, red[w]);
  return x;
}

__device__ __forceinline__ double warp_sum_double(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The tokens of the sequence so far: history[0 .. start) and the step's tokens[0 .. n).
struct Seen {
  const int* history;
  const int* tokens;
  int start, n;
  float penalty;  // 1: off
  // Which of the PER_BLOCK ids from base the sequence holds, as bits in mask[PER_BLOCK / 32]
  // (shared memory, all of the block's threads calling; ends with a barrier).
  __device__ void mark(int base, unsigned* mask) const {
    for (int i = threadIdx.x; i < PER_BLOCK / 32; i += NT) mask[i] = 0u;
    __syncthreads();
    for (int i = threadIdx.x; i < start + n; i += NT) {
      const int token = i < start ? history[i] : tokens[i - start], at = token - base;
      if (at >= 0 && at < PER_BLOCK) atomicOr(&mask[at / 32], 1u << (at % 32));
    }
    __syncthreads();
  }
  // Logit x of id base + at, penalized where the sequence holds it (sampling._penalize: f32).
  __device__ __forceinline__ float operator()(float x, int at, const unsigned* mask) const {
    if (penalty == 1.f || !(mask[at / 32] >> (at % 32) & 1u)) return x;
    return x < 0.f ? x * penalty : x / penalty;
  }
};

// Plain temperature (top-k, top-p and min-p off): sampling._draw's inverse CDF over the whole
// vocabulary, in token-id order, at the uniform number u. M: the largest scaled logit. The
// blocks' sums (phase 1, relative to each block's best, in double) locate the block where the
// CDF crosses u * total; that block's weights, exp(x - M) in f32 as the host computes them,
// summed in double in id order, locate the token. (The host sums the same weights in blocks of
// 1024: the sums agree to double rounding, the block sums to the f32 rounding of weights
// taken relative to another maximum; a draw can differ only within ~1e-7 of a CDF boundary.)
__device__ void draw_whole(const float* __restrict__ logits, float temperature, float M, const double* sums, double u,
                           int V, const Seen& seen, int* __restrict__ out) {
  __shared__ double z[MAX_BLOCKS], warp_total[NT / 32];
  __shared__ double within_s;
  __shared__ int block_s, first_s, last_s;
  __shared__ unsigned mask[PER_BLOCK / 32];
  const int t = threadIdx.x, lane = t % 32, warp = t / 32, grid = gridDim.x;
  if (t < grid) z[t] = __ldcg(sums + 2 * t + 1) * exp(__ldcg(sums + 2 * t) - (double)M);
  if (t == 0) first_s = PER_BLOCK, last_s = -1;
  __syncthreads();
  if (t == 0) {  // the block where the CDF crosses the target
    double total = 0.0;
    for (int b = 0; b < grid; ++b) total += z[b];
    const double target = u * total;
    double before = 0.0;
    int b = 0;
    while (b < grid - 1 && !(before + z[b] > target)) before += z[b++];
    while (b > 0 && z[b] == 0.0) before -= z[--b];  // a float edge past the last block with weight
    block_s = b, within_s = target - before;
  }
  __syncthreads();
  if (seen.penalty != 1.f) seen.mark(block_s * PER_BLOCK, mask);
  const int base = block_s * PER_BLOCK + 2 * t;  // this thread's two tokens, in id order
  float w[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) w[j] = base + j < V ? expf(seen(logits[base + j], 2 * t + j, mask) / temperature - M) : 0.f;
  // A scan of the threads' pair sums over the warp, in double, then the warps before.
  double c = (double)w[0] + (double)w[1];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const double y = __shfl_up_sync(0xffffffffu, c, o);
    if (lane >= o) c += y;
  }
  if (lane == 31) warp_total[warp] = c;
  const double up = __shfl_up_sync(0xffffffffu, c, 1), lanes_before = lane ? up : 0.0;  // (every lane shuffles)
  __syncthreads();
  double before = 0.0;
  for (int i = 0; i < warp; ++i) before += warp_total[i];
  const double c0 = before + lanes_before + w[0], c1 = c0 + w[1];  // the CDF after each of the two tokens
  const double within = within_s;
  if (c0 > within) atomicMin(&first_s, 2 * t);
  else if (c1 > within) atomicMin(&first_s, 2 * t + 1);
  if (w[1] > 0.f) atomicMax(&last_s, 2 * t + 1);
  else if (w[0] > 0.f) atomicMax(&last_s, 2 * t);
  __syncthreads();
  if (t == 0) {  // none above: a float edge at the block's end, the last token with weight
    out[0] = block_s * PER_BLOCK + (first_s < PER_BLOCK ? first_s : last_s), out[1] = 0;
  }
}

// (NT, 1): with the block count left out, ptxas held the kernel to 32 registers and spilled 12
// bytes; one block of NT per SM allows 64, and it takes 42.
extern "C" __global__ void __launch_bounds__(NT, 1) sample_token(
    const float* __restrict__ logits, const int* __restrict__ argmax, const uint32_t* __restrict__ params,
    const int* __restrict__ start, const int* __restrict__ last, int* count, const int* __restrict__ tokens,
    int* history, int* __restrict__ out, float2* candidates, double* sums, int V) {
  __shared__ float v[MAXC];  // pairs kept for sorting: (value, id)
  __shared__ int id[MAXC];
  __shared__ float sw[MAXC];  // the survivors' weights, in id order
  __shared__ int sid[MAXC];
  __shared__ int kept;
  __shared__ float red[NT / 32], red2[NT / 32], floor_v;  // floor_v: phase 1's bound for keeping a logit
  __shared__ double red_sum[NT / 32];
  __shared__ unsigned mask[PER_BLOCK / 32];  // the ids of this block the sequence holds (a penalty only)
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  const int n_step = last[0] + 1;
  // The step's tokens into the history, for the steps after it (this one reads only [0, start)).
  if (blockIdx.x == 0 && t < n_step) history[start[0] + t] = tokens[t];
  const float temperature = __uint_as_float(params[0]), penalty = __uint_as_float(params[6]);
  const Seen seen{history, tokens, start[0], n_step, penalty > 0.f ? penalty : 1.f};
  // Top-k off: top-p or min-p over the whole vocabulary, which need its softmax's denominator,
  // or neither (plain: the whole vocabulary survives, draw_whole).
  const bool whole = params[1] == 0;
  const bool plain = whole && !(__uint_as_float(params[2]) < 1.f) && !(__uint_as_float(params[3]) > 0.f);
  // Greedy: the argmax, as it is; with a penalty, the first best of the penalized logits, which
  // the top-k path below finds as its first candidate (sampling.device_params gives it top-k 1,
  // and the logits are not scaled).
  const bool greedy = temperature == 0.f;
  if (greedy && seen.penalty == 1.f) {
    if (blockIdx.x == 0 && t == 0) out[0] = argmax[0], out[1] = 0;
    return;
  }
  const float scale = greedy ? 1.f : temperature;
  // Phase 1: this block's logits, scaled as the host scales them (an IEEE division). Its TOP
  // best are among those >= the TOP-th largest of its warps' two best (that many logits are
  // at least that large): a few dozen, kept and sorted. (With each warp's best alone, a last
  // block with 12 warps of real logits kept all 384 and its sort set the kernel's time.)
  const int base = blockIdx.x * PER_BLOCK;
  if (seen.penalty != 1.f) seen.mark(base, mask);
  float x[PER_BLOCK / NT];
#pragma unroll
  for (int j = 0; j < PER_BLOCK / NT; ++j) {
    const int g = base + t + j * NT;
    x[j] = g < V ? seen(logits[g], t + j * NT, mask) / scale : -INFINITY;
  }
  static_assert(PER_BLOCK / NT == 2, "two logits per thread");
  const float hi = fmaxf(x[0], x[1]), lo = fminf(x[0], x[1]);
  const float best = warp_reduce<true>(hi);  // the warp's best, then its second: the best but
  const unsigned holder = __ballot_sync(0xffffffffu, hi == best);  // for one lane holding `best`
  const float second = warp_reduce<true>(lane == __ffs(holder) - 1 ? lo : hi);
  if (lane == 0) red[warp] = best, red2[warp] = second;
  if (t == 0) kept = 0, floor_v = -INFINITY;  // (-inf stays where fewer than TOP are finite)
  __syncthreads();
  if (warp == 0) {  // the TOP-th largest of the 64: fewer than TOP above it, at least TOP >= it
    const float mine[2] = {red[lane], red2[lane]};
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      int above = 0, at_least = 0;
      for (int w = 0; w < NT / 32; ++w) {
        above += (red[w] > mine[u]) + (red2[w] > mine[u]);
        at_least += (red[w] >= mine[u]) + (red2[w] >= mine[u]);
      }
      if (above < TOP && at_least >= TOP) floor_v = mine[u];  // lanes that write, write the same value
    }
  }
  float block_best = red[0];
  if (whole) {  // this block's sum of exp(x - its best)
    for (int w = 1; w < NT / 32; ++w) block_best = fmaxf(block_best, red[w]);
    const double e = block_best == -INFINITY  // (exp(-inf - -inf) would be NaN)
                         ? 0.0 : warp_sum_double((double)expf(x[0] - block_best) + (double)expf(x[1] - block_best));
    if (lane == 0) red_sum[warp] = e;
  }
  __syncthreads();
  if (whole && t == 0) {
    double e = 0.0;
    for (int w = 0; w < NT / 32; ++w) e += red_sum[w];
    sums[2 * blockIdx.x] = block_best, sums[2 * blockIdx.x + 1] = e;
  }
  if (!plain) {  // (a plain draw needs no candidates)
#pragma unroll
    for (int j = 0; j < PER_BLOCK / NT; ++j) {
      const int g = base + t + j * NT;
      if (g < V && x[j] >= floor_v) {
        const int at = atomicAdd(&kept, 1);
        v[at] = x[j], id[at] = g;
      }
    }
    __syncthreads();
    sort_first(v, id, kept, TOP);  // (a block with fewer than TOP tokens: pads)
    if (t < TOP) candidates[blockIdx.x * TOP + t] = make_float2(v[t], __int_as_float(id[t]));
  }
  if (t == 0) kept = 0;  // (every thread read it before sort_first's barriers)
  if (!last_block_done(count, gridDim.x)) return;  // the candidates and sums, then phase 2
  const uint64_t seed = (uint64_t)params[4] | ((uint64_t)params[5] << 32);
  const double u = uniform(seed, (uint64_t)(start[0] + last[0]));
  if (plain) {  // NaN (argmax), or no finite best (-inf everywhere, or +inf): the host decides
    const float M = block_max(t < gridDim.x ? (float)__ldcg(sums + 2 * t) : -INFINITY, red);
    if (argmax[0] >= V || !(M > -INFINITY && M < INFINITY)) {
      if (t == 0) out[0] = argmax[0], out[1] = 1;
    } else {
      draw_whole(logits, temperature, M, sums, u, V, seen, out);
    }
    return;
  }

  // Phase 2: m, the largest of the blocks' TOP-th values, bounds every token outside the
  // candidates; the candidates above it, sorted. The top-k set is theirs when there are at
  // least k of them (the k-th is then above m); else the host draws.
  const int n = gridDim.x * TOP;
  const float m = block_max(t < gridDim.x ? __ldcg(&candidates[t * TOP + TOP - 1].x) : -INFINITY, red);
  for (int i = t; i < n; i += NT) {
    const float2 c = __ldcg(candidates + i);
    if (c.x > m) {
      const int at = atomicAdd(&kept, 1);
      v[at] = c.x, id[at] = __float_as_int(c.y);
    }
  }
  __syncthreads();
  const int above = kept;
  // Top-k off: the vocabulary's best M and sum of exp(x - M), from the blocks'.
  const float M = whole ? block_max(t < gridDim.x ? (float)__ldcg(sums + 2 * t) : -INFINITY, red) : 0.f;
  sort_first(v, id, above, 2);
  __shared__ int ns_s, status_s;
  if (t == 0) {
    const int k = params[1];
    const float top_p = __uint_as_float(params[2]), min_p = __uint_as_float(params[3]);
    int status = argmax[0] >= V, ns;  // the survivors: v[0 .. ns)
    if (!whole) {  // top-k, ties with the k-th included
      status |= above < k;
      const float kth = v[min(k, max(above, 1)) - 1];
      ns = min(k, above);
      while (ns < above && v[ns] >= kth) ++ns;
    } else {
      double z = 0.0;
      for (int b = 0; b < gridDim.x; ++b) {
        z += __ldcg(sums + 2 * b + 1) * exp(__ldcg(sums + 2 * b) - (double)M);
      }
      ns = 0;
      if (top_p < 1.f) {  // the nucleus: kept while the mass above it is below top_p
        double head = 0.0;
        while (ns < above && head < top_p) head += exp((double)v[ns] - M) / z, ++ns;
        status |= head < top_p;  // it reaches past the candidates
        while (ns > 0 && ns < above && v[ns] == v[ns - 1]) ++ns;  // ties with the last kept
      } else {  // min-p alone: every token outside the candidates must fall below the cut
        status |= !(expf(m - M) < min_p);
        while (ns < above && expf(v[ns] - M) >= min_p) ++ns;
      }
      status |= ns == 0;
    }
    if (!status && !whole && top_p < 1.f) {  // sampling._top_p: the ascending prefix of cumulative mass <= 1 - top_p goes
      float z = 0.f;
      for (int i = 0; i < ns; ++i) z += expf(v[i] - v[0]);
      float cum = 0.f;
      int removed = 0;
      for (int i = ns - 1; i >= 0; --i) {
        cum += expf(v[i] - v[0]) / z;
        if (!(cum <= 1.f - top_p)) break;
        ++removed;
      }
      const float threshold = v[ns - 1 - min(removed, ns - 1)];
      while (ns > 1 && v[ns - 1] < threshold) --ns;
    }
    if (!status && min_p > 0.f && !(whole && top_p >= 1.f)) {  // sampling._min_p: probability >= min_p * the top one's
      float z = 0.f;
      for (int i = 0; i < ns; ++i) z += expf(v[i] - v[0]);
      const float cut = min_p * (1.f / z);
      while (ns > 1 && expf(v[ns - 1] - v[0]) / z < cut) --ns;
    }
    ns_s = ns, status_s = status;
  }
  __syncthreads();
  const int ns = ns_s;
  if (status_s) {
    if (t == 0) out[0] = argmax[0], out[1] = 1;  // a stand-in the host replaces
    return;
  }
  if (greedy) {  // the candidates are sorted by value down, then id up: the first is np.argmax's
    if (t == 0) out[0] = id[0], out[1] = 0;
    return;
  }
  // The survivors in id order (each one's rank among them), with their weights exp(v - top).
  for (int i = t; i < ns; i += NT) {
    int rank = 0;
    for (int j = 0; j < ns; ++j) rank += id[j] < id[i];
    sid[rank] = id[i], sw[rank] = expf(v[i] - v[0]);
  }
  __syncthreads();
  if (t == 0) {  // inverse CDF, in double as the host's
    double total = 0.0;
    for (int r = 0; r < ns; ++r) total += sw[r];
    const double target = u * total;
    double cum = 0.0;
    int r = 0;
    while (r < ns - 1 && !((cum += sw[r]) > target)) ++r;
    while (r > 0 && sw[r] == 0.f) --r;  // a float edge (target == total) past the last weight
    out[0] = sid[r], out[1] = 0;
  }
}
