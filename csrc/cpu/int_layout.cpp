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
// groups with no nonzero code skipped, linear_epilogue).
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

// Geometry of one call.
struct Plan {
  int64_t KB, NT, gs;
  std::vector<int32_t> silent;  // [2 * KB] zero dwords: the codes of padding tokens
};

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
      run_task<Kernels, kUnsigned, kMB, T>(a, p, codes, m0, span, (task / spans) * kTiles, y);
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
  std::vector<TokenCodes> codes(a.M);
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) token_codes(a, m, p.KB, p.gs, codes[m]);
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
    if (a.sign) {
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
  if (isa == Isa::kGeneric || a.packed == nullptr || a.group) return Isa::kGeneric;
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
