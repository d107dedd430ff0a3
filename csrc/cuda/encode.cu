// CUDA kernels of gif_encode, spike_decode, spike_counts and spike_stats. The CPU kernels of
// csrc/cpu/encode.cpp define the results bit for bit; every element operation below is the
// spike_math.h function the CPU uses, on the same float32 values, in the same order.
#include <cmath>
#include <type_traits>

#include "cuda/device.cuh"

namespace spikeops {
namespace {

using dev::kFullMask;

// gif_encode: one warp per token row, kEncodeWarps rows per block; warps never wait for each
// other. A step is 256 channels (8 words): lane j takes channels 8j .. 8j + 7 of it with 16-byte
// loads, so lanes 4g .. 4g + 3 hold word g of the step. Each lane turns its 8 codes into one
// byte per plane (an 8 x 8 bit transpose in registers); a 4 x 4 byte transpose across those four
// lanes (two shuffles) then leaves lane 4g + t with word g of plane t (of 4k + t for the k-th
// group of four planes), so one store instruction writes 32 consecutive bytes of four planes.
// Row statistics are warp shuffles, and every lane derives the quantizers itself.
//
// Once a warp's loads of the held steps are issued it calls dev::allow_dependents: a decode
// spike_linear launched behind the encoder with programmatic dependent launch
// (csrc/cuda/linear_decode.cu) may then start and prefetch its weights while the codes are made;
// it waits for this grid to complete before it reads them (device.cuh). Calling it after the
// loads keeps those prefetches from queueing ahead of the encoder's own reads of x.
//
// The first steps of a row stay in registers between the statistics and the codes: rows of up
// to kHeldBytes per lane (K <= 4096 in 2-byte types, 2048 in float32, 1024 in float64) are read
// from global memory once; longer rows read the rest a second time (from L1 or L2 by then), and
// so does absmean's exact sum. The loops over a row take kWindowBytes of x per pass, so that the
// code of a step is not repeated for every held step (straight code that large would not stay
// in the instruction cache); the held steps shift down through the window instead.
constexpr int kEncodeWarps = 4;
constexpr int kEncodeThreads = 32 * kEncodeWarps;
constexpr int kUnit = 8;                   // channels per lane and step
constexpr int kStep = 32 * kUnit;          // channels per warp and step
constexpr int kHeldBytes = 256;            // x per lane kept in registers: 64 of them
constexpr int kWindowBytes = 64;           // x per lane and pass of the loops over a row
// Blocks per SM the kernels are compiled for: 4 gives each thread 128 registers, the held row
// included; kernels with salient channels hold a second quantizer and mask bits and get 3.
constexpr int kEncodeBlocks = 4, kSalientEncodeBlocks = 3;

// An element's bits, as loaded: the scalar path for unaligned rows and the ragged end.
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, unsigned short,
                                std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>>;

// The raw bits of one lane's 8 channels of a step.
template <typename T>
struct Unit {
  static constexpr int kWords = kUnit * static_cast<int>(sizeof(T)) / 4;
  static constexpr int kVectors = kWords / 4;  // 16-byte loads
  uint32_t w[kWords];

  __device__ __forceinline__ unsigned short half_bits(int i) const {
    return static_cast<unsigned short>(w[i / 2] >> 16 * (i % 2));
  }

  // Channel i as float32, converted as the CPU converts (dev::to_float); i is a constant.
  __device__ __forceinline__ float value(int i) const {
    if constexpr (std::is_same_v<T, __half>) {
      return dev::to_float(__ushort_as_half(half_bits(i)));
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return dev::to_float(__ushort_as_bfloat16(half_bits(i)));
    } else if constexpr (std::is_same_v<T, float>) {
      return __uint_as_float(w[i]);
    } else {
      return dev::to_float(__hiloint2double(static_cast<int>(w[2 * i + 1]),
                                            static_cast<int>(w[2 * i])));
    }
  }
};

// Channels c .. c + 7 of a row. Only a 16-byte aligned row whose unit lies inside [0, K) is
// loaded in vectors: the host guarantees x contiguous, not aligned (a view may start anywhere).
// Channels at k >= K take `pad`, the bits of the row's channel 0, which leaves min, max and
// max|x| as they are; their codes are masked and the exact sum skips them.
template <typename T>
__device__ __forceinline__ Unit<T> load_unit(const T* row, int c, int K, bool aligned,
                                             Bits<T> pad) {
  Unit<T> u;
  if (aligned && c + kUnit <= K) {
    const uint4* p = reinterpret_cast<const uint4*>(row + c);
#pragma unroll
    for (int v = 0; v < Unit<T>::kVectors; ++v) {
      const uint4 q = __ldg(p + v);
      u.w[4 * v] = q.x, u.w[4 * v + 1] = q.y, u.w[4 * v + 2] = q.z, u.w[4 * v + 3] = q.w;
    }
    return u;
  }
  const Bits<T>* p = reinterpret_cast<const Bits<T>*>(row) + c;
  const int left = K - c;
  Bits<T> b[kUnit];
#pragma unroll
  for (int i = 0; i < kUnit; ++i) b[i] = i < left ? __ldg(p + i) : pad;
#pragma unroll
  for (int i = 0; i < kUnit; ++i) {
    if constexpr (sizeof(T) == 2) {
      if (i % 2) u.w[i / 2] = b[i - 1] | static_cast<uint32_t>(b[i]) << 16;
    } else if constexpr (sizeof(T) == 4) {
      u.w[i] = b[i];
    } else {
      u.w[2 * i] = static_cast<uint32_t>(b[i]);
      u.w[2 * i + 1] = static_cast<uint32_t>(b[i] >> 32);
    }
  }
  return u;
}

// Row m of x as both one-pass encoders read it: its start, whether 16-byte loads may serve, and
// the bits of channel 0 that pad the ragged end (load_unit).
template <typename T>
struct RowSource {
  const T* row;
  bool aligned;
  Bits<T> pad;

  __device__ __forceinline__ RowSource(const void* x, int64_t m, int64_t K)
      : row(static_cast<const T*>(x) + m * K),
        aligned(reinterpret_cast<uintptr_t>(row) % 16 == 0),
        pad(__ldg(reinterpret_cast<const Bits<T>*>(row))) {}

  // Channels c .. c + 7, those at or past `limit` padded.
  __device__ __forceinline__ Unit<T> unit(int c, int limit) const {
    return load_unit(row, c, limit, aligned, pad);
  }
};

// min, max and max|x| of a lane's channels and whether they are all finite. min and max of
// finite floats are exact whatever the order; only the sign of a zero extreme can differ from
// the CPU's, and minmax_quant gives the same scale and codes for it. A row with NaN or Inf
// leaves these unused.
struct RowStats {
  float mn = INFINITY, mx = -INFINITY, amax = 0.f;
  bool finite = true;

  template <typename T>
  __device__ __forceinline__ void add(const Unit<T>& u) {
#pragma unroll
    for (int i = 0; i < kUnit; ++i) {
      const float v = u.value(i);
      finite = finite && isfinite(v);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
      amax = fmaxf(amax, fabsf(v));
    }
  }

  // The whole warp's statistics in every lane.
  __device__ __forceinline__ void reduce() {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, off));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, off));
      amax = fmaxf(amax, __shfl_xor_sync(kFullMask, amax, off));
    }
    finite = __all_sync(kFullMask, finite);
  }
};

// absmean: |x| of channels c .. c + 7 into the warp's ExactSum. Per channel index the lanes are
// grouped by exponent and each group adds its pre-summed mantissas once (< 2^29), so the bucket
// totals are exact integers whatever the order. Channels at k >= K go to bucket 0, which
// ExactSum never reads (only finite rows are summed).
template <typename T>
__device__ __forceinline__ void add_sum(const Unit<T>& u, int c, int K, int lane,
                                        ExactSum& sum) {
#pragma unroll
  for (int i = 0; i < kUnit; ++i) {
    const float v = u.value(i);
    int e = 0;
    int64_t mant = 0;
    if (i < K - c) ExactSum::split(v, &e, &mant);
    const unsigned same = __match_any_sync(kFullMask, e);
    const unsigned total = __reduce_add_sync(same, static_cast<unsigned>(mant));
    if (lane == __ffs(same) - 1) sum.bucket[e] += total;
    __syncwarp();  // the next channel's group leader may add to the same bucket
  }
}

// element_code tells oat, signed and unsigned codes apart by `mode == kOat` and `is_signed`
// only; a kernel serves one of these kinds, fixed at compile time, so that an element's code
// takes no branch. Static codes are signed or unsigned, absmean's signed.
template <Mode kMode, bool kSigned>
struct CodeKind {
  static constexpr Mode mode = kMode;
  static constexpr bool is_signed = kSigned;
  float theta_nor, theta_out;
};
using UnsignedCodes = CodeKind<Mode::kMinMax, false>;  // minmax, static with zero
using SignedCodes = CodeKind<Mode::kAbsMax, true>;      // absmax, absmean, static without zero
using OatCodes = CodeKind<Mode::kOat, true>;

// Bit 8i + p of (lo, hi), lo holding bytes 0..3, moves to bit 8p + i: byte i = code of channel i
// in, byte p = plane p of the 8 channels out (Hacker's Delight transpose8, in 32-bit halves).
__device__ __forceinline__ void transpose_bits(uint32_t& lo, uint32_t& hi) {
  uint32_t t = (lo ^ (lo >> 7)) & 0x00AA00AAu;
  lo ^= t ^ (t << 7);
  t = (hi ^ (hi >> 7)) & 0x00AA00AAu;
  hi ^= t ^ (t << 7);
  t = (lo ^ (lo >> 14)) & 0x0000CCCCu;
  lo ^= t ^ (t << 14);
  t = (hi ^ (hi >> 14)) & 0x0000CCCCu;
  hi ^= t ^ (t << 14);
  t = (lo ^ (hi << 4)) & 0xF0F0F0F0u;
  lo ^= t;
  hi ^= t >> 4;
}

// Byte b of each of the four codes q[0 .. 3], in bytes 0 .. 3.
__device__ __forceinline__ uint32_t code_bytes(const int32_t* q, int b) {
  const unsigned sel = 0x0040u + 0x11u * b;  // byte b of the first and second operand
  return __byte_perm(__byte_perm(q[0], q[1], sel), __byte_perm(q[2], q[3], sel), 0x5410);
}

// Byte b of lane 4g + t becomes byte t of lane 4g + b: lane 4g + t then holds slot t's word g.
__device__ __forceinline__ uint32_t transpose_lanes(uint32_t v, int lane) {
  const int t = lane & 3;
  uint32_t y = __shfl_xor_sync(kFullMask, v, 2);  // halves: (v0 v1 y0 y1) or (y2 y3 v2 v3)
  v = __byte_perm(v, y, t < 2 ? 0x5410 : 0x3276);
  y = __shfl_xor_sync(kFullMask, v, 1);           // bytes: (v0 y0 v2 y2) or (y1 v1 y3 v3)
  return __byte_perm(v, y, t & 1 ? 0x3715 : 0x6240);
}

// Bit i set where byte i of x (i < 4) is nonzero: each byte ORed into its bit 0, then bit 0 of
// byte i multiplied up to bit 28 + i (the four products land on distinct bits, no carries).
__device__ __forceinline__ uint32_t nonzero_bytes(uint32_t x) {
  x |= x >> 4;
  x |= x >> 2;
  x |= x >> 1;
  return ((x & 0x01010101u) * 0x10204080u) >> 28;
}

// Bit i set where channel c + i is salient (bool bytes, nonzero = salient; none at k >= K): one
// 8-byte load where the mask allows it.
__device__ __forceinline__ uint32_t salient_bits(const uint8_t* salient, int c, int left) {
  if (left >= kUnit && reinterpret_cast<uintptr_t>(salient) % 8 == 0) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(salient + c));
    return nonzero_bytes(v.x) | nonzero_bytes(v.y) << 4;
  }
  uint32_t bits = 0;
#pragma unroll
  for (int i = 0; i < kUnit; ++i)
    if (i < left && __ldg(salient + c + i)) bits |= 1u << i;
  return bits;
}

// Planes, sign and hi of step s of row m from this lane's unit: 8 codes, transposed twice, and the
// stores of the words lane 4g + t holds (above). Every lane of the warp calls it. kSalient: the
// call has salient channels, whose codes use range 1.
template <bool kSalient, typename T, typename Kind>
__device__ __forceinline__ void encode_unit(const EncodeArgs& a, const Kind& kind,
                                            const Unit<T>& u, int s, int lane, bool usable,
                                            const RangeQuant* range, int64_t m) {
  const int c = s * kStep + kUnit * lane, left = static_cast<int>(a.K) - c;
  const uint32_t valid = left >= kUnit ? 0xffu : left <= 0 ? 0u : (1u << left) - 1u;
  uint32_t salient = 0;
  if constexpr (kSalient) salient = salient_bits(a.salient, c, left);
  uint32_t plane[4] = {0u, 0u, 0u, 0u};  // byte b of plane[k]: plane 4k + b of the 8 channels
  uint32_t sign = 0, hi = salient;       // an unusable row keeps planes and sign 0, hi = salient
  if (usable) {
    int32_t q[kUnit];
    hi = 0;
#pragma unroll
    for (int i = 0; i < kUnit; ++i) {
      bool negative;
      int r = (salient >> i) & 1;
      if constexpr (Kind::mode == Mode::kOat) {
        q[i] = element_code(kind, u.value(i), range, &r, &negative);  // range in shared memory
      } else {
        // The quantizer of the channel's range, picked here: element_code then reads index 0,
        // a constant, instead of a register array at a variable index.
        const RangeQuant picked = r ? range[1] : range[0];
        int first = 0;
        q[i] = element_code(kind, u.value(i), &picked, &first, &negative);
      }
      sign |= static_cast<uint32_t>(negative) << i;
      hi |= static_cast<uint32_t>(r) << i;
    }
    const uint32_t bytes = valid * 0x01010101u;
    plane[0] = code_bytes(q, 0), plane[1] = code_bytes(q + 4, 0);
    transpose_bits(plane[0], plane[1]);
    plane[0] &= bytes, plane[1] &= bytes;
    if (a.P > 8) {
      plane[2] = code_bytes(q, 1), plane[3] = code_bytes(q + 4, 1);
      transpose_bits(plane[2], plane[3]);
      plane[2] &= bytes, plane[3] &= bytes;
    }
  }
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * k < a.P) plane[k] = transpose_lanes(plane[k], lane);
  uint32_t flags = 0;  // sign word in slot 0, hi word in slot 1
  if (a.sign || a.hi) flags = transpose_lanes((sign & valid) | (hi & valid) << 8, lane);

  const int t = lane & 3, word = 8 * s + lane / 4;
  if (word >= a.W) return;
  const int64_t at = m * a.W + word, plane_stride = a.M * a.W;
#pragma unroll
  for (int k = 0; k < 4; ++k)
    if (4 * k + t < a.P) a.planes[(4 * k + t) * plane_stride + at] = plane[k];
  if (t == 0 && a.sign) a.sign[at] = flags;
  if (t == 1 && a.hi) a.hi[at] = flags;
}

// The quantizers of row m from its statistics (spike_math.h, as on the CPU), in every lane;
// false when the row is not encoded. Static scales and zeros are device data the host could not
// check: an invalid one makes the row unusable.
__device__ __forceinline__ bool row_ranges(const EncodeArgs& a, int64_t m, const RowStats& st,
                                           float mean, RangeQuant range[2]) {
  const bool is_static = a.mode == Mode::kStatic;
  const float s = is_static ? __ldg(a.static_scale + m) : 0.f;
  const int32_t z = is_static && !a.is_signed ? __ldg(a.static_zero + m) : 0;
  if (!st.finite || (is_static && !(isfinite(s) && s > 0.f && zero_in_range(z)))) return false;
  row_quantizers(a, st.mn, st.mx, st.amax, mean, s, z, range);
  return true;
}


// The code pass of the one-pass encoders over a row of `steps` units: the first kHeld units are
// already in held[] (from the statistics pass); they go through step(unit, s) kWindow at a
// time while the held ones shift down, and later units are loaded again (from L1 or L2 by now).
template <int kWindow, int kHeld, typename U, typename Load, typename Step>
__device__ __forceinline__ void code_pass(int steps, U (&held)[kHeld], const Load& load,
                                          const Step& step) {
#pragma unroll 1
  for (int s0 = 0; s0 < steps; s0 += kWindow) {
    if (s0 >= kHeld) {
#pragma unroll
      for (int b = 0; b < kWindow; ++b)
        if (s0 + b < steps) held[b] = load(s0 + b);
    }
#pragma unroll
    for (int b = 0; b < kWindow; ++b)
      if (s0 + b < steps) step(held[b], s0 + b);
    if (s0 + kWindow < kHeld) {
#pragma unroll
      for (int s = 0; s + kWindow < kHeld; ++s) held[s] = held[s + kWindow];
    }
  }
}

template <typename T, typename Kind, bool kSalient>
__global__ void __launch_bounds__(kEncodeThreads, kSalient ? kSalientEncodeBlocks : kEncodeBlocks)
    gif_encode_kernel(const EncodeArgs a) {
  constexpr int kHeld = kHeldBytes / (kUnit * static_cast<int>(sizeof(T)));
  constexpr int kWindow = kWindowBytes / (kUnit * static_cast<int>(sizeof(T)));
  static_assert(kHeld % kWindow == 0, "the held steps pass through the window");
  constexpr bool kOat = Kind::mode == Mode::kOat;
  __shared__ ExactSum sums[kEncodeWarps];  // absmean only
  __shared__ RangeQuant oat_range[2];      // oat only: the same two quantizers for every row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Kind kind{a.theta_nor, a.theta_out};
  const bool want_sum = std::is_same_v<Kind, SignedCodes> && a.mode == Mode::kAbsMean;
  const int K = static_cast<int>(a.K), steps = (K + kStep - 1) / kStep;
  if constexpr (kOat) {
    if (threadIdx.x == 0) row_quantizers(a, 0.f, 0.f, 0.f, 0.f, 0.f, 0, oat_range);
    __syncthreads();
  }
  ExactSum& sum = sums[warp];
  for (int64_t m = int64_t(blockIdx.x) * kEncodeWarps + warp; m < a.M;
       m += int64_t(gridDim.x) * kEncodeWarps) {
    const RowSource<T> src(a.x, m, a.K);
    const auto load = [&](int s) { return src.unit(s * kStep + kUnit * lane, K); };

    // Statistics. Every load of the held steps is issued before the first use; later steps
    // pass through window[] kWindow at a time.
    Unit<T> held[kHeld], window[kWindow];
    RowStats st;
#pragma unroll
    for (int s = 0; s < kHeld; ++s)
      if (s < steps) held[s] = load(s);
    dev::allow_dependents();  // the row's loads are out (header)
#pragma unroll
    for (int s = 0; s < kHeld; ++s)
      if (s < steps) st.add(held[s]);
#pragma unroll 1
    for (int s0 = kHeld; s0 < steps; s0 += kWindow) {
#pragma unroll
      for (int b = 0; b < kWindow; ++b)
        if (s0 + b < steps) window[b] = load(s0 + b);
#pragma unroll
      for (int b = 0; b < kWindow; ++b)
        if (s0 + b < steps) st.add(window[b]);
    }
    st.reduce();

    // Quantizers, redundantly in every lane; absmean's mean from lane 0. The exact sum takes
    // its own pass over x, from L1 or L2 by now: one step at a time, it needs few registers
    // beside the held steps.
    float mean = 0.f;
    if (want_sum && st.finite) {
      __syncwarp();  // lane 0 has read the previous row's sum
      for (int e = lane; e < ExactSum::kBuckets; e += 32) sum.bucket[e] = 0;
      __syncwarp();
#pragma unroll 1
      for (int s = 0; s < steps; ++s) add_sum(load(s), s * kStep + kUnit * lane, K, lane, sum);
      __syncwarp();
      if (lane == 0) mean = exact_mean(sum, a.K);
      mean = __shfl_sync(kFullMask, mean, 0);
    }
    RangeQuant range[2] = {};
    const bool usable = row_ranges(a, m, st, mean, range);
    if (lane < a.R) {
      const RangeQuant& q = lane ? range[1] : range[0];
      a.scale[m * a.R + lane] = usable ? stored_scale(a.mode, q) : dev::quiet_nan();
      if (a.zero) a.zero[m * a.R + lane] = usable ? static_cast<int32_t>(q.zero) : 0;
    }

    // Codes (code_pass).
    const RangeQuant* quant = kOat ? oat_range : range;
    code_pass<kWindow>(steps, held, load, [&](const Unit<T>& u, int s) {
      encode_unit<kSalient>(a, kind, u, s, lane, usable, quant, m);
    });
  }
}

// gif_encode with activation groups (group > 0; modes minmax, absmax, absmean, static: one range,
// no salient channels). The row walk, the held steps and encode_unit are those of
// gif_encode_kernel; what differs is that every statistic and quantizer belongs to the group of
// `group` channels (whole words) that holds a lane's unit: lane j's unit of step s (channels
// 256s + 8j ..) lies in group (256s + 8j) / group. Per step the lanes of a group reduce its min,
// max and max|x| among themselves (__match_any_sync on the group, then __reduce_*_sync on
// order-preserving integer keys: min and max are exact in any order); the group of lane 31
// carries its partial statistics into the next step when it goes on. The last lane of a group
// in the step where it ends writes its scale and zero point to the outputs, and the code pass
// reads them back (written by this warp before a __syncwarp): a row has ceil(K / group) groups,
// too many for registers or shared memory. absmean's exact mean|x| takes one pass per group
// (the warp's ExactSum, lane 0 rounds); static scales are read per group. A row with NaN or Inf
// anywhere, or with an invalid static scale or zero in any group, is rewritten as a non-finite
// row at the end of its statistics: every scale NaN, zero 0, planes and sign 0.

// gif_encode's parameters for row_quantizers with one range known at compile time (groups never
// have salient channels), so that its quantizer array stays in registers.
struct GroupConfig {
  Mode mode;
  bool is_signed;
  int bits;
  static constexpr int salient_bits = 0;
  float gamma, theta_nor, theta_out;
};

// The quantizer of one group (row_quantizers' range 0).
__device__ __forceinline__ RangeQuant group_quantizer(const GroupConfig& c, float mn, float mx,
                                                      float amax, float mean, float s,
                                                      int32_t z) {
  RangeQuant q[2];
  row_quantizers(c, mn, mx, amax, mean, s, z, q);
  return q[0];
}

// An order-preserving integer key of a float (the order of fminf / fmaxf on non-NaN values,
// -0 below +0) and back.
__device__ __forceinline__ int ordered_key(float v) {
  const int b = __float_as_int(v);
  return b >= 0 ? b : b ^ 0x7fffffff;
}
__device__ __forceinline__ float from_key(int k) {
  return __int_as_float(k >= 0 ? k : k ^ 0x7fffffff);
}

template <typename T, typename Kind>
__global__ void __launch_bounds__(kEncodeThreads, kEncodeBlocks)
    gif_encode_grouped_kernel(const EncodeArgs a) {
  constexpr int kHeld = kHeldBytes / (kUnit * static_cast<int>(sizeof(T)));
  constexpr int kWindow = kWindowBytes / (kUnit * static_cast<int>(sizeof(T)));
  static_assert(kHeld % kWindow == 0, "the held steps pass through the window");
  __shared__ ExactSum sums[kEncodeWarps];  // absmean only
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Kind kind{a.theta_nor, a.theta_out};
  const bool is_mean = a.mode == Mode::kAbsMean, is_static = a.mode == Mode::kStatic;
  const bool from_stats = !is_mean && !is_static;  // minmax, absmax: quantizers from min/max
  const int K = static_cast<int>(a.K), steps = (K + kStep - 1) / kStep;
  // Channels per group, as an int: a group past the last step holds the whole row either way.
  const int group = static_cast<int>(min(a.group, int64_t(steps) * kStep));
  const int64_t R = a.R;
  const GroupConfig cfg{a.mode, a.is_signed, a.bits, a.gamma, a.theta_nor, a.theta_out};
  const int32_t qmax = group_quantizer(cfg, 0.f, 0.f, 0.f, 0.f, 1.f, 0).qmax;
  ExactSum& sum = sums[warp];
  for (int64_t m = int64_t(blockIdx.x) * kEncodeWarps + warp; m < a.M;
       m += int64_t(gridDim.x) * kEncodeWarps) {
    const RowSource<T> src(a.x, m, a.K);
    const auto load = [&](int s) { return src.unit(s * kStep + kUnit * lane, K); };

    // Statistics, step by step (every lane of the warp calls it, in ascending steps).
    bool finite = true;
    int open = -1;  // the group carried from the previous step, or -1 (warp-uniform)
    float carry_mn = INFINITY, carry_mx = -INFINITY, carry_amax = 0.f;
    const auto stats_step = [&](const Unit<T>& u, int s) {
      const int c = s * kStep + kUnit * lane;
      const int gid = c < K ? c / group : -1;
      float mn = INFINITY, mx = -INFINITY, amax = 0.f;
#pragma unroll
      for (int i = 0; i < kUnit; ++i) {
        if (i >= K - c) break;  // channels past K (padding) belong to no group
        const float v = u.value(i);
        finite = finite && isfinite(v);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
        amax = fmaxf(amax, fabsf(v));
      }
      if (!from_stats) return;
      const unsigned same = __match_any_sync(kFullMask, gid);
      mn = from_key(__reduce_min_sync(same, ordered_key(mn)));
      mx = from_key(__reduce_max_sync(same, ordered_key(mx)));
      amax = __uint_as_float(__reduce_max_sync(same, __float_as_uint(amax)));
      if (gid >= 0 && gid == open) {
        mn = fminf(mn, carry_mn);
        mx = fmaxf(mx, carry_mx);
        amax = fmaxf(amax, carry_amax);
      }
      const int end = min((gid + 1) * group, K);
      const bool closes = gid >= 0 && end <= (s + 1) * kStep;
      if (closes && lane == 31 - __clz(same)) {
        const RangeQuant q = group_quantizer(cfg, mn, mx, amax, 0.f, 0.f, 0);
        a.scale[m * R + gid] = stored_scale(a.mode, q);
        if (a.zero) a.zero[m * R + gid] = static_cast<int32_t>(q.zero);
      }
      open = __shfl_sync(kFullMask, gid >= 0 && !closes ? gid : -1, 31);
      carry_mn = __shfl_sync(kFullMask, mn, 31);
      carry_mx = __shfl_sync(kFullMask, mx, 31);
      carry_amax = __shfl_sync(kFullMask, amax, 31);
    };

    Unit<T> held[kHeld], window[kWindow];
#pragma unroll
    for (int s = 0; s < kHeld; ++s)
      if (s < steps) held[s] = load(s);
    dev::allow_dependents();  // as in gif_encode_kernel
#pragma unroll
    for (int s = 0; s < kHeld; ++s)
      if (s < steps) stats_step(held[s], s);
#pragma unroll 1
    for (int s0 = kHeld; s0 < steps; s0 += kWindow) {
#pragma unroll
      for (int b = 0; b < kWindow; ++b)
        if (s0 + b < steps) window[b] = load(s0 + b);
#pragma unroll
      for (int b = 0; b < kWindow; ++b)
        if (s0 + b < steps) stats_step(window[b], s0 + b);
    }
    bool usable = __all_sync(kFullMask, finite);

    if (is_mean && usable) {  // exact mean|x| per group, a pass over each group's channels
#pragma unroll 1
      for (int64_t u = 0; u < R; ++u) {
        const int lo = static_cast<int>(u) * group, hi = min(lo + group, K);
        __syncwarp();  // lane 0 has read the previous group's sum
        for (int e = lane; e < ExactSum::kBuckets; e += 32) sum.bucket[e] = 0;
        __syncwarp();
#pragma unroll 1
        for (int c0 = lo; c0 < hi; c0 += kStep) {
          const int c = c0 + kUnit * lane;
          add_sum(src.unit(c, hi), c, hi, lane, sum);
        }
        __syncwarp();
        if (lane == 0) {
          const RangeQuant q =
              group_quantizer(cfg, 0.f, 0.f, 0.f, exact_mean(sum, hi - lo), 0.f, 0);
          a.scale[m * R + u] = stored_scale(a.mode, q);
          if (a.zero) a.zero[m * R + u] = 0;
        }
      }
    }
    if (is_static) {  // the caller's [M, R] scales and zero points; an invalid one spoils the row
      bool valid = true;
      for (int64_t u = lane; u < R; u += 32) {
        const float s = __ldg(a.static_scale + m * R + u);
        const int32_t z = a.is_signed ? 0 : __ldg(a.static_zero + m * R + u);
        valid = valid && isfinite(s) && s > 0.f && zero_in_range(z);
        const RangeQuant q = group_quantizer(cfg, 0.f, 0.f, 0.f, 0.f, s, z);
        a.scale[m * R + u] = stored_scale(a.mode, q);
        if (a.zero) a.zero[m * R + u] = static_cast<int32_t>(q.zero);
      }
      usable = usable && __all_sync(kFullMask, valid);
    }
    __syncwarp();  // every group's scale and zero written (any lane), visible to the warp
    if (!usable) {
      for (int64_t u = lane; u < R; u += 32) {
        a.scale[m * R + u] = dev::quiet_nan();
        if (a.zero) a.zero[m * R + u] = 0;
      }
      __syncwarp();
    }

    // Codes, as in gif_encode_kernel, each unit with its group's quantizer read back.
    const auto code_step = [&](const Unit<T>& u, int s) {
      const int c = s * kStep + kUnit * lane;
      RangeQuant q[2] = {RangeQuant{1.f, 0.f, qmax}, RangeQuant{1.f, 0.f, qmax}};
      if (usable && c < K) {
        const int64_t at = m * R + c / group;
        q[0].scale = a.scale[at];  // plain loads: written by this warp above
        q[0].zero = a.zero ? static_cast<float>(a.zero[at]) : 0.f;
      }
      encode_unit<false>(a, kind, u, s, lane, usable, q, m);
    };
    code_pass<kWindow>(steps, held, load, code_step);
  }
}

// spike_decode: one thread per element; the 32 lanes of a warp share one word.
constexpr int kDecodeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) spike_decode_kernel(const DecodeArgs a) {
  T* out = static_cast<T*>(a.out);
  const int64_t total = a.M * a.W * 32;
  for (int64_t i = int64_t(blockIdx.x) * kDecodeThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kDecodeThreads) {
    const int64_t m = i / (a.W * 32), w = (i / 32) % a.W, k = 32 * w + i % 32;
    if (k >= a.K) continue;
    const int j = static_cast<int>(i % 32);
    const int64_t at = m * a.W + w;
    const int32_t q = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, j),
                                   a.sign ? __ldg(a.sign + at) : 0u, j);
    const int64_t r = scale_column(a, w, a.hi ? __ldg(a.hi + at) : 0u, j);
    const int32_t z = a.zero ? __ldg(a.zero + m * a.R + r) : 0;
    const float v = zero_in_range(z) ? __ldg(a.scale + m * a.R + r) * static_cast<float>(q - z)
                                          : dev::quiet_nan();
    out[m * a.K + k] = dev::from_float<T>(v);
  }
}

// spike_counts: one warp per (plane, token) row of words.
constexpr int kCountThreads = 256;
constexpr int kCountWarps = kCountThreads / 32;

__global__ void __launch_bounds__(kCountThreads) spike_counts_kernel(const CountsArgs a) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint32_t* sign = a.negative ? a.sign : nullptr;  // sign masks only for negative=True
  for (int64_t pm = int64_t(blockIdx.x) * kCountWarps + warp; pm < a.P * a.M;
       pm += int64_t(gridDim.x) * kCountWarps) {
    const int64_t m = pm % a.M;
    int64_t c = 0;
    // Every bit of every word counts, as on the CPU (encode never sets bits at k >= K).
    for (int64_t w = lane; w < a.W; w += 32)
      c += __popc(__ldg(a.planes + pm * a.W + w) & (sign ? __ldg(sign + m * a.W + w) : kFullMask));
    for (int off = 16; off > 0; off /= 2) c += __shfl_down_sync(kFullMask, c, off);
    if (lane == 0) a.counts[pm] = c;
  }
}

// spike_stats: a grid-stride loop over the M * W word columns, one thread per column. Each
// count is summed over the warp (__reduce_add_sync), then over the block in shared memory, and
// each block adds its totals to the output once. Integer sums: the result does not depend on the
// order, so it equals the CPU's exactly.
constexpr int kStatsThreads = 256;
constexpr int kMaxStats = 2 * kMaxPlanes + 2;

__global__ void __launch_bounds__(kStatsThreads) spike_stats_kernel(const StatsArgs a) {
  __shared__ unsigned long long block_stats[kMaxStats];
  const int n = static_cast<int>(2 * a.P + 2), lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < n; i += kStatsThreads) block_stats[i] = 0;
  __syncthreads();
  const int64_t columns = a.M * a.W, stride = int64_t(gridDim.x) * kStatsThreads;
  const auto warp_add = [&](int slot, unsigned v) {
    // Every lane reaches this with the same loop trip count (the loop bound is per block).
    v = __reduce_add_sync(kFullMask, v);
    if (lane == 0 && v) atomicAdd(block_stats + slot, static_cast<unsigned long long>(v));
  };
  // Start of this block's columns: the loop runs while any thread of the block has a column,
  // so all lanes of a warp iterate together and out-of-range lanes contribute zeros.
  for (int64_t base = int64_t(blockIdx.x) * kStatsThreads; base < columns; base += stride) {
    const int64_t col = base + threadIdx.x;
    const bool valid = col < columns;
    const uint32_t neg = valid && a.sign ? __ldg(a.sign + col) : 0u;
    uint32_t fired = 0;
    for (int64_t p = 0; p < a.P; ++p) {
      const uint32_t v = valid ? __ldg(a.planes + p * columns + col) : 0u;
      warp_add(static_cast<int>(p), __popc(v));
      if (a.sign) warp_add(static_cast<int>(a.P + p), __popc(v & neg));
      fired |= v;
    }
    warp_add(static_cast<int>(2 * a.P), __popc(fired));
    warp_add(static_cast<int>(2 * a.P + 1), valid && fired == 0 ? 1u : 0u);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += kStatsThreads)
    if (block_stats[i])
      atomicAdd(reinterpret_cast<unsigned long long*>(a.stats) + i, block_stats[i]);
}

// feedback_encode: one warp per row, kEncodeWarps rows per block, the row's running values in
// shared memory. At step j every lane reads r_j and derives the code and the error itself (the
// same operations as the CPU's on the same value), then updates its own later channels l = lane
// (mod 32); the word of 32 channels is one ballot per plane of the codes the lanes kept.
__global__ void feedback_encode_kernel(FeedbackEncodeArgs a) {
  extern __shared__ float held[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* r = held + warp * a.K;
  const int64_t rows = a.G * a.N;
  const int32_t qmax = (1 << a.bits) - 1;
  for (int64_t m = int64_t(blockIdx.x) * kEncodeWarps + warp; m < rows;
       m += int64_t(gridDim.x) * kEncodeWarps) {
    const float* x = a.x + m * a.K;
    const float* F = a.feedback + (m / a.N) * a.K * a.K;
    float mn = INFINITY, mx = -INFINITY;
    bool finite = true;
    for (int64_t k = lane; k < a.K; k += 32) {
      const float v = x[k];
      finite = finite && isfinite(v);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
      r[k] = v;
    }
    for (int o = 16; o > 0; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(kFullMask, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, o));
    }
    finite = __all_sync(kFullMask, finite);
    __syncwarp();
    const RangeQuant q = minmax_quant(a.gamma, mn, mx, qmax);
    for (int64_t w = 0; w < a.W; ++w) {
      uint32_t code = 0;
      for (int t = 0; finite && t < 32 && w * 32 + t < a.K; ++t) {
        const int64_t j = w * 32 + t;
        float error;
        const uint32_t c = static_cast<uint32_t>(feedback_code(r[j], q, &error));
        if (t == lane) code = c;
        for (int64_t l = j + 1 + lane; l < a.K; l += 32) r[l] = r[l] - error * F[j * a.K + l];
        __syncwarp();
      }
      for (int p = 0; p < a.bits; ++p) {
        const uint32_t word = __ballot_sync(kFullMask, (code >> p) & 1u);
        if (lane == 0) a.planes[(p * rows + m) * a.W + w] = word;
      }
    }
    if (lane == 0) {
      a.scale[m] = finite ? q.scale : dev::quiet_nan();
      a.zero[m] = finite ? static_cast<int32_t>(q.zero) : 0;
    }
    __syncwarp();
  }
}

}  // namespace

void launch_gif_encode(const EncodeArgs& a, cudaStream_t stream) {
  dev::dispatch_float(a.x_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const unsigned grid = dev::grid_size((a.M + kEncodeWarps - 1) / kEncodeWarps);
    if (a.group > 0) {  // never with salient channels or oat (checks.cpp)
      auto kernel = a.is_signed ? gif_encode_grouped_kernel<T, SignedCodes>
                                : gif_encode_grouped_kernel<T, UnsignedCodes>;
      kernel<<<grid, kEncodeThreads, 0, stream>>>(a);
    } else if (a.mode == Mode::kOat) {
      gif_encode_kernel<T, OatCodes, false><<<grid, kEncodeThreads, 0, stream>>>(a);
    } else if (a.is_signed) {
      auto kernel = a.salient ? gif_encode_kernel<T, SignedCodes, true>
                              : gif_encode_kernel<T, SignedCodes, false>;
      kernel<<<grid, kEncodeThreads, 0, stream>>>(a);
    } else {
      auto kernel = a.salient ? gif_encode_kernel<T, UnsignedCodes, true>
                              : gif_encode_kernel<T, UnsignedCodes, false>;
      kernel<<<grid, kEncodeThreads, 0, stream>>>(a);
    }
  });
}

void launch_feedback_encode(const FeedbackEncodeArgs& a, cudaStream_t stream) {
  const int64_t rows = a.G * a.N;
  const unsigned grid = dev::grid_size((rows + kEncodeWarps - 1) / kEncodeWarps);
  const size_t shared = sizeof(float) * kEncodeWarps * a.K;  // K <= kMaxFeedbackK: 16 KiB
  feedback_encode_kernel<<<grid, kEncodeThreads, shared, stream>>>(a);
}

void launch_spike_decode(const DecodeArgs& a, cudaStream_t stream) {
  const unsigned grid = dev::grid_size((a.M * a.W * 32 + kDecodeThreads - 1) / kDecodeThreads);
  dev::dispatch_out_float(a.out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    spike_decode_kernel<T><<<grid, kDecodeThreads, 0, stream>>>(a);
  });
}

void launch_spike_counts(const CountsArgs& a, cudaStream_t stream) {
  const unsigned grid = dev::grid_size((a.P * a.M + kCountWarps - 1) / kCountWarps);
  spike_counts_kernel<<<grid, kCountThreads, 0, stream>>>(a);
}

void launch_spike_stats(const StatsArgs& a, cudaStream_t stream) {
  // Enough blocks to fill the GPU on large inputs; each block reads P + 1 words per column.
  const int64_t blocks = (a.M * a.W + kStatsThreads - 1) / kStatsThreads;
  spike_stats_kernel<<<dev::grid_size(std::min<int64_t>(blocks, 1024)), kStatsThreads, 0, stream>>>(a);
}

}  // namespace spikeops
