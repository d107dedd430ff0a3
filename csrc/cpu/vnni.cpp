// The int backend of spike_linear on x86 CPUs with AVX-512 VNNI: integer dot products of 8-bit
// activation codes and 4-bit weight codes (vpdpbusd), on the CPU layout of the weights that
// spikeops.GPTQWeight builds once (docs/ops.md, spike_linear, "CPU layout"):
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
#define SPIKEOPS_VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define SPIKEOPS_HAVE_VNNI_BUILD 1
#else
#define SPIKEOPS_HAVE_VNNI_BUILD 0
#endif

namespace spikeops {
namespace cpu {

// Largest group the int32 epilogue covers: |D| <= gs * (255 * 15 + 15 * 255 + 1e4 * 15 +
// 1e4 * 16) < 2^31 for gs <= 4096 (codes < 256, weight codes and zeros <= 16, |zero| <= 1e4).
constexpr int64_t kMaxGroup = 4096;

bool vnni_available() {
#if SPIKEOPS_HAVE_VNNI_BUILD
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
  }();
  // SPIKEOPS_CPU_ISA=generic forces the portable kernel; read on every call, so that the tests
  // run both paths in one process.
  const char* forced = std::getenv("SPIKEOPS_CPU_ISA");
  return supported && !(forced != nullptr && std::strcmp(forced, "generic") == 0);
#else
  return false;
#endif
}

#if SPIKEOPS_HAVE_VNNI_BUILD
namespace {

constexpr int kTileCols = 16;  // columns per zmm of int32 lanes
constexpr int kTiles = 4;        // column tiles per task: independent accumulator chains
constexpr int kBlockTokens = 4;  // tokens per task when M allows: one weight load serves them

// One token's codes in the layout the kernel broadcasts: bytes of channels 8b..8b+3 and
// 8b+4..8b+7 as two dwords per block b, per range (R = 2: range 1 codes and an indicator).
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
      // channel k -> dword 2 * (k / 8) + (k % 8) / 4, byte k % 4
      reinterpret_cast<uint8_t*>(t.act[r].data())[(2 * (k / 8) + (k % 8) / 4) * 4 + k % 4] =
          static_cast<uint8_t>(v);
      if (r == 1) reinterpret_cast<uint8_t*>(t.ind1.data())[(2 * (k / 8) + (k % 8) / 4) * 4 + k % 4] = 1;
    }
  }
}

// A of kMB tokens x kTiles column tiles over the k-blocks [b0, b1) of one group: every weight
// row is loaded once for all the tokens of the block (prefill reuses each byte kMB times).
template <bool kUnsigned, int kMB>
SPIKEOPS_VNNI_TARGET inline void dot_tiles(const uint8_t* packed, int64_t KB, int64_t t0,
                                           int tiles, int64_t b0, int64_t b1,
                                           const int32_t* const* act, __m512i (*acc)[kTiles]) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int t = 0; t < kMB; ++t)
    for (int i = 0; i < tiles; ++i) acc[t][i] = _mm512_setzero_si512();
  for (int64_t b = b0; b < b1; ++b) {
    int32_t a_lo[kMB], a_hi[kMB];
    int32_t any = 0;
    for (int t = 0; t < kMB; ++t) {
      a_lo[t] = act[t][2 * b];
      a_hi[t] = act[t][2 * b + 1];
      any |= a_lo[t] | a_hi[t];
    }
    if (any == 0) continue;  // eight channels silent in every token: their weights are not read
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
}

// Geometry of one call.
struct Plan {
  int64_t KB, NT, gs;
  std::vector<int32_t> silent;  // [2 * KB] zero dwords: the codes of padding tokens
};

// The epilogue of one group and range for one token and the task's columns, 16 at a time:
//   D = A - z * sum(s*Q) - zero * sum(q) + zero * z * count        (int32: see kMaxGroup)
//   S += double(scales[g, n] * float(D)),
// the same integers and roundings as the generic kernel's scalar loop.
SPIKEOPS_VNNI_TARGET inline void fold(const LinearArgs& a, int64_t g, int64_t n0, int tiles,
                                      int cols, const __m512i* A, const __m512i* Q1, bool range1,
                                      int32_t sum_a, int32_t zr, int32_t count, double* S) {
  for (int i = 0; i < tiles; ++i) {
    const int valid = std::min(kTileCols, cols - i * kTileCols);
    const __mmask16 mask = valid == kTileCols ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
    const int64_t at = g * a.N + n0 + i * kTileCols;
    const __m512i z = _mm512_maskz_loadu_epi32(mask, a.zeros + at);
    __m512i d = _mm512_sub_epi32(A[i], _mm512_mullo_epi32(z, _mm512_set1_epi32(sum_a)));
    if (zr != 0) {
      const __m512i qsum = range1 ? Q1[i] : _mm512_sub_epi32(
          _mm512_maskz_loadu_epi32(mask, a.code_sums + at), Q1 ? Q1[i] : _mm512_setzero_si512());
      d = _mm512_sub_epi32(d, _mm512_mullo_epi32(_mm512_set1_epi32(zr), qsum));
      d = _mm512_add_epi32(d, _mm512_mullo_epi32(_mm512_set1_epi32(zr * count), z));
    }
    const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a.scales + at),
                                      _mm512_cvtepi32_ps(d));
    double* s = S + i * kTileCols;
    _mm512_storeu_pd(s, _mm512_add_pd(_mm512_loadu_pd(s),
                                      _mm512_cvtps_pd(_mm512_castps512_ps256(prod))));
    _mm512_storeu_pd(s + 8, _mm512_add_pd(_mm512_loadu_pd(s + 8), _mm512_cvtps_pd(
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(prod), 1)))));
  }
}

// One task: tokens [m0, m0 + mb), mb <= kMB, column tiles [t0, t0 + kTiles), every group.
template <bool kUnsigned, int kMB, typename T>
SPIKEOPS_VNNI_TARGET void run_task(const LinearArgs& a, const Plan& p,
                                   const std::vector<TokenCodes>& codes, int64_t m0, int mb,
                                   int64_t t0, T* y) {
  constexpr int kCols = kTiles * kTileCols;
  alignas(64) double S[kMB][2][kCols];
  __m512i A[kMB][kTiles], Q1[kMB][kTiles];
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
      dot_tiles<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
      // sum(q) over (g, r) for the zero point term: the group's from code_sums, range 1's by
      // a dot product with the indicator of range-1 channels.
      const bool two_ranges = R == 2 && a.zero;
      if (two_ranges) {
        for (int t = 0; t < kMB; ++t) act[t] = t < mb ? codes[m0 + t].ind1.data() : p.silent.data();
        dot_tiles<true, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, Q1);
      }
      for (int t = 0; t < mb; ++t) {
        const TokenCodes& tc = codes[m0 + t];
        if (!tc.nonzero[g * R + r]) continue;
        fold(a, g, n0, tiles, cols, A[t], two_ranges ? Q1[t] : nullptr, r == 1,
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

template <bool kUnsigned, int kMB, typename T>
void run(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes) {
  const int64_t col_tasks = (p.NT + kTiles - 1) / kTiles, blocks = (a.M + kMB - 1) / kMB;
  T* y = static_cast<T*>(a.out);
  // Token blocks of the same columns are neighbours, so their weight rows meet in cache.
  at::parallel_for(0, col_tasks * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task % blocks) * kMB;
      const int mb = static_cast<int>(std::min<int64_t>(kMB, a.M - m0));
      run_task<kUnsigned, kMB, T>(a, p, codes, m0, mb, (task / blocks) * kTiles, y);
    }
  });
}

template <bool kUnsigned, typename T>
void run(const LinearArgs& a) {
  Plan p;
  p.KB = (a.K + 7) / 8;
  p.NT = (a.N + kTileCols - 1) / kTileCols;
  p.gs = a.G == 1 ? p.KB * 8 : a.group_size;  // one group: all blocks
  p.silent.assign(2 * p.KB, 0);
  std::vector<TokenCodes> codes(a.M);
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) token_codes(a, m, p.KB, p.gs, codes[m]);
  });
  // One token per task at decode (no padding work), four per task beyond.
  if (a.M < kBlockTokens) {
    run<kUnsigned, 1, T>(a, p, codes);
  } else {
    run<kUnsigned, kBlockTokens, T>(a, p, codes);
  }
}

}  // namespace
#endif

bool vnni_usable(const LinearArgs& a) {
  if (!vnni_available() || a.packed == nullptr || a.bits != 4) return false;
  const int64_t gs = a.G == 1 ? (a.K + 7) / 8 * 8 : a.group_size;
  if (gs > kMaxGroup) return false;
  // Codes must fit the instruction's bytes: unsigned Q <= 255 (P <= 8), signed |s*Q| <= 127.
  return a.sign ? a.P <= 7 : a.P <= 8;
}

void spike_linear_vnni(const LinearArgs& a) {
#if SPIKEOPS_HAVE_VNNI_BUILD
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    if (a.sign) {
      run<false, T>(a);
    } else {
      run<true, T>(a);
    }
  });
#else
  (void)a;
#endif
}

}  // namespace cpu
}  // namespace spikeops
