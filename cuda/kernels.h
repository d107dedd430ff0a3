// Launchers of the CUDA kernels. They take raw device pointers, sizes and a stream (no torch
// types), so that cuda/*.cu compile with plain nvcc; the host entries in csrc/cuda/ops_cuda.cpp
// check the arguments first (checks.h), allocate the outputs and check each launch afterwards.
//
// What the host cannot check without synchronizing (values of CUDA tensors) the kernels guard
// instead, and they mark what such a value spoils with NaN rather than reading out of bounds:
//   - a g_idx entry outside [0, G): every output of spike_linear is NaN (that channel's group,
//     hence its scale, is unknown for every column); gptq_dequantize writes NaN in column k;
//   - a zero point beyond +-kMaxZero: spike_decode writes NaN for the elements of that range,
//     spike_linear writes NaN for the whole token (its codes could overflow int32);
//   - a static gif_encode scale that is not positive and finite, or a static zero outside
//     [-1e4, 1e4]: the row is encoded like a row holding NaN (SPEC §2).
// Channel bits at k >= K in the last word of a row are ignored by every consumer.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "spike_math.h"

namespace spikeops {

// Element type of a float tensor crossing the launcher boundary.
enum class FloatType : int32_t { kHalf, kBFloat16, kFloat, kDouble };

struct EncodeArgs {
  const void* x;                // x_type [M, K]
  FloatType x_type;
  const uint8_t* salient;       // bool [K] read as bytes (nonzero = salient), or null
  const float* static_scale;    // mode static: [M]; else null
  const int32_t* static_zero;   // mode static, unsigned: [M]; else null
  uint32_t* planes;             // [P, M, W]
  uint32_t* sign;               // [M, W], or null for unsigned encodings
  uint32_t* hi;                 // [M, W], or null when R = 1
  float* scale;                 // [M, R]
  int32_t* zero;                // [M, R], or null for signed encodings
  Mode mode;
  bool is_signed;
  int bits, salient_bits;       // salient_bits = 0 without salient channels
  float gamma, theta_nor, theta_out;
  int64_t M, K, W, P, R;
};

struct DecodeArgs {
  const uint32_t* planes;       // [P, M, W]
  const uint32_t* sign;         // [M, W] or null
  const uint32_t* hi;           // [M, W] or null
  const float* scale;           // [M, R]
  const int32_t* zero;          // [M, R] or null
  void* out;                    // out_type [M, K]
  FloatType out_type;           // kHalf, kBFloat16 or kFloat
  int64_t P, M, W, R, K;
};

struct CountsArgs {
  const uint32_t* planes;       // [P, M, W]
  const uint32_t* sign;         // [M, W]: count only negative spikes; null: count all
  int64_t* counts;              // [P, M]
  int64_t P, M, W;
};

struct StatsArgs {
  const uint32_t* planes;       // [P, M, W]
  const uint32_t* sign;         // [M, W] or null
  int64_t* stats;               // [2P + 2], zeroed: see spike_stats in csrc/ops.cpp
  int64_t P, M, W;
};

struct AccumulateArgs {
  const uint32_t* planes;       // [P, M, W]
  const uint32_t* sign;         // [M, W] or null
  const uint32_t* hi;           // [M, W] or null
  const int8_t* w;              // [K, N]
  int64_t* out;                 // per_plane ? [P, R, M, N] : [R, M, N]
  bool per_plane;
  int64_t P, M, W, R, K, N;
};

struct LinearArgs {
  const uint32_t* planes;       // [P, M, W]
  const uint32_t* sign;         // [M, W] or null
  const uint32_t* hi;           // [M, W] or null
  const float* scale;           // [M, R]
  const int32_t* zero;          // [M, R] or null
  const int32_t* qweight;       // [ceil(K * bits / 32), N]
  const int32_t* qzeros;        // [G, zero_cols], zero_cols = ceil(N * bits / 32)
  const __half* scales;         // [G, N]
  const int32_t* g_idx;         // [K]
  const double* bias;           // [N] or null
  void* out;                    // out_type [M, N]
  FloatType out_type;           // kHalf, kBFloat16 or kFloat
  Backend backend;             // kAuto resolves in launch_spike_linear (cuda/linear.cu)
  int64_t P, M, W, R, K, N, G, zero_cols;
  int bits;                     // 2, 4 or 8
  int32_t zero_offset;          // z = stored zero + zero_offset
};

struct DequantizeArgs {
  const int32_t* qweight;       // [ceil(K * bits / 32), N]
  const int32_t* qzeros;        // [G, zero_cols]
  const __half* scales;         // [G, N]
  const int32_t* g_idx;         // [K]
  __half* out;                  // [N, K]
  int64_t K, N, G, zero_cols;
  int bits;
  int32_t zero_offset;
};

// Each launcher expects at least one output element (the host skips empty outputs).
void launch_gif_encode(const EncodeArgs& a, cudaStream_t stream);
void launch_spike_decode(const DecodeArgs& a, cudaStream_t stream);
void launch_spike_counts(const CountsArgs& a, cudaStream_t stream);
void launch_spike_stats(const StatsArgs& a, cudaStream_t stream);
void launch_spike_accumulate(const AccumulateArgs& a, cudaStream_t stream);
void launch_spike_linear(const LinearArgs& a, cudaStream_t stream);
void launch_gptq_dequantize(const DequantizeArgs& a, cudaStream_t stream);

}  // namespace spikeops
