// spike_linear on 2-bit weights (cuda/linear_kernel.cuh).
#include "linear_kernel.cuh"

void spikeops::launch_spike_linear_w2(const LinearArgs& a, cudaStream_t stream) {
  launch_bits<2>(a, stream);
}
