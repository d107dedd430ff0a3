// spike_linear on 4-bit weights (csrc/cuda/linear_kernel.cuh).
#include "cuda/linear_kernel.cuh"

void spikeops::launch_spike_linear_w4(const LinearArgs& a, cudaStream_t stream) {
  launch_bits<4>(a, stream);
}
