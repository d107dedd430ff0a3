// CPU kernels, one per op. Each takes the checked arguments of csrc/kernel_args.h, with outputs
// already allocated, and fills the outputs; csrc/ops.cpp calls them. docs/ops.md is the contract.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/isa.h"
#include "kernel_args.h"

namespace spikeops {
namespace cpu {

void gif_encode(const EncodeArgs& a);
void feedback_encode(const FeedbackEncodeArgs& a);  // cpu/encode.cpp
void spike_decode(const DecodeArgs& a);
void spike_counts(const CountsArgs& a);
void spike_stats(const StatsArgs& a);
void spike_accumulate(const AccumulateArgs& a);
void spike_linear(const LinearArgs& a);
void gptq_dequantize(const DequantizeArgs& a);
void spike_matmul(const MatmulArgs& a);  // cpu/matmul.cpp
// prob_matmul's fused kernel (cpu/matmul.cpp): the probabilities' codes made in the byte
// kernel's rows, no planes; prob_matmul_fits says whether it serves a call (the entry composes
// gif_encode and spike_matmul otherwise, with the same results).
bool prob_matmul_fits(const MatmulArgs& m);
void prob_matmul(const ProbMatmulArgs& a);
void channel_major_write(const ChannelMajorArgs& a);  // cpu/matmul.cpp

// The CPU layout from qweight (packed and code_sums) and qweight from it (cpu/layout.cpp).
void cpu_layout(const LayoutArgs& a);
void cpu_layout_qweight(const LayoutArgs& a);

void hadamard(const HadamardArgs& a);  // cpu/hadamard.cpp

// The int backend on the CPU layout of 4-bit codes (cpu/int_layout.cpp), with AMX tiles (blocks
// of 16 tokens; fewer tokens take AVX-512 VNNI), AVX-512 VNNI or AVX2 dot products.
// int_layout_isa: the instruction set a call can use (best_isa(), cpu/isa.h; kGeneric when the
// layout is absent or the codes do not fit 8 bits); spike_linear runs spike_linear_int_layout
// with it, with identical results.
Isa int_layout_isa(const LinearArgs& a);
void spike_linear_int_layout(const LinearArgs& a, Isa isa);

// Calls f(T{}) with the C++ element type T of a float tensor, to pick a kernel template:
// dispatch_float for inputs, dispatch_out_float for outputs, which are never float64.
template <typename F>
void dispatch_out_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::kHalf: f(c10::Half{}); break;
    case FloatType::kBFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;  // kFloat
  }
}
template <typename F>
void dispatch_float(FloatType t, F&& f) {
  if (t == FloatType::kDouble) {
    f(double{});
  } else {
    dispatch_out_float(t, f);
  }
}

}  // namespace cpu
}  // namespace spikeops
