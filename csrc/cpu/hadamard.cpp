// CPU kernel of hadamard (docs/ops.md): each block of n elements is read into float64, goes
// through the log2(n) butterfly stages of hadamard_math.h in place, and is rounded once to its
// type (then scaled). A rotated model's decode step calls it on a few blocks of a few hundred
// channels, where the call costs about what the n log n additions do; so a task is large enough
// that such calls never leave the calling thread.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#include "hadamard_math.h"

namespace spikeops {
namespace cpu {
namespace {

// Elements per task: about 32k * log2(n) float64 additions, some tens of microseconds, so that
// threads only split prefill-sized calls (a decode step's 1,536 channels run serially).
constexpr int64_t kTaskElements = int64_t(1) << 15;

// The butterfly stages h = 1, 2, ..., n / 2 of one block in place. Stages 1 and 2 run together
// on each group of four (the same butterflies on the same values); the wider stages are
// independent pairs of runs of h elements, which the compiler vectorizes.
void transform(double* v, int64_t n) {
  int64_t h = 1;
  if (n >= 4) {
    for (int64_t i = 0; i < n; i += 4) {
      butterfly(v[i], v[i + 1]);
      butterfly(v[i + 2], v[i + 3]);
      butterfly(v[i], v[i + 2]);
      butterfly(v[i + 1], v[i + 3]);
    }
    h = 4;
  }
  for (; h < n; h *= 2) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      double* lo = v + i;
      double* hi = v + i + h;
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) butterfly(lo[j], hi[j]);
    }
  }
}

// The one rounding of a float64 sum to T (hadamard_math.h, to_odd_float, for the 16-bit types).
template <typename T>
T round_once(double v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(v);
  } else {
    return T(to_odd_float(v));
  }
}

template <typename T>
void hadamard_typed(const HadamardArgs& a) {
  // torch's `y * scale`: float32 arithmetic for the 16- and 32-bit types, float64 for double.
  using Compute = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const int64_t n = a.n;
  const Compute scale = static_cast<Compute>(a.scale);
  at::parallel_for(0, a.blocks, std::max<int64_t>(1, kTaskElements / n),
                   [&](int64_t begin, int64_t end) {
    std::vector<double> v(n);
    for (int64_t b = begin; b < end; ++b) {
      const T* xb = x + b * n;
      T* ob = out + b * n;
      for (int64_t i = 0; i < n; ++i) v[i] = static_cast<Compute>(xb[i]);  // exact
      transform(v.data(), n);
      // Times 1 changes no value, so that multiply is skipped (docs/ops.md).
      if (scale == 1) {
        for (int64_t i = 0; i < n; ++i) ob[i] = round_once<T>(v[i]);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          ob[i] = static_cast<T>(static_cast<Compute>(round_once<T>(v[i])) * scale);
        }
      }
    }
  });
}

}  // namespace

void hadamard(const HadamardArgs& a) {
  dispatch_float(a.type, [&](auto tag) { hadamard_typed<decltype(tag)>(a); });
}

}  // namespace cpu
}  // namespace spikeops
