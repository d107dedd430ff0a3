// CPU kernels of gif_encode, spike_decode, spike_counts and spike_stats: one token row per task.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"

#if SPIKEOPS_X86_INTRINSICS
#include <immintrin.h>
#endif

namespace spikeops {
namespace cpu {
namespace {

// Quantizers of both ranges of one row, or finite = false for a row holding NaN or Inf.
struct RowQuant {
  bool finite;
  RangeQuant range[2];
};

#if SPIKEOPS_X86_INTRINSICS
// min, max and max |x| of a row, false if it holds NaN or Inf. Exact in any order, but for the
// sign of a zero minimum or maximum, which no code, scale or zero point depends on.
SPIKEOPS_TARGET_AVX512 bool row_stats_avx512(const float* x, int64_t K, float* mn, float* mx,
                                             float* amax) {
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512 lo = inf, hi = _mm512_sub_ps(_mm512_setzero_ps(), inf), top = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t n = std::min<int64_t>(16, K - k0);
    const __mmask16 valid = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + k0);
    // v - v is 0 for finite v and NaN for NaN or Inf
    if (_mm512_mask_cmp_ps_mask(valid, _mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_NEQ_UQ))
      return false;
    lo = _mm512_mask_min_ps(lo, valid, lo, v);
    hi = _mm512_mask_max_ps(hi, valid, hi, v);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  }
  *mn = _mm512_reduce_min_ps(lo);
  *mx = _mm512_reduce_max_ps(hi);
  *amax = _mm512_reduce_max_ps(top);
  return true;
}

// row_stats_avx512 on AVX2, 8 lanes at a time (lanes past K read as +-inf and 0).
SPIKEOPS_TARGET_AVX2 bool row_stats_avx2(const float* x, int64_t K, float* mn, float* mx,
                                         float* amax) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 minus_inf = _mm256_sub_ps(_mm256_setzero_ps(), inf);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 lo = inf, hi = minus_inf, top = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, K - k0));
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    const __m256 v = _mm256_maskload_ps(x + k0, valid);
    // v - v is 0 for finite v and NaN for NaN or Inf (lanes past K: 0)
    if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ)))
      return false;
    const __m256 in = _mm256_castsi256_ps(valid);
    lo = _mm256_min_ps(lo, _mm256_blendv_ps(inf, v, in));
    hi = _mm256_max_ps(hi, _mm256_blendv_ps(minus_inf, v, in));
    top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
  }
  alignas(32) float l[8], h[8], t[8];
  _mm256_store_ps(l, lo);
  _mm256_store_ps(h, hi);
  _mm256_store_ps(t, top);
  *mn = l[0], *mx = h[0], *amax = t[0];
  for (int i = 1; i < 8; ++i) {
    *mn = std::min(*mn, l[i]);
    *mx = std::max(*mx, h[i]);
    *amax = std::max(*amax, t[i]);
  }
  return true;
}
#endif

// The quantizers of channels [k0, k0 + K) of token m (the row, or one activation group of it:
// column r of the static scale), or finite = false if they hold NaN or Inf.
RowQuant row_quant(const EncodeArgs& a, const float* x, int64_t K, int64_t m, int64_t r,
                   Isa vector) {
  RowQuant rq{true, {}};
  float mn = std::numeric_limits<float>::infinity(), mx = -mn, amax = 0.f;
  ExactSum sum;
  const bool want_sum = a.mode == Mode::kAbsMean;
  const int64_t at = m * a.R + r;  // static scale [M] (R = 1) or [M, R]
  const float static_scale = a.static_scale ? a.static_scale[at] : 0.f;
  const int32_t static_zero = a.static_zero ? a.static_zero[at] : 0;
#if SPIKEOPS_X86_INTRINSICS
  if (vector != Isa::kGeneric && !want_sum) {
    const bool finite = vector == Isa::kAvx2 ? row_stats_avx2(x, K, &mn, &mx, &amax)
                                             : row_stats_avx512(x, K, &mn, &mx, &amax);
    if (!finite) return RowQuant{false, {}};
    row_quantizers(a, mn, mx, amax, 0.f, static_scale, static_zero, rq.range);
    return rq;
  }
#endif
  if (want_sum) sum.clear();
  for (int64_t k = 0; k < K; ++k) {
    const float v = x[k];
    if (!std::isfinite(v)) return RowQuant{false, {}};
    mn = std::fmin(mn, v);
    mx = std::fmax(mx, v);
    amax = std::fmax(amax, std::fabs(v));
    if (want_sum) sum.add(v);
  }
  row_quantizers(a, mn, mx, amax, want_sum ? exact_mean(sum, K) : 0.f, static_scale, static_zero,
                 rq.range);
  return rq;
}

#if SPIKEOPS_X86_INTRINSICS
// The planes and signs of words [w0, w1) of a finite row with one range and no salient channels
// (minmax, absmax, absmean, static), which all use the quantizer q, 16 channels at a time: the
// arithmetic of unsigned_code / signed_code in AVX-512 (IEEE division, rounding to nearest even,
// min and max of values that are not NaN), so the codes are element_code's, and plane p of 16
// codes is one mask test.
SPIKEOPS_TARGET_AVX512 void encode_words_avx512(const EncodeArgs& a, const float* x, int64_t m,
                                                int64_t w0, int64_t w1, const RangeQuant& q) {
  const __m512 scale = _mm512_set1_ps(q.scale), zero = _mm512_set1_ps(q.zero);
  const __m512 qmax = _mm512_set1_ps(static_cast<float>(q.qmax)), none = _mm512_setzero_ps();
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t plane_stride = a.M * a.W;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t plane_word[kMaxPlanes] = {0};
    uint32_t sign_word = 0;
    for (int h = 0; h < 2; ++h) {
      const int64_t k0 = 32 * w + 16 * h;
      if (k0 >= a.K) break;
      const int64_t n = std::min<int64_t>(16, a.K - k0);
      const __mmask16 valid = n == 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(valid, x + k0);
      __m512 c;
      if (a.is_signed) {
        c = _mm512_min_ps(_mm512_roundscale_ps(
            _mm512_div_ps(_mm512_abs_ps(v), scale), kNearest), qmax);
      } else {
        c = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(_mm512_roundscale_ps(
            _mm512_div_ps(v, scale), kNearest), zero), none), qmax);
      }
      const __m512i code = _mm512_maskz_cvttps_epi32(valid, c);
      for (int64_t p = 0; p < a.P; ++p)
        plane_word[p] |= static_cast<uint32_t>(_mm512_test_epi32_mask(
            code, _mm512_set1_epi32(1 << p))) << (16 * h);
      if (a.is_signed)
        sign_word |= static_cast<uint32_t>(_mm512_mask_cmp_ps_mask(valid, v, none, _CMP_LT_OQ) &
                                           _mm512_test_epi32_mask(code, code)) << (16 * h);
    }
    for (int64_t p = 0; p < a.P; ++p) a.planes[p * plane_stride + m * a.W + w] = plane_word[p];
    if (a.sign) a.sign[m * a.W + w] = sign_word;
  }
}

// encode_words_avx512 on AVX2, 8 channels at a time: the same IEEE operations; plane p of 8
// codes is the sign bits of the codes shifted left by 31 - p; bits past K are dropped.
SPIKEOPS_TARGET_AVX2 void encode_words_avx2(const EncodeArgs& a, const float* x, int64_t m,
                                            int64_t w0, int64_t w1, const RangeQuant& q) {
  const __m256 scale = _mm256_set1_ps(q.scale), zero = _mm256_set1_ps(q.zero);
  const __m256 qmax = _mm256_set1_ps(static_cast<float>(q.qmax)), none = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const int64_t plane_stride = a.M * a.W;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t plane_word[kMaxPlanes] = {0};
    uint32_t sign_word = 0;
    for (int e = 0; e < 4; ++e) {
      const int64_t k0 = 32 * w + 8 * e;
      if (k0 >= a.K) break;
      const int n = static_cast<int>(std::min<int64_t>(8, a.K - k0));
      const __m256 v = _mm256_maskload_ps(x + k0, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
      __m256 c;
      if (a.is_signed) {
        c = _mm256_min_ps(
            _mm256_round_ps(_mm256_div_ps(_mm256_and_ps(v, magnitude), scale), kNearest), qmax);
      } else {
        c = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_round_ps(
            _mm256_div_ps(v, scale), kNearest), zero), none), qmax);
      }
      const __m256i code = _mm256_cvttps_epi32(c);
      const uint32_t valid = (1u << n) - 1;
      for (int64_t p = 0; p < a.P; ++p) {
        const __m256i top = _mm256_sll_epi32(code, _mm_cvtsi32_si128(31 - static_cast<int>(p)));
        const auto bits = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(top)));
        plane_word[p] |= (bits & valid) << (8 * e);
      }
      if (a.is_signed) {
        const int negative = _mm256_movemask_ps(_mm256_cmp_ps(v, none, _CMP_LT_OQ));
        const int silent = _mm256_movemask_ps(
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(code, _mm256_setzero_si256())));
        sign_word |= (static_cast<uint32_t>(negative & ~silent) & valid) << (8 * e);
      }
    }
    for (int64_t p = 0; p < a.P; ++p) a.planes[p * plane_stride + m * a.W + w] = plane_word[p];
    if (a.sign) a.sign[m * a.W + w] = sign_word;
  }
}
#endif

// Which vector encoder serves this call (kGeneric: none, encode_words): encode_words_avx512 or
// _avx2 for one range without salient channels (not oat), as the CPU has it and
// SPIKEOPS_CPU_ISA leaves it (the encoder follows spike_linear's instruction-set choice, so that
// the tests run each).
Isa vector_words(const EncodeArgs& a) {
#if SPIKEOPS_X86_INTRINSICS
  if (a.salient || a.mode == Mode::kOat) return Isa::kGeneric;
  const Isa isa = best_isa();
  return isa >= Isa::kAvx512Vnni ? Isa::kAvx512Vnni : isa;
#else
  (void)a;
  return Isa::kGeneric;
#endif
}

// Words [w0, w1) of a row, element by element (any encoding); rq holds the quantizers of their
// channels.
void encode_words(const EncodeArgs& a, const float* x, int64_t m, int64_t w0, int64_t w1,
                  const RowQuant& rq) {
  const int64_t plane_stride = a.M * a.W;
  for (int64_t w = w0; w < w1; ++w) {
    uint32_t plane_word[kMaxPlanes] = {0};
    uint32_t sign_word = 0, hi_word = 0;
    const int64_t k_end = std::min<int64_t>(32 * w + 32, a.K);
    for (int64_t k = 32 * w; k < k_end; ++k) {
      const uint32_t bit = 1u << (k - 32 * w);
      int r = a.salient ? static_cast<int>(a.salient[k] != 0) : 0;
      if (rq.finite) {
        bool negative;
        const int32_t q = element_code(a, x[k], rq.range, &r, &negative);
        if (negative) sign_word |= bit;
        for (int64_t p = 0; p < a.P; ++p)
          plane_word[p] |= ((static_cast<uint32_t>(q) >> p) & 1u) * bit;
      }
      if (r) hi_word |= bit;
    }
    for (int64_t p = 0; p < a.P; ++p) a.planes[p * plane_stride + m * a.W + w] = plane_word[p];
    if (a.sign) a.sign[m * a.W + w] = sign_word;
    if (a.hi) a.hi[m * a.W + w] = hi_word;
  }
}

// Token m: its scale columns (quantizers) and its words. `groups` is scratch for one RowQuant
// per activation group.
void encode_row(const EncodeArgs& a, const float* x, int64_t m, Isa vector,
                std::vector<RowQuant>& groups) {
  // Activation groups (docs/ops.md): the quantizers of each group's channels, one column each;
  // without them one "group" of every channel, whose quantizers fill the R range columns.
  const int64_t ngroups = a.group > 0 ? a.R : 1;
  const int64_t span = a.group > 0 ? a.group : a.K;
  groups.resize(ngroups);
  bool finite = true;
  for (int64_t u = 0; u < ngroups && finite; ++u) {
    const int64_t k0 = u * span;
    groups[u] = row_quant(a, x + k0, std::min(span, a.K - k0), m, u, vector);
    finite = groups[u].finite;
  }
  // A row holding NaN or Inf decodes to NaN; its planes and signs stay 0 (docs/ops.md).
  for (int64_t r = 0; r < a.R; ++r) {
    const RangeQuant& q = a.group > 0 ? groups[r].range[0] : groups[0].range[r];
    a.scale[m * a.R + r] = finite ? stored_scale(a.mode, q)
                                  : std::numeric_limits<float>::quiet_NaN();
    if (a.zero) a.zero[m * a.R + r] = finite ? static_cast<int32_t>(q.zero) : 0;
  }
  const int64_t words = a.group > 0 ? a.group / 32 : a.W;
  for (int64_t u = 0; u < ngroups; ++u) {
    RowQuant rq = groups[u];
    rq.finite = finite;
    const int64_t w0 = u * words, w1 = std::min(a.W, w0 + words);
#if SPIKEOPS_X86_INTRINSICS
    if (vector != Isa::kGeneric && finite) {
      if (vector == Isa::kAvx2)
        encode_words_avx2(a, x, m, w0, w1, rq.range[0]);
      else
        encode_words_avx512(a, x, m, w0, w1, rq.range[0]);
      continue;
    }
#endif
    encode_words(a, x, m, w0, w1, rq);
  }
}

// Rows per thread of the row-parallel kernels: at least kRowWork elements, so that the few
// short rows of a decode step (queries, attention probabilities) run on the calling thread
// instead of waking the pool, which costs more than encoding them. The split changes no bit.
constexpr int64_t kRowWork = 1 << 14;
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, kRowWork / std::max<int64_t>(K, 1)); }

}  // namespace

void gif_encode(const EncodeArgs& a) {
  dispatch_float(a.x_type, [&](auto tag) {
    using T = decltype(tag);
    const T* xin = static_cast<const T*>(a.x);
    const Isa vector = vector_words(a);
    at::parallel_for(0, a.M, row_grain(a.K), [&](int64_t begin, int64_t end) {
      std::vector<float> row(a.K);
      std::vector<RowQuant> groups;
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t k = 0; k < a.K; ++k) row[k] = static_cast<float>(xin[m * a.K + k]);
        encode_row(a, row.data(), m, vector, groups);
      }
    });
  });
}

// One row per task: its statistics as gif_encode's minmax, then the channels in order, each
// coded from its running value and its error carried into the later channels (docs/ops.md,
// feedback_encode). The inner loop is elementwise (a product, then a difference, each rounded:
// the build does not contract them), so the compiler's vectors give the same bits.
void feedback_encode(const FeedbackEncodeArgs& a) {
  const int64_t rows = a.G * a.N, K = a.K, W = a.W, qmax = (int64_t(1) << a.bits) - 1;
  at::parallel_for(0, rows, std::max<int64_t>(1, row_grain(K * K / 2)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> r(K);
    std::vector<uint32_t> words(a.bits * W);
    for (int64_t m = begin; m < end; ++m) {
      const float* x = a.x + m * K;
      const float* F = a.feedback + (m / a.N) * K * K;
      float mn = std::numeric_limits<float>::infinity(), mx = -mn;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) {
        finite = finite && std::isfinite(x[k]);
        mn = std::fmin(mn, x[k]);
        mx = std::fmax(mx, x[k]);
      }
      std::fill(words.begin(), words.end(), 0u);
      if (!finite) {  // as gif_encode: a row holding NaN or Inf is silent, its scale NaN
        a.scale[m] = std::numeric_limits<float>::quiet_NaN();
        a.zero[m] = 0;
      } else {
        const RangeQuant q = minmax_quant(a.gamma, mn, mx, static_cast<int32_t>(qmax));
        std::copy(x, x + K, r.begin());
        for (int64_t j = 0; j < K; ++j) {
          float error;
          const uint32_t code = static_cast<uint32_t>(feedback_code(r[j], q, &error));
          for (int p = 0; p < a.bits; ++p)
            words[p * W + j / 32] |= ((code >> p) & 1u) << (j % 32);
          const float* Fj = F + j * K;
          for (int64_t l = j + 1; l < K; ++l) r[l] = r[l] - error * Fj[l];
        }
        a.scale[m] = q.scale;
        a.zero[m] = static_cast<int32_t>(q.zero);
      }
      for (int p = 0; p < a.bits; ++p)
        std::copy(words.begin() + p * W, words.begin() + (p + 1) * W,
                  a.planes + (p * rows + m) * W);
    }
  });
}

void spike_decode(const DecodeArgs& a) {
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    T* out = static_cast<T*>(a.out);
    at::parallel_for(0, a.M, row_grain(a.K), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t k = 0; k < a.K; ++k) {
          const int64_t at = m * a.W + k / 32;
          const int j = static_cast<int>(k % 32);
          const int32_t q = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, j),
                                         a.sign ? a.sign[at] : 0u, j);
          const int64_t r = scale_column(a, k / 32, a.hi ? a.hi[at] : 0u, j);
          const int32_t z = a.zero ? a.zero[m * a.R + r] : 0;
          out[m * a.K + k] = static_cast<T>(a.scale[m * a.R + r] * static_cast<float>(q - z));
        }
      }
    });
  });
}

void spike_counts(const CountsArgs& a) {
  const uint32_t* sign = a.negative ? a.sign : nullptr;
  at::parallel_for(0, a.P * a.M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t pm = begin; pm < end; ++pm) {
      const int64_t m = pm % a.M;
      int64_t c = 0;
      for (int64_t w = 0; w < a.W; ++w)
        c += popcount32(a.planes[pm * a.W + w] & (sign ? sign[m * a.W + w] : ~0u));
      a.counts[pm] = c;
    }
  });
}

void spike_stats(const StatsArgs& a) {
  const int64_t n = 2 * a.P + 2;
  // Tokens are split into chunks, each summing into its own row of partials, so the result
  // does not depend on the thread count; the rows are added at the end.
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (a.M + kChunk - 1) / kChunk;
  std::vector<int64_t> partial(static_cast<size_t>(chunks * n), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* acc = partial.data() + c * n;
      for (int64_t m = c * kChunk; m < std::min(a.M, (c + 1) * kChunk); ++m) {
        for (int64_t w = 0; w < a.W; ++w) {
          const uint32_t neg = a.sign ? a.sign[m * a.W + w] : 0u;
          uint32_t fired = 0;
          for (int64_t p = 0; p < a.P; ++p) {
            const uint32_t v = a.planes[(p * a.M + m) * a.W + w];
            acc[p] += popcount32(v);
            acc[a.P + p] += popcount32(v & neg);
            fired |= v;
          }
          acc[2 * a.P] += popcount32(fired);
          acc[2 * a.P + 1] += fired == 0;
        }
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < n; ++i) a.stats[i] += partial[c * n + i];
}

}  // namespace cpu
}  // namespace spikeops
