// Launchers of the CUDA kernels. They take the raw-pointer arguments of csrc/kernel_args.h and a
// stream (no torch types), so that csrc/cuda/*.cu compile with plain nvcc; the host entries in
// csrc/ops.cpp check the arguments first (checks.h), allocate the outputs and check each launch
// afterwards.
//
// What the host cannot check without synchronizing (values of CUDA tensors) the kernels guard
// instead, and they mark what such a value spoils with NaN rather than reading out of bounds:
//   - a g_idx entry outside [0, G) of an act-order layer (group_size 0): every output of
//     spike_linear is NaN (that channel's group, hence its scale, is unknown for every column);
//     gptq_dequantize writes NaN in column k;
//   - a zero point beyond +-kZeroLimit: spike_decode writes NaN for the elements of that scale
//     column (range or activation group), spike_linear writes NaN for the whole token (its codes
//     could overflow int32);
//   - a static gif_encode scale that is not positive and finite, or a static zero beyond
//     +-kZeroLimit: the row is encoded like a row holding NaN (docs/ops.md, encodings).
// Channel bits at k >= K in the last word of a row are ignored by every consumer.
// Scales and zero points are [M, R] (SpikeFields::R): R = 2 with ranges (hi), ceil(K / group)
// with activation groups (group > 0, column k / group), else 1; spike_accumulate's output is
// [R, M, N] or [P, R, M, N] by the same columns, and gif_encode's static scales and zeros are
// [M, R] with groups ([M] without).
#pragma once

#include <cuda_runtime_api.h>

#include "kernel_args.h"

namespace spikeops {

// Each launcher expects at least one output element (the host skips empty outputs).
void launch_gif_encode(const EncodeArgs& a, cudaStream_t stream);
void launch_feedback_encode(const FeedbackEncodeArgs& a, cudaStream_t stream);
void launch_spike_decode(const DecodeArgs& a, cudaStream_t stream);
void launch_spike_counts(const CountsArgs& a, cudaStream_t stream);
void launch_spike_stats(const StatsArgs& a, cudaStream_t stream);
void launch_spike_accumulate(const AccumulateArgs& a, cudaStream_t stream);
void launch_spike_linear(const LinearArgs& a, cudaStream_t stream);
void launch_gptq_dequantize(const DequantizeArgs& a, cudaStream_t stream);
void launch_spike_matmul(const MatmulArgs& a, cudaStream_t stream);  // csrc/cuda/matmul.cu
void launch_channel_major_write(const ChannelMajorArgs& a, cudaStream_t stream);  // matmul.cu
void launch_hadamard(const HadamardArgs& a, cudaStream_t stream);  // csrc/cuda/hadamard.cu

// spike_linear's launcher per weight bit width (csrc/cuda/linear_w*.cu), called by
// launch_spike_linear.
void launch_spike_linear_w2(const LinearArgs& a, cudaStream_t stream);
void launch_spike_linear_w4(const LinearArgs& a, cudaStream_t stream);
void launch_spike_linear_w8(const LinearArgs& a, cudaStream_t stream);

// spike_linear's decode kernel (csrc/cuda/linear_decode.cu): whether it serves these arguments (few
// tokens, 4-bit weights, uniform groups), and its launcher. launch_spike_linear routes.
bool spike_linear_decode_applies(const LinearArgs& a);
void launch_spike_linear_decode(const LinearArgs& a, cudaStream_t stream);

// spike_linear's prefill kernel on integer tensor cores (csrc/cuda/linear_mma.cu): whether it serves
// these arguments (M >= 64, 2- or 4-bit weights, uniform groups, one range (activation groups
// included), codes that fit int8 after an offset), and its launcher. launch_spike_linear routes.
bool spike_linear_mma_applies(const LinearArgs& a);
void launch_spike_linear_mma(const LinearArgs& a, cudaStream_t stream);

}  // namespace spikeops
