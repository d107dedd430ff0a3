// CUDA kernel of spike_matmul: one thread per output (query row, key), the plane-pair popcounts
// (__popc) and the float64 epilogue of csrc/matmul_math.h, the integers and the rounding of the
// CPU kernel (csrc/cpu/matmul.cpp). A zero point beyond +-kZeroLimit, which the host cannot
// check without synchronizing, makes the outputs of its token NaN (csrc/cuda/launchers.h).
#include "cuda/device.cuh"
#include "matmul_math.h"

namespace spikeops {
namespace {

constexpr int kThreads = 128;  // keys fastest: the lanes of a warp share the query's words

__device__ __forceinline__ bool zeros_in_range(const SpikeFields& s, int64_t row) {
  if (!s.zero) return true;
  for (int64_t r = 0; r < s.R; ++r)
    if (!zero_in_range(__ldg(s.zero + row * s.R + r))) return false;
  return true;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spike_matmul_kernel(const MatmulArgs a) {
  const int64_t total = a.batch * a.heads * a.Ma * a.N;
  for (int64_t o = int64_t(blockIdx.x) * kThreads + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * kThreads) {
    const int64_t j = o % a.N, row = o / a.N;  // row: (batch n, head h, query i) of A
    const int64_t i = row % a.Ma, h = (row / a.Ma) % a.heads, n = row / (a.Ma * a.heads);
    float v;
    if (matmul_masked(a, i, j)) {
      v = -__int_as_float(0x7f800000);
    } else {
      const int64_t ib = matmul_b_row(a, n, h, j);
      if (zeros_in_range(a.a, row) && zeros_in_range(a.b, ib)) {
        int64_t D[4] = {0, 0, 0, 0};
        matmul_row_pair(a, row, ib, D);
        v = matmul_epilogue(a, row, ib, D);
      } else {
        v = dev::quiet_nan();
      }
    }
    static_cast<T*>(a.out)[o] = dev::from_float<T>(v);
  }
}

// channel_major_write: one thread per written word (plane, row, word).
__global__ void __launch_bounds__(kThreads) channel_major_kernel(const ChannelMajorArgs a) {
  const int64_t w0 = a.start / 32, span = (a.start + a.T + 31) / 32 - w0;
  const int64_t rows = a.G * a.K, total = (a.P + (a.sign != nullptr)) * rows * span;
  for (int64_t o = int64_t(blockIdx.x) * kThreads + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * kThreads) {
    const int64_t w = w0 + o % span, pr = o / span;
    a.out[pr * a.words + w] = channel_major_word(a, pr / rows, pr % rows, w);
  }
}

}  // namespace

void launch_spike_matmul(const MatmulArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.heads * a.Ma * a.N;
  dev::dispatch_out_float(a.out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    spike_matmul_kernel<T><<<dev::grid_size((total + kThreads - 1) / kThreads), kThreads, 0,
                             stream>>>(a);
  });
}

void launch_channel_major_write(const ChannelMajorArgs& a, cudaStream_t stream) {
  const int64_t span = (a.start + a.T + 31) / 32 - a.start / 32;
  const int64_t total = (a.P + (a.sign != nullptr)) * a.G * a.K * span;
  channel_major_kernel<<<dev::grid_size((total + kThreads - 1) / kThreads), kThreads, 0,
                         stream>>>(a);
}

}  // namespace spikeops

