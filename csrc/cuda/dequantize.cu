// CUDA kernel of gptq_dequantize: W_hat[n, k] = fp16(scales[g, n] * float32(q - z)), g the group
// of channel k, the one rounding of csrc/cpu/linear.cpp (cpu::gptq_dequantize). A g_idx entry
// outside [0, G) of an act-order layer gives NaN in column k instead of a read out of bounds.
#include "cuda/device.cuh"

namespace spikeops {
namespace {

constexpr int kThreads = 256;

// One thread per output element, k fastest: the stores are coalesced, and the lanes of a warp
// share a few qweight words (one per 32 / bits channels).
__global__ void __launch_bounds__(kThreads) gptq_dequantize_kernel(const DequantizeArgs a) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < a.N * a.K;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i / a.K, k = i % a.K;
    const int64_t g = a.group_size > 0 ? k / a.group_size : __ldg(a.g_idx + k);
    float v = dev::quiet_nan();
    if (g >= 0 && g < a.G) {
      const int32_t q = gptq_code(a.qweight, a.N, k, n, a.bits);
      v = scale_at(a, g, n) * static_cast<float>(q - zero_at(a, g, n));
    }
    static_cast<__half*>(a.out)[i] = __float2half_rn(v);
  }
}

}  // namespace

void launch_gptq_dequantize(const DequantizeArgs& a, cudaStream_t stream) {
  const unsigned grid = dev::grid_size((a.N * a.K + kThreads - 1) / kThreads);
  gptq_dequantize_kernel<<<grid, kThreads, 0, stream>>>(a);
}

}  // namespace spikeops
