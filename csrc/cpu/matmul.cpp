// CPU kernel of spike_matmul (docs/ops.md): the plane-pair popcounts of csrc/matmul_math.h for
// every (query row, key) pair, tasks of one query row and a block of keys.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
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

#if SPIKEOPS_X86_INTRINSICS
// One range on both sides with at most 8 planes on one side and at most 7 on the other (every
// attention product of Runner: 8-bit signed queries against 4- or 8-bit keys, the unsigned 8-bit
// probabilities against the 4-bit value codes): each operand's codes |s*Q| are unpacked from its
// plane words into bytes, 64 channels to a register (a masked byte add per plane), and the
// integer dot product is VPDPBUSD of the magnitudes of the <= 8-plane side (unsigned bytes) and
// those of the other side (< 128), negated where the two signs differ. The same integers as
// matmul_row_pair: D = sum_k (s_a Q_a)(s_b Q_b) - zb * S_a - za * S_b + za * zb * K, |D| below
// 2^16 * 255 * 127 < 2^31 for K <= kMatmulMaxK. A's rows are unpacked once per call; a task is
// one (batch, kv head) and a block of keys, every query row of the kv head's group against each
// key's bytes, unpacked once.
constexpr int64_t kByteKeyBlock = 16;
// Below this many units in all, the calling thread alone. SmolLM2's decode step at 2,048 keys
// (QK^T about 18 k units, PV about 18 k) gains from both threads of a 2-core machine: decode
// with kv=spike4 against kv=float went from 0.89-0.92x with 32,768 to 0.94-0.96x with 4,096
// (three alternating pairs; docs/performance.md, "Attention on spikes on the CPU").
constexpr int64_t kByteSerialUnits = 4096;
constexpr int64_t kByteMaxABytes = int64_t(8) << 20;  // larger A (a long prefill's PV): popcounts

bool byte_kernel_fits(const MatmulArgs& a) {
  if (a.a.R != 1 || a.b.R != 1) return false;
  const bool fits = (a.b.P <= 8 && a.a.P <= 7) || (a.a.P <= 8 && a.b.P <= 7);
  const int64_t words64 = (a.a.W + 1) / 2;
  return fits && a.a.M * words64 * 64 <= kByteMaxABytes;
}

// A task of the byte kernels and their AVX2 form: one (batch n, kv head g), index nk, and a block
// of keys from j0 (count of them: the last block may be short), B's row of key j0, and row0, the
// first A row of the kv head's group.
struct KeyTask {
  int64_t nk, row0, j0, count, ib0;
};
inline KeyTask key_task(const MatmulArgs& a, int64_t task, int64_t block) {
  const int64_t blocks = (a.N + block - 1) / block;
  const int64_t nk = task / blocks, n = nk / a.kv_heads, g = nk % a.kv_heads;
  const int64_t j0 = (task % blocks) * block;
  return {nk, (n * a.heads + g * (a.heads / a.kv_heads)) * a.Ma, j0,
          std::min<int64_t>(block, a.N - j0), (n * a.kv_heads + g) * a.Lb + j0};
}

// Which words of a task's kv head group hold a nonzero code in some of its rows_g A rows
// (nonzero: [row][w]), remade only when the task's group changes.
class GroupWords {
 public:
  GroupWords(const std::vector<uint8_t>& nonzero, int64_t rows_g, int64_t words)
      : nonzero_(nonzero), rows_g_(rows_g), words_(words), any_(words) {}
  // any[w] for the group nk, whose first A row is row0.
  const uint8_t* of(int64_t nk, int64_t row0) {
    if (nk != for_) {
      for (int64_t w = 0; w < words_; ++w) {
        uint8_t y = 0;
        for (int64_t r = 0; r < rows_g_; ++r) y |= nonzero_[(row0 + r) * words_ + w];
        any_[w] = y;
      }
      for_ = nk;
    }
    return any_.data();
  }

 private:
  const std::vector<uint8_t>& nonzero_;
  int64_t rows_g_, words_;
  std::vector<uint8_t> any_;
  int64_t for_ = -1;
};

// Bits of 64-bit word w of a row of W 32-bit words (the high half 0 past the row).
inline uint64_t load_word64(const uint32_t* row, int64_t w, int64_t W) {
  return uint64_t(row[2 * w]) | (2 * w + 1 < W ? uint64_t(row[2 * w + 1]) << 32 : 0u);
}

// |s*Q| of 64 channels as bytes: plane p adds 2^p to the bytes of its set bits (distinct bits:
// no carry), of row r of s's planes at 64-bit word w, restricted to valid.
SPIKEOPS_TARGET_AVX512 inline __m512i unpack_bytes(const SpikeFields& s, int64_t r, int64_t w,
                                                   uint64_t valid) {
  __m512i mag = _mm512_setzero_si512();
  for (int64_t p = 0; p < s.P; ++p) {
    const uint64_t m = load_word64(s.planes + (p * s.M + r) * s.W, w, s.W) & valid;
    mag = _mm512_mask_add_epi8(mag, m, mag, _mm512_set1_epi8(static_cast<char>(1 << p)));
  }
  return mag;
}

// GF2P8AFFINEQB's byte operand for a bit-matrix transpose: byte b of every qword is 2^b, so byte
// b of a result qword holds bit b of each of the matrix qword's 8 bytes, byte 7 - r as bit r.
constexpr long long kTransposeBits = 0x8040201008040201LL;

// The bytes of 8 cells (unpack_bytes of each) from their bit rows: qword c of z[r] is cell c's
// plane r word (rows past the planes zero); out[c] byte k = sum_r 2^r * bit k of it. Unpacks
// within 128-bit lanes (lane l holds cells 2l and 2l + 1 throughout) gather each 8 channels' rows
// into one qword, row r at byte 7 - r, which GF2P8AFFINEQB transposes into the 8 channels'
// bytes; a 4x4 transpose of 128-bit lanes then puts each cell's 64 channels in one register.
SPIKEOPS_TARGET_GFNI inline void transpose_cells(const __m512i z[8], __m512i out[8]) {
  __m512i u[2][4], v[2][2][2], g[2][4];  // [cell 2l + x]...
  for (int r = 0; r < 4; ++r) {  // 8 channels x rows 2r + 1, 2r
    u[0][r] = _mm512_unpacklo_epi8(z[2 * r + 1], z[2 * r]);
    u[1][r] = _mm512_unpackhi_epi8(z[2 * r + 1], z[2 * r]);
  }
  for (int x = 0; x < 2; ++x)
    for (int s = 0; s < 2; ++s) {  // 8 channels x rows 4s + 3 .. 4s: channels 0-31, then 32-63
      v[x][s][0] = _mm512_unpacklo_epi16(u[x][2 * s + 1], u[x][2 * s]);
      v[x][s][1] = _mm512_unpackhi_epi16(u[x][2 * s + 1], u[x][2 * s]);
    }
  const __m512i bits = _mm512_set1_epi64(kTransposeBits);
  for (int x = 0; x < 2; ++x)
    for (int y = 0; y < 2; ++y) {  // g[x][q] lane l: channels 16q .. 16q + 15 of cell 2l + x
      g[x][2 * y] = _mm512_gf2p8affine_epi64_epi8(
          bits, _mm512_unpacklo_epi32(v[x][1][y], v[x][0][y]), 0);
      g[x][2 * y + 1] = _mm512_gf2p8affine_epi64_epi8(
          bits, _mm512_unpackhi_epi32(v[x][1][y], v[x][0][y]), 0);
    }
  for (int x = 0; x < 2; ++x) {
    const __m512i t0 = _mm512_shuffle_i64x2(g[x][0], g[x][1], 0x44);  // lanes 0, 1 of each
    const __m512i t1 = _mm512_shuffle_i64x2(g[x][0], g[x][1], 0xEE);  // lanes 2, 3
    const __m512i t2 = _mm512_shuffle_i64x2(g[x][2], g[x][3], 0x44);
    const __m512i t3 = _mm512_shuffle_i64x2(g[x][2], g[x][3], 0xEE);
    out[x] = _mm512_shuffle_i64x2(t0, t2, 0x88);
    out[2 + x] = _mm512_shuffle_i64x2(t0, t2, 0xDD);
    out[4 + x] = _mm512_shuffle_i64x2(t1, t3, 0x88);
    out[6 + x] = _mm512_shuffle_i64x2(t1, t3, 0xDD);
  }
}

// sum over 64 channels of signed bytes |v| * (-1)^sign, into int64.
SPIKEOPS_TARGET_AVX512 inline int64_t signed_byte_sum(__m512i mag, uint64_t sign) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i pos = _mm512_sad_epu8(_mm512_maskz_mov_epi8(~sign, mag), z);
  const __m512i neg = _mm512_sad_epu8(_mm512_maskz_mov_epi8(sign, mag), z);
  return _mm512_reduce_add_epi64(_mm512_sub_epi64(pos, neg));
}

// A's rows unpacked once per call: bytes [row][w] (64 each), signs [row][w], whether the word has
// a nonzero byte [row][w], S_a per row (with B's zero points).
struct ByteRows {
  std::vector<uint8_t> mag, nonzero;
  // valid[w]: the channels of 64-bit word w below K; valid_cells[c]: valid[c % words64], for
  // byte_cells (the block of a task's cells, and 8 more).
  std::vector<uint64_t> sign, valid, valid_cells;
  std::vector<int64_t> sum;
  int64_t words64;
};

SPIKEOPS_TARGET_AVX512 void unpack_rows(const MatmulArgs& a, ByteRows& x, bool sums,
                                        int64_t begin, int64_t end) {
  const SpikeFields& A = a.a;
  for (int64_t r = begin; r < end; ++r)
    for (int64_t w = 0; w < x.words64; ++w) {
      const int64_t k = r * x.words64 + w;
      const __m512i mag = unpack_bytes(A, r, w, x.valid[w]);
      const uint64_t sign = A.sign ? load_word64(A.sign + r * A.W, w, A.W) : 0u;
      _mm512_storeu_si512(x.mag.data() + 64 * k, mag);
      x.sign[k] = sign;
      x.nonzero[k] = _mm512_test_epi8_mask(mag, mag) != 0;
      if (sums) x.sum[r] += signed_byte_sum(mag, sign);
    }
}

// The 16 sums of the 16 lanes of each of v[0..15], lane j the sum of v[j]: pairwise adds of
// interleaved halves (32-bit, 64-bit, then 128-bit lanes).
SPIKEOPS_TARGET_AVX512 inline __m512i sum_lanes16(__m512i v[16]) {
  __m512i x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)
    x[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                            _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    y[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(x[2 * i], x[2 * i + 1]),
                            _mm512_unpackhi_epi64(x[2 * i], x[2 * i + 1]));
  // y[i]: in each 128-bit lane, the partial sums of vectors 4i .. 4i + 3.
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(y[2 * i], y[2 * i + 1], 0x88),
                            _mm512_shuffle_i32x4(y[2 * i], y[2 * i + 1], 0xdd));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(z[0], z[1], 0x88),
                          _mm512_shuffle_i32x4(z[0], z[1], 0xdd));
}

// matmul_epilogue with one range on both sides (the same operations, in the same order).
inline float epilogue_r1(float scale_a, float scale_b, int64_t D) {
  double acc = 0.0;
  acc += static_cast<double>(scale_a) * static_cast<double>(scale_b) * static_cast<double>(D);
  return static_cast<float>(acc);
}

// The epilogue of keys ib0 .. ib0 + n (n <= 8), float outputs o[0 .. n), from half h of the 16
// dot products: the operations of the scalar loop below, lane by lane. D = dot - zb * S_a - za *
// S_b + za * zb * K in int64 (every product of two numbers below 2^31: |zb|, |za| <= 10^4,
// |S| <= 255 * 2^16, K <= 2^16); float64(D) exactly as hi * 2^32 + lo, the two 32-bit halves
// (|D| < 2^50, docs/ops.md); then epilogue_r1: 0.0 + (float64(sa) * float64(sb)) * float64(D),
// rounded to float32. Lanes past `last` (causal) are -inf.
SPIKEOPS_TARGET_AVX512 inline void epilogue8(const MatmulArgs& a, float* o, int64_t ib0,
                                             __m512i dots, int64_t h, const int64_t* sum_b,
                                             int64_t sum_a, int64_t za, float sa, int64_t n,
                                             int64_t last) {
  if (n <= 0) return;
  const SpikeFields& B = a.b;
  const __mmask16 lanes = static_cast<__mmask16>((1u << n) - 1u);  // 8 at most
  __m512i D = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(dots, h));
  const __m512i zb = B.zero ? _mm512_cvtepi32_epi64(_mm512_castsi512_si256(
                                _mm512_maskz_loadu_epi32(lanes, B.zero + ib0)))
                            : _mm512_setzero_si512();
  const __m512i zav = _mm512_set1_epi64(za);
  D = _mm512_sub_epi64(D, _mm512_mul_epi32(zb, _mm512_set1_epi64(sum_a)));
  const __m512i sb = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(lanes), sum_b);
  D = _mm512_sub_epi64(D, _mm512_mul_epi32(zav, sb));
  D = _mm512_add_epi64(D, _mm512_mul_epi32(_mm512_mul_epi32(zav, zb), _mm512_set1_epi64(a.K)));
  const __m512d hi = _mm512_cvtepi32_pd(_mm512_cvtepi64_epi32(_mm512_srai_epi64(D, 32)));
  const __m512d lo = _mm512_cvtepu32_pd(_mm512_cvtepi64_epi32(D));
  const __m512d d = _mm512_add_pd(_mm512_mul_pd(hi, _mm512_set1_pd(4294967296.0)), lo);
  const __m512d s = _mm512_mul_pd(_mm512_set1_pd(static_cast<double>(sa)),
                                  _mm512_cvtps_pd(_mm512_castps512_ps256(
                                      _mm512_maskz_loadu_ps(lanes, B.scale + ib0))));
  __m512 y = _mm512_castps256_ps512(
      _mm512_cvtpd_ps(_mm512_add_pd(_mm512_setzero_pd(), _mm512_mul_pd(s, d))));
  if (last < 7) {
    const __mmask16 masked =
        static_cast<__mmask16>(last < 0 ? 0xffu : (0xffu << (last + 1)) & 0xffu);
    y = _mm512_mask_mov_ps(y, masked, _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
  }
  _mm512_mask_storeu_ps(o, lanes, y);
}

// unpack_bytes of B's cells (key k < count, 64-bit word w) of a task, cell k * words64 + w to
// bytes[64 * cell]: 8 cells at a time, transpose_cells of their plane words, from runs of cells
// whose words follow one another in memory (with even W the block's keys, else one key's row),
// read by masked loads of the run's 32-bit words (none past a row's end or the tensor's).
SPIKEOPS_TARGET_GFNI void byte_cells(const SpikeFields& B, int64_t ib0, int64_t count,
                                     const ByteRows& x, uint8_t* bytes) {
  const bool even = B.W % 2 == 0;
  const int64_t runs = even ? 1 : count, cells = even ? count * x.words64 : x.words64;
  const int64_t dwords = even ? count * B.W : B.W;  // 32-bit words of a run
  for (int64_t run = 0; run < runs; ++run)
    for (int64_t c0 = 0; c0 < cells; c0 += 8) {
      const int64_t n32 = std::min<int64_t>(16, dwords - 2 * c0);
      const __mmask16 loaded = static_cast<__mmask16>((1u << n32) - 1u);
      const __m512i valid = _mm512_loadu_si512(x.valid_cells.data() + c0);
      __m512i z[8], out[8];
      for (int64_t r = 0; r < 8; ++r)
        z[r] = r < B.P ? _mm512_and_si512(_mm512_maskz_loadu_epi32(
                             loaded, B.planes + (r * B.M + ib0 + run) * B.W + 2 * c0), valid)
                       : _mm512_setzero_si512();
      transpose_cells(z, out);
      for (int64_t c = 0; c < 8 && c0 + c < cells; ++c)
        _mm512_storeu_si512(bytes + 64 * (run * x.words64 + c0 + c), out[c]);
    }
}

template <typename T>
SPIKEOPS_TARGET_AVX512 void byte_tasks(const MatmulArgs& a, const ByteRows& x, bool gfni,
                                       int64_t begin, int64_t end) {
  const SpikeFields& A = a.a;
  const SpikeFields& B = a.b;
  T* out = static_cast<T*>(a.out);
  const bool b_unsigned_side = B.P <= 8 && A.P <= 7;  // else A's magnitudes are the u8 side
  // B's signs alone (A unsigned, B the signed side: the probabilities against the value codes):
  // B's bytes are stored negated where B's sign is set, once per key, for every row.
  const bool b_signed_bytes = !b_unsigned_side && !A.sign;
  const bool need_sum_b = A.zero != nullptr;
  const int64_t words64 = x.words64;
  const int64_t rows_g = a.heads / a.kv_heads * a.Ma;  // A rows per kv head
  // The block's keys unpacked: bytes [key][w], signs [key][w].
  std::vector<uint8_t> bbytes(64 * words64 * kByteKeyBlock);
  std::vector<uint64_t> bsign(words64 * kByteKeyBlock);
  GroupWords groups(x.nonzero, rows_g, words64);
  for (int64_t task = begin; task < end; ++task) {
    const auto [nk, row0, j0, count, ib0] = key_task(a, task, kByteKeyBlock);
    const uint8_t* any = groups.of(nk, row0);
    int64_t sum_b[kByteKeyBlock] = {};
    if (gfni) byte_cells(B, ib0, count, x, bbytes.data());
    // With GFNI the keys' bytes are in place, which leaves B's signs and S_b (if any) and the
    // cells past the last key to the loop (bsign stays 0 without B's signs).
    const int64_t k_first = gfni && !B.sign && !need_sum_b ? count : 0;
    for (int64_t k = k_first; k < kByteKeyBlock; ++k)
      for (int64_t w = 0; w < words64; ++w) {
        const int64_t c = k * words64 + w;
        if (k >= count || (!any[w] && !need_sum_b)) {
          _mm512_storeu_si512(bbytes.data() + 64 * c, _mm512_setzero_si512());
          bsign[c] = 0;
          continue;
        }
        const __m512i mag = gfni ? _mm512_loadu_si512(bbytes.data() + 64 * c)
                                 : unpack_bytes(B, ib0 + k, w, x.valid[w]);
        bsign[c] = B.sign ? load_word64(B.sign + (ib0 + k) * B.W, w, B.W) : 0u;
        _mm512_storeu_si512(bbytes.data() + 64 * c,
                            b_signed_bytes
                                ? _mm512_mask_sub_epi8(mag, bsign[c], _mm512_setzero_si512(), mag)
                                : mag);
        if (need_sum_b) sum_b[k] = sum_b[k] + signed_byte_sum(mag, bsign[c]);
      }
    for (int64_t r = 0; r < rows_g; ++r) {
      const int64_t row = row0 + r, i = row % a.Ma;
      __m512i acc[kByteKeyBlock];
      // Unrolled, so that the 16 accumulators stay in registers.
#pragma GCC unroll 16
      for (int64_t k = 0; k < kByteKeyBlock; ++k) acc[k] = _mm512_setzero_si512();
      for (int64_t w = 0; w < words64; ++w) {
        const int64_t c = row * words64 + w;
        if (!x.nonzero[c]) continue;
        const __m512i am = _mm512_loadu_si512(x.mag.data() + 64 * c);
        if (b_unsigned_side && !B.sign) {  // A's signs alone: negate A's bytes once
          const __m512i s = _mm512_mask_sub_epi8(am, x.sign[c], _mm512_setzero_si512(), am);
#pragma GCC unroll 16
          for (int64_t k = 0; k < kByteKeyBlock; ++k)
            acc[k] = _mm512_dpbusd_epi32(
                acc[k], _mm512_loadu_si512(bbytes.data() + 64 * (k * words64 + w)), s);
        } else if (b_signed_bytes) {  // B's bytes already signed
#pragma GCC unroll 16
          for (int64_t k = 0; k < kByteKeyBlock; ++k)
            acc[k] = _mm512_dpbusd_epi32(
                acc[k], am, _mm512_loadu_si512(bbytes.data() + 64 * (k * words64 + w)));
        } else {
#pragma GCC unroll 16
          for (int64_t k = 0; k < kByteKeyBlock; ++k) {
            const int64_t cb = k * words64 + w;
            const __mmask64 neg = x.sign[c] ^ bsign[cb];
            const __m512i bm = _mm512_loadu_si512(bbytes.data() + 64 * cb);
            if (b_unsigned_side)
              acc[k] = _mm512_dpbusd_epi32(
                  acc[k], bm, _mm512_mask_sub_epi8(am, neg, _mm512_setzero_si512(), am));
            else
              acc[k] = _mm512_dpbusd_epi32(
                  acc[k], am, _mm512_mask_sub_epi8(bm, neg, _mm512_setzero_si512(), bm));
          }
        }
      }
      const __m512i sums = sum_lanes16(acc);
      const int64_t za = A.zero ? A.zero[row] : 0;
      const float sa = A.scale[row];
      T* o = out + row * a.N + j0;
      if constexpr (std::is_same_v<T, float>) {
        // The last key i may see (causal): later lanes are -inf.
        const int64_t last = a.causal ? a.N - a.Ma + i - j0 : kByteKeyBlock;
        for (int64_t h = 0; h < 2; ++h)
          epilogue8(a, o + 8 * h, ib0 + 8 * h, sums, h, sum_b + 8 * h, x.sum[row], za, sa,
                    std::min<int64_t>(8, std::max<int64_t>(0, count - 8 * h)), last - 8 * h);
        continue;
      }
      alignas(64) int32_t dots[kByteKeyBlock];
      _mm512_store_si512(dots, sums);
      for (int64_t k = 0; k < count; ++k) {
        if (matmul_masked(a, i, j0 + k)) {
          o[k] = static_cast<T>(-std::numeric_limits<float>::infinity());
          continue;
        }
        const int64_t ib = ib0 + k, zb = B.zero ? B.zero[ib] : 0;
        const int64_t D = int64_t(dots[k]) - zb * x.sum[row] - za * sum_b[k] + za * zb * a.K;
        o[k] = static_cast<T>(epilogue_r1(sa, B.scale[ib], D));
      }
    }
  }
}

// ByteRows sized for A's rows, with the valid channels of each 64-channel word.
ByteRows byte_rows(const MatmulArgs& a) {
  ByteRows x;
  x.words64 = (a.a.W + 1) / 2;
  const int64_t cells = a.a.M * x.words64;
  x.mag.resize(64 * cells);
  x.nonzero.resize(cells);
  x.sign.resize(cells);
  x.sum.assign(a.a.M, 0);
  x.valid.resize(x.words64);
  for (int64_t w = 0; w < x.words64; ++w) {
    x.valid[w] = matmul_valid_bits(2 * w, a.K);
    if (2 * w + 1 < a.a.W) x.valid[w] |= uint64_t(matmul_valid_bits(2 * w + 1, a.K)) << 32;
  }
  x.valid_cells.resize(kByteKeyBlock * x.words64 + 8);
  for (size_t c = 0; c < x.valid_cells.size(); ++c) x.valid_cells[c] = x.valid[c % x.words64];
  return x;
}

// The tasks of byte_tasks over A's rows x, filled.
template <typename T>
void run_byte_tasks(const MatmulArgs& a, const ByteRows& x) {
  const int64_t rows_g = a.heads / a.kv_heads * a.Ma;
  const int64_t blocks = (a.N + kByteKeyBlock - 1) / kByteKeyBlock;
  const int64_t tasks = a.batch * a.kv_heads * blocks;
  // Work per task in (row, key, word) units; under ~32k units in all the tasks run serially (the
  // threads' start costs more than they save on a decode step).
  const int64_t units = rows_g * kByteKeyBlock * x.words64;
  const int64_t grain = units >= kByteSerialUnits ? 1 : (kByteSerialUnits + units - 1) / units;
  const bool gfni = has_gfni();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    byte_tasks<T>(a, x, gfni, begin, end);
  });
}

template <typename T>
void matmul_bytes(const MatmulArgs& a) {
  ByteRows x = byte_rows(a);
  const bool sums = a.b.zero != nullptr;
  at::parallel_for(0, a.a.M, 256, [&](int64_t begin, int64_t end) {
    unpack_rows(a, x, sums, begin, end);
  });
  run_byte_tasks<T>(a, x);
}

// prob_matmul's rows of A (docs/ops.md, prob_matmul): row r's weights v = p * token scale
// (float32 products), its scale s = max(v) / 255 (1 when the max is not positive) and its codes
// min(max(rint(v / s), 0), 255), made as bytes: the arithmetic of gif_encode's static unsigned
// encoder (encode_words_avx512: IEEE division, rounding to nearest even) on the weights that
// torch's product makes, so the bytes are those unpack_rows makes from the encoded planes. A row
// holding NaN gets scale 1 and then, like any non-finite row of gif_encode, stored scale NaN and
// codes 0; a scale that gif_encode would refuse (+Inf: a weight of +Inf) is refused.
SPIKEOPS_TARGET_AVX512 inline __m512 prob_weights(const float* p, const float* scale, int64_t k0,
                                                  __mmask16 valid) {
  return _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, p + k0),
                       _mm512_maskz_loadu_ps(valid, scale + k0));
}

SPIKEOPS_TARGET_AVX512 void prob_rows(const ProbMatmulArgs& p, ByteRows& x, bool sums,
                                      int64_t begin, int64_t end) {
  const MatmulArgs& a = p.m;
  const int64_t K = a.K, group = a.heads / a.kv_heads;
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t r = begin; r < end; ++r) {
    const float* pr = p.probs + r * K;
    const int64_t n = r / (a.heads * a.Ma), h = (r / a.Ma) % a.heads;
    const float* ts = p.token_scale + (n * a.kv_heads + h / group) * p.scale_stride;
    __m512 top = _mm512_sub_ps(_mm512_setzero_ps(), inf);
    bool nan = false, finite = true;
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t c = std::min<int64_t>(16, K - k0);
      const __mmask16 valid = c == 16 ? 0xFFFF : static_cast<__mmask16>((1u << c) - 1);
      const __m512 v = prob_weights(pr, ts, k0, valid);
      nan |= _mm512_mask_cmp_ps_mask(valid, v, v, _CMP_UNORD_Q) != 0;
      // v - v is 0 for finite v and NaN for NaN or Inf
      finite &= _mm512_mask_cmp_ps_mask(valid, _mm512_sub_ps(v, v), _mm512_setzero_ps(),
                                        _CMP_NEQ_UQ) == 0;
      top = _mm512_mask_max_ps(top, valid, top, v);
    }
    // torch's amax: NaN if the row holds one; the scale: where(max > 0, max / 255, 1).
    const float row_max = _mm512_reduce_max_ps(top);
    const float step = !nan && row_max > 0.f ? row_max / 255.f : 1.f;
    TORCH_CHECK_VALUE(std::isfinite(step) && step > 0.f, "prob_matmul: the scale of row ", r,
                      " (its largest weight / 255) must be positive and finite, as gif_encode's ",
                      "static scale, got ", step);
    p.steps[r] = finite ? step : std::numeric_limits<float>::quiet_NaN();
    const __m512 scale = _mm512_set1_ps(step), qmax = _mm512_set1_ps(255.f);
    for (int64_t w = 0; w < x.words64; ++w) {
      const int64_t cell = r * x.words64 + w;
      uint8_t* bytes = x.mag.data() + 64 * cell;
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t k0 = 64 * w + 16 * q;
        const int64_t c = finite ? std::max<int64_t>(0, std::min<int64_t>(16, K - k0)) : 0;
        const __mmask16 valid = c == 16 ? 0xFFFF : static_cast<__mmask16>((1u << c) - 1);
        const __m512 code = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(
            _mm512_div_ps(prob_weights(pr, ts, k0, valid), scale), kNearest), _mm512_setzero_ps()), qmax);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + 16 * q),
                         _mm512_cvtepi32_epi8(_mm512_maskz_cvttps_epi32(valid, code)));
      }
      const __m512i mag = _mm512_loadu_si512(bytes);
      x.sign[cell] = 0;
      x.nonzero[cell] = _mm512_test_epi8_mask(mag, mag) != 0;
      if (sums) x.sum[r] += signed_byte_sum(mag, 0);
    }
  }
}
#endif

#if SPIKEOPS_X86_INTRINSICS
// The byte kernel's products on CPUs with AVX2 and no AVX-512 (byte_kernel_fits: one range, at
// most 8 planes on one side and 7 on the other): each operand's codes s*Q are unpacked from its
// plane words, 32 channels (one 32-bit word) at a time, into signed 16-bit integers whose dot
// product is VPMADDWD (|s_a Q_a s_b Q_b| <= 255 * 127, a pair's sum below 2^17), or, where
// word_bytes holds (SpikeKV's 4-bit products), into bytes whose dot product is VPMADDUBSW of the
// unsigned side's codes and the signed side's s*Q, then VPMADDWD by 1; the int32 lanes' sums stay
// below K * 255 * 127 < 2^31. The same integers as matmul_row_pair (D = sum_k (s_a Q_a)
// (s_b Q_b) - zb * S_a - za * S_b + za * zb * K) and its epilogue. A's rows are unpacked once per
// call (int16: twice the byte kernel's memory under the same kByteMaxABytes); a task is one
// (batch, kv head) and 8 keys (eight int32 accumulators and A's word fit AVX2's 16 registers),
// every query row of the kv head's group against each key's codes, unpacked once.
constexpr int64_t kWordKeyBlock = 8;

// Whether the pair runs on bytes: one side without signs (the unsigned side, codes up to 255),
// the other signed with at most 7 planes (s*Q fits int8), and no VPMADDUBSW pair sum saturates
// int16: 2 (2^P_u - 1)(2^P_s - 1) <= 32767 (4-bit keys against 8-bit queries: 3,810; 8-bit
// probabilities against 4-bit values: 3,570; 8-bit keys or values do not fit).
bool word_bytes(const MatmulArgs& a) {
  if ((a.a.sign == nullptr) == (a.b.sign == nullptr)) return false;
  const SpikeFields& u = a.a.sign ? a.b : a.a;
  const SpikeFields& v = a.a.sign ? a.a : a.b;
  return u.P <= 8 && v.P <= 7 && 2 * ((int64_t(1) << u.P) - 1) * ((int64_t(1) << v.P) - 1) <= 32767;
}

// 0xFF in byte j where bit j of the word in every 32-bit lane of m is set: each byte of the word
// copied to 8 bytes, one bit tested in each.
SPIKEOPS_TARGET_AVX2 inline __m256i expand_bits(__m256i m) {
  const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                        2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);  // byte b of a qword: 2^b
  const __m256i x = _mm256_shuffle_epi8(m, pick);
  return _mm256_cmpeq_epi8(_mm256_and_si256(x, bit), bit);
}
SPIKEOPS_TARGET_AVX2 inline __m256i expand_bits(uint32_t m) {
  return expand_bits(_mm256_set1_epi32(static_cast<int>(m)));
}

// The sum of the 8 int32 lanes of v.
SPIKEOPS_TARGET_AVX2 inline int64_t sum_lanes(__m256i v) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  int64_t sum = 0;
  for (int i = 0; i < 8; ++i) sum += lanes[i];
  return sum;
}

// The codes of the 32 channels of word w of row r of s (restricted to valid) to out[0, 32): plane
// p adds 2^p to the bytes of its set bits (distinct bits: no carry); as int16 (E) the magnitudes
// are widened and negated where the sign is set; as bytes the same in int8 (signed side, below
// 128) or the unsigned codes as they are (no sign: negation by 0). Returns whether any is
// nonzero; adds their sum (s*Q) to *sum when sum is not null.
template <typename E>
SPIKEOPS_TARGET_AVX2 inline bool unpack_words(const SpikeFields& s, int64_t r, int64_t w,
                                              uint32_t valid, E* out, int64_t* sum) {
  __m256i mag = _mm256_setzero_si256();
  const uint32_t* word = s.planes + r * s.W + w;
  const int64_t plane_stride = s.M * s.W;
  if (valid == ~0u) {  // a whole word: each plane's broadcast straight from memory
    for (int64_t p = 0; p < s.P; ++p, word += plane_stride)
      mag = _mm256_add_epi8(
          mag, _mm256_and_si256(expand_bits(_mm256_castps_si256(_mm256_broadcast_ss(
                                    reinterpret_cast<const float*>(word)))),
                                _mm256_set1_epi8(static_cast<char>(1 << p))));
  } else {
    for (int64_t p = 0; p < s.P; ++p, word += plane_stride)
      mag = _mm256_add_epi8(mag, _mm256_and_si256(expand_bits(*word & valid),
                                                  _mm256_set1_epi8(static_cast<char>(1 << p))));
  }
  // 0xFF where negative (no sign words: none, and no work; the keys' minmax codes)
  const __m256i neg = s.sign ? expand_bits(s.sign[r * s.W + w]) : _mm256_setzero_si256();
  if constexpr (sizeof(E) == 1) {
    const __m256i v = s.sign ? _mm256_sub_epi8(_mm256_xor_si256(mag, neg), neg) : mag;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
    if (sum) {  // pairs of bytes times 1 (VPMADDUBSW: the first operand unsigned), then pairs
      const __m256i one = _mm256_set1_epi8(1);
      const __m256i pairs = s.sign ? _mm256_maddubs_epi16(one, v) : _mm256_maddubs_epi16(v, one);
      *sum += sum_lanes(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    }
    return !_mm256_testz_si256(mag, mag);
  }
  for (int h = 0; h < 2; ++h) {
    const __m128i m = h ? _mm256_extracti128_si256(mag, 1) : _mm256_castsi256_si128(mag);
    const __m128i n = h ? _mm256_extracti128_si256(neg, 1) : _mm256_castsi256_si128(neg);
    const __m256i wide = _mm256_cvtepu8_epi16(m), sign = _mm256_cvtepi8_epi16(n);
    const __m256i v = _mm256_sub_epi16(_mm256_xor_si256(wide, sign), sign);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * h), v);
    if (sum) *sum += sum_lanes(_mm256_madd_epi16(v, _mm256_set1_epi16(1)));
  }
  return !_mm256_testz_si256(mag, mag);
}

// A's rows unpacked once per call: codes E [row][w][32], whether the word has a nonzero code
// [row][w], S_a per row (with B's zero points).
template <typename E>
struct WordRows {
  std::vector<E> codes;
  std::vector<uint8_t> nonzero;
  std::vector<int64_t> sum;
};

// The int32 lanes of the sum over 32 channels of a's codes times b's: a0 (and a1, the second 16
// of int16 codes) A's, b B's; on bytes VPMADDUBSW takes the unsigned side first (kBUnsigned: B).
template <typename E, bool kBUnsigned>
SPIKEOPS_TARGET_AVX2 inline __m256i dot32(__m256i a0, __m256i a1, const E* b) {
  const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
  if constexpr (sizeof(E) == 1) {
    const __m256i pairs = kBUnsigned ? _mm256_maddubs_epi16(b0, a0) : _mm256_maddubs_epi16(a0, b0);
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  } else {
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    return _mm256_add_epi32(_mm256_madd_epi16(a0, b0), _mm256_madd_epi16(a1, b1));
  }
}

// The 8 sums of the 8 lanes of each of v[0..7], lane j the sum of v[j].
SPIKEOPS_TARGET_AVX2 inline __m256i sum_lanes8(const __m256i v[8]) {
  const __m256i g0 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
  const __m256i g1 =
      _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
  return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),
                          _mm256_permute2x128_si256(g0, g1, 0x31));
}

// The epilogue of keys ib0 .. ib0 + n (n <= 4), float outputs o[0 .. n), from half h of the 8 dot
// products: D = dot - zb * S_a - za * S_b + za * zb * K in float64, exact (every term and partial
// sum an integer below 2^53: |zb|, |za| <= 10^4, |S| <= 255 * 2^16, K <= 2^16, docs/ops.md), then
// epilogue_r1: 0.0 + (float64(sa) * float64(sb)) * D, rounded to float32. Lanes past `last`
// (causal) are -inf.
SPIKEOPS_TARGET_AVX2 inline void epilogue4(const MatmulArgs& a, float* o, int64_t ib0,
                                           __m256i dots, int64_t h, const int64_t* sum_b,
                                           int64_t sum_a, int64_t za, float sa, int64_t n,
                                           int64_t last) {
  if (n <= 0) return;
  const SpikeFields& B = a.b;
  const __m128i index = _mm_setr_epi32(0, 1, 2, 3);
  const __m128i lanes = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), index);
  __m256d D = _mm256_cvtepi32_pd(h ? _mm256_extracti128_si256(dots, 1)
                                   : _mm256_castsi256_si128(dots));
  if (B.zero) {
    const __m256d zb = _mm256_cvtepi32_pd(_mm_maskload_epi32(B.zero + ib0, lanes));
    D = _mm256_sub_pd(D, _mm256_mul_pd(zb, _mm256_set1_pd(static_cast<double>(sum_a))));
    if (za) {
      const __m256d zaK = _mm256_set1_pd(static_cast<double>(za) * static_cast<double>(a.K));
      D = _mm256_add_pd(D, _mm256_mul_pd(zb, zaK));
    }
  }
  if (za) {
    const __m256d sb = _mm256_setr_pd(static_cast<double>(sum_b[0]), static_cast<double>(sum_b[1]),
                                      static_cast<double>(sum_b[2]), static_cast<double>(sum_b[3]));
    D = _mm256_sub_pd(D, _mm256_mul_pd(_mm256_set1_pd(static_cast<double>(za)), sb));
  }
  const __m256d s = _mm256_mul_pd(_mm256_set1_pd(static_cast<double>(sa)),
                                  _mm256_cvtps_pd(_mm_maskload_ps(B.scale + ib0, lanes)));
  __m128 y = _mm256_cvtpd_ps(_mm256_add_pd(_mm256_setzero_pd(), _mm256_mul_pd(s, D)));
  if (last < 3) {
    const __m128i masked =
        _mm_cmpgt_epi32(index, _mm_set1_epi32(static_cast<int>(std::max<int64_t>(last, -1))));
    y = _mm_blendv_ps(y, _mm_set1_ps(-std::numeric_limits<float>::infinity()),
                      _mm_castsi128_ps(masked));
  }
  _mm_maskstore_ps(o, lanes, y);
}

template <typename T, typename E, bool kBUnsigned>
SPIKEOPS_TARGET_AVX2 void word_tasks(const MatmulArgs& a, const WordRows<E>& x, int64_t begin,
                                     int64_t end) {
  const SpikeFields& A = a.a;
  const SpikeFields& B = a.b;
  T* out = static_cast<T*>(a.out);
  const int64_t W = A.W;
  const bool need_sum_b = A.zero != nullptr;
  const int64_t rows_g = a.heads / a.kv_heads * a.Ma;  // A rows per kv head
  // The block's keys unpacked, E [key][w][32] (keys past the last: 0).
  std::vector<E> keys(32 * W * kWordKeyBlock);
  GroupWords groups(x.nonzero, rows_g, W);
  for (int64_t task = begin; task < end; ++task) {
    const auto [nk, row0, j0, count, ib0] = key_task(a, task, kWordKeyBlock);
    const uint8_t* any = groups.of(nk, row0);
    int64_t sum_b[kWordKeyBlock] = {};
    for (int64_t k = 0; k < kWordKeyBlock; ++k)
      for (int64_t w = 0; w < W; ++w) {
        E* cell = keys.data() + 32 * (k * W + w);
        if (k < count && (any[w] || need_sum_b))
          unpack_words(B, ib0 + k, w, matmul_valid_bits(w, a.K), cell,
                       need_sum_b ? sum_b + k : nullptr);
        else
          std::fill(cell, cell + 32, E(0));
      }
    for (int64_t r = 0; r < rows_g; ++r) {
      const int64_t row = row0 + r, i = row % a.Ma;
      __m256i acc[kWordKeyBlock];
#pragma GCC unroll 8
      for (int64_t k = 0; k < kWordKeyBlock; ++k) acc[k] = _mm256_setzero_si256();
      for (int64_t w = 0; w < W; ++w) {
        const int64_t c = row * W + w;
        if (!x.nonzero[c]) continue;
        const E* ac = x.codes.data() + 32 * c;
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac));
        const __m256i a1 = sizeof(E) == 1
                               ? a0
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ac + 16));
#pragma GCC unroll 8
        for (int64_t k = 0; k < kWordKeyBlock; ++k)
          acc[k] = _mm256_add_epi32(
              acc[k], dot32<E, kBUnsigned>(a0, a1, keys.data() + 32 * (k * W + w)));
      }
      const __m256i sums = sum_lanes8(acc);
      const int64_t za = A.zero ? A.zero[row] : 0;
      T* o = out + row * a.N + j0;
      if constexpr (std::is_same_v<T, float>) {
        // The last key i may see (causal): later lanes are -inf.
        const int64_t last = a.causal ? a.N - a.Ma + i - j0 : kWordKeyBlock;
        for (int64_t h = 0; h < 2; ++h)
          epilogue4(a, o + 4 * h, ib0 + 4 * h, sums, h, sum_b + 4 * h, x.sum[row], za,
                    A.scale[row], std::min<int64_t>(4, count - 4 * h), last - 4 * h);
        continue;
      }
      alignas(32) int32_t dots[kWordKeyBlock];
      _mm256_store_si256(reinterpret_cast<__m256i*>(dots), sums);
      for (int64_t k = 0; k < count; ++k) {
        if (matmul_masked(a, i, j0 + k)) {
          o[k] = static_cast<T>(-std::numeric_limits<float>::infinity());
          continue;
        }
        const int64_t ib = ib0 + k, zb = B.zero ? B.zero[ib] : 0;
        const int64_t D = int64_t(dots[k]) - zb * x.sum[row] - za * sum_b[k] + za * zb * a.K;
        o[k] = static_cast<T>(epilogue_r1(A.scale[row], B.scale[ib], D));
      }
    }
  }
}

// WordRows sized for A's rows.
template <typename E>
WordRows<E> word_rows(const MatmulArgs& a) {
  WordRows<E> x;
  x.codes.resize(32 * a.a.M * a.a.W);
  x.nonzero.resize(a.a.M * a.a.W);
  x.sum.assign(a.a.M, 0);
  return x;
}

// The tasks of word_tasks over A's rows x, filled.
template <typename T, typename E>
void run_word_tasks(const MatmulArgs& a, const WordRows<E>& x) {
  const int64_t W = a.a.W;
  const int64_t rows_g = a.heads / a.kv_heads * a.Ma;
  const int64_t blocks = (a.N + kWordKeyBlock - 1) / kWordKeyBlock;
  const int64_t tasks = a.batch * a.kv_heads * blocks;
  // As run_byte_tasks: under kByteSerialUnits (row, key, 64 channels) units the calling thread.
  const int64_t units = rows_g * kWordKeyBlock * ((W + 1) / 2);
  const int64_t grain = units >= kByteSerialUnits ? 1 : (kByteSerialUnits + units - 1) / units;
  const bool b_unsigned = a.b.sign == nullptr;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    if (b_unsigned)
      word_tasks<T, E, true>(a, x, begin, end);
    else
      word_tasks<T, E, false>(a, x, begin, end);
  });
}

template <typename T, typename E>
void matmul_words(const MatmulArgs& a) {
  const SpikeFields& A = a.a;
  WordRows<E> x = word_rows<E>(a);
  const bool sums = a.b.zero != nullptr;
  at::parallel_for(0, A.M, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t w = 0; w < A.W; ++w)
        x.nonzero[r * A.W + w] = unpack_words(A, r, w, matmul_valid_bits(w, a.K),
                                              x.codes.data() + 32 * (r * A.W + w),
                                              sums ? &x.sum[r] : nullptr);
  });
  run_word_tasks<T, E>(a, x);
}

// prob_rows for the AVX2 kernel: the same weights, scale and codes (the same IEEE operations,
// 8 lanes at a time), as int16 in WordRows.
SPIKEOPS_TARGET_AVX2 inline __m256 prob_weights8(const float* p, const float* scale, int64_t k0,
                                                 int64_t count) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane);
  return _mm256_mul_ps(_mm256_maskload_ps(p + k0, valid), _mm256_maskload_ps(scale + k0, valid));
}

template <typename E>
SPIKEOPS_TARGET_AVX2 void prob_words(const ProbMatmulArgs& p, WordRows<E>& x, bool sums,
                                     int64_t begin, int64_t end) {
  const MatmulArgs& a = p.m;
  const int64_t K = a.K, W = a.a.W, group = a.heads / a.kv_heads;
  const float inf = std::numeric_limits<float>::infinity();
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t r = begin; r < end; ++r) {
    const float* pr = p.probs + r * K;
    const int64_t n = r / (a.heads * a.Ma), h = (r / a.Ma) % a.heads;
    const float* ts = p.token_scale + (n * a.kv_heads + h / group) * p.scale_stride;
    __m256 top = _mm256_set1_ps(-inf);
    bool nan = false, finite = true;
    for (int64_t k0 = 0; k0 < K; k0 += 8) {
      const int64_t c = std::min<int64_t>(8, K - k0);
      const int valid = (1 << c) - 1;
      const __m256 v = prob_weights8(pr, ts, k0, c);
      nan |= (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)) & valid) != 0;
      // v - v is 0 for finite v and NaN for NaN or Inf
      finite &= (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(),
                                                  _CMP_NEQ_UQ)) & valid) == 0;
      // lanes past K hold 0, below any row's max once a weight is positive (else step 1)
      top = _mm256_max_ps(top, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, top);
    float row_max = lanes[0];
    for (int i = 1; i < 8; ++i) row_max = std::max(row_max, lanes[i]);
    const float step = !nan && row_max > 0.f ? row_max / 255.f : 1.f;
    TORCH_CHECK_VALUE(std::isfinite(step) && step > 0.f, "prob_matmul: the scale of row ", r,
                      " (its largest weight / 255) must be positive and finite, as gif_encode's ",
                      "static scale, got ", step);
    p.steps[r] = finite ? step : std::numeric_limits<float>::quiet_NaN();
    const __m256 scale = _mm256_set1_ps(step), qmax = _mm256_set1_ps(255.f);
    for (int64_t w = 0; w < W; ++w) {
      __m256i code[4];
      for (int64_t q = 0; q < 4; ++q) {
        const int64_t k0 = 32 * w + 8 * q;
        const int64_t c = finite ? std::max<int64_t>(0, std::min<int64_t>(8, K - k0)) : 0;
        const __m256 rounded =
            _mm256_round_ps(_mm256_div_ps(prob_weights8(pr, ts, k0, c), scale), kNearest);
        code[q] = _mm256_cvttps_epi32(
            _mm256_min_ps(_mm256_max_ps(rounded, _mm256_setzero_ps()), qmax));
      }
      // packs interleaves the 128-bit lanes: 0x d8 puts the four 64-bit quarters in order
      const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(code[0], code[1]), 0xd8);
      const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(code[2], code[3]), 0xd8);
      E* out = x.codes.data() + 32 * (r * W + w);
      if constexpr (sizeof(E) == 1) {  // the codes (< 256) as unsigned bytes, in order again
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                            _mm256_permute4x64_epi64(_mm256_packus_epi16(lo, hi), 0xd8));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), lo);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), hi);
      }
      const __m256i any = _mm256_or_si256(lo, hi);
      x.nonzero[r * W + w] = !_mm256_testz_si256(any, any);
      if (sums)
        x.sum[r] += sum_lanes(_mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_set1_epi16(1)),
                                               _mm256_madd_epi16(hi, _mm256_set1_epi16(1))));
    }
  }
}
#endif

}  // namespace

bool prob_matmul_fits(const MatmulArgs& m) {
#if SPIKEOPS_X86_INTRINSICS
  return best_isa() >= Isa::kAvx2 && byte_kernel_fits(m);
#else
  (void)m;
  return false;
#endif
}

void prob_matmul(const ProbMatmulArgs& p) {
#if SPIKEOPS_X86_INTRINSICS
  const bool sums = p.m.b.zero != nullptr;
  if (best_isa() >= Isa::kAvx512Vnni) {
    ByteRows x = byte_rows(p.m);
    at::parallel_for(0, p.m.a.M, 256, [&](int64_t begin, int64_t end) {
      prob_rows(p, x, sums, begin, end);
    });
    run_byte_tasks<float>(p.m, x);
    return;
  }
  const auto run = [&](auto code) {
    using E = decltype(code);
    WordRows<E> x = word_rows<E>(p.m);
    at::parallel_for(0, p.m.a.M, 256, [&](int64_t begin, int64_t end) {
      prob_words<E>(p, x, sums, begin, end);
    });
    run_word_tasks<float, E>(p.m, x);
  };
  if (word_bytes(p.m))
    run(int8_t{});
  else
    run(int16_t{});
#else
  (void)p;
  TORCH_CHECK(false, "prob_matmul: the fused kernel needs x86 intrinsics (prob_matmul_fits)");
#endif
}

void channel_major_write(const ChannelMajorArgs& a) {
  const int64_t w0 = a.start / 32, w1 = (a.start + a.T + 31) / 32;
  const int64_t rows = a.G * a.K, planes = a.P + (a.sign != nullptr);
  at::parallel_for(0, planes * rows, 4096 / (w1 - w0) + 1, [&](int64_t begin, int64_t end) {
    for (int64_t pr = begin; pr < end; ++pr)  // (plane p, row)
      for (int64_t w = w0; w < w1; ++w)
        a.out[pr * a.words + w] = channel_major_word(a, pr / rows, pr % rows, w);
  });
}

void spike_matmul(const MatmulArgs& a) {
#if SPIKEOPS_X86_INTRINSICS
  if (a.N > 0 && byte_kernel_fits(a)) {
    if (best_isa() >= Isa::kAvx512Vnni) {
      dispatch_out_float(a.out_type, [&](auto tag) { matmul_bytes<decltype(tag)>(a); });
      return;
    }
    if (best_isa() >= Isa::kAvx2) {
      const bool bytes = word_bytes(a);
      dispatch_out_float(a.out_type, [&](auto tag) {
        if (bytes)
          matmul_words<decltype(tag), int8_t>(a);
        else
          matmul_words<decltype(tag), int16_t>(a);
      });
      return;
    }
  }
#endif
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
