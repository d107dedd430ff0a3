// spike_linear on 8-bit weights (csrc/cuda/linear_kernel.cuh).
#include "cuda/linear_kernel.cuh"

void spikeops::launch_spike_linear_w8(const LinearArgs& a, cudaStream_t stream) {
  launch_bits<8>(a, stream);
}
