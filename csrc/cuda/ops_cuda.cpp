// CUDA host entries. Each runs the checks of its CPU twin (csrc/cpu/*.cpp) in the same order with
// the same messages, makes the inputs' device current, allocates the outputs and launches one
// kernel (cuda/kernels.h) on that device's current stream. Values of CUDA tensors are never read
// here (that would synchronize); the kernels guard them instead (cuda/kernels.h lists how).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "kernels.h"
#include "spikeops.h"

namespace spikeops {
namespace {

// at::cuda::getCurrentCUDAStream() is this function; its c10 header needs no cuBLAS headers.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// The tensor that picks the device must be a CUDA tensor: CUDA dispatch can also be reached
// through another argument (an empty optional tensor on a CUDA device).
void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor when the other ",
                    "arguments are, got ", t.device());
}

FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return FloatType::kHalf;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat;
    case at::kDouble: return FloatType::kDouble;
    default: TORCH_CHECK_TYPE(false, "spikeops: no CUDA kernel for ", dtype_name(t));
  }
}

}  // namespace

EncodeResult gif_encode_cuda(const at::Tensor& x, const std::string& mode, int64_t bits,
                             double gamma, const at::Tensor& salient_mask, int64_t salient_bits,
                             const at::Tensor& scale, const at::Tensor& zero, double theta_nor,
                             double theta_out) {
  const Encode e = check_encode(x, mode, bits, gamma, salient_mask, salient_bits, scale, zero,
                                theta_nor, theta_out);
  check_cuda("gif_encode", x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  EncodeResult out = encode_outputs(e);
  auto& [planes, sign, hi, scale_out, zero_out] = out;
  if (e.M > 0) {
    EncodeArgs a;
    a.x = e.x.data_ptr();
    a.x_type = float_type(e.x.scalar_type());
    a.salient = e.salient_mask.defined()
                    ? reinterpret_cast<const uint8_t*>(e.salient_mask.data_ptr<bool>())
                    : nullptr;
    a.static_scale = data_or_null<float>(e.scale);
    a.static_zero = data_or_null<int32_t>(e.zero);
    a.planes = mutable_words(planes);
    a.sign = mutable_words(sign);
    a.hi = mutable_words(hi);
    a.scale = scale_out.data_ptr<float>();
    a.zero = mutable_data_or_null<int32_t>(zero_out);
    a.mode = e.mode;
    a.is_signed = e.is_signed;
    a.bits = e.bits;
    a.salient_bits = e.salient_bits;
    a.gamma = e.gamma;
    a.theta_nor = e.theta_nor;
    a.theta_out = e.theta_out;
    a.M = e.M, a.K = e.K, a.W = e.W, a.P = e.P, a.R = e.R;
    launch_gif_encode(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor spike_decode_cuda(const at::Tensor& planes, const at::Tensor& sign, const at::Tensor& hi,
                             const at::Tensor& scale, const at::Tensor& zero, int64_t K,
                             at::ScalarType dtype) {
  const Spikes s = check_spike_decode(planes, sign, hi, scale, zero, K, dtype);
  check_cuda("spike_decode", planes, "planes");
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = at::empty({s.M, K}, planes.options().dtype(dtype));
  if (s.M > 0) {
    DecodeArgs a;
    a.planes = words(s.planes);
    a.sign = words(s.sign);
    a.hi = words(s.hi);
    a.scale = s.scale.data_ptr<float>();
    a.zero = data_or_null<int32_t>(s.zero);
    a.out = out.data_ptr();
    a.out_type = float_type(dtype);
    a.P = s.P, a.M = s.M, a.W = s.W, a.R = s.R, a.K = K;
    launch_spike_decode(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor spike_counts_cuda(const at::Tensor& planes, const at::Tensor& sign, bool negative) {
  const Spikes s = check_spike_counts(planes, sign, negative);
  check_cuda("spike_counts", planes, "planes");
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = at::empty({s.P, s.M}, planes.options().dtype(at::kLong));
  if (s.M > 0) {
    CountsArgs a;
    a.planes = words(s.planes);
    a.sign = negative ? words(s.sign) : nullptr;
    a.counts = out.data_ptr<int64_t>();
    a.P = s.P, a.M = s.M, a.W = s.W;
    launch_spike_counts(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor spike_stats_cuda(const at::Tensor& planes, const at::Tensor& sign) {
  const Spikes s = check_spike_bits("spike_stats", planes, sign, at::Tensor());
  check_cuda("spike_stats", planes, "planes");
  const c10::cuda::CUDAGuard guard(planes.device());
  // The kernel adds into the output with atomics, so it starts from zeros.
  at::Tensor out = at::zeros({stats_size(s.P)}, planes.options().dtype(at::kLong));
  if (s.M > 0) {
    StatsArgs a;
    a.planes = words(s.planes);
    a.sign = words(s.sign);
    a.stats = out.data_ptr<int64_t>();
    a.P = s.P, a.M = s.M, a.W = s.W;
    launch_spike_stats(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor spike_accumulate_cuda(const at::Tensor& planes, const at::Tensor& sign,
                                 const at::Tensor& hi, const at::Tensor& w, bool per_plane) {
  at::Tensor wc;
  const Spikes s = check_spike_accumulate(planes, sign, hi, w, &wc);
  const int64_t K = wc.size(0), N = wc.size(1);
  check_cuda("spike_accumulate", planes, "planes");
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor out = at::empty(per_plane ? at::IntArrayRef{s.P, s.R, s.M, N}
                                       : at::IntArrayRef{s.R, s.M, N},
                             planes.options().dtype(at::kLong));
  if (out.numel() > 0) {
    AccumulateArgs a;
    a.planes = words(s.planes);
    a.sign = words(s.sign);
    a.hi = words(s.hi);
    a.w = wc.data_ptr<int8_t>();
    a.out = out.data_ptr<int64_t>();
    a.per_plane = per_plane;
    a.P = s.P, a.M = s.M, a.W = s.W, a.R = s.R, a.K = K, a.N = N;
    launch_spike_accumulate(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor spike_linear_cuda(const at::Tensor& planes, const at::Tensor& sign, const at::Tensor& hi,
                             const at::Tensor& scale, const at::Tensor& zero,
                             const at::Tensor& qweight, const at::Tensor& qzeros,
                             const at::Tensor& scales, const at::Tensor& g_idx,
                             const at::Tensor& bias, int64_t bits, int64_t zero_offset,
                             at::ScalarType out_dtype, const std::string& backend) {
  const Linear l = check_spike_linear(planes, sign, hi, scale, zero, qweight, qzeros, scales,
                                      g_idx, bias, bits, zero_offset, out_dtype, backend);
  const Spikes& s = l.s;
  const Gptq& w = l.w;
  check_cuda("spike_linear", planes, "planes");
  const c10::cuda::CUDAGuard guard(planes.device());
  at::Tensor y = at::empty({s.M, w.N}, planes.options().dtype(out_dtype));
  if (s.M > 0) {
    LinearArgs a;
    a.planes = words(s.planes);
    a.sign = words(s.sign);
    a.hi = words(s.hi);
    a.scale = s.scale.data_ptr<float>();
    a.zero = data_or_null<int32_t>(s.zero);
    a.qweight = w.qweight.data_ptr<int32_t>();
    a.qzeros = w.qzeros.data_ptr<int32_t>();
    a.scales = reinterpret_cast<const __half*>(w.scales.data_ptr<at::Half>());
    a.g_idx = w.g_idx.data_ptr<int32_t>();
    a.bias = data_or_null<double>(l.bias64);
    a.out = y.data_ptr();
    a.out_type = float_type(out_dtype);
    a.backend = l.backend;
    a.P = s.P, a.M = s.M, a.W = s.W, a.R = s.R;
    a.K = w.K, a.N = w.N, a.G = w.G, a.zero_cols = w.qzeros.size(1);
    a.bits = w.bits;
    a.zero_offset = w.zero_offset;
    launch_spike_linear(a, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

at::Tensor gptq_dequantize_cuda(const at::Tensor& qweight, const at::Tensor& qzeros,
                                const at::Tensor& scales, const at::Tensor& g_idx, int64_t bits,
                                int64_t zero_offset) {
  const Gptq w = check_gptq("gptq_dequantize", qweight, qzeros, scales, g_idx, bits, zero_offset);
  check_cuda("gptq_dequantize", qweight, "qweight");
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty({w.N, w.K}, qweight.options().dtype(at::kHalf));
  DequantizeArgs a;
  a.qweight = w.qweight.data_ptr<int32_t>();
  a.qzeros = w.qzeros.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const __half*>(w.scales.data_ptr<at::Half>());
  a.g_idx = w.g_idx.data_ptr<int32_t>();
  a.out = reinterpret_cast<__half*>(out.data_ptr<at::Half>());
  a.K = w.K, a.N = w.N, a.G = w.G, a.zero_cols = w.qzeros.size(1);
  a.bits = w.bits;
  a.zero_offset = w.zero_offset;
  launch_gptq_dequantize(a, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace spikeops
