// The arguments of every kernel, CPU and CUDA alike: raw pointers and sizes, no torch or CUDA
// types, so that this header compiles with the host compiler and with nvcc. The checks of
// csrc/checks.h fill one of these structs from the op's inputs, the host entries of csrc/ops.cpp
// allocate the outputs into it and hand it to the CPU kernel (cpu/kernels.h) or the CUDA launcher
// (csrc/cuda/launchers.h). Absent optional tensors are null pointers. docs/ops.md is the contract of each op.
#pragma once

#include <cstdint>

#include "spike_math.h"

namespace spikeops {

// Element type of a float tensor crossing the kernel boundary. Inputs x of gif_encode may be
// float64; every float output is float16, bfloat16 or float32.
enum class FloatType : int32_t { kHalf, kBFloat16, kFloat, kDouble };

// A checked SpikeTensor (docs/ops.md, "The spike format").
struct SpikeFields {
  const uint32_t* planes;  // [P, M, W]
  const uint32_t* sign;    // [M, W] or null
  const uint32_t* hi;      // [M, W] or null
  const float* scale;      // [M, R], or null for the ops that take no scale
  const int32_t* zero;     // [M, R] or null
  int64_t P, M, W, R;
};

// The kernel form of one GPTQ linear layer (spikeops.GPTQWeight; docs/checkpoints.md): the
// checkpoint's tensors as they are, except that on the CPU the CPU layout may replace qweight
// (docs/ops.md, spike_linear). Read its fields through the accessors below.
struct WeightFields {
  const int32_t* qweight;     // [ceil(K * bits / 32), N], GPTQ packing; null when packed holds
                              // the codes
  const int32_t* qzeros;      // [G, ceil(N * bits / 32)] stored zero points, GPTQ packing
  const uint16_t* scales;     // [G, N] float16 group scales (their bits)
  const int32_t* g_idx;       // [K] group of each channel; read only when group_size == 0
  const uint8_t* packed;      // CPU layout of 4-bit codes [ceil(N/16), ceil(K/8), 64], or null
  const uint16_t* code_sums;  // [G, N] sum of q per group and column, with packed; or null
  int64_t group_size;         // > 0: channel k is in group k / group_size; 0: g_idx says
  int64_t K, N, G;
  int bits;                   // 2, 4 or 8
  int zero_offset;            // true zero point = stored field + zero_offset (0 or 1)
};

// Largest group of the CPU layout (G == 1: all of K, in whole blocks of 8): code_sums
// (<= 4096 * 15) fits uint16, and the int32 epilogue of cpu/int_layout_isa.h cannot overflow.
constexpr int64_t kMaxLayoutGroup = 4096;

// Which layers the CPU layout holds (docs/ops.md, "CPU layout"), the one rule that its builder
// (cpu_layout), the weight checks (packed) and its dot-product kernels apply and that
// spikeops.GPTQWeight asks (spikeops._C.layout_group): 4-bit codes in uniform groups
// (group_size > 0) of a multiple of 8 channels, or in one group (group_size >= K) of all of K
// rounded up to whole blocks of 8, at most kMaxLayoutGroup channels. The channels per group of
// the layout, or 0 where it cannot hold the layer.
constexpr int64_t layout_group(int64_t bits, int64_t group_size, int64_t K) {
  if (bits != 4 || group_size <= 0) return 0;
  const int64_t gs = group_size >= K ? (K + 7) / 8 * 8 : group_size;
  return gs % 8 == 0 && gs <= kMaxLayoutGroup ? gs : 0;
}

// Group of channel k of a layer.
SPIKE_HD int64_t group_of(const WeightFields& w, int64_t k) {
  return w.group_size > 0 ? k / w.group_size : static_cast<int64_t>(w.g_idx[k]);
}

// float32(scales[g, n]), exact.
SPIKE_HD float scale_at(const WeightFields& w, int64_t g, int64_t n) {
  return half_to_float(w.scales[g * w.N + n]);
}

// The true zero point z[g, n] (docs/checkpoints.md, "Zero points").
SPIKE_HD int32_t zero_at(const WeightFields& w, int64_t g, int64_t n) {
  return gptq_unpack(w.qzeros + g * ((w.N * w.bits + 31) / 32), n, w.bits) + w.zero_offset;
}

// The weight code q[k, n], from qweight or the CPU layout.
SPIKE_HD int32_t code_at(const WeightFields& w, int64_t k, int64_t n) {
  return w.qweight ? gptq_code(w.qweight, w.N, k, n, w.bits)
                   : layout_code(w.packed, (w.K + 7) / 8, k, n);
}

struct EncodeArgs {
  const void* x;                // x_type [M, K]
  FloatType x_type;
  const uint8_t* salient;       // bool [K] read as bytes (nonzero = salient), or null
  const float* static_scale;    // mode static: [M]; else null
  const int32_t* static_zero;   // mode static, unsigned: [M]; else null
  uint32_t* planes;             // [P, M, W]
  uint32_t* sign;               // [M, W], or null for unsigned encodings
  uint32_t* hi;                 // [M, W], or null when R = 1
  float* scale;                 // [M, R]
  int32_t* zero;                // [M, R], or null for signed encodings
  Mode mode;
  bool is_signed;
  int bits, salient_bits;       // salient_bits = 0 without salient channels
  float gamma, theta_nor, theta_out;
  int64_t M, K, W, P, R;
};

struct DecodeArgs : SpikeFields {
  void* out;                    // out_type [M, K]
  FloatType out_type;
  int64_t K;
};

struct CountsArgs : SpikeFields {
  bool negative;                // count only spikes whose sign bit is set
  int64_t* counts;              // [P, M]
};

struct StatsArgs : SpikeFields {
  int64_t* stats;               // [2P + 2], zeroed: see spike_stats in csrc/ops.cpp
};

struct AccumulateArgs : SpikeFields {
  const int8_t* w;              // [K, N]
  int64_t* out;                 // per_plane ? [P, R, M, N] : [R, M, N], zeroed
  bool per_plane;
  int64_t K, N;
};

struct LinearArgs : SpikeFields, WeightFields {
  const float* bias;            // [N] or null
  void* out;                    // out_type [M, N]
  FloatType out_type;
  Backend backend;              // kAuto is resolved by each device (docs/ops.md)
};

// spike_linear's epilogue, the one float rounding after the exact sums (docs/ops.md): output
// (m, n) from the folded sums S_r of its ranges (S1 read only when R == 2),
//   float32(double(scale[m, 0]) * S0 [+ double(scale[m, 1]) * S1] [+ double(bias[n])]).
// Every kernel, CPU and CUDA, ends with it, so their outputs agree bit for bit.
SPIKE_HD float linear_epilogue(const LinearArgs& a, int64_t m, int64_t n, double S0, double S1) {
  double v = static_cast<double>(a.scale[m * a.R]) * S0;
  if (a.R == 2) v += static_cast<double>(a.scale[m * a.R + 1]) * S1;
  if (a.bias) v += static_cast<double>(a.bias[n]);
  return static_cast<float>(v);
}

struct DequantizeArgs : WeightFields {
  void* out;                    // float16 [N, K]
};

// The CPU layout of a 4-bit layer and GPTQ's qweight, either made from the other (cpu_layout,
// cpu_layout_qweight; CPU only). Channels k >= K are 0 in what is made.
struct LayoutArgs {
  int32_t* qweight;             // [ceil(K / 8), N] GPTQ packing of 4-bit codes
  uint8_t* packed;              // [ceil(N / 16), ceil(K / 8), 64] (docs/ops.md, "CPU layout")
  uint16_t* code_sums;          // [G, N] sums of the codes per group, made with packed
  int64_t group_size;           // channel k is in group k / group_size
  int64_t K, N, G;
};

// spike_matmul (docs/ops.md): A rows are (batch, head, i), B rows (batch, kv head, j); query
// head h reads kv head h / (heads / kv_heads).
struct MatmulArgs {
  SpikeFields a;                // rows batch * heads * Ma
  SpikeFields b;                // rows batch * kv_heads * Lb, of which the first N per head
  void* out;                    // out_type [batch, heads, Ma, N]
  FloatType out_type;
  int64_t K, batch, heads, kv_heads, Ma, Lb, N;
  bool causal;                  // key j of query i is masked (-inf) when j > N - Ma + i
};

}  // namespace spikeops
