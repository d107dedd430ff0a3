// Element-level arithmetic of docs/ops.md, shared by the CPU kernels and the CUDA kernels so that
// both backends compute the same codes by construction. Plain C++ (no torch headers): it compiles
// with nvcc and with the host compiler alike. All float arithmetic is IEEE float32 with
// round-half-even (rintf); the build disables FMA contraction so that no product is fused into a
// sum.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define SPIKE_HD __host__ __device__ __forceinline__
#else
#define SPIKE_HD inline
#endif

namespace spikeops {

// Encoding modes, in the order of the `mode` strings accepted by gif_encode.
enum class Mode : int32_t { kMinMax = 0, kAbsMax = 1, kAbsMean = 2, kStatic = 3, kOat = 4 };

// spike_linear backends; kAuto is resolved per device (docs/ops.md).
enum class Backend : int32_t { kAuto = 0, kSpike = 1, kInt = 2 };

constexpr int kMaxPlanes = 16;          // Q < 2^16: codes, zeros and products stay small integers
constexpr float kScaleMin = 1e-5f;      // clamps of every dynamic scale (docs/ops.md, encodings)
constexpr float kScaleMax = 1e4f;
// |zero| of every unsigned encoding: minmax clamps to it, static zeros and the zero points that
// consumers read must lie within it, so that codes s*Q - zero stay far from int32 overflow.
constexpr int32_t kZeroLimit = 10000;
constexpr int64_t kMaxK = int64_t(1) << 23;  // K * 255 fits int32 per-plane accumulators
// feedback_encode's channels per row: the CUDA kernel keeps a row's running values in shared
// memory (4 KiB per warp); head dimensions are 64 to 256.
constexpr int64_t kMaxFeedbackK = 1024;

SPIKE_HD float clamp_f(float v, float lo, float hi) { return fminf(fmaxf(v, lo), hi); }

SPIKE_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

SPIKE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
#endif
}

// Quantizer of one range of one token row: the stored code of an element and its sign bit.
struct RangeQuant {
  float scale;   // s of docs/ops.md (for oat: theta_r, the code is floor(|x| / theta_r * 2^P))
  float zero;    // z as a float (exact: |z| <= 1e4); 0 for signed encodings
  int32_t qmax;  // largest code
};

// minmax / static unsigned: Q = clamp(round(x / s) + z, 0, qmax).
SPIKE_HD int32_t unsigned_code(float x, const RangeQuant& q) {
  const float v = rintf(x / q.scale) + q.zero;
  return static_cast<int32_t>(clamp_f(v, 0.f, static_cast<float>(q.qmax)));
}

// absmax / absmean / static signed: Q = min(round(|x| / s), qmax); the caller sets the sign bit
// for x < 0 and Q > 0.
SPIKE_HD int32_t signed_code(float x, const RangeQuant& q) {
  return static_cast<int32_t>(fminf(rintf(fabsf(x) / q.scale), static_cast<float>(q.qmax)));
}

// oat: a = |clamp(x, -theta_out, theta_out)|, Q = min(floor(a / theta_r * 2^P), 2^P - 1).
// theta_r is passed as q.scale; the multiplication by 2^P is exact.
SPIKE_HD int32_t oat_code(float a, const RangeQuant& q) {
  const float u = a / q.scale;
  return static_cast<int32_t>(fminf(floorf(u * static_cast<float>(q.qmax + 1)),
                                    static_cast<float>(q.qmax)));
}

// The dynamic scale of minmax, clipped to [gamma * min, gamma * max] (gamma = 1: the row's
// range): s = clamp(gamma * (max - min) / qmax, 1e-5, 1e4), z = round(clamp(-gamma * min / s)).
// At gamma = 1 both products are exact, so unclipped codes do not depend on the formula.
SPIKE_HD RangeQuant minmax_quant(float gamma, float mn, float mx, int32_t qmax) {
  RangeQuant q;
  q.scale = clamp_f(gamma * (mx - mn) / static_cast<float>(qmax), kScaleMin, kScaleMax);
  const float limit = static_cast<float>(kZeroLimit);
  q.zero = rintf(clamp_f(-(gamma * mn) / q.scale, -limit, limit));
  q.qmax = qmax;
  return q;
}

// feedback_encode (docs/ops.md): the code of channel j from its running value r (x_j less the
// earlier channels' carried errors) and the error it leaves, r - s * (Q - z), which channel
// l > j takes times F[j, l]. Q - z is an exact integer in float32 (|Q|, |z| <= 2^16).
SPIKE_HD int32_t feedback_code(float r, const RangeQuant& q, float* error) {
  const int32_t code = unsigned_code(r, q);
  *error = r - q.scale * (static_cast<float>(code) - q.zero);
  return code;
}

// The dynamic scale of absmax (stat = max|x|) and absmean (stat = mean|x|, qmax_div = 1):
// s = clamp(gamma * stat / qmax_div, 1e-5, 1e4).
SPIKE_HD RangeQuant symmetric_quant(float gamma, float stat, float qmax_div, int32_t qmax) {
  RangeQuant q;
  q.scale = clamp_f(gamma * stat / qmax_div, kScaleMin, kScaleMax);
  q.zero = 0.f;
  q.qmax = qmax;
  return q;
}

// The quantizers of both ranges of one finite token row from its statistics (docs/ops.md). `c` is
// gif_encode's parameters (mode, is_signed, bits, salient_bits, gamma, theta_nor, theta_out):
// kernel_args.h's EncodeArgs, a template parameter here because kernel_args.h includes this
// header. `mean` is read by absmean only; static mode takes the row's given scale and zero.
template <typename Config>
SPIKE_HD void row_quantizers(const Config& c, float mn, float mx, float amax, float mean,
                             float static_scale, int32_t static_zero, RangeQuant range[2]) {
  if (c.mode == Mode::kOat) {
    const int32_t qmax = (1 << c.bits) - 1;
    range[0] = RangeQuant{c.theta_nor, 0.f, qmax};
    range[1] = RangeQuant{c.theta_out, 0.f, qmax};
    return;
  }
  const int ranges = c.salient_bits ? 2 : 1;
  for (int r = 0; r < ranges; ++r) {
    const int b = r ? c.salient_bits : c.bits;
    const int32_t qmax_unsigned = (1 << b) - 1, qmax_signed = (1 << (b - 1)) - 1;
    switch (c.mode) {
      case Mode::kMinMax:
        range[r] = minmax_quant(c.gamma, mn, mx, qmax_unsigned);
        break;
      case Mode::kAbsMax:
        range[r] = symmetric_quant(c.gamma, amax, static_cast<float>(qmax_signed), qmax_signed);
        break;
      case Mode::kAbsMean:
        range[r] = symmetric_quant(c.gamma, mean, 1.f, qmax_signed);
        break;
      default:  // kStatic
        range[r] = RangeQuant{static_scale, c.is_signed ? 0.f : static_cast<float>(static_zero),
                              c.is_signed ? qmax_signed : qmax_unsigned};
        break;
    }
  }
}

// The code of one finite element v of a row whose quantizers are `range` (gif_encode): returns
// Q and sets the element's range r (in: the salient bit of its channel; oat picks the range from
// |v|) and whether its sign bit is set (signed encodings, v < 0 and Q > 0).
template <typename Config>
SPIKE_HD int32_t element_code(const Config& c, float v, const RangeQuant range[2], int* r,
                              bool* negative) {
  int32_t q;
  if (c.mode == Mode::kOat) {
    const float a = fabsf(clamp_f(v, -c.theta_out, c.theta_out));
    *r = a >= c.theta_nor;
    q = oat_code(a, range[*r]);
  } else if (c.is_signed) {
    q = signed_code(v, range[*r]);
  } else {
    q = unsigned_code(v, range[*r]);
  }
  *negative = c.is_signed && v < 0.f && q > 0;
  return q;
}

// The scale stored for a range: oat stores theta_r / 2^P, the value of one code step (exact:
// a division by a power of two); the other modes store s itself.
SPIKE_HD float stored_scale(Mode mode, const RangeQuant& q) {
  return mode == Mode::kOat ? q.scale / static_cast<float>(q.qmax + 1) : q.scale;
}

// ---------------------------------------------------------------------------------------------
// Reading spikes back. A load of a spike word (read-only data cache on the GPU).
SPIKE_HD uint32_t load_word(const uint32_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Magnitude code Q of channel bit j from the P plane words of one token and word
// (plane p at planes[p * plane_stride]).
SPIKE_HD int32_t plane_code(const uint32_t* planes, int64_t plane_stride, int64_t P, int j) {
  int32_t q = 0;
  for (int64_t p = 0; p < P; ++p)
    q |= static_cast<int32_t>((load_word(planes + p * plane_stride) >> j) & 1u) << p;
  return q;
}

// The signed code s*Q of channel bit j: Q negated where the sign word has bit j set.
SPIKE_HD int32_t signed_value(int32_t q, uint32_t sign_word, int j) {
  return ((sign_word >> j) & 1u) ? -q : q;
}

// The range (0 or 1) of channel bit j.
SPIKE_HD int range_of(uint32_t hi_word, int j) { return static_cast<int>((hi_word >> j) & 1u); }

// A zero point that consumers accept (see kZeroLimit).
SPIKE_HD bool zero_in_range(int32_t z) { return z >= -kZeroLimit && z <= kZeroLimit; }

// ---------------------------------------------------------------------------------------------
// Exact sum of |x| for absmean: mean|x| must not depend on the order of the additions, or CPU,
// CUDA and the Python reference would disagree on the scale in rare rows. Each finite float32
// is m * 2^(e - 150) with an integer mantissa m < 2^24; summing mantissas per exponent e in int64
// is exact and order independent (2^24 * K < 2^63). The total is then rounded once to float64.
struct ExactSum {
  static constexpr int kBuckets = 255;  // biased exponents 1..254 (0 folds into 1)
  int64_t bucket[kBuckets];

  SPIKE_HD void clear() {
    for (int e = 0; e < kBuckets; ++e) bucket[e] = 0;
  }

  // Exponent bucket and mantissa of |v| (v finite); both are pure functions of the bits.
  SPIKE_HD static void split(float v, int* e, int64_t* m) {
    const uint32_t u = float_bits(v) & 0x7fffffffu;
    const uint32_t biased = u >> 23;
    const uint32_t frac = u & 0x7fffffu;
    *e = biased ? static_cast<int>(biased) : 1;
    *m = biased ? static_cast<int64_t>(frac | 0x800000u) : static_cast<int64_t>(frac);
  }

  SPIKE_HD void add(float v) {
    int e;
    int64_t m;
    split(v, &e, &m);
    bucket[e] += m;
  }

  // The exact total, rounded to nearest-even float64. The total is sum bucket[e] * 2^(e - 150),
  // i.e. an integer count of 2^-149 units held in 5 x 64 bits (2^55 * 2^253 < 2^320).
  SPIKE_HD double to_double() const {
    uint64_t limb[5] = {0, 0, 0, 0, 0};
    for (int e = 1; e < kBuckets; ++e) {
      if (bucket[e] == 0) continue;
      const int bit = e - 1;
      const int li = bit / 64, sh = bit % 64;
      const uint64_t v = static_cast<uint64_t>(bucket[e]);
      uint64_t lo = v << sh;
      uint64_t hi = sh ? (v >> (64 - sh)) : 0;
      uint64_t old = limb[li];
      limb[li] = old + lo;
      uint64_t carry = (limb[li] < old) ? 1 : 0;
      for (int j = li + 1; j < 5 && (hi | carry); ++j) {
        old = limb[j];
        limb[j] = old + hi + carry;
        carry = (limb[j] < old || (carry && limb[j] == old)) ? 1 : 0;
        hi = 0;
      }
    }
    int top = 4;
    while (top >= 0 && limb[top] == 0) --top;
    if (top < 0) return 0.0;
    int h = 63;
    while (!((limb[top] >> h) & 1u)) --h;
    const int msb = 64 * top + h;
    if (msb < 53) return ldexp(static_cast<double>(limb[0]), -149);  // exact
    const int low = msb - 52;  // lowest kept bit
    uint64_t mant = 0;
    for (int b = msb; b >= low; --b) mant = (mant << 1) | ((limb[b / 64] >> (b % 64)) & 1u);
    const bool round_bit = (limb[(low - 1) / 64] >> ((low - 1) % 64)) & 1u;
    bool sticky = false;
    for (int b = low - 2; b >= 0 && !sticky; --b) sticky = (limb[b / 64] >> (b % 64)) & 1u;
    if (round_bit && (sticky || (mant & 1u))) ++mant;  // 2^53 after a carry is still exact
    return ldexp(static_cast<double>(mant), low - 149);
  }
};

// mean|x| of a row: the exact sum rounded to float64, divided by K in float64, rounded to float32.
SPIKE_HD float exact_mean(const ExactSum& s, int64_t K) {
  return static_cast<float>(s.to_double() / static_cast<double>(K));
}

// ---------------------------------------------------------------------------------------------
// GPTQ packing: field t of a word holds bits [b*t, b*t + b) (docs/checkpoints.md), b in {2, 4, 8}.
SPIKE_HD int32_t gptq_field(int32_t word, int shift, uint32_t mask) {
  return static_cast<int32_t>((static_cast<uint32_t>(word) >> shift) & mask);
}

// log2 of the codes per 32-bit word (32 / bits), for shifts instead of divisions in hot loops.
SPIKE_HD int log2_codes_per_word(int bits) { return bits == 2 ? 4 : bits == 4 ? 3 : 2; }

// Code i of a packed run: word i >> log2(32 / bits), field i & (32 / bits - 1).
SPIKE_HD int32_t gptq_unpack(const int32_t* words, int64_t i, int bits) {
  const int lg = log2_codes_per_word(bits);
  return gptq_field(words[i >> lg], bits * static_cast<int>(i & ((1 << lg) - 1)),
                    (1u << bits) - 1u);
}

// Weight code q[k, n] of a [K*b/32, N] qweight (packed along K).
SPIKE_HD int32_t gptq_code(const int32_t* qweight, int64_t N, int64_t k, int64_t n, int bits) {
  const int lg = log2_codes_per_word(bits);
  return gptq_field(qweight[(k >> lg) * N + n], bits * static_cast<int>(k & ((1 << lg) - 1)),
                    (1u << bits) - 1u);
}

// Code of channel k, column n in the CPU layout of 4-bit codes [ceil(N/16), KB, 64]
// (docs/ops.md, spike_linear, "CPU layout"): byte 4 * (n % 16) + k % 4 of row [n / 16, k / 8],
// low nibble for k % 8 < 4, high nibble otherwise.
SPIKE_HD int32_t layout_code(const uint8_t* packed, int64_t KB, int64_t k, int64_t n) {
  const uint8_t byte = packed[((n >> 4) * KB + (k >> 3)) * 64 + 4 * (n & 15) + (k & 3)];
  return (byte >> (4 * ((k >> 2) & 1))) & 15;
}

// A float16 (its bits) widened to float32: exact, every float16 is a float32. GPTQ scales are
// float16 and the kernels read them so, as the checkpoint holds them (docs/ops.md, spike_linear).
// Host compilers with _Float16 convert with one instruction where the target has one (F16C),
// which lets the CPU kernels widen whole rows of scales in vector registers.
SPIKE_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#elif defined(__FLT16_MAX__) && !defined(__CUDACC__)
  _Float16 f;
  std::memcpy(&f, &h, sizeof(f));
  return static_cast<float>(f);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // Inf, NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal m * 2^-24: normalized, 2^(-14 - s) * 1.f after s shifts
    uint32_t e = 113;
    do {
      man <<= 1;
      --e;
    } while (!(man & 0x400u));
    bits = sign | (e << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

SPIKE_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

}  // namespace spikeops
