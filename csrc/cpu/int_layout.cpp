// The int backend of spike_linear on x86 CPUs with AMX, AVX-512 VNNI or AVX2, on the CPU layout of
// the weights (cpu/layout.cpp): the choice of instruction set and the schedule. Each token's
// codes are laid out once as bytes (TokenCodes); tasks of up to kBlockTokens tokens (16 for AMX)
// and kTiles tiles of 16 columns run the instruction-set kernels of cpu/int_layout_isa.h over
// every group: dot products over the group's channels, then the group's epilogue (fold).
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

// centered (activation groups with zero points that fit, centered_codes): the bytes and sum_a
// are those of c = Q - zero[m, u], signed, instead of Q.
void token_codes(const LinearArgs& a, int64_t m, int64_t KB, int64_t gs, bool centered,
                 TokenCodes& t) {
  const int64_t R = a.R, U = fold_units(a);
  for (int r = 0; r < (a.hi ? 2 : 1); ++r) t.act[r].assign(2 * KB, 0);
  if (a.hi) t.ind1.assign(2 * KB, 0);
  t.sum_a.assign(U, 0);
  t.count.assign(U, 0);
  t.nonzero.assign(U, 0);
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

// Geometry of one call.
struct Plan {
  int64_t KB, NT, gs;
  std::vector<int32_t> silent;  // [2 * KB] zero dwords: the codes of padding tokens
  // Activation groups with zero points in units smaller than their layout group: sum(q) over a
  // unit is a dot product with ones, the indicator of channels k < K ([2 * KB] dwords).
  bool unit_qsum = false;
  std::vector<int32_t> ones;
  bool centered = false;        // the codes are c = Q - zero[m, u] (centered_codes)
};

// Activation groups with zero points: when every c = Q - zero[m, u] fits a signed byte (zero
// points in [2^P - 1 - 127, 128]; minmax4 groups that hold both signs have them in [0, 15]), the
// codes are c itself, on the kernels of signed encodings: D = sum(c q) - z sum(c), exactly the
// same integer with no zero point term, so neither sum(q) over the unit nor its dot product
// with ones. Else Q (unsigned) and the zero point term, as without groups.
bool centered_codes(const LinearArgs& a) {
  if (!a.group || !a.zero) return false;
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

// One task: tokens [m0, m0 + span), span <= kSpan, in blocks of kMB; column tiles
// [t0, t0 + kTiles); every group.
template <typename Kernels, bool kUnsigned, int kMB, typename T>
void run_task(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes,
              int64_t m0, int span, int64_t t0, T* y) {
  constexpr int kSpan = std::max(kMB, kSpanTokens);
  static_assert(kSpan % kMB == 0, "a span is whole blocks");
  double S[kSpan][2][kCols];
  alignas(64) int32_t A[kMB][kCols], Q1[kMB][kCols];
  GroupCols gc;
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
        Kernels::template dot<kUnsigned, kMB>(a.packed, p.KB, t0, tiles, b0, b1, act, A);
        // sum(q) over (g, r) for the zero point term: the group's from code_sums, range 1's by
        // a dot product with the indicator of range-1 channels.
        const bool two_ranges = R == 2 && a.zero;
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
                        a.zero ? a.zero[(mj + t) * R + r] : 0,
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
  constexpr int kSpan = std::max(kMB, kSpanTokens);
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

template <typename Kernels, bool kUnsigned, int kMB, typename T>
void run(const LinearArgs& a, const Plan& p, const std::vector<TokenCodes>& codes) {
  constexpr int64_t kSpan = std::max(kMB, kSpanTokens);
  const int64_t col_tasks = (p.NT + kTiles - 1) / kTiles, spans = (a.M + kSpan - 1) / kSpan;
  T* y = static_cast<T*>(a.out);
  // Token spans of the same columns are neighbours, so their weight rows meet in cache.
  at::parallel_for(0, col_tasks * spans, 1, [&](int64_t begin, int64_t end) {
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
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) token_codes(a, m, p.KB, p.gs, p.centered, codes[m]);
  });
  // AMX: blocks of 16 tokens (it runs from kAmxTokens on). Else one token per task at decode
  // (no padding work), four per task beyond.
  if constexpr (Kernels::kBlock > kBlockTokens) {
    run<Kernels, kUnsigned, Kernels::kBlock, T>(a, p, codes);
  } else if (a.M < kBlockTokens) {
    run<Kernels, kUnsigned, 1, T>(a, p, codes);
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
