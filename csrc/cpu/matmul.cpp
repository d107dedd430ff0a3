// CPU kernel of spike_matmul (docs/ops.md): the plane-pair popcounts of csrc/matmul_math.h for
// every (query row, key) pair, tasks of one query row and a block of keys.
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "cpu/isa.h"
#include "cpu/kernels.h"
#include "matmul_math.h"

#if SPIKEOPS_X86_INTRINSICS
#include <immintrin.h>
#endif

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


#if SPIKEOPS_X86_INTRINSICS
// One range on both sides, zero points or not (every attention product of Runner: signed
// queries against signed or unsigned keys, the unsigned probabilities against the value codes),
// 8 keys at once in 64-channel words: a plane word of 8 consecutive B rows is one gather, and
// each plane pair costs two AND and two VPOPCNTQ for the 8 keys. The same integers as
// matmul_row_pair: with R = 1 the zero points' terms are -zb * S_a - za * S_b + za * zb * K,
// S the sum of s*Q over the K channels (docs/ops.md, spike_matmul); S_a is one sum per A row.
// Word w of 8 B rows (lanes) at 32-bit offsets rows from base. A row's last word is half a 64-bit
// word when W is odd (half): 32-bit gathers then, no read past the row.
SPIKEOPS_TARGET_VPOPCNTDQ inline __m512i gather_words(const uint32_t* base, __m512i rows,
                                                      __mmask8 lanes, bool half) {
  if (half)
    return _mm512_cvtepu32_epi64(
        _mm512_mask_i64gather_epi32(_mm256_setzero_si256(), lanes, rows, base, 4));
  return _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), lanes, rows, base, 4);
}

template <typename T>
SPIKEOPS_TARGET_VPOPCNTDQ void matmul_rows_vpopcntdq(const MatmulArgs& a, int64_t begin,
                                                     int64_t end) {
  const SpikeFields& A = a.a;
  const SpikeFields& B = a.b;
  T* out = static_cast<T*>(a.out);
  const int64_t blocks = (a.N + kKeyBlock - 1) / kKeyBlock;
  const int64_t words64 = (A.W + 1) / 2;
  std::vector<uint64_t> aw((A.P + 2) * words64);  // A's planes, its sign, the valid channels
  for (int64_t task = begin; task < end; ++task) {
    const int64_t row = task / blocks;  // (batch n, head h, query i), the row of A
    const int64_t i = row % a.Ma, h = (row / a.Ma) % a.heads, n = row / (a.Ma * a.heads);
    const int64_t j0 = (task % blocks) * kKeyBlock;
    const int64_t j1 = j0 + kKeyBlock < a.N ? j0 + kKeyBlock : a.N;
    int64_t sum_a = 0;  // S_a
    for (int64_t w = 0; w < words64; ++w) {
      const auto word = [&](const uint32_t* src) {
        return src ? uint64_t(src[2 * w]) | (2 * w + 1 < A.W ? uint64_t(src[2 * w + 1]) << 32 : 0u)
                   : uint64_t(0);
      };
      uint64_t valid = matmul_valid_bits(2 * w, a.K);
      if (2 * w + 1 < A.W) valid |= uint64_t(matmul_valid_bits(2 * w + 1, a.K)) << 32;
      const uint64_t sign = word(A.sign ? A.sign + row * A.W : nullptr);
      aw[A.P * words64 + w] = sign;
      aw[(A.P + 1) * words64 + w] = valid;
      for (int64_t p = 0; p < A.P; ++p) {
        const uint64_t x = word(A.planes + (p * A.M + row) * A.W) & valid;
        aw[p * words64 + w] = x;
        sum_a += int64_t(__builtin_popcountll(x) - 2 * __builtin_popcountll(x & sign)) << p;
      }
    }
    const int64_t za = A.zero ? A.zero[row] : 0;
    const int64_t channels = a.K;
    for (int64_t jb = j0; jb < j1; jb += 8) {
      const int64_t count = j1 - jb < 8 ? j1 - jb : 8;
      const __mmask8 lanes = static_cast<__mmask8>((1u << count) - 1u);
      const int64_t ib0 = matmul_b_row(a, n, h, jb);  // the 8 keys' rows are consecutive
      const long long stride = B.W;  // 32-bit words from one row to the next
      __m512i rows = _mm512_set_epi64(7 * stride, 6 * stride, 5 * stride, 4 * stride,
                                      3 * stride, 2 * stride, stride, 0);
      __m512i d = _mm512_setzero_si512(), sum_b = _mm512_setzero_si512();
      for (int64_t w = 0; w < words64; ++w, rows = _mm512_add_epi64(rows, _mm512_set1_epi64(2))) {
        const bool half = 2 * w + 1 == B.W;
        const __m512i valid = _mm512_set1_epi64(static_cast<long long>(aw[(A.P + 1) * words64 + w]));
        const __m512i sb = B.sign ? gather_words(B.sign + ib0 * B.W, rows, lanes, half) : _mm512_setzero_si512();
        const __m512i neg = _mm512_xor_si512(sb, _mm512_set1_epi64(
            static_cast<long long>(aw[A.P * words64 + w])));
        __m512i bw[kMaxPlanes];
        for (int64_t p = 0; p < B.P; ++p) {
          bw[p] = _mm512_and_si512(
              gather_words(B.planes + (p * B.M + ib0) * B.W, rows, lanes, half), valid);
          if (za) {
            const __m512i c = _mm512_sub_epi64(
                _mm512_popcnt_epi64(bw[p]),
                _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_and_si512(bw[p], sb)), 1));
            sum_b = _mm512_add_epi64(sum_b, _mm512_sll_epi64(c, _mm_cvtsi64_si128(p)));
          }
        }
        for (int64_t pa = 0; pa < A.P; ++pa) {
          const uint64_t xa = aw[pa * words64 + w];
          if (!xa) continue;
          const __m512i x = _mm512_set1_epi64(static_cast<long long>(xa));
          __m512i part = _mm512_setzero_si512();
          for (int64_t pb = 0; pb < B.P; ++pb) {
            const __m512i y = _mm512_and_si512(x, bw[pb]);
            const __m512i c = _mm512_sub_epi64(
                _mm512_popcnt_epi64(y),
                _mm512_slli_epi64(_mm512_popcnt_epi64(_mm512_and_si512(y, neg)), 1));
            part = _mm512_add_epi64(part, _mm512_sll_epi64(c, _mm_cvtsi64_si128(pb)));
          }
          d = _mm512_add_epi64(d, _mm512_sll_epi64(part, _mm_cvtsi64_si128(pa)));
        }
      }
      alignas(64) int64_t dk[8], sk[8];
      _mm512_store_si512(dk, d);
      _mm512_store_si512(sk, sum_b);
      for (int64_t k = 0; k < count; ++k) {
        const int64_t j = jb + k, ib = ib0 + k;
        if (matmul_masked(a, i, j)) {
          out[row * a.N + j] = static_cast<T>(-std::numeric_limits<float>::infinity());
          continue;
        }
        const int64_t zb = B.zero ? B.zero[ib] : 0;
        int64_t D[4] = {dk[k] - zb * sum_a - za * sk[k] + za * zb * channels, 0, 0, 0};
        out[row * a.N + j] = static_cast<T>(matmul_epilogue(a, row, ib, D));
      }
    }
  }
}
#endif

}  // namespace

void spike_matmul(const MatmulArgs& a) {
  const int64_t tasks = a.batch * a.heads * a.Ma * ((a.N + kKeyBlock - 1) / kKeyBlock);
#if SPIKEOPS_X86_INTRINSICS
  const bool popcnt = has_popcnt();
  const bool vector = a.a.R == 1 && a.b.R == 1 && has_vpopcntdq();
#endif
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
#if SPIKEOPS_X86_INTRINSICS
      if (vector) return matmul_rows_vpopcntdq<T>(a, begin, end);
      if (popcnt) return matmul_rows_popcnt<T>(a, begin, end);
#endif
      matmul_rows<T>(a, begin, end);
    });
  });
}

}  // namespace cpu
}  // namespace spikeops
