// Boundary checks of every op, in one place. Each check raises ValueError (bad value or shape) or
// TypeError (bad dtype) with a message naming the op, the argument, the expectation and what was
// given, and fills the kernel's argument struct (kernel_args.h) with the checked inputs; kernels
// behind these checks trust their inputs. Optional inputs are `Tensor?` in the schemas
// (std::nullopt here, None in Python) and null pointers in the argument structs.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "kernel_args.h"

namespace spikeops {

using OptTensor = std::optional<at::Tensor>;

// The inputs of one op call that its argument struct points into, read in place when contiguous;
// another input is copied once and the copy kept here until the entry returns.
class Inputs {
 public:
  template <typename T>
  const T* data(const at::Tensor& t) {
    if (t.is_contiguous()) return t.const_data_ptr<T>();
    copies_.push_back(t.contiguous());
    return copies_.back().const_data_ptr<T>();
  }
  // The elements of a tensor whose dtype the kernel dispatches on (gif_encode's x).
  const void* bytes(const at::Tensor& t) {
    if (t.is_contiguous()) return t.const_data_ptr();
    copies_.push_back(t.contiguous());
    return copies_.back().const_data_ptr();
  }
  // The words of an int32 bit tensor (planes, sign, hi).
  const uint32_t* words(const at::Tensor& t) {
    return reinterpret_cast<const uint32_t*>(data<int32_t>(t));
  }

 private:
  std::vector<at::Tensor> copies_;
};

std::string dtype_name(at::ScalarType t);
FloatType float_type(at::ScalarType t);
Mode parse_mode(const std::string& mode);

// The bit widths of an encoding (docs/ops.md, gif_encode): `bits` in [min, kMaxPlanes] with min
// 2 for signed codes other than oat (one bit is the sign), and salient_bits (0: none) in
// (bits, kMaxPlanes]. spikeops.Encoding asks the same rule through spikeops._C.check_bits.
void check_bits(const char* op, const std::string& mode, bool is_signed, int64_t bits,
                int64_t salient_bits);

// gif_encode's inputs, with the sizes of the spikes it produces; the output pointers are left
// for the entry to set.
EncodeArgs check_encode(Inputs& in, const at::Tensor& x, const std::string& mode, int64_t bits,
                        double gamma, const OptTensor& salient_mask, int64_t salient_bits,
                        const OptTensor& scale, const OptTensor& zero, double theta_nor,
                        double theta_out, int64_t group);

// An activation group (docs/ops.md, "The spike format"): 0, or a positive multiple of 32.
void check_group(const char* op, int64_t group);

// planes, sign, hi and the activation group only (spike_counts, spike_stats and
// spike_accumulate take no scale); R is the count of scale columns (scale_columns).
SpikeFields check_spike_bits(const char* op, Inputs& in, const at::Tensor& planes,
                             const OptTensor& sign, const OptTensor& hi, int64_t group);

SpikeFields check_spikes(const char* op, Inputs& in, const at::Tensor& planes,
                         const OptTensor& sign, const OptTensor& hi, const at::Tensor& scale,
                         const OptTensor& zero, int64_t group);

// spike_linear's rule for activation groups: uniform weight groups that each hold whole
// activation groups (group_size a multiple of group, or one weight group).
void check_linear_groups(const char* op, const SpikeFields& s, const WeightFields& w);

// The spike words must cover exactly K channels: W == ceil(K / 32).
void check_spike_width(const char* op, const SpikeFields& s, int64_t K, const char* k_source);

// The weights of spike_linear and gptq_dequantize: qweight or the CPU layout packed (CPU
// tensors, 4-bit codes in uniform groups) holds the codes.
WeightFields check_weights(const char* op, Inputs& in, const OptTensor& qweight,
                           const at::Tensor& qzeros, const at::Tensor& scales,
                           const at::Tensor& g_idx, const OptTensor& packed, int64_t bits,
                           int64_t group_size, int64_t zero_offset);

// spike_linear's code_sums: given exactly with packed, into w.
void check_code_sums(const char* op, Inputs& in, const OptTensor& code_sums,
                     const at::Tensor& scales, WeightFields& w);

// spike_linear's bias: float32 [N] on the device of the weights' scales, or null when absent.
const float* check_bias(const char* op, Inputs& in, const OptTensor& bias,
                        const at::Tensor& scales, int64_t N);

// `t` has dtype `want` (TypeError otherwise).
void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want);

// `t` lies on the device of `ref` (argument names for the message).
void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name);

// Output dtypes of the float-producing ops: float16, bfloat16 or float32.
void check_float_out_dtype(const char* op, at::ScalarType dtype, const char* name);

// spike_linear's backend argument.
Backend parse_backend(const char* op, const std::string& backend);
// SPIKEOPS_PDL, read on every call (docs/ops.md, spike_linear): unset, empty or "1" allow the
// CUDA decode kernel's programmatic dependent launch where the device has it, "0" turns it off
// (the A/B switch); any other value is refused, so that a misspelt switch never times the wrong
// path in silence.
bool programmatic_launch_allowed(const char* op);

// spike_matmul's inputs: both operands (messages name them "spike_matmul (a)" and
// "spike_matmul (b)"), with the head layout of docs/ops.md; the output pointer is left for the
// entry to set.
MatmulArgs check_matmul(Inputs& in, const at::Tensor& a_planes, const OptTensor& a_sign,
                        const OptTensor& a_hi, const at::Tensor& a_scale,
                        const OptTensor& a_zero, const at::Tensor& b_planes,
                        const OptTensor& b_sign, const OptTensor& b_hi,
                        const at::Tensor& b_scale, const OptTensor& b_zero, int64_t K,
                        int64_t batch, int64_t heads, int64_t kv_heads, int64_t keys,
                        bool causal, at::ScalarType out_dtype);

// cpu_layout's arguments: qweight int32 [ceil(K / 8), N] of a layer the CPU layout holds, on the
// CPU.
void check_cpu_layout(const at::Tensor& qweight, int64_t bits, int64_t group_size, int64_t K);

// cpu_layout_qweight's arguments: packed uint8 [ceil(N / 16), ceil(K / 8), 64] on the CPU.
void check_layout_qweight(const at::Tensor& packed, int64_t K, int64_t N);

// prob_matmul's inputs: probs float32 [batch, heads, Ma, K], token_scale float32
// [batch * kv_heads, S >= K] on probs' device, and B (messages name it "prob_matmul (b)") as
// spike_matmul's b with K channels; `a` describes the probabilities' codes (8 planes, one range,
// no scale yet), N = Lb (every row of B), out float32, the pointers left for the entry.
MatmulArgs check_prob_matmul(Inputs& in, const at::Tensor& probs, const at::Tensor& token_scale,
                             const at::Tensor& b_planes, const OptTensor& b_sign,
                             const OptTensor& b_hi, const at::Tensor& b_scale,
                             const OptTensor& b_zero, int64_t kv_heads);

// channel_major_write's inputs: planes/sign of M = G * T token rows of K channels (one range),
// out int32 [P + (sign given), G * K, words], contiguous (written in place), on planes' device,
// with start + T <= 32 * words; the pointers left for the entry.
ChannelMajorArgs check_channel_major_write(Inputs& in, const at::Tensor& planes,
                                           const OptTensor& sign, const at::Tensor& out,
                                           int64_t K, int64_t start);

// feedback_encode's inputs: x float32 [G, N, K] with 1 <= K <= kMaxFeedbackK, feedback float32
// [G, K, K] on x's device, bits in [1, kMaxPlanes], gamma in (0, 1]; the output pointers left
// for the entry.
FeedbackEncodeArgs check_feedback_encode(Inputs& in, const at::Tensor& x,
                                         const at::Tensor& feedback, int64_t bits, double gamma);

}  // namespace spikeops

