// Device helpers shared by the kernels of csrc/cuda/*.cu: element conversions, word masks, grid sizes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "cuda/launchers.h"
#include "spike_math.h"

namespace spikeops {
namespace dev {

constexpr unsigned kFullMask = 0xffffffffu;

// Blocks of a grid-stride launch: every kernel loops over its work units, so any count works;
// the cap keeps gridDim.x legal for any size.
inline unsigned grid_size(int64_t units) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(units, int64_t(1) << 30)));
}

// The NaN that the CPU kernels write (std::numeric_limits<float>::quiet_NaN()).
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// Input element -> float32; double rounds to nearest like static_cast<float> on the CPU.
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }

// float32 -> output element, round to nearest even (what c10::Half / c10::BFloat16 do).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls f(Tag<T>{}) with the C++ element type T of t (host side, to pick a kernel template):
// dispatch_float for inputs, dispatch_out_float for outputs, which are never float64.
template <typename T>
struct Tag {
  using type = T;
};
template <typename F>
void dispatch_out_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::kHalf: f(Tag<__half>{}); break;
    case FloatType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default: f(Tag<float>{}); break;  // kFloat
  }
}
template <typename F>
void dispatch_float(FloatType t, F&& f) {
  if (t == FloatType::kDouble) {
    f(Tag<double>{});
  } else {
    dispatch_out_float(t, f);
  }
}

// Bits of word w that name channels k < K (words past the end give 0).
__device__ __forceinline__ uint32_t channel_bits(int64_t w, int64_t K) {
  const int64_t left = K - 32 * w;
  return left >= 32 ? kFullMask : left <= 0 ? 0u : (1u << left) - 1u;
}

// Bits of word w that name channels in [lo, hi).
__device__ __forceinline__ uint32_t range_bits(int64_t w, int64_t lo, int64_t hi) {
  const int64_t base = 32 * w;
  const int64_t a = lo > base ? lo - base : 0, b = hi - base < 32 ? hi - base : 32;
  if (a >= b) return 0u;
  const uint32_t upto_b = b == 32 ? kFullMask : (1u << b) - 1u;
  return upto_b & ~((1u << a) - 1u);
}

// Programmatic dependent launch (sm_90 and later; docs/performance.md, "GPU status"). A kernel
// launched with it (launch_spike_linear_decode) may start while the previous kernel of its stream
// still runs; until it returns from wait_for_previous_grid it must neither read what that kernel
// may write nor write what it may read, so before the wait it only prefetches into L2, which
// holds no stale copy to read later (every write reaches L2). wait_for_previous_grid returns once
// the previous grid has completed and its writes are visible (griddepcontrol.wait), wherever
// that grid called allow_dependents and whether it called it at all; allow_dependents only lets
// the next grid, if launched that way, begin to start (griddepcontrol.launch_dependents: it
// takes effect once every block of this grid has called it or exited, and implies no
// visibility). Both do nothing for a kernel launched without it, and compile to nothing below
// sm_90, where kGridDependency is false.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kGridDependency = true;
#else
constexpr bool kGridDependency = false;
#endif

__device__ __forceinline__ void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Brings the line of p into L2 without a register result (a hint: no value is read).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" : : "l"(p));
}

}  // namespace dev
}  // namespace spikeops
