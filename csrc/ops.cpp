// The op catalogue: every schema of torch.ops.spikeops, and which host entry serves each device.
// Optional tensors are passed as empty tensors (numel 0), as SPEC.md §1 describes. Importing the
// Python module spikeops._C (this library) registers everything.
#include <Python.h>
#include <torch/library.h>

#include "spikeops.h"

extern "C" {
// An empty module: importing it loads this shared library, whose static initializers register
// the ops (the pattern of pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(spikeops, m) {
  // Activations x [M, K] -> bit-plane spikes (planes [P, M, W], sign, hi, scale [M, R], zero).
  // mode: minmax | absmax | absmean | static | oat; bits counts the sign for signed modes and is
  // the plane count P for oat; scale/zero only for static (zero given = unsigned); theta_* only oat.
  m.def(
      "gif_encode(Tensor x, str mode, int bits, float gamma, Tensor salient_mask, "
      "int salient_bits, Tensor scale, Tensor zero, float theta_nor, float theta_out) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Spikes -> x_hat [M, K] = scale[m, r] * (s * Q - zero[m, r]) in float32, cast to dtype.
  m.def(
      "spike_decode(Tensor planes, Tensor sign, Tensor hi, Tensor scale, Tensor zero, int K, "
      "ScalarType dtype) -> Tensor");
  // Set bits per plane and token, int64 [P, M]; negative=True counts only spikes with sign set.
  m.def("spike_counts(Tensor planes, Tensor sign, bool negative) -> Tensor");
  // One pass of layer statistics, int64 [2P + 2], summed over tokens: spikes per plane [0, P),
  // negative spikes per plane [P, 2P) (zeros without sign), fired channels (set bits of the OR
  // over planes) at 2P, and all-zero words (OR over planes == 0) at 2P + 1.
  m.def("spike_stats(Tensor planes, Tensor sign) -> Tensor");
  // Exact signed accumulation with int8 weights w [K, N]: int64 [R, M, N], or per plane
  // [P, R, M, N] whose 2^p-weighted sum is the total.
  m.def(
      "spike_accumulate(Tensor planes, Tensor sign, Tensor hi, Tensor w, bool per_plane) "
      "-> Tensor");
  // y [M, N] = x_hat @ W_hat^T + bias from GPTQ tensors (bits 2/4/8; z = stored zero +
  // zero_offset, 1 for v1 files); integer sums per group and range, float32 epilogue.
  // backend: spike (event driven) | int (integer codes) | auto; both give identical bits.
  m.def(
      "spike_linear(Tensor planes, Tensor sign, Tensor hi, Tensor scale, Tensor zero, "
      "Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor bias, int bits, "
      "int zero_offset, ScalarType out_dtype, str backend) -> Tensor");
  // W_hat float16 [N, K] = fp16(float32(scales[g_idx[k], n]) * float32(q - z)), bit exact.
  m.def(
      "gptq_dequantize(Tensor qweight, Tensor qzeros, Tensor scales, Tensor g_idx, int bits, "
      "int zero_offset) -> Tensor");
}

#define SPIKEOPS_REGISTER(dev)                                 \
  m.impl("gif_encode", &spikeops::gif_encode_##dev);             \
  m.impl("spike_decode", &spikeops::spike_decode_##dev);         \
  m.impl("spike_counts", &spikeops::spike_counts_##dev);         \
  m.impl("spike_stats", &spikeops::spike_stats_##dev);           \
  m.impl("spike_accumulate", &spikeops::spike_accumulate_##dev); \
  m.impl("spike_linear", &spikeops::spike_linear_##dev);         \
  m.impl("gptq_dequantize", &spikeops::gptq_dequantize_##dev);

TORCH_LIBRARY_IMPL(spikeops, CPU, m) { SPIKEOPS_REGISTER(cpu) }

#ifdef SPIKEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(spikeops, CUDA, m) { SPIKEOPS_REGISTER(cuda) }
#endif
