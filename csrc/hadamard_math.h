// Element arithmetic of the hadamard op (docs/ops.md, hadamard), shared by its CPU and CUDA
// kernels: the butterfly, and the one rounding of a float64 sum to the input's type. Plain C++ on
// top of spike_math.h, compiled by nvcc and the host compiler alike.
#pragma once

#include <cmath>
#include <cstdint>

#include "spike_math.h"

namespace spikeops {

// The largest n the CUDA kernel takes: a block of float64 values in one thread block's shared
// memory (128 KB, within what sm_80 and sm_90 allow). The CPU kernel takes any n.
constexpr int64_t kHadamardCudaMaxN = int64_t(1) << 14;

// One butterfly of stage h: elements j and j + h become their sum and difference. The stages run
// h = 1, 2, 4, ..., n / 2; every kernel computes exactly these sums (fusing stages or not), so
// that the float64 values, rounded or not, are the same on every device.
SPIKE_HD void butterfly(double& a, double& b) {
  const double u = a, w = b;
  a = u + w;
  b = u - w;
}

// v rounded to float32 "to odd": toward zero, with the last significand bit set when that drops
// anything. A float32 value made so, rounded to nearest even to float16 or bfloat16 (11 and 8
// significand bits, at least 2 fewer than float32's 24, and a range within float32's), is v
// rounded once to that type, where double -> float -> 16 bits rounded to nearest twice is not
// (a sum just above a midpoint of the 16-bit grid lands on it as float32, then rounds to even).
// NaN and the infinities come through as they are; finite v beyond float32 give its largest
// finite value, which rounds to infinity in both 16-bit types.
SPIKE_HD float to_odd_float(double v) {
  const float f = static_cast<float>(v);  // nearest even
  if (static_cast<double>(f) == v || v != v) return f;  // exact, or NaN
  uint32_t u = float_bits(f);
  if (fabs(static_cast<double>(f)) > fabs(v)) --u;  // rounded away from zero: step back
  return bits_float(u | 1u);
}

}  // namespace spikeops
