// CUDA kernel of hadamard (docs/ops.md): the butterflies and the one rounding of
// csrc/hadamard_math.h, as the CPU kernel (csrc/cpu/hadamard.cpp) computes them, so both give the
// same bits. A thread block takes a tile of whole blocks of n elements into shared memory as
// float64 and runs the log2(n) stages there, one __syncthreads apart.
#include "cuda/device.cuh"
#include "hadamard_math.h"

namespace spikeops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kTile = 512;  // elements of a tile at least: 2 pairs per thread and stage

// The element as float64 (exact) and the one rounding of a float64 sum back to its type.
template <typename T>
__device__ __forceinline__ double widen(T v) {
  return dev::to_float(v);
}
template <>
__device__ __forceinline__ double widen<double>(double v) {
  return v;
}
template <typename T>
__device__ __forceinline__ T round_once(double v) {
  return dev::from_float<T>(to_odd_float(v));
}
template <>
__device__ __forceinline__ float round_once<float>(double v) {
  return static_cast<float>(v);  // to nearest even
}
template <>
__device__ __forceinline__ double round_once<double>(double v) {
  return v;
}

// torch's `y * scale`: in float32 for the 16- and 32-bit types, in float64 for double.
template <typename T>
__device__ __forceinline__ T times(T y, double scale) {
  return dev::from_float<T>(dev::to_float(y) * static_cast<float>(scale));
}
template <>
__device__ __forceinline__ double times<double>(double y, double scale) {
  return y * scale;
}

// Tiles of `tile` elements (a multiple of n; the last one may hold fewer whole blocks), one per
// thread block in a grid-stride loop. Stage h pairs element j with j + h inside each group of
// 2h, which for h < n is the pairing of every block of the tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) hadamard_kernel(const HadamardArgs a, int64_t tile) {
  extern __shared__ double v[];
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t total = a.blocks * a.n;
  for (int64_t start = int64_t(blockIdx.x) * tile; start < total;
       start += int64_t(gridDim.x) * tile) {
    const int len = static_cast<int>(min(tile, total - start));
    for (int i = threadIdx.x; i < len; i += kThreads) {
      v[i] = widen(x[start + i]);
    }
    __syncthreads();
    for (int h = 1; h < a.n; h *= 2) {
      for (int p = threadIdx.x; p < len / 2; p += kThreads) {
        const int j = (p / h) * 2 * h + p % h;
        butterfly(v[j], v[j + h]);
      }
      __syncthreads();
    }
    for (int i = threadIdx.x; i < len; i += kThreads) {
      const T y = round_once<T>(v[i]);
      // Times 1 changes no value, so that multiply is skipped (docs/ops.md).
      out[start + i] = a.scale == 1.0 ? y : times(y, a.scale);
    }
    __syncthreads();  // the next tile overwrites v
  }
}

}  // namespace

void launch_hadamard(const HadamardArgs& a, cudaStream_t stream) {
  const int64_t tile = a.n > kTile ? a.n : kTile;  // n <= kHadamardCudaMaxN (host check)
  const int64_t total = a.blocks * a.n;
  const size_t bytes = static_cast<size_t>(tile) * sizeof(double);
  dev::dispatch_float(a.type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (bytes > 48 * 1024) {  // the default limit of dynamic shared memory
      cudaFuncSetAttribute(hadamard_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
    }
    hadamard_kernel<T><<<dev::grid_size((total + tile - 1) / tile), kThreads, bytes, stream>>>(
        a, tile);
  });
}

}  // namespace spikeops
