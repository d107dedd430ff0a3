// The instruction-set kernels of spike_linear's int backend on the CPU layout (cpu/layout.cpp):
// integer dot products of 8-bit activation codes and 4-bit weight codes with AVX-512 VNNI
// (vpdpbusd, four code products per lane), AVX2 (vpmaddubsw + vpmaddwd) and AMX (tdpbusd /
// tdpbsud on tiles of 16 tokens), and the epilogue of one group (fold). cpu/int_layout.cpp
// chooses among them and schedules them; this header is its part.
//
// Each token's codes are broadcast as four bytes; unsigned encodings (Q <= 255) are the
// instructions' unsigned operand and the weight codes (<= 15) their signed one, signed encodings
// (|sQ| <= 127) the other way round. AMX multiplies a tile of 16 tokens x 64 channels by a tile of
// 64 channels x 16 columns: the low and high nibbles of a layout row are, as they stand, two rows
// of the AMX weight tile (four consecutive channels of 16 columns), so a tile is 8 layout rows
// unpacked.
// The int32 epilogue cannot overflow: |D| <= gs * (255 * 15 + 15 * 255 + 1e4 * 15 + 1e4 * 16)
// < 2^31 for gs <= kMaxLayoutGroup (codes < 256, weight codes and zeros <= 16, |zero| <= 1e4).
#pragma once

#include "cpu/kernels.h"

#if SPIKEOPS_X86_INTRINSICS
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace spikeops {
namespace cpu {
namespace isa_kernels {

constexpr int kTileCols = 16;    // columns per zmm of int32 lanes
constexpr int kTiles = 4;        // column tiles per task: independent accumulator chains
constexpr int kBlockTokens = 4;  // tokens per block when M allows: one weight load serves them
                                 // (AVX-512 prefill: Avx512::kPrefillBlock)

constexpr int kCols = kTiles * kTileCols;
constexpr int64_t kPrefetchBlocks = 64;  // AVX-512 decode: weight rows fetched 4 KB ahead

// What the epilogue of one group reads for the task's columns, widened once per group and shared
// by its tokens and ranges: zero points, float32 scales and code sums.
struct GroupCols {
  alignas(64) int32_t zero[kCols];
  alignas(64) float scale[kCols];
  alignas(64) int32_t code_sum[kCols];

  // Compiled for AVX2 with F16C, which every instruction set of this file implies (cpu/isa.h).
  // Three loops the compiler vectorizes (vcvtph2ps; vpmovzxwd; the zero points, 4-bit as the
  // layout's, eight per qzeros word, shifted by a constant vector): one fused loop stayed scalar,
  // and it ran once per group and task, as often as 16 blocks of dot products (docs/
  // performance.md, "The CPU engine"). n0 is a multiple of 16; the fields of a word past column
  // N are read (qzeros holds whole words) but not used.
  SPIKEOPS_TARGET_AVX2 void load(const LinearArgs& a, int64_t g, int64_t n0, int cols) {
    const uint16_t* s = a.scales + g * a.N + n0;
    const uint16_t* sums = a.code_sums + g * a.N + n0;
    const int32_t* words = a.qzeros + g * ((a.N + 7) / 8) + n0 / 8;
    for (int c = 0; c < cols; ++c) scale[c] = half_to_float(s[c]);
    for (int c = 0; c < cols; ++c) code_sum[c] = sums[c];
    for (int w = 0; w < (cols + 7) / 8; ++w)
      for (int j = 0; j < 8; ++j)
        zero[8 * w + j] = gptq_field(words[w], 4 * j, 15u) + a.zero_offset;
  }
};

// The instruction-set kernels. dot: A[t][c] = sum over the k-blocks [b0, b1) of the codes of
// token t times the weight codes of column 16 * t0 + c, for kMB tokens and `tiles` tiles of 16
// columns; every weight row is loaded once for all the tokens (prefill reuses each byte kMB
// times), and blocks silent in every token are never read. fold: the epilogue of one group and
// range for one token, S[c] += double(scales[g, n] * float(D)), with
//   D = A - z * sum(s*Q) - zero * sum(q) + zero * z * count        (int32: see kMaxLayoutGroup),
// the integers and roundings of the generic kernel. fold<true> (activation groups) adds the
// epilogue term instead: S[c] += scale * double(scales[g, n] * float(D)), scale = scale[m, u].
// The two code dwords of block b of every token (channels 8b..8b+3, 8b+4..8b+7); false when
// all are zero, so the block's weights need not be read.
template <int kMB>
inline bool block_codes(const int32_t* const* act, int64_t b, int32_t* lo, int32_t* hi) {
  int32_t any = 0;
  for (int t = 0; t < kMB; ++t) {
    lo[t] = act[t][2 * b];
    hi[t] = act[t][2 * b + 1];
    any |= lo[t] | hi[t];
  }
  return any != 0;
}

// What the vector-register kernels share: blocks of kBlockTokens tokens, no per-thread state
// to set up or release (AMX has both).
struct VectorRegisters {
  static constexpr int kBlock = kBlockTokens;
  static constexpr int kPrefillBlock = kBlockTokens;
  static void begin() {}
  static void end() {}
};

struct Avx512 : VectorRegisters {
  // Tokens per block of prefill (from kPrefillTokens on, cpu/int_layout.cpp): kPrefillBlock
  // tokens x kTiles tiles are 24 independent accumulator chains, which Zen 4 needs to run
  // vpdpbusd at its peak (docs/performance.md, "The CPU engine").
  static constexpr int kPrefillBlock = 6;

  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX512 static void dot(const uint8_t* packed, int64_t KB, int64_t t0,
                                         int tiles, int64_t b0, int64_t b1,
                                         const int32_t* const* act, int32_t (*A)[kCols]) {
    if constexpr (kMB <= 2) {
      dot_decode<kUnsigned, kMB>(packed, KB, t0, tiles, b0, b1, act, A);
    } else {
      dot_prefill<kUnsigned, kMB>(packed, KB, t0, tiles, b0, b1, act, A);
    }
  }

  // Decode (one token, or one and the ones of activation groups): memory-bound, each weight row
  // read once; both nibbles of a row go to the same accumulator.
  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX512 static void dot_decode(const uint8_t* packed, int64_t KB, int64_t t0,
                                                int tiles, int64_t b0, int64_t b1,
                                                const int32_t* const* act,
                                                int32_t (*A)[kCols]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    // Every tile's accumulators are zeroed and stored, so that they stay in registers (with
    // `tiles` bounds, GCC spills them and calls memset and memcpy).
    __m512i acc[kMB][kTiles];
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < kTiles; ++i) acc[t][i] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      int32_t a_lo[kMB], a_hi[kMB];
      if (!block_codes<kMB>(act, b, a_lo, a_hi)) continue;
      for (int i = 0; i < tiles; ++i) {
        // Decode reads each weight row once, from memory: the rows kPrefetchBlocks ahead are
        // fetched now (one core's four streams, 32 KB apart, outran the hardware prefetchers of
        // Zen 4: docs/performance.md, "The CPU engine"). The last row stands for those past it.
        _mm_prefetch(reinterpret_cast<const char*>(
            packed + ((t0 + i) * KB + std::min<int64_t>(b + kPrefetchBlocks, KB - 1)) * 64),
                     _MM_HINT_T0);
        const __m512i w = _mm512_loadu_si512(packed + ((t0 + i) * KB + b) * 64);
        const __m512i w_lo = _mm512_and_si512(w, low);
        const __m512i w_hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        for (int t = 0; t < kMB; ++t) {
          const __m512i x_lo = _mm512_set1_epi32(a_lo[t]), x_hi = _mm512_set1_epi32(a_hi[t]);
          acc[t][i] = dpbusd<kUnsigned>(acc[t][i], x_lo, w_lo);
          acc[t][i] = dpbusd<kUnsigned>(acc[t][i], x_hi, w_hi);
        }
      }
    }
    for (int t = 0; t < kMB; ++t)  // every tile, in registers, zero past `tiles`
      for (int i = 0; i < kTiles; ++i) _mm512_storeu_si512(A[t] + i * kTileCols, acc[t][i]);
  }

  // Prefill: kMB x kTiles accumulators (24 at kPrefillBlock) and, per block, one nibble of the
  // kTiles weight rows at a time (kTiles registers, not 2 * kTiles: all fit the 32 zmm); each
  // token's code dword is broadcast from memory. The weight rows of the group come from L1 for
  // every block of tokens after the first. Tiles past `tiles` (the last task of a ragged N)
  // repeat the first tile; their sums are never output.
  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX512 __attribute__((always_inline)) static inline void accumulate(
      const uint8_t* packed, int64_t KB, int64_t t0, int tiles, int64_t b0, int64_t b1,
      const int32_t* const* act, __m512i (&acc)[kMB][kTiles]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const uint8_t* rows[kTiles];
    for (int i = 0; i < kTiles; ++i) rows[i] = packed + (t0 + (i < tiles ? i : 0)) * KB * 64;
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < kTiles; ++i) acc[t][i] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      // Both code dwords of each token in one 64-bit load, for the test only: the broadcasts
      // below then read the codes from memory (loads the compiler cannot share with these).
      uint64_t any = 0;
      for (int t = 0; t < kMB; ++t) {
        uint64_t both;
        std::memcpy(&both, act[t] + 2 * b, sizeof(both));
        any |= both;
      }
      if (any == 0) continue;  // silent in every token: the block's weights are not read
      for (int h = 0; h < 2; ++h) {
        __m512i w[kTiles];
        for (int i = 0; i < kTiles; ++i) {
          const __m512i v = _mm512_loadu_si512(rows[i] + b * 64);
          w[i] = _mm512_and_si512(h ? _mm512_srli_epi16(v, 4) : v, low);
        }
        for (int t = 0; t < kMB; ++t) {
          const __m512i x = _mm512_set1_epi32(act[t][2 * b + h]);
          for (int i = 0; i < kTiles; ++i) acc[t][i] = dpbusd<kUnsigned>(acc[t][i], x, w[i]);
        }
      }
    }
  }

  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX512 static void dot_prefill(const uint8_t* packed, int64_t KB,
                                                 int64_t t0, int tiles, int64_t b0, int64_t b1,
                                                 const int32_t* const* act,
                                                 int32_t (*A)[kCols]) {
    __m512i acc[kMB][kTiles];
    accumulate<kUnsigned, kMB>(packed, KB, t0, tiles, b0, b1, act, acc);
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < kTiles; ++i) _mm512_storeu_si512(A[t] + i * kTileCols, acc[t][i]);
  }

  // dot_prefill and the fold of its kMB tokens from the accumulators, for units without a zero
  // point term (signed or centered codes): D = A - z * sum_a, then fold's float32 product and
  // float64 sum, the same operations on the same values per output (identical bits). The group's
  // zero points and scales are loaded once for the kMB tokens; S[t] is null for a token that
  // skips the unit (no nonzero code, or padding). gc holds zeros past the task's columns.
  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX512 static void dot_fold(const uint8_t* packed, int64_t KB, int64_t t0,
                                              int tiles, int64_t b0, int64_t b1,
                                              const int32_t* const* act, const GroupCols& gc,
                                              const int32_t* sum_a, double* const* S) {
    __m512i acc[kMB][kTiles];
    accumulate<kUnsigned, kMB>(packed, KB, t0, tiles, b0, b1, act, acc);
    for (int i = 0; i < kTiles; ++i) {
      const __m512i z = _mm512_load_si512(gc.zero + i * kTileCols);
      const __m512 scale = _mm512_load_ps(gc.scale + i * kTileCols);
      for (int t = 0; t < kMB; ++t) {
        if (S[t] == nullptr) continue;
        const __m512i d =
            _mm512_sub_epi32(acc[t][i], _mm512_mullo_epi32(z, _mm512_set1_epi32(sum_a[t])));
        add_product(_mm512_mul_ps(scale, _mm512_cvtepi32_ps(d)), S[t] + i * kTileCols);
      }
    }
  }

  // s[0..16) += float64(prod), the float64 sum of the epilogue; kTerm (activation groups):
  // += scale * float64(prod), scale_term's product rounded, then added.
  template <bool kTerm = false>
  SPIKEOPS_TARGET_AVX512 __attribute__((always_inline)) static inline void add_product(
      __m512 prod, double* s, double scale = 0.0) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(prod));
    __m512d hi = _mm512_cvtps_pd(
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(prod), 1)));
    if constexpr (kTerm) {
      const __m512d ts = _mm512_set1_pd(scale);
      lo = _mm512_mul_pd(ts, lo);
      hi = _mm512_mul_pd(ts, hi);
    }
    _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s), lo));
    _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), hi));
  }

  // acc + the four-byte dot products of the codes x and the weight codes w: unsigned encodings
  // have u8 activations and s8 weight codes (<= 15), signed ones u8 weight codes and s8
  // activations.
  template <bool kUnsigned>
  SPIKEOPS_TARGET_AVX512 static __m512i dpbusd(__m512i acc, __m512i x, __m512i w) {
    return kUnsigned ? _mm512_dpbusd_epi32(acc, x, w) : _mm512_dpbusd_epi32(acc, w, x);
  }

  template <bool kTerm = false>
  SPIKEOPS_TARGET_AVX512 static void fold(const GroupCols& gc, int cols, const int32_t* A,
                                          const int32_t* Q1, bool range1, int32_t sum_a,
                                          int32_t zr, int32_t count, double* S,
                                          double scale = 0.0) {
    for (int c0 = 0; c0 < cols; c0 += kTileCols) {
      const int valid = cols - c0 < kTileCols ? cols - c0 : kTileCols;
      const __mmask16 mask =
          valid == kTileCols ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      const __m512i z = _mm512_maskz_loadu_epi32(mask, gc.zero + c0);
      // D = A - z * (sum(s*Q) - zero * count) - zero * sum(q): the same integers in two
      // products (int32 arithmetic wraps, and D itself fits: see kMaxLayoutGroup).
      __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(A + c0),
                                   _mm512_mullo_epi32(z, _mm512_set1_epi32(sum_a - zr * count)));
      if (zr != 0) {
        const __m512i q1 = Q1 ? _mm512_loadu_si512(Q1 + c0) : _mm512_setzero_si512();
        const __m512i qsum = range1 ? q1 : _mm512_sub_epi32(
            _mm512_maskz_loadu_epi32(mask, gc.code_sum + c0), q1);
        d = _mm512_sub_epi32(d, _mm512_mullo_epi32(_mm512_set1_epi32(zr), qsum));
      }
      const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, gc.scale + c0),
                                        _mm512_cvtepi32_ps(d));
      add_product<kTerm>(prod, S + c0, scale);
    }
  }
};

// The same with 256-bit AVX2: a 64-byte row is two halves of 8 columns, and the four-byte dot
// product is vpmaddubsw (pairs of u8 x s8 into int16, at most 2 * 255 * 15 or 2 * 15 * 127: no
// saturation) followed by vpmaddwd with ones (pairs of int16 into int32).
struct Avx2 : VectorRegisters {
  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AVX2 static void dot(const uint8_t* packed, int64_t KB, int64_t t0, int tiles,
                                       int64_t b0, int64_t b1, const int32_t* const* act,
                                       int32_t (*A)[kCols]) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i acc[kMB][kTiles][2];  // all zeroed, as AVX-512's
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < kTiles; ++i) acc[t][i][0] = acc[t][i][1] = _mm256_setzero_si256();
    for (int64_t b = b0; b < b1; ++b) {
      int32_t a_lo[kMB], a_hi[kMB];
      if (!block_codes<kMB>(act, b, a_lo, a_hi)) continue;
      for (int i = 0; i < tiles; ++i) {
        for (int h = 0; h < 2; ++h) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
              packed + ((t0 + i) * KB + b) * 64 + 32 * h));
          const __m256i w_lo = _mm256_and_si256(w, low);
          const __m256i w_hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
          for (int t = 0; t < kMB; ++t) {
            const __m256i x_lo = _mm256_set1_epi32(a_lo[t]), x_hi = _mm256_set1_epi32(a_hi[t]);
            const __m256i p_lo = kUnsigned ? _mm256_maddubs_epi16(x_lo, w_lo)
                                           : _mm256_maddubs_epi16(w_lo, x_lo);
            const __m256i p_hi = kUnsigned ? _mm256_maddubs_epi16(x_hi, w_hi)
                                           : _mm256_maddubs_epi16(w_hi, x_hi);
            acc[t][i][h] = _mm256_add_epi32(
                acc[t][i][h], _mm256_madd_epi16(_mm256_add_epi16(p_lo, p_hi), ones));
          }
        }
      }
    }
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < kTiles; ++i)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(A[t] + i * kTileCols + 8 * h),
                              acc[t][i][h]);
  }

  template <bool kTerm = false>
  SPIKEOPS_TARGET_AVX2 static void fold(const GroupCols& gc, int cols, const int32_t* A,
                                        const int32_t* Q1, bool range1, int32_t sum_a,
                                        int32_t zr, int32_t count, double* S,
                                        double scale = 0.0) {
    for (int c = 0; c < cols; ++c) {  // the compiler vectorizes this for AVX2
      const int32_t z = gc.zero[c];
      int32_t d = A[c] - z * sum_a;
      if (zr != 0) {
        const int32_t q1 = Q1 ? Q1[c] : 0;
        d -= zr * (range1 ? q1 : gc.code_sum[c] - q1);
        d += zr * count * z;
      }
      const double Sd = static_cast<double>(gc.scale[c] * static_cast<float>(d));
      if constexpr (kTerm) {
        S[c] += scale * Sd;
      } else {
        S[c] += Sd;
      }
    }
  }
};

// AMX: tiles of 16 tokens x 64 channels (A, u8 or s8) times 64 channels x 16 columns (B, the
// other signedness), accumulated over a group into one int32 16 x 16 tile per column tile
// (tmm0..tmm3); tmm4 holds A, tmm5 B. The epilogue is AVX-512's.
struct Amx {
  static constexpr int kBlock = 16;  // tokens per tile
  static constexpr int kChunk = 8;   // packed rows (blocks of 8 channels) per tile: 64 channels

  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  };

  // The tile shapes live in a per-thread register that other code (oneDNN's AMX kernels in
  // torch) may load with its own: each thread's run of tasks loads this one first, and
  // releases the tiles after it (so that the thread's context switches stop saving them).
  SPIKEOPS_TARGET_AMX static void begin() {
    static const Config config = [] {
      Config c;
      for (int t = 0; t < 6; ++t) c.colsb[t] = 64, c.rows[t] = 16;
      return c;
    }();
    _tile_loadconfig(&config);
  }

  SPIKEOPS_TARGET_AMX static void end() { _tile_release(); }

  template <bool kUnsigned, int kMB>
  SPIKEOPS_TARGET_AMX static void dot(const uint8_t* packed, int64_t KB, int64_t t0, int tiles,
                                      int64_t b0, int64_t b1, const int32_t* const* act,
                                      int32_t (*A)[kCols]) {
    static_assert(kMB == kBlock, "AMX tiles hold 16 tokens");
    alignas(64) uint8_t a_tile[kBlock][64], b_tile[2 * kChunk][64];
    const __m512i low = _mm512_set1_epi8(0x0F);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = b0; c < b1; c += kChunk) {
      const int nb = static_cast<int>(std::min<int64_t>(kChunk, b1 - c));
      const __mmask64 bytes = nb == kChunk ? ~__mmask64(0) : (__mmask64(1) << (8 * nb)) - 1;
      __mmask64 any = 0;
      for (int t = 0; t < kBlock; ++t) {
        const __m512i v = _mm512_maskz_loadu_epi8(
            bytes, reinterpret_cast<const uint8_t*>(act[t]) + 8 * c);
        any |= _mm512_test_epi8_mask(v, v);
        _mm512_store_si512(a_tile[t], v);
      }
      if (!any) continue;  // channels silent in every token: their weights are not read
      compiler_barrier();
      _tile_loadd(4, a_tile, 64);
      for (int i = 0; i < tiles; ++i) {
        const uint8_t* rows = packed + ((t0 + i) * KB + c) * 64;
        for (int r = 0; r < kChunk; ++r) {
          const __m512i w = r < nb ? _mm512_loadu_si512(rows + 64 * r) : _mm512_setzero_si512();
          _mm512_store_si512(b_tile[2 * r], _mm512_and_si512(w, low));
          _mm512_store_si512(b_tile[2 * r + 1], _mm512_and_si512(_mm512_srli_epi16(w, 4), low));
        }
        compiler_barrier();
        _tile_loadd(5, b_tile, 64);
        // Tile registers are immediates. Unsigned encodings: activations u8, weight codes s8
        // (<= 15); signed: activations s8, weight codes u8.
#define SPIKEOPS_AMX_DP(tile)            \
  if constexpr (kUnsigned) {             \
    _tile_dpbusd(tile, 4, 5);            \
  } else {                               \
    _tile_dpbsud(tile, 4, 5);            \
  }
        switch (i) {
          case 0: SPIKEOPS_AMX_DP(0) break;
          case 1: SPIKEOPS_AMX_DP(1) break;
          case 2: SPIKEOPS_AMX_DP(2) break;
          default: SPIKEOPS_AMX_DP(3) break;
        }
#undef SPIKEOPS_AMX_DP
      }
    }
    int32_t* out = A[0];
    if (tiles > 0) _tile_stored(0, out, sizeof(A[0]));
    if (tiles > 1) _tile_stored(1, out + kTileCols, sizeof(A[0]));
    if (tiles > 2) _tile_stored(2, out + 2 * kTileCols, sizeof(A[0]));
    if (tiles > 3) _tile_stored(3, out + 3 * kTileCols, sizeof(A[0]));
    compiler_barrier();
  }

  // GCC's tile load and store intrinsics are asm statements that do not tell the compiler they
  // touch memory: without a barrier it may drop the stores that fill a tile buffer, or read
  // A before the tile store.
  static void compiler_barrier() { asm volatile("" ::: "memory"); }

  template <bool kTerm = false>
  static void fold(const GroupCols& gc, int cols, const int32_t* A, const int32_t* Q1,
                   bool range1, int32_t sum_a, int32_t zr, int32_t count, double* S,
                   double scale = 0.0) {
    Avx512::fold<kTerm>(gc, cols, A, Q1, range1, sum_a, zr, count, S, scale);
  }
};

}  // namespace isa_kernels
}  // namespace cpu
}  // namespace spikeops
#endif
