// CPU kernel of spike_matmul (docs/ops.md): the plane-pair popcounts of csrc/matmul_math.h for
// every (query row, key) pair, tasks of one query row and a block of keys.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "matmul_math.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kKeyBlock = 64;  // keys per task: decode has one query row per head

// The common case of attention (one range on both sides, no zero points: signed queries and
// keys) in 64-channel words: the A row's words are read once per task, and each key costs
// P_a * P_b * 2 popcounts per 64 channels. The same integers as matmul_row_pair.
// always_inline: inlined into matmul_rows_popcnt, it is compiled with the popcnt instruction.
__attribute__((always_inline)) inline int64_t plain_row_pair(const uint64_t* aw, const MatmulArgs& a, int64_t ib, int64_t words64) {
  const SpikeFields& B = a.b;
  int64_t d = 0;
  for (int64_t w = 0; w < words64; ++w) {
    const int64_t w32 = 2 * w;  // first 32-bit word of this 64-channel word
    const auto load64 = [&](const uint32_t* row) {
      const uint64_t hi = w32 + 1 < B.W ? row[w32 + 1] : 0u;
      return uint64_t(row[w32]) | (hi << 32);
    };
    uint64_t valid = matmul_valid_bits(w32, a.K);
    if (w32 + 1 < B.W) valid |= uint64_t(matmul_valid_bits(w32 + 1, a.K)) << 32;
    const uint64_t neg =
        (a.a.sign ? aw[a.a.P * words64 + w] : 0u) ^ (B.sign ? load64(B.sign + ib * B.W) : 0u);
    uint64_t bw[kMaxPlanes];
    for (int64_t p = 0; p < B.P; ++p) bw[p] = load64(B.planes + (p * B.M + ib) * B.W);
    for (int64_t pa = 0; pa < a.a.P; ++pa) {
      const uint64_t x = aw[pa * words64 + w] & valid;
      if (!x) continue;
      int64_t part = 0;
      for (int64_t pb = 0; pb < B.P; ++pb) {
        const uint64_t y = x & bw[pb];
        part += int64_t(__builtin_popcountll(y) - 2 * __builtin_popcountll(y & neg)) *
                (int64_t(1) << pb);
      }
      d += part * (int64_t(1) << pa);
    }
  }
  return d;
}

template <typename T>
__attribute__((always_inline)) inline void matmul_rows(const MatmulArgs& a, int64_t begin, int64_t end) {
  T* out = static_cast<T*>(a.out);
  const int64_t blocks = (a.N + kKeyBlock - 1) / kKeyBlock;
  const bool plain = a.a.R == 1 && a.b.R == 1 && !a.a.zero && !a.b.zero;
  const int64_t words64 = (a.a.W + 1) / 2;
  std::vector<uint64_t> words(plain ? (a.a.P + 1) * words64 : 0);  // A's planes, then its sign
  uint64_t* aw = words.data();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / blocks;  // (batch n, head h, query i), the row of A
    const int64_t i = row % a.Ma, h = (row / a.Ma) % a.heads, n = row / (a.Ma * a.heads);
    const int64_t j0 = (task % blocks) * kKeyBlock;
    const int64_t j1 = j0 + kKeyBlock < a.N ? j0 + kKeyBlock : a.N;
    if (plain) {
      for (int64_t p = 0; p <= a.a.P; ++p) {
        const uint32_t* src = p < a.a.P ? a.a.planes + (p * a.a.M + row) * a.a.W
                                        : (a.a.sign ? a.a.sign + row * a.a.W : nullptr);
        for (int64_t w = 0; src && w < words64; ++w)
          aw[p * words64 + w] =
              uint64_t(src[2 * w]) | (2 * w + 1 < a.a.W ? uint64_t(src[2 * w + 1]) << 32 : 0u);
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      if (matmul_masked(a, i, j)) {
        out[row * a.N + j] = static_cast<T>(-std::numeric_limits<float>::infinity());
        continue;
      }
      const int64_t ib = matmul_b_row(a, n, h, j);
      int64_t D[4] = {0, 0, 0, 0};
      if (plain) {
        D[0] = plain_row_pair(aw, a, ib, words64);
      } else {
        matmul_row_pair(a, row, ib, D);
      }
      out[row * a.N + j] = static_cast<T>(matmul_epilogue(a, row, ib, D));
    }
  }
}

#if SPIKEOPS_X86_INTRINSICS
// The same code compiled with the popcnt instruction (the build targets baseline x86-64, where
// __builtin_popcount is a library call): identical integers, a few times faster.
template <typename T>
SPIKEOPS_TARGET_POPCNT void matmul_rows_popcnt(const MatmulArgs& a, int64_t begin, int64_t end) {
  matmul_rows<T>(a, begin, end);
}
#endif

}  // namespace

void spike_matmul(const MatmulArgs& a) {
  const int64_t tasks = a.batch * a.heads * a.Ma * ((a.N + kKeyBlock - 1) / kKeyBlock);
#if SPIKEOPS_X86_INTRINSICS
  const bool popcnt = has_popcnt();
#endif
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
#if SPIKEOPS_X86_INTRINSICS
      if (popcnt) return matmul_rows_popcnt<T>(a, begin, end);
#endif
      matmul_rows<T>(a, begin, end);
    });
  });
}

}  // namespace cpu
}  // namespace spikeops
