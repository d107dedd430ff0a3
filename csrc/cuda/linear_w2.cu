// spike_linear on 2-bit weights (csrc/cuda/linear_kernel.cuh).
#include "cuda/linear_kernel.cuh"

void spikeops::launch_spike_linear_w2(const LinearArgs& a, cudaStream_t stream) {
  launch_bits<2>(a, stream);
}
