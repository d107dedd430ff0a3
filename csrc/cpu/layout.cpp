// The CPU layout of 4-bit weight codes (docs/ops.md, spike_linear, "CPU layout"), made from GPTQ's
// qweight and back. spikeops.GPTQWeight holds it in place of qweight for the layers layout_group
// (kernel_args.h) admits; the dot-product kernels (cpu/int_layout.cpp), the portable kernel
// (cpu/linear.cpp, LayoutRows) and layout_code (spike_math.h) read it:
//   packed[t, b, 4 * n + j]: byte of column 16t + n, channels 8b + j (low nibble) and 8b + 4 + j
//                            (high nibble), j = 0..3; zero past K and N;
//   code_sums[g, n]        : sum of the codes q of group g, column n (uint16: kMaxLayoutGroup).
// A 64-byte row is one zmm of 16 columns x 8 channels: masking its low nibbles gives the codes of
// channels 8b..8b+3 as four bytes per column, shifting its high nibbles those of 8b+4..8b+7.
//
// qweight's row b holds the same 8 channels of each column, channel 8b + i in bits 4i..4i+3, so a
// layout byte is two nibbles of one qweight word, and the conversions are bit shuffles.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kTileCols = 16;  // columns per layout row

// The bits of qweight's row b that hold channels below K: the fields past K in the last row are
// padding, which the layout holds as zeros.
uint32_t channel_mask(const LayoutArgs& a, int64_t b) {
  const int64_t valid = a.K - 8 * b;
  return valid >= 8 ? ~0u : (1u << (4 * valid)) - 1u;
}

}  // namespace

void cpu_layout(const LayoutArgs& a) {
  const int64_t KB = (a.K + 7) / 8, NT = (a.N + kTileCols - 1) / kTileCols;
  at::parallel_for(0, NT, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t b = 0; b < KB; ++b) {
        uint8_t* row = a.packed + (t * KB + b) * 64;
        const uint32_t mask = channel_mask(a, b);
        for (int64_t c = 0; c < kTileCols; ++c) {
          const int64_t n = t * kTileCols + c;
          const uint32_t word = n < a.N ? static_cast<uint32_t>(a.qweight[b * a.N + n]) & mask : 0u;
          for (int j = 0; j < 4; ++j)
            row[4 * c + j] = static_cast<uint8_t>(((word >> (4 * j)) & 15u) |
                                                  (((word >> (16 + 4 * j)) & 15u) << 4));
        }
      }
    }
  });
  // Sums per group in int32 (at most kMaxLayoutGroup * 15), then stored as uint16; a task's
  // columns are walked row by row of qweight, which reads it in order.
  constexpr int64_t kSumCols = 256;
  at::parallel_for(0, (a.N + kSumCols - 1) / kSumCols, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> sums(a.G * kSumCols);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kSumCols, cols = std::min(kSumCols, a.N - n0);
      std::fill(sums.begin(), sums.end(), 0);
      for (int64_t k = 0; k < a.K; ++k) {
        const int32_t* words = a.qweight + (k / 8) * a.N + n0;
        int32_t* s = sums.data() + (k / a.group_size) * kSumCols;
        for (int64_t c = 0; c < cols; ++c)
          s[c] += (static_cast<uint32_t>(words[c]) >> (4 * (k % 8))) & 15u;
      }
      for (int64_t g = 0; g < a.G; ++g)
        for (int64_t c = 0; c < cols; ++c)
          a.code_sums[g * a.N + n0 + c] = static_cast<uint16_t>(sums[g * kSumCols + c]);
    }
  });
}

void cpu_layout_qweight(const LayoutArgs& a) {
  const int64_t KB = (a.K + 7) / 8;
  at::parallel_for(0, KB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t mask = channel_mask(a, b);
      for (int64_t n = 0; n < a.N; ++n) {
        const uint8_t* bytes = a.packed + ((n / kTileCols) * KB + b) * 64 + 4 * (n % kTileCols);
        uint32_t word = 0;
        for (int j = 0; j < 4; ++j)
          word |= (static_cast<uint32_t>(bytes[j] & 15u) << (4 * j)) |
                  (static_cast<uint32_t>(bytes[j] >> 4) << (16 + 4 * j));
        a.qweight[b * a.N + n] = static_cast<int32_t>(word & mask);
      }
    }
  });
}

}  // namespace cpu
}  // namespace spikeops
