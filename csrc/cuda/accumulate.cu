// CUDA kernel of spike_accumulate: exact signed accumulation of int8 weights by spikes, the
// integers of csrc/cpu/linear.cpp (spike_accumulate_cpu).
//   acc[p, r, m, n] = sum over channels k in range r of s * bit_p(Q[m, k]) * w[k, n]   (per plane)
//   acc[r, m, n]    = sum over p of 2^p * acc[p, r, m, n]
// Only additions and subtractions touch the weights. Each per-plane sum stays in int32
// (|sum| <= K * 128 <= 2^30 for K <= kMaxK); the total is int64.
#include "cuda/device.cuh"

namespace spikeops {
namespace {

constexpr int kThreads = 128;  // one output column per thread; a block shares one token

__global__ void __launch_bounds__(kThreads) spike_accumulate_kernel(const AccumulateArgs a) {
  const int64_t col_tiles = (a.N + kThreads - 1) / kThreads;
  for (int64_t tile = blockIdx.x; tile < a.M * col_tiles; tile += gridDim.x) {
    const int64_t m = tile / col_tiles, n = (tile % col_tiles) * kThreads + threadIdx.x;
    const bool column = n < a.N;
    int32_t part[2][kMaxPlanes] = {};  // [range][plane]
    for (int64_t w = 0; w < a.W; ++w) {
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
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (r >= a.R) break;
      if (a.per_plane) {
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p)
          if (p < a.P) a.out[((p * a.R + r) * a.M + m) * a.N + n] = part[r][p];
      } else {
        int64_t total = 0;
#pragma unroll
        for (int p = 0; p < kMaxPlanes; ++p) total += (int64_t(1) << p) * part[r][p];
        a.out[(r * a.M + m) * a.N + n] = total;
      }
    }
  }
}

}  // namespace

void launch_spike_accumulate(const AccumulateArgs& a, cudaStream_t stream) {
  const int64_t tiles = a.M * ((a.N + kThreads - 1) / kThreads);
  spike_accumulate_kernel<<<dev::grid_size(tiles), kThreads, 0, stream>>>(a);
}

}  // namespace spikeops
