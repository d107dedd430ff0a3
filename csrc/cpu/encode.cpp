// CPU kernels of gif_encode, spike_decode, spike_counts and spike_stats: one token row per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "spikeops.h"

namespace spikeops {
namespace {

// Quantizers of both ranges of one row, or finite = false for a row holding NaN or Inf.
struct RowQuant {
  bool finite;
  RangeQuant range[2];
};

RowQuant row_quant(const Encode& e, const float* x, int64_t m) {
  RowQuant rq{true, {}};
  float mn = std::numeric_limits<float>::infinity(), mx = -mn, amax = 0.f;
  ExactSum sum;
  const bool want_sum = e.mode == Mode::kAbsMean;
  if (want_sum) sum.clear();
  for (int64_t k = 0; k < e.K; ++k) {
    const float v = x[k];
    if (!std::isfinite(v)) return RowQuant{false, {}};
    mn = std::fmin(mn, v);
    mx = std::fmax(mx, v);
    amax = std::fmax(amax, std::fabs(v));
    if (want_sum) sum.add(v);
  }
  const bool is_static = e.mode == Mode::kStatic;
  row_quantizers(e, mn, mx, amax, want_sum ? exact_mean(sum, e.K) : 0.f,
                 is_static ? e.scale.data_ptr<float>()[m] : 0.f,
                 is_static && !e.is_signed ? e.zero.data_ptr<int32_t>()[m] : 0, rq.range);
  return rq;
}

template <typename scalar_t>
void encode_row(const Encode& e, const scalar_t* xin, float* x, const bool* salient, int64_t m,
                uint32_t* planes, uint32_t* sign, uint32_t* hi, float* scale, int32_t* zero) {
  for (int64_t k = 0; k < e.K; ++k) x[k] = static_cast<float>(xin[k]);
  const RowQuant rq = row_quant(e, x, m);
  const int64_t plane_stride = e.M * e.W;

  if (!rq.finite) {  // SPEC §2: the whole row decodes to NaN; its planes and signs stay 0
    for (int64_t r = 0; r < e.R; ++r) {
      scale[m * e.R + r] = std::numeric_limits<float>::quiet_NaN();
      if (zero) zero[m * e.R + r] = 0;
    }
  } else {
    for (int64_t r = 0; r < e.R; ++r) {
      // oat stores theta_r / 2^P, the value of one code step; the others store s itself.
      const float step = e.mode == Mode::kOat
                             ? rq.range[r].scale / static_cast<float>(rq.range[r].qmax + 1)
                             : rq.range[r].scale;
      scale[m * e.R + r] = step;
      if (zero) zero[m * e.R + r] = static_cast<int32_t>(rq.range[r].zero);
    }
  }

  for (int64_t w = 0; w < e.W; ++w) {
    uint32_t plane_word[kMaxPlanes] = {0};
    uint32_t sign_word = 0, hi_word = 0;
    const int64_t k_end = std::min<int64_t>(32 * w + 32, e.K);
    for (int64_t k = 32 * w; k < k_end; ++k) {
      const uint32_t bit = 1u << (k - 32 * w);
      int r = salient ? static_cast<int>(salient[k]) : 0;
      if (!rq.finite) {
        if (r) hi_word |= bit;
        continue;
      }
      const float v = x[k];
      int32_t q;
      bool negative = false;
      if (e.mode == Mode::kOat) {
        const float a = std::fabs(clamp_f(v, -e.theta_out, e.theta_out));
        r = a >= e.theta_nor;
        q = oat_code(a, rq.range[r]);
        negative = v < 0.f;
      } else if (e.is_signed) {
        q = signed_code(v, rq.range[r]);
        negative = v < 0.f;
      } else {
        q = unsigned_code(v, rq.range[r]);
      }
      if (r) hi_word |= bit;
      if (negative && q > 0) sign_word |= bit;
      for (int64_t p = 0; p < e.P; ++p) plane_word[p] |= ((static_cast<uint32_t>(q) >> p) & 1u) * bit;
    }
    for (int64_t p = 0; p < e.P; ++p) planes[p * plane_stride + m * e.W + w] = plane_word[p];
    if (sign) sign[m * e.W + w] = sign_word;
    if (hi) hi[m * e.W + w] = hi_word;
  }
}

}  // namespace

EncodeResult gif_encode_cpu(const at::Tensor& x, const std::string& mode, int64_t bits,
                            double gamma, const at::Tensor& salient_mask, int64_t salient_bits,
                            const at::Tensor& scale, const at::Tensor& zero, double theta_nor,
                            double theta_out) {
  const Encode e = check_encode(x, mode, bits, gamma, salient_mask, salient_bits, scale, zero,
                                theta_nor, theta_out);
  EncodeResult out = encode_outputs(e);
  auto& [planes, sign, hi, scale_out, zero_out] = out;
  uint32_t *pp = mutable_words(planes), *sp = mutable_words(sign), *hp = mutable_words(hi);
  float* scp = scale_out.data_ptr<float>();
  int32_t* zp = mutable_data_or_null<int32_t>(zero_out);
  const bool* salient = data_or_null<bool>(e.salient_mask);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, e.x.scalar_type(), "gif_encode", [&] {
    const scalar_t* xin = e.x.data_ptr<scalar_t>();
    at::parallel_for(0, e.M, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row(e.K);
      for (int64_t m = begin; m < end; ++m)
        encode_row<scalar_t>(e, xin + m * e.K, row.data(), salient, m, pp, sp, hp, scp, zp);
    });
  });
  return out;
}

at::Tensor spike_decode_cpu(const at::Tensor& planes, const at::Tensor& sign, const at::Tensor& hi,
                            const at::Tensor& scale, const at::Tensor& zero, int64_t K,
                            at::ScalarType dtype) {
  const Spikes s = check_spike_decode(planes, sign, hi, scale, zero, K, dtype);
  at::Tensor out = at::empty({s.M, K}, planes.options().dtype(dtype));
  const uint32_t *pp = words(s.planes), *sp = words(s.sign), *hp = words(s.hi);
  const float* scp = s.scale.data_ptr<float>();
  const int32_t* zp = data_or_null<int32_t>(s.zero);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "spike_decode", [&] {
    scalar_t* op_out = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t w = k / 32;
          const uint32_t bit = 1u << (k % 32);
          int32_t q = 0;
          for (int64_t p = 0; p < s.P; ++p)
            q |= ((pp[(p * s.M + m) * s.W + w] & bit) ? 1 : 0) << p;
          if (sp && (sp[m * s.W + w] & bit)) q = -q;
          const int r = (hp && (hp[m * s.W + w] & bit)) ? 1 : 0;
          const int32_t z = zp ? zp[m * s.R + r] : 0;
          const float v = scp[m * s.R + r] * static_cast<float>(q - z);
          op_out[m * K + k] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

at::Tensor spike_counts_cpu(const at::Tensor& planes, const at::Tensor& sign, bool negative) {
  const Spikes s = check_spike_counts(planes, sign, negative);
  at::Tensor out = at::empty({s.P, s.M}, planes.options().dtype(at::kLong));
  const uint32_t *pp = words(s.planes), *sp = negative ? words(s.sign) : nullptr;
  int64_t* counts = out.data_ptr<int64_t>();
  at::parallel_for(0, s.P * s.M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t pm = begin; pm < end; ++pm) {
      const int64_t m = pm % s.M;
      int64_t c = 0;
      for (int64_t w = 0; w < s.W; ++w)
        c += popcount32(pp[pm * s.W + w] & (sp ? sp[m * s.W + w] : ~0u));
      counts[pm] = c;
    }
  });
  return out;
}

at::Tensor spike_stats_cpu(const at::Tensor& planes, const at::Tensor& sign) {
  const Spikes s = check_spike_bits("spike_stats", planes, sign, at::Tensor());
  const int64_t n = stats_size(s.P);
  const uint32_t *pp = words(s.planes), *sp = words(s.sign);
  // Tokens are split into chunks, each summing into its own row of partials, so the result
  // does not depend on the thread count; the rows are added at the end.
  constexpr int64_t kChunk = 16;
  const int64_t chunks = (s.M + kChunk - 1) / kChunk;
  std::vector<int64_t> partial(static_cast<size_t>(std::max<int64_t>(chunks, 1) * n), 0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* acc = partial.data() + c * n;
      for (int64_t m = c * kChunk; m < std::min(s.M, (c + 1) * kChunk); ++m) {
        for (int64_t w = 0; w < s.W; ++w) {
          const uint32_t neg = sp ? sp[m * s.W + w] : 0u;
          uint32_t fired = 0;
          for (int64_t p = 0; p < s.P; ++p) {
            const uint32_t v = pp[(p * s.M + m) * s.W + w];
            acc[p] += popcount32(v);
            acc[s.P + p] += popcount32(v & neg);
            fired |= v;
          }
          acc[2 * s.P] += popcount32(fired);
          acc[2 * s.P + 1] += fired == 0;
        }
      }
    }
  });
  at::Tensor out = at::zeros({n}, planes.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < n; ++i) o[i] += partial[c * n + i];
  return out;
}

}  // namespace spikeops
