// CUDA kernel of spike_accumulate: exact signed accumulation of int8 weights by spikes, the
// integers of csrc/cpu/linear.cpp (spike_accumulate_cpu).
//   acc[p, r, m, n] = sum over channels k in scale column r of s * bit_p(Q[m, k]) * w[k, n]
//   acc[r, m, n]    = sum over p of 2^p * acc[p, r, m, n]
// A scale column is a range (hi), or with activation groups (group > 0) a group: the words
// [r * group / 32, (r + 1) * group / 32) of the token. A block's work item is one token, 128
// columns and, with groups, one group (its words only, range 0, written to column r).
// Only additions and subtractions touch the weights. Each per-plane sum stays in int32
// (|sum| <= K * 128 <= 2^30 for K <= kMaxK); the total is int64.
#include "cuda/device.cuh"

namespace spikeops {
namespace {

constexpr int kThreads = 128;  // one output column per thread; a block shares one token

// Work items per token: one, or one per activation group.
__host__ __device__ inline int64_t groups_of(const AccumulateArgs& a) {
  return a.group > 0 ? a.R : 1;
}

__global__ void __launch_bounds__(kThreads) spike_accumulate_kernel(const AccumulateArgs a) {
  const int64_t col_tiles = (a.N + kThreads - 1) / kThreads, groups = groups_of(a);
  const int64_t group_words = a.group > 0 ? a.group / 32 : a.W;
  for (int64_t item = blockIdx.x; item < a.M * col_tiles * groups; item += gridDim.x) {
    const int64_t u = item % groups, tile = item / groups;
    const int64_t m = tile / col_tiles, n = (tile % col_tiles) * kThreads + threadIdx.x;
    const bool column = n < a.N;
    int32_t part[2][kMaxPlanes] = {};  // [range][plane]
    const int64_t w_end = min(a.W, (u + 1) * group_words);
    for (int64_t w = u * group_words; w < w_end; ++w) {
      const int64_t at = m * a.W + w;
      uint32_t plane[kMaxPlanes];
      uint32_t any = 0;
#pragma unroll
      for (int p = 0; p < kMaxPlanes; ++p) {
        plane[p] = p < a.P ? __ldg(a.planes + p * a.M * a.W + at) : 0u;
        any |= plane[p];
      }
      // Bits of channels k >= K are ignored: they never name a weight row.
      any &= dev::channel_bits(w, a.K);
      if (!any) continue;  // a silent word costs no weight reads
      const uint32_t sign = a.sign ? __ldg(a.sign + at) : 0u;
      const uint32_t hi = a.hi ? __ldg(a.hi + at) : 0u;
      while (any) {  // the channels that spiked in some plane, the same for the whole block
        const int j = __ffs(any) - 1;
        any &= any - 1;
        const int32_t wk = column ? static_cast<int32_t>(__ldg(a.w + (32 * w + j) * a.N + n)) : 0;
        const int32_t signed_w = ((sign >> j) & 1u) ? -wk : wk;
        const bool high = (hi >> j) & 1u;
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) {
          if (!((plane[p] >> j) & 1u)) continue;
          if (high) {
            part[1][p] += signed_w;
          } else {
            part[0][p] += signed_w;
          }
        }
      }
    }
    if (!column) continue;
    const int ranges = a.hi ? 2 : 1;  // activation groups have one range, column u
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (r >= ranges) break;
      const int64_t col = r + u;  // u = 0 without groups
      if (a.per_plane) {
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p)
          if (p < a.P) a.out[((p * a.R + col) * a.M + m) * a.N + n] = part[r][p];
      } else {
        int64_t total = 0;
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) total += (int64_t(1) << p) * part[r][p];
        a.out[(col * a.M + m) * a.N + n] = total;
      }
    }
  }
}

}  // namespace

void launch_spike_accumulate(const AccumulateArgs& a, cudaStream_t stream) {
  const int64_t tiles = a.M * ((a.N + kThreads - 1) / kThreads) * groups_of(a);
  spike_accumulate_kernel<<<dev::grid_size(tiles), kThreads, 0, stream>>>(a);
}

}  // namespace spikeops
