// Boundary checks of every op, in one place. Each check raises ValueError (bad value or shape) or
// TypeError (bad dtype) with a message naming the op, the argument, the expectation and what was
// given; kernels behind these checks trust their inputs.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "kernel_args.h"

namespace spikeops {

// A SpikeTensor's fields, contiguous, with absent tensors (numel 0) kept as undefined tensors.
struct Spikes {
  at::Tensor planes;  // int32 [P, M, W]
  at::Tensor sign;    // int32 [M, W] or undefined
  at::Tensor hi;      // int32 [M, W] or undefined
  at::Tensor scale;   // float32 [M, R], or undefined for the ops that take no scale
  at::Tensor zero;    // int32 [M, R] or undefined
  int64_t P, M, W, R;
};

// The kernel form of a GPTQ layer (docs/ops.md, spike_linear), contiguous.
struct Weights {
  at::Tensor qweight;    // int32 [ceil(K*bits/32), N], or undefined with packed
  at::Tensor qzeros;     // int32 [G, ceil(N*bits/32)] stored zero points
  at::Tensor scales;     // float16 [G, N]
  at::Tensor g_idx;      // int32 [K], values in [0, G)
  at::Tensor packed;     // uint8 [ceil(N/16), ceil(K/8), 64] CPU layout, or undefined
  at::Tensor code_sums;  // uint16 [G, N], with packed (spike_linear), or undefined
  int64_t group_size;    // > 0: uniform groups (g_idx's values are not read); 0: g_idx
  int64_t K, N, G;
  int bits;
  int zero_offset;
};

// gif_encode's arguments, checked, with the derived sizes of the SpikeTensor it produces.
struct Encode {
  at::Tensor x;             // [M, K] contiguous; float16, bfloat16, float32 or float64
  at::Tensor salient_mask;  // bool [K] or undefined
  at::Tensor scale;         // static mode: float32 [M]; else undefined
  at::Tensor zero;          // static unsigned mode: int32 [M]; else undefined
  Mode mode;
  bool is_signed;
  int bits, salient_bits;   // salient_bits is 0 without a salient mask
  float gamma, theta_nor, theta_out;
  int64_t M, K, W, P, R;
};

std::string dtype_name(at::ScalarType t);

Encode check_encode(const at::Tensor& x, const std::string& mode, int64_t bits, double gamma,
                    const at::Tensor& salient_mask, int64_t salient_bits,
                    const at::Tensor& scale, const at::Tensor& zero, double theta_nor,
                    double theta_out);

// planes, sign and hi only (spike_counts, spike_stats and spike_accumulate take no scale); R is
// 2 with hi.
Spikes check_spike_bits(const char* op, const at::Tensor& planes, const at::Tensor& sign,
                        const at::Tensor& hi);

Spikes check_spikes(const char* op, const at::Tensor& planes, const at::Tensor& sign,
                    const at::Tensor& hi, const at::Tensor& scale, const at::Tensor& zero);

// The weights of spike_linear and gptq_dequantize: qweight or the CPU layout packed (CPU
// tensors, 4-bit codes in uniform groups) holds the codes.
Weights check_weights(const char* op, const at::Tensor& qweight, const at::Tensor& qzeros,
                      const at::Tensor& scales, const at::Tensor& g_idx,
                      const at::Tensor& packed, int64_t bits, int64_t group_size,
                      int64_t zero_offset);

// spike_linear's code_sums: present exactly with packed, into w.
void check_code_sums(const char* op, const at::Tensor& code_sums, Weights& w);

// The spike words must cover exactly K channels: W == ceil(K / 32).
void check_spike_width(const char* op, const Spikes& s, int64_t K, const char* k_source);

// `t` has dtype `want` (TypeError otherwise).
void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want);

// `t` lies on the device of `ref` (argument names for the message).
void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name);

// Output dtypes of the float-producing ops: float16, bfloat16 or float32.
void check_float_out_dtype(const char* op, at::ScalarType dtype, const char* name);

// spike_linear's backend argument.
Backend parse_backend(const char* op, const std::string& backend);

// spike_linear's bias: float32 [N] on the device of the weights, or undefined when absent.
at::Tensor check_bias(const char* op, const at::Tensor& bias, const Weights& w);

// Data of optional tensors: absent (undefined or empty) tensors give null.
template <typename T>
const T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}
template <typename T>
T* mutable_data_or_null(at::Tensor& t) {
  return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr;
}

// Word views of int32 bit tensors (planes, sign, hi), null when absent.
inline const uint32_t* words(const at::Tensor& t) {
  return reinterpret_cast<const uint32_t*>(data_or_null<int32_t>(t));
}
inline uint32_t* mutable_words(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(mutable_data_or_null<int32_t>(t));
}

Mode parse_mode(const std::string& mode);

// spike_matmul's arguments, checked: both operands (messages name them "spike_matmul (a)" and
// "spike_matmul (b)"), with the head layout of docs/ops.md.
struct Matmul {
  Spikes a, b;
  int64_t K, batch, heads, kv_heads, Ma, Lb, N;
};

Matmul check_matmul(const at::Tensor& a_planes, const at::Tensor& a_sign, const at::Tensor& a_hi,
                    const at::Tensor& a_scale, const at::Tensor& a_zero,
                    const at::Tensor& b_planes, const at::Tensor& b_sign, const at::Tensor& b_hi,
                    const at::Tensor& b_scale, const at::Tensor& b_zero, int64_t K, int64_t batch,
                    int64_t heads, int64_t kv_heads, int64_t keys, bool causal);

// cpu_layout's arguments: qweight int32 [ceil(K / 8), N] of a layer the CPU layout holds, on the
// CPU.
void check_cpu_layout(const at::Tensor& qweight, int64_t bits, int64_t group_size, int64_t K);

// cpu_layout_qweight's arguments: packed uint8 [ceil(N / 16), ceil(K / 8), 64] on the CPU.
void check_layout_qweight(const at::Tensor& packed, int64_t K, int64_t N);

}  // namespace spikeops
