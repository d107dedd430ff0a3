// CUDA kernels of gif_encode, spike_decode, spike_counts and spike_stats. The CPU kernels of
// csrc/cpu/encode.cpp define the results bit for bit; every element operation below is the
// spike_math.h function the CPU uses, on the same float32 values, in the same order.
#include <cmath>

#include "device.cuh"

namespace spikeops {
namespace {

using dev::kFullMask;

// gif_encode: one block per token row, one warp per 32-channel word.
constexpr int kEncodeThreads = 256;
constexpr int kEncodeWarps = kEncodeThreads / 32;
// Lanes that store the sign and hi words of a word; lanes 0 .. P - 1 store the planes.
constexpr int kSignLane = kMaxPlanes, kHiLane = kMaxPlanes + 1;
static_assert(kHiLane < 32, "one lane per stored word");

struct EncodeShared {
  // absmean: each warp's ExactSum buckets. Per step a warp adds one pre-summed integer per
  // distinct exponent (one writer per bucket), so the totals are exact and order independent.
  int64_t bucket[kEncodeWarps][ExactSum::kBuckets];
  ExactSum sum;
  float mn[kEncodeWarps], mx[kEncodeWarps], amax[kEncodeWarps];
  int finite[kEncodeWarps];
  RangeQuant range[2];
  int usable;  // the row is finite and, in static mode, its scale and zero are valid
};

// The quantizers of one row from its statistics (spike_math.h, as on the CPU). Static scales and
// zeros are device data the host could not check: an invalid one makes the row unusable.
__device__ void row_ranges(const EncodeArgs& a, int64_t m, float mn, float mx, float amax,
                           const ExactSum& sum, EncodeShared& sh) {
  const bool is_static = a.mode == Mode::kStatic;
  const float s = is_static ? a.static_scale[m] : 0.f;
  const int32_t z = is_static && !a.is_signed ? a.static_zero[m] : 0;
  if (is_static && !(isfinite(s) && s > 0.f && zero_in_range(z))) {
    sh.usable = 0;
    return;
  }
  row_quantizers(a, mn, mx, amax, a.mode == Mode::kAbsMean ? exact_mean(sum, a.K) : 0.f, s, z,
                 sh.range);
}

// Row statistics (min, max, max|x|, exact sum of |x|, finiteness) -> sh.range, sh.usable, and
// the row's scale and zero outputs. Ends with a block barrier.
template <typename T>
__device__ void row_statistics(const EncodeArgs& a, const T* x, int64_t m, EncodeShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool want_sum = a.mode == Mode::kAbsMean;
  if (want_sum)
    for (int e = lane; e < ExactSum::kBuckets; e += 32) sh.bucket[warp][e] = 0;
  __syncwarp();
  float mn = INFINITY, mx = -INFINITY, amax = 0.f;
  bool finite = true;
  for (int64_t k0 = 32 * warp; k0 < a.K; k0 += kEncodeThreads) {  // warp-uniform trip count
    const int64_t k = k0 + lane;
    const bool in = k < a.K;
    const float v = in ? dev::to_float(x[k]) : 0.f;  // 0 adds nothing to the sum
    const bool ok = isfinite(v);
    finite = finite && ok;
    if (in && ok) {
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
      amax = fmaxf(amax, fabsf(v));
    }
    if (want_sum) {
      // Non-finite values go to bucket 0, which ExactSum never reads (and the row is NaN).
      int e = 0;
      int64_t mant = 0;
      if (ok) ExactSum::split(v, &e, &mant);
      const unsigned same = __match_any_sync(kFullMask, e);
      const unsigned total = __reduce_add_sync(same, static_cast<unsigned>(mant));  // < 2^29
      if (lane == __ffs(same) - 1) sh.bucket[warp][e] += total;
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
    amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, off));
  }
  finite = __all_sync(kFullMask, finite);
  if (lane == 0) {
    sh.mn[warp] = mn;
    sh.mx[warp] = mx;
    sh.amax[warp] = amax;
    sh.finite[warp] = finite;
  }
  __syncthreads();
  if (want_sum) {
    for (int e = threadIdx.x; e < ExactSum::kBuckets; e += kEncodeThreads) {
      int64_t s = 0;
      for (int w = 0; w < kEncodeWarps; ++w) s += sh.bucket[w][e];
      sh.sum.bucket[e] = s;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    // min and max of finite floats are exact whatever the order; only the sign of a zero
    // extreme can differ from the CPU's, and minmax_quant gives the same scale and codes for it.
    bool all_finite = true;
    for (int w = 0; w < kEncodeWarps; ++w) {
      mn = fminf(mn, sh.mn[w]);
      mx = fmaxf(mx, sh.mx[w]);
      amax = fmaxf(amax, sh.amax[w]);
      all_finite = all_finite && sh.finite[w];
    }
    sh.usable = all_finite;
    if (all_finite) row_ranges(a, m, mn, mx, amax, sh.sum, sh);
    for (int64_t r = 0; r < a.R; ++r) {
      float step = dev::quiet_nan();
      int32_t zero = 0;
      if (sh.usable) {
        step = stored_scale(a.mode, sh.range[r]);
        zero = static_cast<int32_t>(sh.range[r].zero);
      }
      a.scale[m * a.R + r] = step;
      if (a.zero) a.zero[m * a.R + r] = zero;
    }
  }
  __syncthreads();
}

// Codes of one row, one warp per word: lane j encodes channel 32w + j, ballots assemble words.
template <typename T>
__device__ void encode_words(const EncodeArgs& a, const T* x, int64_t m, const EncodeShared& sh) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t w = warp; w < a.W; w += kEncodeWarps) {
    const int64_t k = 32 * w + lane;
    const bool in = k < a.K;
    int r = (a.salient && in && a.salient[k]) ? 1 : 0;
    int32_t q = 0;
    bool negative = false;
    if (sh.usable && in)  // an unusable row keeps planes and sign 0 and hi = salient bits
      q = element_code(a, dev::to_float(x[k]), sh.range, &r, &negative);
    uint32_t mine = 0;
    for (int64_t p = 0; p < a.P; ++p) {
      const uint32_t word = __ballot_sync(kFullMask, (q >> p) & 1);
      if (lane == p) mine = word;
    }
    const uint32_t sign_word = __ballot_sync(kFullMask, negative);
    const uint32_t hi_word = __ballot_sync(kFullMask, r != 0);
    const int64_t at = m * a.W + w;
    if (lane < a.P) a.planes[lane * a.M * a.W + at] = mine;
    if (lane == kSignLane && a.sign) a.sign[at] = sign_word;
    if (lane == kHiLane && a.hi) a.hi[at] = hi_word;
  }
}

template <typename T>
__global__ void __launch_bounds__(kEncodeThreads) gif_encode_kernel(const EncodeArgs a) {
  __shared__ EncodeShared sh;
  for (int64_t m = blockIdx.x; m < a.M; m += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + m * a.K;
    row_statistics<T>(a, x, m, sh);
    encode_words<T>(a, x, m, sh);
    __syncthreads();  // sh belongs to the next row
  }
}

// spike_decode: one thread per element; the 32 lanes of a warp share one word.
constexpr int kDecodeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) spike_decode_kernel(const DecodeArgs a) {
  T* out = static_cast<T*>(a.out);
  const int64_t total = a.M * a.W * 32;
  for (int64_t i = int64_t(blockIdx.x) * kDecodeThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kDecodeThreads) {
    const int64_t m = i / (a.W * 32), w = (i / 32) % a.W, k = 32 * w + i % 32;
    if (k >= a.K) continue;
    const int j = static_cast<int>(i % 32);
    const int64_t at = m * a.W + w;
    const int32_t q = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, j),
                                   a.sign ? __ldg(a.sign + at) : 0u, j);
    const int r = a.hi ? range_of(__ldg(a.hi + at), j) : 0;
    const int32_t z = a.zero ? __ldg(a.zero + m * a.R + r) : 0;
    const float v = zero_in_range(z) ? __ldg(a.scale + m * a.R + r) * static_cast<float>(q - z)
                                          : dev::quiet_nan();
    out[m * a.K + k] = dev::from_float<T>(v);
  }
}

// spike_counts: one warp per (plane, token) row of words.
constexpr int kCountThreads = 256;
constexpr int kCountWarps = kCountThreads / 32;

__global__ void __launch_bounds__(kCountThreads) spike_counts_kernel(const CountsArgs a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t* sign = a.negative ? a.sign : nullptr;  // sign masks only for negative=True
  for (int64_t pm = int64_t(blockIdx.x) * kCountWarps + warp; pm < a.P * a.M;
       pm += int64_t(gridDim.x) * kCountWarps) {
    const int64_t m = pm % a.M;
    int64_t c = 0;
    // Every bit of every word counts, as on the CPU (encode never sets bits at k >= K).
    for (int64_t w = lane; w < a.W; w += 32)
      c += __popc(__ldg(a.planes + pm * a.W + w) & (sign ? __ldg(sign + m * a.W + w) : kFullMask));
    for (int off = 16; off > 0; off /= 2) c += __shfl_down_sync(kFullMask, c, off);
    if (lane == 0) a.counts[pm] = c;
  }
}

// spike_stats: a grid-stride loop over the M * W word columns, one thread per column. Each
// count is summed over the warp (__reduce_add_sync), then over the block in shared memory, and
// each block adds its totals to the output once. Integer sums: the result does not depend on the
// order, so it equals the CPU's exactly.
constexpr int kStatsThreads = 256;
constexpr int kMaxStats = 2 * kMaxPlanes + 2;

__global__ void __launch_bounds__(kStatsThreads) spike_stats_kernel(const StatsArgs a) {
  __shared__ unsigned long long block_stats[kMaxStats];
  const int n = static_cast<int>(2 * a.P + 2), lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < n; i += kStatsThreads) block_stats[i] = 0;
  __syncthreads();
  const int64_t columns = a.M * a.W, stride = int64_t(gridDim.x) * kStatsThreads;
  const auto warp_add = [&](int slot, unsigned v) {
    // Every lane reaches this with the same loop trip count (the loop bound is per block).
    v = __reduce_add_sync(kFullMask, v);
    if (lane == 0 && v) atomicAdd(block_stats + slot, static_cast<unsigned long long>(v));
  };
  // Start of this block's columns: the loop runs while any thread of the block has a column,
  // so all lanes of a warp iterate together and out-of-range lanes contribute zeros.
  for (int64_t base = int64_t(blockIdx.x) * kStatsThreads; base < columns; base += stride) {
    const int64_t col = base + threadIdx.x;
    const bool valid = col < columns;
    const uint32_t neg = valid && a.sign ? __ldg(a.sign + col) : 0u;
    uint32_t fired = 0;
    for (int64_t p = 0; p < a.P; ++p) {
      const uint32_t v = valid ? __ldg(a.planes + p * columns + col) : 0u;
      warp_add(static_cast<int>(p), __popc(v));
      if (a.sign) warp_add(static_cast<int>(a.P + p), __popc(v & neg));
      fired |= v;
    }
    warp_add(static_cast<int>(2 * a.P), __popc(fired));
    warp_add(static_cast<int>(2 * a.P + 1), valid && fired == 0 ? 1u : 0u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kStatsThreads)
    if (block_stats[i])
      atomicAdd(reinterpret_cast<unsigned long long*>(a.stats) + i, block_stats[i]);
}

}  // namespace

void launch_gif_encode(const EncodeArgs& a, cudaStream_t stream) {
  dev::dispatch_float(a.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gif_encode_kernel<T><<<dev::grid_size(a.M), kEncodeThreads, 0, stream>>>(a);
  });
}

void launch_spike_decode(const DecodeArgs& a, cudaStream_t stream) {
  const unsigned grid = dev::grid_size((a.M * a.W * 32 + kDecodeThreads - 1) / kDecodeThreads);
  dev::dispatch_out_float(a.out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    spike_decode_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(a);
  });
}

void launch_spike_counts(const CountsArgs& a, cudaStream_t stream) {
  const unsigned grid = dev::grid_size((a.P * a.M + kCountWarps - 1) / kCountWarps);
  spike_counts_kernel<<<grid, kCountThreads, 0, stream>>>(a);
}

void launch_spike_stats(const StatsArgs& a, cudaStream_t stream) {
  // Enough blocks to fill the GPU on large inputs; each block reads P + 1 words per column.
  const int64_t blocks = (a.M * a.W + kStatsThreads - 1) / kStatsThreads;
  spike_stats_kernel<<<dev::grid_size(std::min<int64_t>(blocks, 1024)), kStatsThreads, 0, stream>>>(a);
}

}  // namespace spikeops
