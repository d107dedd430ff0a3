// The int backend of spike_linear on x86 CPUs with AVX-512 VNNI or AVX2: integer dot products of
// 8-bit activation codes and 4-bit weight codes (vpdpbusd; vpmaddubsw + vpmaddwd on AVX2), on
// the CPU layout of the weights that spikeops.GPTQWeight builds once (docs/ops.md, spike_linear,
// "CPU layout"):
//   packed[t, b, 4 * n + j]: byte of columns 16t + n, channels 8b + j (low nibble) and
//                            8b + 4 + j (high nibble), j = 0..3;
//   code_sums[g, n]        : sum of the weight codes q of group g, column n.
// A 64-byte row of packed is one zmm: masking the low nibbles gives the codes of channels
// 8b..8b+3 of 16 columns as u8x4 per lane, shifting the high nibbles those of 8b+4..8b+7, and
// vpdpbusd adds four code products per lane at once. Each token's codes are broadcast as four
// bytes; unsigned encodings (Q <= 255) are the instruction's unsigned operand and the weight
// codes (<= 15) its signed one, signed encodings (|sQ| <= 127) the other way round.
//
// The integers are those of csrc/cpu/linear.cpp, so the outputs are identical bit for bit:
//   D[g, r] = sum over k in group g, range r of (s*Q - zero[r]) * (q - z)
//           = A - z * sum(s*Q) - zero[r] * sum(q) + zero[r] * z * count,   A = sum s*Q * q,
// then the same epilogue (float32 product per group, float64 sums, groups in ascending order,
// groups with no nonzero code skipped).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPIKEOPS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define SPIKEOPS_AVX2 __attribute__((target("avx2")))
#define SPIKEOPS_HAVE_VNNI_BUILD 1
#else
#define SPIKEOPS_HAVE_VNNI_BUILD 0
#endif

namespace spikeops {
namespace cpu {

// Largest group the int32 epilogue covers: |D| <= gs * (255 * 15 + 15 * 255 + 1e4 * 15 +
// 1e4 * 16) < 2^31 for gs <= 4096 (codes < 256, weight codes and zeros <= 16, |zero| <= 1e4).
constexpr int64_t kMaxGroup = 4096;

// Channels per group of the layout: group_size, or all of K (padded to whole blocks of 8) for
// one group.
int64_t layout_group(const LinearArgs& a) {
  return a.G == 1 ? (a.K + 7) / 8 * 8 : a.group_size;
}

IntIsa int_isa() {
#if SPIKEOPS_HAVE_VNNI_BUILD
  static const IntIsa supported = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
      return IntIsa::kAvx512Vnni;
    return __builtin_cpu_supports("avx2") ? IntIsa::kAvx2 : IntIsa::kGeneric;
  }();
  // SPIKEOPS_CPU_ISA=avx2 or =generic caps the choice (read on every call, so that the tests
  // run every path in one process); it never enables what the CPU lacks.
  const char* forced = std::getenv("SPIKEOPS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "generic") == 0) return IntIsa::kGeneric;
  if (forced != nullptr && std::strcmp(forced, "avx2") == 0 && supported == IntIsa::kAvx512Vnni)
    return IntIsa::kAvx2;
  return supported;
#else
  return IntIsa::kGeneric;
#endif
}

const char* int_isa_name(IntIsa isa) {
  switch (isa) {
    case IntIsa::kAvx512Vnni: return "avx512vnni";
    case IntIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

#if SPIKEOPS_HAVE_VNNI_BUILD
namespace {

constexpr int kTileCols = 16;  // columns per zmm of int32 lanes
constexpr int kTiles = 4;        // column tiles per task: independent accumulator chains
constexpr int kBlockTokens = 4;  // tokens per task when M allows: one weight load serves them

// One token's codes as the kernel broadcasts them: byte k is channel k, so dwords 2b and 2b + 1
// hold channels 8b..8b+3 and 8b+4..8b+7 of block b; per range (R = 2: range 1 codes and an
// indicator of range-1 channels).
struct TokenCodes {
  std::vector<int32_t> act[2];   // [2 * KB] dwords of s*Q (or Q) per range, zero elsewhere
  std::vector<int32_t> ind1;     // [2 * KB] dwords of 1 for range-1 channels (R = 2)
  std::vector<int64_t> sum_a;    // [G * R] sum of s*Q over (g, r)
  std::vector<int64_t> count;    // [G * R] channels of (g, r), k < K
  std::vector<uint8_t> nonzero;  // [G * R] some c = s*Q - zero[r] != 0
};

void token_codes(const LinearArgs& a, int64_t m, int64_t KB, int64_t gs, TokenCodes& t) {
  const int64_t G = a.G, R = a.R;
  for (int r = 0; r < R; ++r) t.act[r].assign(2 * KB, 0);
  if (R == 2) t.ind1.assign(2 * KB, 0);
  t.sum_a.assign(G * R, 0);
  t.count.assign(G * R, 0);
  t.nonzero.assign(G * R, 0);
  const int32_t* zero = a.zero ? a.zero + m * R : nullptr;
  for (int64_t w = 0; w < a.W; ++w) {
    const int64_t at = m * a.W + w;
    const uint32_t sgn = a.sign ? a.sign[at] : 0u, hib = a.hi ? a.hi[at] : 0u;
    const int64_t k_end = std::min<int64_t>(32 * w + 32, a.K);
    for (int64_t k = 32 * w; k < k_end; ++k) {
      const int j = static_cast<int>(k - 32 * w);
      const int32_t v = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, j), sgn, j);
      const int r = a.hi ? range_of(hib, j) : 0;
      const int64_t gr = (k / gs) * R + r;
      t.sum_a[gr] += v;
      t.count[gr] += 1;
      if (v - (zero ? zero[r] : 0) != 0) t.nonzero[gr] = 1;
      reinterpret_cast<uint8_t*>(t.act[r].data())[k] = static_cast<uint8_t>(v);
      if (r == 1) reinterpret_cast<uint8_t*>(t.ind1.data())[k] = 1;
    }
  }
}

constexpr int kCols = kTiles * kTileCols;

// The instruction-set kernels. dot: A[t][c] = sum over the k-blocks [b0, b1) of the codes of
// token t times the weight codes of column 16 * t0 + c, for kMB tokens and `tiles` tiles of 16
// columns; every weight row is loaded once for all the tokens (prefill reuses each byte kMB
// times), and blocks silent in every token are never read. fold: the epilogue of one group and
// range for one token, S[c] += double(scales[g, n] * float(D)), with
//   D = A - z * sum(s*Q) - zero * sum(q) + zero * z * count        (int32: see kMaxGroup),
// the integers and roundings of the generic kernel.
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

struct Avx512 {
  template <bool kUnsigned, int kMB>
  SPIKEOPS_AVX512 static void dot(const uint8_t* packed, int64_t KB, int64_t t0, int tiles,
                                  int64_t b0, int64_t b1, const int32_t* const* act,
                                  int32_t (*A)[kCols]) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512i acc[kMB][kTiles];
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < tiles; ++i) acc[t][i] = _mm512_setzero_si512();
    for (int64_t b = b0; b < b1; ++b) {
      int32_t a_lo[kMB], a_hi[kMB];
      if (!block_codes<kMB>(act, b, a_lo, a_hi)) continue;
      for (int i = 0; i < tiles; ++i) {
        const __m512i w = _mm512_loadu_si512(packed + ((t0 + i) * KB + b) * 64);
        const __m512i w_lo = _mm512_and_si512(w, low);
        const __m512i w_hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        for (int t = 0; t < kMB; ++t) {
          const __m512i x_lo = _mm512_set1_epi32(a_lo[t]), x_hi = _mm512_set1_epi32(a_hi[t]);
          if constexpr (kUnsigned) {  // activations u8, weight codes s8 (<= 15)
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], x_lo, w_lo);
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], x_hi, w_hi);
          } else {                    // weight codes u8, activations s8
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], w_lo, x_lo);
            acc[t][i] = _mm512_dpbusd_epi32(acc[t][i], w_hi, x_hi);
          }
        }
      }
    }
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < tiles; ++i) _mm512_storeu_si512(A[t] + i * kTileCols, acc[t][i]);
  }

  SPIKEOPS_AVX512 static void fold(const LinearArgs& a, int64_t g, int64_t n0, int cols,
                                   const int32_t* A, const int32_t* Q1, bool range1,
                                   int32_t sum_a, int32_t zr, int32_t count, double* S) {
    for (int c0 = 0; c0 < cols; c0 += kTileCols) {
      const int valid = cols - c0 < kTileCols ? cols - c0 : kTileCols;
      const __mmask16 mask =
          valid == kTileCols ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      const int64_t at = g * a.N + n0 + c0;
      const __m512i z = _mm512_maskz_loadu_epi32(mask, a.zeros + at);
      __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(A + c0),
                                   _mm512_mullo_epi32(z, _mm512_set1_epi32(sum_a)));
      if (zr != 0) {
        const __m512i q1 = Q1 ? _mm512_loadu_si512(Q1 + c0) : _mm512_setzero_si512();
        const __m512i qsum = range1 ? q1 : _mm512_sub_epi32(
            _mm512_maskz_loadu_epi32(mask, a.code_sums + at), q1);
        d = _mm512_sub_epi32(d, _mm512_mullo_epi32(_mm512_set1_epi32(zr), qsum));
        d = _mm512_add_epi32(d, _mm512_mullo_epi32(_mm512_set1_epi32(zr * count), z));
      }
      const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a.scales + at),
                                        _mm512_cvtepi32_ps(d));
      double* s = S + c0;
      _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s),
                                        _mm512_cvtps_pd(_mm512_castps512_ps256(prod))));
      _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), _mm512_cvtps_pd(
          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(prod), 1)))));
    }
  }
};

// The same with 256-bit AVX2: a 64-byte row is two halves of 8 columns, and the four-byte dot
// product is vpmaddubsw (pairs of u8 x s8 into int16, at most 2 * 255 * 15 or 2 * 15 * 127: no
// saturation) followed by vpmaddwd with ones (pairs of int16 into int32).
struct Avx2 {
  template <bool kUnsigned, int kMB>
  SPIKEOPS_AVX2 static void dot(const uint8_t* packed, int64_t KB, int64_t t0, int tiles,
                                int64_t b0, int64_t b1, const int32_t* const* act,
                                int32_t (*A)[kCols]) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i acc[kMB][kTiles][2];
    for (int t = 0; t < kMB; ++t)
      for (int i = 0; i < tiles; ++i) acc[t][i][0] = acc[t][i][1] = _mm256_setzero_si256();
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
      for (int i = 0; i < tiles; ++i)
        for (int h = 0; h < 2; ++h)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(A[t] + i * kTileCols + 8 * h),
                              acc[t][i][h]);
  }

  SPIKEOPS_AVX2 static void fold(const LinearArgs& a, int64_t g, int64_t n0, int cols,
                                 const int32_t* A, const int32_t* Q1, bool range1,
                                 int32_t sum_a, int32_t zr, int32_t count, double* S) {
    for (int c = 0; c < cols; ++c) {  // the compiler vectorizes this for AVX2
      const int64_t at = g * a.N + n0 + c;
      const int32_t z = a.zeros[at];
      int32_t d = A[c] - z * sum_a;
      if (zr != 0) {
        const int32_t q1 = Q1 ? Q1[c] : 0;
        d -= zr * (range1 ? q1 : a.code_sums[at] - q1);
        d += zr * count * z;
      }
      S[c] += static_cast<double>(a.scales[at] * static_cast<float>(d));
    }
  }
};

// Geometry of one call.
struct Plan {
  int64_t KB, NT, gs;
  std::vector<int32_t> silent;  // [2 * KB] zero dwords: the codes of padding tokens
};

// One task: tokens [m0, m0 + mb), mb <= kMB, column tiles [t0, t0 + kTiles), every group.
template <typename Isa, bool kUnsigned, int kMB, typename T>
void run_task(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes,
              int64_t m0, int mb, int64_t t0, T* y) {
  double S[kMB][2][kCols];
  alignas(64) int32_t A[kMB][kCols], Q1[kMB][kCols];
  const int64_t R = a.R;
  const int tiles = static_cast<int>(std::min<int64_t>(kTiles, p.NT - t0));
  const int64_t n0 = t0 * kTileCols;
  const int cols = static_cast<int>(std::min<int64_t>(tiles * kTileCols, a.N - n0));
  const int32_t* act[kMB];
  std::fill(&S[0][0][0], &S[0][0][0] + kMB * 2 * kCols, 0.0);
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t b0 = g * p.gs / 8, b1 = std::min<int64_t>(p.KB, (g + 1) * p.gs / 8);
    for (int64_t r = 0; r < R; ++r) {
      bool any = false;
      for (int t = 0; t < mb; ++t) any = any || codes[m0 + t].nonzero[g * R + r];
      if (!any) continue;  // as the generic kernel: empty groups are skipped
      for (int t = 0; t < kMB; ++t) act[t] = t < mb ? codes[m0 + t].act[r].data() : p.silent.data();
      Isa::template dot<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
      // sum(q) over (g, r) for the zero point term: the group's from code_sums, range 1's by
      // a dot product with the indicator of range-1 channels.
      const bool two_ranges = R == 2 && a.zero;
      if (two_ranges) {
        for (int t = 0; t < kMB; ++t) act[t] = t < mb ? codes[m0 + t].ind1.data() : p.silent.data();
        Isa::template dot<true, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, Q1);
      }
      for (int t = 0; t < mb; ++t) {
        const TokenCodes& tc = codes[m0 + t];
        if (!tc.nonzero[g * R + r]) continue;
        Isa::fold(a, g, n0, cols, A[t], two_ranges ? Q1[t] : nullptr, r == 1,
                  static_cast<int32_t>(tc.sum_a[g * R + r]),
                  a.zero ? a.zero[(m0 + t) * R + r] : 0,
                  static_cast<int32_t>(tc.count[g * R + r]), S[t][r]);
      }
    }
  }
  for (int t = 0; t < mb; ++t) {
    const int64_t m = m0 + t;
    for (int c = 0; c < cols; ++c) {
      double v = static_cast<double>(a.scale[m * R]) * S[t][0][c];
      if (R == 2) v += static_cast<double>(a.scale[m * R + 1]) * S[t][1][c];
      if (a.bias) v += static_cast<double>(a.bias[n0 + c]);
      y[m * a.N + n0 + c] = static_cast<T>(static_cast<float>(v));
    }
  }
}

template <typename Isa, bool kUnsigned, int kMB, typename T>
void run(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes) {
  const int64_t col_tasks = (p.NT + kTiles - 1) / kTiles, blocks = (a.M + kMB - 1) / kMB;
  T* y = static_cast<T*>(a.out);
  // Token blocks of the same columns are neighbours, so their weight rows meet in cache.
  at::parallel_for(0, col_tasks * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task % blocks) * kMB;
      const int mb = static_cast<int>(std::min<int64_t>(kMB, a.M - m0));
      run_task<Isa, kUnsigned, kMB, T>(a, p, codes, m0, mb, (task / blocks) * kTiles, y);
    }
  });
}

template <typename Isa, bool kUnsigned, typename T>
void run(const LinearArgs& a) {
  Plan p;
  p.KB = (a.K + 7) / 8;
  p.NT = (a.N + kTileCols - 1) / kTileCols;
  p.gs = layout_group(a);
  p.silent.assign(2 * p.KB, 0);
  std::vector<TokenCodes> codes(a.M);
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) token_codes(a, m, p.KB, p.gs, codes[m]);
  });
  // One token per task at decode (no padding work), four per task beyond.
  if (a.M < kBlockTokens) {
    run<Isa, kUnsigned, 1, T>(a, p, codes);
  } else {
    run<Isa, kUnsigned, kBlockTokens, T>(a, p, codes);
  }
}

template <typename Isa>
void run_isa(const LinearArgs& a) {
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    if (a.sign) {
      run<Isa, false, T>(a);
    } else {
      run<Isa, true, T>(a);
    }
  });
}

}  // namespace
#endif

IntIsa int_layout_isa(const LinearArgs& a) {
  const IntIsa isa = int_isa();
  if (isa == IntIsa::kGeneric || a.packed == nullptr || a.bits != 4) return IntIsa::kGeneric;
  if (layout_group(a) > kMaxGroup) return IntIsa::kGeneric;
  // Codes must fit the instructions' bytes: unsigned Q <= 255 (P <= 8), signed |s*Q| <= 127.
  return (a.sign ? a.P <= 7 : a.P <= 8) ? isa : IntIsa::kGeneric;
}

void spike_linear_int_layout(const LinearArgs& a, IntIsa isa) {
#if SPIKEOPS_HAVE_VNNI_BUILD
  if (isa == IntIsa::kAvx512Vnni) {
    run_isa<Avx512>(a);
  } else {
    run_isa<Avx2>(a);
  }
#else
  (void)a, (void)isa;
#endif
}

}  // namespace cpu
}  // namespace spikeops
