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

// A checked SpikeTensor (docs/ops.md, "The spike format"). Each element reads column r of its
// token's scale (and zero) row: its range (hi) or its activation group (group > 0), never both.
struct SpikeFields {
  const uint32_t* planes;  // [P, M, W]
  const uint32_t* sign;    // [M, W] or null
  const uint32_t* hi;      // [M, W] or null
  const float* scale;      // [M, R], or null for the ops that take no scale
  const int32_t* zero;     // [M, R] or null
  int64_t P, M, W;
  int64_t R;               // scale columns: 2 with hi, ceil(K / group) with group, else 1
  int64_t group;           // channels per activation group, a multiple of 32; 0: none
};

// Scale columns of spikes with W words per token: activation groups are whole words, so their
// count follows from W (ceil(K / group) == ceil(W / (group / 32))).
SPIKE_HD int64_t scale_columns(bool has_hi, int64_t group, int64_t W) {
  return has_hi ? 2 : group > 0 ? (W + group / 32 - 1) / (group / 32) : 1;
}

// The scale column of channel 32 * w + j, whose range bit is bit j of hi_word (read only with
// hi): its activation group, its range, or 0.
SPIKE_HD int64_t scale_column(const SpikeFields& s, int64_t w, uint32_t hi_word, int j) {
  return s.group > 0 ? w / (s.group / 32) : s.hi ? range_of(hi_word, j) : 0;
}

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

// Whether spike_linear takes spikes with activation groups of `group` channels on weights in
// groups of group_size (docs/ops.md, spike_linear): group 0 (none), or uniform weight groups
// that each hold whole activation groups (group_size a multiple of group, or one weight group,
// group_size >= K). spike_linear's check applies it; spikeops.SpikeLinear asks it
// (spikeops._C.activation_groups_fit) when an encoding is set.
constexpr bool activation_groups_fit(int64_t group, int64_t group_size, int64_t K) {
  return group == 0 || (group_size > 0 && (group_size % group == 0 || group_size >= K));
}

// Group of channel k of a layer.
SPIKE_HD int64_t group_of(const WeightFields& w, int64_t k) {
  return w.group_size > 0 ? k / w.group_size : static_cast<int64_t>(w.g_idx[k]);
}

// Where scales[g, n] is stored, and the packed qzeros row of group g: what scale_at and zero_at
// read (the CUDA decode kernel also prefetches them).
SPIKE_HD const uint16_t* scale_address(const WeightFields& w, int64_t g, int64_t n) {
  return w.scales + g * w.N + n;
}
SPIKE_HD const int32_t* qzeros_row(const WeightFields& w, int64_t g) {
  return w.qzeros + g * ((w.N * w.bits + 31) / 32);
}

// float32(scales[g, n]), exact.
SPIKE_HD float scale_at(const WeightFields& w, int64_t g, int64_t n) {
  return half_to_float(*scale_address(w, g, n));
}

// The true zero point z[g, n] (docs/checkpoints.md, "Zero points").
SPIKE_HD int32_t zero_at(const WeightFields& w, int64_t g, int64_t n) {
  return gptq_unpack(qzeros_row(w, g), n, w.bits) + w.zero_offset;
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
  int64_t M, K, W, P;
  int64_t R;                    // scale columns (SpikeFields::R)
  int64_t group;                // channels per activation group (a multiple of 32), 0: none;
                                // static_scale / static_zero are then [M, R]
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
  bool programmatic;            // CUDA decode kernel: programmatic dependent launch allowed
};

// spike_linear's epilogue, the one float rounding after the exact sums (docs/ops.md): output
// (m, n) is float32(Y + double(bias[n])) with
//   Y = sum over scale columns r ascending of double(scale[m, r]) * S_r,
// S_r the folded weight-group sums of column r. Every kernel, CPU and CUDA, ends with these
// functions, so their outputs agree bit for bit.

// One term of Y.
SPIKE_HD double scale_term(const LinearArgs& a, int64_t m, int64_t r, double S) {
  return static_cast<double>(a.scale[m * a.R + r]) * S;
}

// float32(Y + bias[n]).
SPIKE_HD float linear_output(const LinearArgs& a, int64_t n, double Y) {
  if (a.bias) Y += static_cast<double>(a.bias[n]);
  return static_cast<float>(Y);
}

// The epilogue of spikes without activation groups, from S0 and S1 (read only when R == 2).
// With activation groups the kernels add the R terms themselves, starting from Y = 0.0 (the
// same value: an S_r is never -0.0, as its sum starts at +0.0, and scales are positive).
SPIKE_HD float linear_epilogue(const LinearArgs& a, int64_t m, int64_t n, double S0, double S1) {
  double Y = scale_term(a, m, 0, S0);
  if (a.R == 2) Y += scale_term(a, m, 1, S1);
  return linear_output(a, n, Y);
}

// The weight group that holds activation group u of spike_linear's input: activation groups
// lie inside one uniform weight group (checks.cpp), and with one weight group u * group < K <=
// group_size.
SPIKE_HD int64_t weight_group_of(const LinearArgs& a, int64_t u) {
  return u * a.group / a.group_size;
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

// channel_major_write (docs/ops.md): T tokens' spike words, token-major (row (g, t), channel k at
// bit k), written into channel-major words (row (g, k), token j at bit j) at tokens start ..
// start + T; the plane words first, the sign words last.
struct ChannelMajorArgs {
  const uint32_t* planes;       // [P, G * T, Wt]
  const uint32_t* sign;         // [G * T, Wt] or null
  uint32_t* out;                // [P + (sign != null), G * K, words]
  int64_t P, G, T, K, Wt, words, start;
};

// feedback_encode (docs/ops.md): minmax codes of rows (g, n) of K channels, each channel's
// rounding error carried into the later channels through the row's group's matrix F (error
// feedback): r = x; for j < K: Q_j = code(r_j), r_l -= (r_j - s * (Q_j - z)) * F[g, j, l], l > j.
struct FeedbackEncodeArgs {
  const float* x;               // [G * N, K]
  const float* feedback;        // [G, K, K], the strict upper triangle read
  uint32_t* planes;             // [P, G * N, W]
  float* scale;                 // [G * N]
  int32_t* zero;                // [G * N]
  int bits;
  float gamma;
  int64_t G, N, K, W;
};

// prob_matmul (docs/ops.md): spike_matmul of A, the float32 probabilities times B's token
// scales encoded per row as static unsigned 8-bit codes, and B. `m.a` describes those codes
// (P = 8, one range, no sign or zero; its scale is `steps`, which the kernel fills), m.b is B.
struct ProbMatmulArgs {
  MatmulArgs m;
  const float* probs;           // [batch * heads * Ma, K]
  const float* token_scale;     // row (batch, kv head): K scales at stride scale_stride
  int64_t scale_stride;
  float* steps;                 // [batch * heads * Ma] out: each A row's scale
};

// hadamard (docs/ops.md): every block of n consecutive elements of x (a contiguous
// [blocks * n]) times the +-1 Sylvester matrix H_n, float64 butterflies, each output rounded once
// to x's type, then, unless scale is 1, times scale as torch multiplies such a tensor by a Python
// float: in float32 by float32(scale), in float64 for float64 x.
struct HadamardArgs {
  const void* x;                // type [blocks * n]
  void* out;                    // type [blocks * n]
  FloatType type;
  int64_t blocks, n;            // n a power of two
  double scale;
};

}  // namespace spikeops
