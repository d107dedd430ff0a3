// The int backend of spike_linear on x86 CPUs with AMX, AVX-512 VNNI or AVX2, on the CPU layout of
// the weights (cpu/layout.cpp): the choice of instruction set and the schedule. Each token's
// codes are laid out once as bytes (TokenCodes); tasks of blocks of kBlockTokens tokens (16 for
// AMX, 6 for AVX-512 from kPrefillTokens on) and kTiles tiles of 16 columns run the
// instruction-set kernels of cpu/int_layout_isa.h over every group: dot products over the
// group's channels, then the group's epilogue (fold; AVX-512's blocks of six fold from their
// registers, dot_fold).
//
// The integers are those of csrc/cpu/linear.cpp, so the outputs are identical bit for bit:
//   D[g, r] = sum over k in group g, range r of (s*Q - zero[r]) * (q - z)
//           = A - z * sum(s*Q) - zero[r] * sum(q) + zero[r] * z * count,   A = sum s*Q * q,
// then the same epilogue (float32 product per group, float64 sums, groups in ascending order,
// groups with no nonzero code skipped, linear_epilogue). With activation groups the units are
// the activation groups u (run_task_groups): D[u] the same sum over u's channels with zero[m, u],
// the term scale[m, u] * S_u added to Y for u ascending, linear_output (generic: fold_group).
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/int_layout_isa.h"
#include "cpu/kernels.h"

namespace spikeops {
namespace cpu {

#if SPIKEOPS_X86_INTRINSICS
namespace {

using namespace isa_kernels;  // this file's kernels, in their own header

// Tokens from which AMX runs (blocks of 16, the last one padded with silent tokens); fewer
// take AVX-512 VNNI. Measured on 4096 -> 11008: see docs/performance.md.
constexpr int64_t kAmxTokens = 8;

// One token's codes as the kernel broadcasts them: byte k is channel k, so dwords 2b and 2b + 1
// hold channels 8b..8b+3 and 8b+4..8b+7 of block b; per range (R = 2: range 1 codes and an
// indicator of range-1 channels).
// The sums are per fold unit: (layout group g, range r) as unit g * R + r, or with activation
// groups the activation group u (its scale column), which lies in one weight group.
struct TokenCodes {
  std::vector<int32_t> act[2];   // [2 * KB] dwords of s*Q (or Q) per range, zero elsewhere
  std::vector<int32_t> ind1;     // [2 * KB] dwords of 1 for range-1 channels (R = 2)
  std::vector<int64_t> sum_a;    // [units] sum of s*Q over the unit
  std::vector<int64_t> count;    // [units] channels of the unit, k < K
  std::vector<uint8_t> nonzero;  // [units] some c = s*Q - zero[m, r] != 0
};

// Fold units of a call: G * R, or R activation groups.
int64_t fold_units(const LinearArgs& a) { return a.group ? a.R : a.G * a.R; }

// Empties t for a token's codes: K bytes per range, sums, counts and flags per unit.
void reset_codes(const LinearArgs& a, int64_t KB, TokenCodes& t) {
  const int64_t U = fold_units(a);
  for (int r = 0; r < (a.hi ? 2 : 1); ++r) t.act[r].assign(2 * KB, 0);
  if (a.hi) t.ind1.assign(2 * KB, 0);
  t.sum_a.assign(U, 0);
  t.count.assign(U, 0);
  t.nonzero.assign(U, 0);
}

// centered (zero points that fit, centered_codes): the bytes and sum_a are those of
// c = Q - zero[m, r], signed, instead of Q.
void token_codes(const LinearArgs& a, int64_t m, int64_t KB, int64_t gs, bool centered,
                 TokenCodes& t) {
  const int64_t R = a.R;
  reset_codes(a, KB, t);
  const int32_t* zero = a.zero ? a.zero + m * R : nullptr;
  for (int64_t w = 0; w < a.W; ++w) {
    const int64_t at = m * a.W + w;
    const uint32_t sgn = a.sign ? a.sign[at] : 0u, hib = a.hi ? a.hi[at] : 0u;
    const int64_t k_end = std::min<int64_t>(32 * w + 32, a.K);
    for (int64_t k = 32 * w; k < k_end; ++k) {
      const int j = static_cast<int>(k - 32 * w);
      const int32_t v = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, j), sgn, j);
      const int r = a.hi ? range_of(hib, j) : 0;        // the code's range
      const int64_t col = scale_column(a, w, hib, j);   // its scale column
      const int64_t gr = a.group ? col : (k / gs) * R + r;
      const int32_t c = v - (zero ? zero[col] : 0);
      const int32_t byte = centered ? c : v;
      t.sum_a[gr] += byte;
      t.count[gr] += 1;
      if (c != 0) t.nonzero[gr] = 1;
      reinterpret_cast<uint8_t*>(t.act[r].data())[k] = static_cast<uint8_t>(byte);
      if (r == 1) reinterpret_cast<uint8_t*>(t.ind1.data())[k] = 1;
    }
  }
}

// Whether every word of 32 channels lies in one fold unit per range, as token_codes_avx512
// needs: activation groups (whole words), layout groups of whole words, or one group.
bool word_units(const LinearArgs& a, int64_t gs) { return a.group || gs % 32 == 0 || a.G == 1; }

// token_codes with AVX-512 (BW), a word of 32 channels at a time (the low half of a zmm): the
// codes as bytes by masked adds of each plane's bit, negated where the sign bit is set, per range
// centered or not; the unit's sum by a dot product with ones, its count by the range's mask. The
// same bytes and sums as token_codes, which took about 25 us a token at K = 4,096 on Zen 4, a
// quarter of the dot products' time at M = 256 (docs/performance.md, "The CPU engine").
SPIKEOPS_TARGET_AVX512 void token_codes_avx512(const LinearArgs& a, int64_t m, int64_t KB,
                                               int64_t gs, bool centered, TokenCodes& t) {
  const int64_t R = a.R;
  reset_codes(a, KB, t);
  const int32_t* zero = a.zero ? a.zero + m * R : nullptr;
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t w = 0; w < a.W; ++w) {
    const int64_t at = m * a.W + w;
    const int64_t valid_ch = std::min<int64_t>(32, a.K - 32 * w);
    const uint32_t valid = valid_ch == 32 ? ~0u : (1u << valid_ch) - 1u;
    __m512i v = _mm512_setzero_si512();
    for (int64_t p = 0; p < a.P; ++p)
      v = _mm512_mask_add_epi8(v, a.planes[p * a.M * a.W + at] & valid, v,
                               _mm512_set1_epi8(static_cast<char>(1 << p)));
    const uint32_t sgn = a.sign ? a.sign[at] & valid : 0u, hib = a.hi ? a.hi[at] : 0u;
    if (sgn) v = _mm512_mask_sub_epi8(v, sgn, _mm512_setzero_si512(), v);
    for (int r = 0; r < (a.hi ? 2 : 1); ++r) {
      const uint32_t rmask = (a.hi ? (r ? hib : ~hib) : ~0u) & valid;
      if (rmask == 0) continue;
      const int64_t col = a.group ? w / (a.group / 32) : r;  // scale_column of the word
      const int64_t gr = a.group ? col : (32 * w / gs) * R + r;
      const int32_t z = zero ? zero[col] : 0;
      const __m512i bytes = centered ? _mm512_maskz_sub_epi8(rmask, v, _mm512_set1_epi8(
                                                                static_cast<char>(z)))
                                     : _mm512_maskz_mov_epi8(rmask, v);
      _mm512_mask_storeu_epi8(reinterpret_cast<uint8_t*>(t.act[r].data()) + 32 * w, valid, bytes);
      // Signed bytes (signed or centered codes) or unsigned (Q) against ones.
      const bool is_signed = a.sign || centered;
      t.sum_a[gr] += _mm512_reduce_add_epi32(
          is_signed ? _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, bytes)
                    : _mm512_dpbusd_epi32(_mm512_setzero_si512(), bytes, ones));
      t.count[gr] += __builtin_popcount(rmask);
      // Some c = s*Q - zero != 0: a nonzero byte where the bytes are c (centered, or no zero
      // point), else a Q other than the zero point (every Q is, when it lies past a byte).
      bool nonzero;
      if (is_signed || !zero) {
        nonzero = _mm512_test_epi8_mask(bytes, bytes) != 0;
      } else if (z >= 0 && z <= 255) {
        nonzero = (_mm512_cmpneq_epi8_mask(v, _mm512_set1_epi8(static_cast<char>(z))) & rmask) != 0;
      } else {
        nonzero = true;
      }
      if (nonzero) t.nonzero[gr] = 1;
    }
    if (a.hi)
      _mm512_mask_storeu_epi8(reinterpret_cast<uint8_t*>(t.ind1.data()) + 32 * w, valid,
                              _mm512_maskz_mov_epi8(hib & valid, ones));
  }
}

// Geometry of one call.
struct Plan {
  int64_t KB, NT, gs;
  std::vector<int32_t> silent;  // [2 * KB] zero dwords: the codes of padding tokens
  // Activation groups with zero points in units smaller than their layout group: sum(q) over a
  // unit is a dot product with ones, the indicator of channels k < K ([2 * KB] dwords).
  bool unit_qsum = false;
  std::vector<int32_t> ones;
  bool centered = false;        // the codes are c = Q - zero[m, r] (centered_codes)
};

// Zero points (per token, range or activation group u): when every c = Q - zero[m, u] fits a
// signed byte (zero points in [2^P - 1 - 127, 128]; minmax4 rows or groups that hold both signs
// have them in [0, 15]), the codes are c itself, on the kernels of signed encodings:
// D = sum(c q) - z sum(c), exactly the same integer with no zero point term, so neither sum(q)
// over the unit (range 1's dot product with its indicator, a unit's with ones) nor its product
// in the epilogue. Else Q (unsigned) and the zero point term.
bool centered_codes(const LinearArgs& a) {
  if (!a.zero) return false;
  const int32_t lo = (int32_t{1} << a.P) - 1 - 127;
  for (int64_t i = 0; i < a.M * a.R; ++i)
    if (a.zero[i] < lo || a.zero[i] > 128) return false;
  return true;
}

// Tokens per task (kMB at least): blocks of kMB tokens on the same columns, walked inside each
// group, so that the group's scales, zero points and code sums are widened once for all of them
// and its weight rows (64 columns x gs channels: 4 KB at gs = 128) come from L1 for every block
// after the first. One task per block of four tokens re-widened them per block, as often as 16
// blocks of dot products (docs/performance.md, "The CPU engine").
constexpr int kSpanTokens = 16;

// Tokens from which the vector kernels take blocks of kPrefillBlock tokens (AVX-512: 6, the
// register-blocked kernel, dot_fold) instead of kBlockTokens: 4096 -> 11008 at M = 16 took
// 5.4-5.7 ms before the change that brought them, 3.7-4.0 ms after (docs/performance.md, "The
// CPU engine").
constexpr int64_t kPrefillTokens = 16;

// Tokens per task: kSpanTokens rounded up to whole blocks of kMB.
template <int kMB>
constexpr int span_of() {
  return (std::max(kMB, kSpanTokens) + kMB - 1) / kMB * kMB;
}

// Whether blocks of kMB tokens on Kernels fold from the dot product's registers (dot_fold).
template <typename Kernels, int kMB>
constexpr bool kFusedFold = std::is_same_v<Kernels, Avx512> && kMB == Avx512::kPrefillBlock;

// One task: tokens [m0, m0 + span), span <= kSpan, in blocks of kMB; column tiles
// [t0, t0 + kTiles); every group.
template <typename Kernels, bool kUnsigned, int kMB, typename T>
void run_task(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes,
              int64_t m0, int span, int64_t t0, T* y) {
  constexpr int kSpan = span_of<kMB>();
  static_assert(kSpan % kMB == 0, "a span is whole blocks");
  double S[kSpan][2][kCols];
  alignas(64) int32_t A[kMB][kCols], Q1[kMB][kCols];
  GroupCols gc{};  // zeros past the task's columns, which dot_fold reads
  const int64_t R = a.R;
  const int tiles = static_cast<int>(std::min<int64_t>(kTiles, p.NT - t0));
  const int64_t n0 = t0 * kTileCols;
  const int cols = static_cast<int>(std::min<int64_t>(tiles * kTileCols, a.N - n0));
  const int32_t* act[kMB];
  std::fill(&S[0][0][0], &S[0][0][0] + span * 2 * kCols, 0.0);
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t b0 = g * p.gs / 8, b1 = std::min<int64_t>(p.KB, (g + 1) * p.gs / 8);
    bool loaded = false;
    for (int64_t r = 0; r < R; ++r) {
      for (int j0 = 0; j0 < span; j0 += kMB) {
        const int64_t mj = m0 + j0;
        const int mb = std::min(kMB, span - j0);
        bool any = false;
        for (int t = 0; t < mb; ++t) any = any || codes[mj + t].nonzero[g * R + r];
        if (!any) continue;  // as the generic kernel: empty groups are skipped
        if (!loaded) gc.load(a, g, n0, cols), loaded = true;
        for (int t = 0; t < kMB; ++t)
          act[t] = t < mb ? codes[mj + t].act[r].data() : p.silent.data();
        const bool zero_term = a.zero && !p.centered;
        if constexpr (kFusedFold<Kernels, kMB>) {
          if (!zero_term) {  // the prefill kernel folds from its registers
            int32_t sum_a[kMB];
            double* Sp[kMB];
            for (int t = 0; t < kMB; ++t) {
              const bool live = t < mb && codes[mj + t].nonzero[g * R + r];
              sum_a[t] = live ? static_cast<int32_t>(codes[mj + t].sum_a[g * R + r]) : 0;
              Sp[t] = live ? S[j0 + t][r] : nullptr;
            }
            Kernels::template dot_fold<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act,
                                                       gc, sum_a, Sp);
            continue;
          }
        }
        Kernels::template dot<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
        // sum(q) over (g, r) for the zero point term: the group's from code_sums, range 1's by
        // a dot product with the indicator of range-1 channels.
        const bool two_ranges = R == 2 && zero_term;
        if (two_ranges) {
          for (int t = 0; t < kMB; ++t)
            act[t] = t < mb ? codes[mj + t].ind1.data() : p.silent.data();
          Kernels::template dot<true, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, Q1);
        }
        for (int t = 0; t < mb; ++t) {
          const TokenCodes& tc = codes[mj + t];
          if (!tc.nonzero[g * R + r]) continue;
          Kernels::fold(gc, cols, A[t], two_ranges ? Q1[t] : nullptr, r == 1,
                        static_cast<int32_t>(tc.sum_a[g * R + r]),
                        zero_term ? a.zero[(mj + t) * R + r] : 0,
                        static_cast<int32_t>(tc.count[g * R + r]), S[j0 + t][r]);
        }
      }
    }
  }
  for (int t = 0; t < span; ++t) {
    const int64_t m = m0 + t;
    for (int c = 0; c < cols; ++c) {
      const double S1 = R == 2 ? S[t][1][c] : 0.0;
      y[m * a.N + n0 + c] = static_cast<T>(linear_epilogue(a, m, n0 + c, S[t][0][c], S1));
    }
  }
}

// run_task with activation groups: the fold units are the activation groups u ascending (blocks
// [u * group / 8, (u + 1) * group / 8) of the layout), each folded with the scales and zero points
// of its weight group g(u) (widened once per weight group and task) and its own sum(q): the
// layout group's code sums when the unit is the whole layout group, else a dot product with the
// indicator of channels < K, once per unit and task (for the vector kernels as one more token of
// the first block that computes the unit, so that it shares the weight loads). Each unit adds
// its epilogue term scale[m, u] * S_u into the token's Y (docs/ops.md; generic: fold_group).
template <typename Kernels, bool kUnsigned, int kMB, typename T>
void run_task_groups(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes,
                     int64_t m0, int span, int64_t t0, T* y) {
  constexpr int kSpan = span_of<kMB>();
  constexpr bool kTiles16 = Kernels::kBlock > kBlockTokens;  // AMX: the indicator on AVX-512
  double Y[kSpan][kCols];
  alignas(64) int32_t A[kMB + 1][kCols];  // row kMB: sum(q) over the unit (unit_qsum)
  GroupCols gc;
  const int tiles = static_cast<int>(std::min<int64_t>(kTiles, p.NT - t0));
  const int64_t n0 = t0 * kTileCols;
  const int cols = static_cast<int>(std::min<int64_t>(tiles * kTileCols, a.N - n0));
  const int64_t unit_blocks = a.group / 8;
  const int32_t* act[kMB + 1];
  std::fill(&Y[0][0], &Y[0][0] + span * kCols, 0.0);
  int64_t loaded = -1;  // the weight group in gc
  for (int64_t u = 0; u < a.R; ++u) {
    const int64_t b0 = u * unit_blocks, b1 = std::min<int64_t>(p.KB, b0 + unit_blocks);
    const int64_t g = weight_group_of(a, u);
    bool have_qsum = !p.unit_qsum;  // or centered: no zero point term
    for (int j0 = 0; j0 < span; j0 += kMB) {
      const int64_t mj = m0 + j0;
      const int mb = std::min(kMB, span - j0);
      bool any = false;
      for (int t = 0; t < mb; ++t) any = any || codes[mj + t].nonzero[u];
      if (!any) continue;  // as the generic kernel: units with no nonzero code are skipped
      if (loaded != g) gc.load(a, g, n0, cols), loaded = g;
      for (int t = 0; t < kMB; ++t)
        act[t] = t < mb ? codes[mj + t].act[0].data() : p.silent.data();
      if (have_qsum) {
        Kernels::template dot<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
      } else if constexpr (kTiles16) {
        Kernels::template dot<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
        const int32_t* ones[1] = {p.ones.data()};
        Avx512::dot<kUnsigned, 1>(a.packed, p.KB, t0, tiles, b0, b1, ones, A + kMB);
      } else {  // ones is 1 as an unsigned and as a signed byte
        act[kMB] = p.ones.data();
        Kernels::template dot<kUnsigned, kMB + 1>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
      }
      have_qsum = true;
      for (int t = 0; t < mb; ++t) {
        const int64_t m = mj + t;
        if (!codes[m].nonzero[u]) continue;
        // sum(q) over the unit: A[kMB] (passed as range 1's), else the group's code sums.
        Kernels::template fold<true>(gc, cols, A[t], p.unit_qsum ? A[kMB] : nullptr,
                                     p.unit_qsum, static_cast<int32_t>(codes[m].sum_a[u]),
                                     a.zero && !p.centered ? a.zero[m * a.R + u] : 0,
                                     static_cast<int32_t>(codes[m].count[u]), Y[j0 + t],
                                     static_cast<double>(a.scale[m * a.R + u]));
      }
    }
  }
  for (int t = 0; t < span; ++t) {
    const int64_t m = m0 + t;
    // The skipped units' terms scale[m, u] * 0.0, as the generic kernel adds them (fold_silent):
    // +0.0 for finite scales, NaN for a non-finite row's.
    double silent = 0.0;
    for (int64_t u = 0; u < a.R; ++u)
      if (!codes[m].nonzero[u]) silent += scale_term(a, m, u, 0.0);
    for (int c = 0; c < cols; ++c)
      y[m * a.N + n0 + c] = static_cast<T>(linear_output(a, n0 + c, Y[t][c] + silent));
  }
}

// Multiply-adds a thread takes on at least (tokens x channels x columns): below it the OpenMP
// region's start costs more than a second thread saves. At decode on 2 threads of Zen 4, 576 ->
// 192 (110 k) took 5.0 us on one thread and 5.9 us on two, 576 -> 1,536 (885 k) 13 us on one and
// 9.2 us on two (docs/performance.md, "Whole model on the CPU"); tasks are grouped so that each
// thread gets this much, and a call with less runs serially.
constexpr int64_t kThreadWork = int64_t(1) << 17;

template <typename Kernels, bool kUnsigned, int kMB, typename T>
void run(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes) {
  constexpr int64_t kSpan = span_of<kMB>();
  const int64_t col_tasks = (p.NT + kTiles - 1) / kTiles, spans = (a.M + kSpan - 1) / kSpan;
  const int64_t task_work = std::min(a.M, kSpan) * a.K * kCols;
  const int64_t grain = (kThreadWork + task_work - 1) / task_work;
  T* y = static_cast<T*>(a.out);
  // Token spans of the same columns are neighbours, so their weight rows meet in cache.
  at::parallel_for(0, col_tasks * spans, grain, [&](int64_t begin, int64_t end) {
    Kernels::begin();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task % spans) * kSpan;
      const int span = static_cast<int>(std::min<int64_t>(kSpan, a.M - m0));
      if (a.group) {
        run_task_groups<Kernels, kUnsigned, kMB, T>(a, p, codes, m0, span,
                                                    (task / spans) * kTiles, y);
      } else {
        run_task<Kernels, kUnsigned, kMB, T>(a, p, codes, m0, span, (task / spans) * kTiles, y);
      }
    }
    Kernels::end();
  });
}

template <typename Kernels, bool kUnsigned, typename T>
void run(const LinearArgs& a) {
  Plan p;
  p.KB = (a.K + 7) / 8;
  p.NT = (a.N + kTileCols - 1) / kTileCols;
  p.gs = layout_group(a.bits, a.group_size, a.K);  // > 0: the entry admitted the layout
  p.silent.assign(2 * p.KB, 0);
  // A unit is its layout group when group == gs, or when one activation group spans the one
  // weight group (both all of K).
  p.centered = a.zero && !kUnsigned;  // zero points only come with unsigned codes
  p.unit_qsum = a.group && a.zero && !p.centered &&
                !(a.group == p.gs || (a.R == 1 && a.G == 1));
  if (p.unit_qsum) {
    p.ones.assign(2 * p.KB, 0);
    std::fill_n(reinterpret_cast<uint8_t*>(p.ones.data()), a.K, uint8_t{1});
  }
  std::vector<TokenCodes> codes(a.M);
  const bool vector_codes = !std::is_same_v<Kernels, Avx2> && word_units(a, p.gs);
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      if (vector_codes) {
        token_codes_avx512(a, m, p.KB, p.gs, p.centered, codes[m]);
      } else {
        token_codes(a, m, p.KB, p.gs, p.centered, codes[m]);
      }
    }
  });
  // AMX: blocks of 16 tokens (it runs from kAmxTokens on). Else one token per task at decode
  // (no padding work), four per task beyond, and from kPrefillTokens on the kernels' prefill
  // block (AVX-512: six; not with the ones of unit_qsum, a seventh token past the registers).
  if constexpr (Kernels::kBlock > kBlockTokens) {
    run<Kernels, kUnsigned, Kernels::kBlock, T>(a, p, codes);
  } else if (a.M < kBlockTokens) {
    run<Kernels, kUnsigned, 1, T>(a, p, codes);
  } else if (Kernels::kPrefillBlock != kBlockTokens && a.M >= kPrefillTokens && !p.unit_qsum) {
    run<Kernels, kUnsigned, Kernels::kPrefillBlock, T>(a, p, codes);
  } else {
    run<Kernels, kUnsigned, kBlockTokens, T>(a, p, codes);
  }
}

template <typename Kernels>
void run_isa(const LinearArgs& a) {
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    if (a.sign || centered_codes(a)) {
      run<Kernels, false, T>(a);
    } else {
      run<Kernels, true, T>(a);
    }
  });
}

}  // namespace
#endif

Isa int_layout_isa(const LinearArgs& a) {
  const Isa isa = best_isa();
  if (isa == Isa::kGeneric || a.packed == nullptr) return Isa::kGeneric;
  // Codes must fit the instructions' bytes: unsigned Q <= 255 (P <= 8), signed |s*Q| <= 127.
  return (a.sign ? a.P <= 7 : a.P <= 8) ? isa : Isa::kGeneric;
}

void spike_linear_int_layout(const LinearArgs& a, Isa isa) {
#if SPIKEOPS_X86_INTRINSICS
  if (isa == Isa::kAmx && a.M >= kAmxTokens) {
    run_isa<Amx>(a);
  } else if (isa == Isa::kAmx || isa == Isa::kAvx512Vnni) {
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
