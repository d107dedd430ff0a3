// Host entry points of every op, one per device. Each checks its inputs (checks.h) and runs the
// kernel; the schemas and their documentation are in ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "checks.h"

namespace spikeops {

#define SPIKEOPS_DECLARE_HOST_ENTRIES(dev)                                                        \
  EncodeResult gif_encode_##dev(const at::Tensor& x, const std::string& mode, int64_t bits,       \
                                double gamma, const at::Tensor& salient_mask,                     \
                                int64_t salient_bits, const at::Tensor& scale,                    \
                                const at::Tensor& zero, double theta_nor, double theta_out);      \
  at::Tensor spike_decode_##dev(const at::Tensor& planes, const at::Tensor& sign,                 \
                                const at::Tensor& hi, const at::Tensor& scale,                    \
                                const at::Tensor& zero, int64_t K, at::ScalarType dtype);         \
  at::Tensor spike_counts_##dev(const at::Tensor& planes, const at::Tensor& sign, bool negative); \
  at::Tensor spike_stats_##dev(const at::Tensor& planes, const at::Tensor& sign);                \
  at::Tensor spike_accumulate_##dev(const at::Tensor& planes, const at::Tensor& sign,             \
                                    const at::Tensor& hi, const at::Tensor& w, bool per_plane);   \
  at::Tensor spike_linear_##dev(                                                                  \
      const at::Tensor& planes, const at::Tensor& sign, const at::Tensor& hi,                     \
      const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& qweight,                 \
      const at::Tensor& qzeros, const at::Tensor& scales, const at::Tensor& g_idx,                \
      const at::Tensor& bias, int64_t bits, int64_t zero_offset, at::ScalarType out_dtype,        \
      const std::string& backend);                                                                \
  at::Tensor gptq_dequantize_##dev(const at::Tensor& qweight, const at::Tensor& qzeros,           \
                                   const at::Tensor& scales, const at::Tensor& g_idx,             \
                                   int64_t bits, int64_t zero_offset);

SPIKEOPS_DECLARE_HOST_ENTRIES(cpu)
#ifdef SPIKEOPS_WITH_CUDA
SPIKEOPS_DECLARE_HOST_ENTRIES(cuda)
#endif

#undef SPIKEOPS_DECLARE_HOST_ENTRIES

}  // namespace spikeops
