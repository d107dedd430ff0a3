// spike_linear for prefill on integer tensor cores: mma.sync.aligned.m16n8k32 with s8 operands
// and int32 accumulators (sm_80 and later). csrc/cuda/linear.cu routes here what
// spike_linear_mma_applies accepts; the kernel computes that file's contract (the same integers
// D, the same fold, the same epilogue), so its outputs are the CPU's bits (docs/ops.md,
// spike_linear). Its index maps live in csrc/cuda/mma_layout.h, where tests/test_cuda_mma_layout.py
// emulates whole blocks on the CPU through them. Compiled, not yet run on a GPU.
//
// Operands. A = c' = s*Q - off, the activation codes with off = 128 for unsigned 8-plane codes
// (else 0), int8 for every input the path accepts (signed P <= 7, unsigned P <= 8). The zero
// point of unsigned codes is bounded only by kZeroLimit, so c = s*Q - zero has no int8 form in
// general, and the device cannot fall back per token without reading values; as in
// csrc/cuda/linear_decode.cu the kernel uses the identity, per group g and column n,
//   D = sum c' (q - z) - zero' * sum (q - z),   zero' = zero[m] - off,
// with B = q - z widened from 2 or 4 bits to int8 (in [-16, 15] for the zero points [0, 2^bits]
// of the contract). sum (q - z) is one dp4a per weight register against bytes of 1, reduced over
// the lane quad that shares a column. 8-bit weights (q - z does not fit int8), act-order layers
// (group_size 0), group sizes not a multiple of 32, two ranges (R = 2: salient channels, oat)
// and the spike backend keep the kernel of csrc/cuda/linear_kernel.cuh. R = 2 would need the codes
// masked per range (two accumulators) and, with zero points, sum over range 1 of (q - z) per
// token (a third mma on the hi bits): 1.5x the registers of the tile below; not done yet.
//
// Exactness. |c'| <= 128 and |q - z| <= 16 give 2^11 per channel, so the int32 sums of a group
// are exact up to kMaxGroup = 2^20 channels, and sum (q - z) <= 2^24. A k-tile is one spike word
// (32 channels, one m16n8k32 step) and never straddles a group (group_size % 32 == 0); the k
// index of the mma is a permutation of the word's channels (mma::k_channel), the same for A and
// B, which leaves every sum unchanged. After the last k-tile of group g every thread turns its
// accumulators into D in int64 and folds
//   S[m, n] += double(float32(scales[g, n]) * float32(D))
// (mma::fold_group; --fmad=false), in ascending g from S = +0, then resets them: the sequence of
// csrc/cuda/linear.cu's header. The epilogue is y = float32(double(scale[m]) * S + double(bias[n])).
// Tokens whose zero point lies beyond kZeroLimit give NaN rows, as in the other kernels.
//
// Activation groups (group > 0; hi null, each group inside one weight group): at the first
// k-tile of activation group u the threads of the block's tokens put zero' = zero[m, u] - off and
// scale[m, u] into shared memory (between the k-tile's two barriers: the previous group's fold
// has passed, this group's fold is after the second), and the fold runs at the end of every
// activation group instead of every weight group: Y += double(scale[m, u]) * (0.0 +
// double(float32(scales[g, n]) * float32(D))) (mma::fold_column), y = float32(Y + bias[n]). The
// column sums of q - z are then per activation group, which D with zero[m, u] needs.
//
// Tiles. A block owns 64 tokens x 128 columns; 8 warps of 32 x 32 (2 m16 x 4 n8 tiles: 8 mma per
// k-tile, 32 int32 accumulators and 32 double sums S per thread, which keeps the registers near
// 200 without spills; a 64 x 32 warp tile would need 64 + 128 registers for them alone).
// 128 columns per block let each token's codes, built once per block, serve 128 columns; each
// unpacked weight register serves the warp's 2 m16 tiles. Blocks are numbered token tile
// fastest, so the blocks that read the same weights run together (L2).
//
// Pipeline. A ring of kStages = 6 k-tiles, filled by cp.async: 16-byte copies of 4 columns of a
// qweight row (N % 4 == 0 and a 16-byte aligned base, checked by spike_linear_mma_applies),
// 4-byte copies of the spike words (a token row of W words is 16-byte aligned only when
// W % 4 == 0); the group's zero points and scales are unpacked into the stage by plain loads
// (the kernel form holds them packed and in float16); padding tokens, columns and qweight rows
// are zero-filled. Per k-tile: wait for the oldest stage, one barrier (which also frees the slot of
// the previous k-tile and the code buffer), issue the copy of the k-tile kStages - 1 ahead,
// build the codes (thread i: 8 positions of token i / 4, per plane one mask and one multiply
// that spreads 4 bits into 4 bytes; mma::code_bytes), a barrier, then per warp 2 ldmatrix.x4
// (swizzled rows, conflict-free), 4 weight words (rows padded to 136 words, conflict-free), each
// two int8 registers of q - z (4-bit: one mask each, thanks to the k permutation), and 8 mma.
//
// Cost, estimated from the source (not measured, no SASS read): per k-tile a warp issues 8 mma,
// 2 ldmatrix and about 70 instructions of weight unpacking and column sums, 65 of code build
// (P = 4), 25 of copies, and per group about 8 per accumulator for the fold (int64 -> float32,
// the product, the double add): about 240 issue slots per k-tile with groups of 128, against
// 8 mma. The kernel is bound by instruction issue, not by the tensor cores: at 4 slots per
// clock per SM and ~1.98 GHz, 4096 -> 11008 at M = 2048 (2,752 blocks x 128 k-tiles x 8 warps)
// comes to roughly 0.65 ms, against 156 ms for the CUDA-core kernel and 0.24 ms for
// torch._int_mm. The fold alone (M * N * G products, about 0.17 ms here) is a floor of any
// exact kernel of this contract; wider warp tiles would amortize build and unpack over more mma
// but need the double sums S out of registers. One block of 256 threads per SM (~200
// registers) leaves little latency hiding beyond the ring.
//
// Hopper. wgmma (sm_90a, 64xNx32 s8 atoms fed from shared memory) would pay on H100/H200 once
// issue is no longer the bound: mma.sync reaches roughly two thirds of the s8 peak there, and a
// producer warp plus consumer warpgroups would hide the code build and the fold. It needs the
// weights unpacked as int8 in shared memory (or prepacked) and per-file sm_90a flags in
// setup.py; mma.sync runs on both architectures as it is.
//
// ptxas (nvcc 13.0, -O3 --fmad=false, -Xptxas -v; compiled, not yet run on a GPU), 256 threads,
// 35,584 bytes of static shared memory, no spills and no stack frame in any instantiation:
//   sm_80: 4-bit 201 (signed codes) / 198 (zero points) registers, 2-bit 195 / 186;
//   sm_90: 4-bit 200 / 208, 2-bit 192 / 190 (the same for float16, bfloat16, float32 outputs;
//   activation groups added up to 10 registers, one kernel serves both).
#include "cuda/device.cuh"
#include "cuda/mma_layout.h"

namespace spikeops {
namespace {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async of `bytes` (4 or 16); with valid false the destination is zero-filled and src (any
// valid address) is not read.
template <int kBytes>
__device__ __forceinline__ void copy_async(void* dst, const void* src, bool valid) {
  const int size = valid ? kBytes : 0;
  if (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
                 "l"(src), "r"(size));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared_address(dst)),
                 "l"(src), "n"(kBytes), "r"(size));
  }
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(p)));
}

// acc += A (16 x 32, s8, row) * B (32 x 8, s8, col), int32.
__device__ __forceinline__ void mma_s8(int32_t (&acc)[4], const uint32_t (&A)[4],
                                       const uint32_t (&B)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(acc[0]), "+r"(acc[1]), "+r"(acc[2]), "+r"(acc[3])
      : "r"(A[0]), "r"(A[1]), "r"(A[2]), "r"(A[3]), "r"(B[0]), "r"(B[1]));
}

// Copies of k-tile t (spike word t, qweight rows t * kBits ..) into its stage.
template <int kBits>
__device__ void issue_tile(const LinearArgs& a, mma::Stage& s, const mma::BlockTile& bt,
                           int64_t t) {
  const int tid = threadIdx.x;
  const int units = mma::spike_units(a.P, a.sign != nullptr);
  for (int u = tid; u < units; u += mma::kThreads) {
    const mma::SpikeCopy c = mma::spike_copy(u);
    const int64_t m = bt.m0 + c.token;
    const bool valid = m < a.M;
    const uint32_t* base = c.row < a.P ? a.planes : a.sign;
    copy_async<4>(&s.spikes[c.row][c.token],
                  valid ? base + mma::spike_source(c, a.P, a.M, a.W, m, t) : base, valid);
  }
  const int64_t g = 32 * t / a.group_size, q_rows = (a.K * kBits + 31) / 32;
  for (int u = tid; u < mma::weight_units(kBits); u += mma::kThreads) {
    const mma::WeightCopy c = mma::weight_copy(u, kBits);
    const int64_t n = bt.n0 + c.col, r = t * kBits + c.row;
    if (c.kind == 0) {
      const bool valid = n < a.N && r < q_rows;
      copy_async<16>(&s.weights[c.row][c.col], valid ? a.qweight + r * a.N + n : a.qweight,
                     valid);
      continue;
    }
    // The group's zero points and scales of these 4 columns, unpacked from the kernel form
    // (packed qzeros, float16 scales: csrc/kernel_args.h) by plain loads and stores, which the
    // barrier before their use publishes like the copies.
    for (int e = 0; e < 4; ++e) {
      const bool valid = n + e < a.N;
      if (c.kind == 1) s.zeros[c.col + e] = valid ? zero_at(a, g, n + e) : 0;
      else s.scales[c.col + e] = valid ? scale_at(a, g, n + e) : 0.0f;
    }
  }
}

template <int kBits, bool kZero, typename T>
__global__ void __launch_bounds__(mma::kThreads, 1) spike_linear_mma_kernel(const LinearArgs a) {
  using namespace mma;
  __shared__ __align__(16) Shared sh;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int32_t off = a.sign == nullptr && a.P == 8 ? 128 : 0;
  const uint32_t flip = off ? 0x80808080u : 0u;
  const CodeBuild cb = code_build(tid);
  const int64_t k_tiles = a.W;  // one per spike word
  const int64_t tiles = block_count(a.M, a.N);

  for (int64_t block = blockIdx.x; block < tiles; block += gridDim.x) {
    const BlockTile bt = block_tile(block, a.M);
    if (tid < kBlockM) {
      const int64_t m = bt.m0 + tid;
      const int32_t z = m < a.M && a.zero ? a.zero[m * a.R] : 0;  // one range
      bool ok = m < a.M && zero_in_range(z);
      if (a.group > 0 && a.zero && ok)  // every activation group's zero point
        for (int64_t u = 1; u < a.R; ++u) ok = ok && zero_in_range(a.zero[m * a.R + u]);
      sh.ok[tid] = ok;
      sh.zero[tid] = ok ? z - off : 0;
    }
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < k_tiles) issue_tile<kBits>(a, sh.stage[st], bt, st);
      copy_commit();  // empty groups keep the count of copy_wait right
    }

    int32_t acc[kTilesM][kTilesN][4] = {};
    int32_t colsum[kTilesN] = {};
    double S[kTilesM][kTilesN][4] = {};
    for (int64_t t = 0; t < k_tiles; ++t) {
      copy_wait<kStages - 2>();
      __syncthreads();
      const int64_t ahead = t + kStages - 1;  // its slot held k-tile t - 1, read before the barrier
      if (ahead < k_tiles) issue_tile<kBits>(a, sh.stage[ahead % kStages], bt, ahead);
      copy_commit();
      const Stage& s = sh.stage[t % kStages];
      if (a.group > 0 && 32 * t % a.group == 0 && tid < kBlockM) {
        // First k-tile of activation group u: its zero' and scale per token, read at its fold
        // (after the barrier below; the previous group's fold came before the one above).
        const int64_t m = bt.m0 + tid, u = 32 * t / a.group;
        const bool ok = sh.ok[tid];
        sh.zero[tid] = ok ? (a.zero ? a.zero[m * a.R + u] : 0) - off : 0;
        sh.act_scale[tid] = ok ? a.scale[m * a.R + u] : 0.0f;
      }
      {
        uint32_t plane[kMaxP];
#pragma unroll
        for (int p = 0; p < kMaxP; ++p) plane[p] = p < a.P ? s.spikes[p][cb.token] : 0u;
        const uint32_t sign = a.sign ? s.spikes[a.P][cb.token] : 0u;
        const uint32_t keep = word_channels(t, a.K);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int pos = code_position(cb, half);
          *reinterpret_cast<uint32_t*>(sh.codes + code_offset(cb.token, pos)) =
              code_bytes(plane, sign, keep, flip, k_channel(kBits, pos), k_stride(kBits));
        }
      }
      __syncthreads();

      uint32_t A[kTilesM][4];
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
        ldmatrix_x4(A[i], sh.codes + a_ldmatrix_offset(warp_m, i, lane));
      const int valid = static_cast<int>(a.K - 32 * t < 32 ? a.K - 32 * t : 32);
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        uint32_t B[2];
#pragma unroll
        for (int reg = 0; reg < 2; ++reg) {
          const WeightLoad l = weight_load(kBits, warp_n, j, lane, reg);
          const uint32_t keep = valid == 32 ? 0xffffffffu : weight_keep(kBits, lane, reg, valid);
          B[reg] = weight_bytes((&s.weights[0][0])[weight_offset(l)], kBits, l.shift,
                                s.zeros[l.col], keep);
          if (kZero) colsum[j] = __dp4a(static_cast<int>(B[reg]), 0x01010101, colsum[j]);
        }
#pragma unroll
        for (int i = 0; i < kTilesM; ++i) mma_s8(acc[i][j], A[i], B);
      }

      // Last k-tile of its weight group, or of its activation group (which ends with or inside
      // it): fold.
      const int64_t fold_every = a.group > 0 ? a.group : a.group_size;
      if (t == k_tiles - 1 || 32 * (t + 1) % fold_every == 0) {
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) {
          if (kZero) {
            colsum[j] += __shfl_xor_sync(dev::kFullMask, colsum[j], 1);
            colsum[j] += __shfl_xor_sync(dev::kFullMask, colsum[j], 2);
          }
          int32_t cs[2] = {0, 0};
          if (kZero) {
            cs[0] = __shfl_sync(dev::kFullMask, colsum[j], colsum_lane(lane, 0));
            cs[1] = __shfl_sync(dev::kFullMask, colsum[j], colsum_lane(lane, 1));
          }
          colsum[j] = 0;
#pragma unroll
          for (int i = 0; i < kTilesM; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int token = c_token(warp_m, i, lane, e);
              const int32_t zero = kZero ? sh.zero[token] : 0;
              const float scale = s.scales[c_col(warp_n, j, lane, e)];
              if (a.group > 0) {
                fold_column(S[i][j][e], acc[i][j][e], zero, cs[e & 1], scale,
                            sh.act_scale[token]);
              } else {
                fold_group(S[i][j][e], acc[i][j][e], zero, cs[e & 1], scale);
              }
              acc[i][j][e] = 0;
            }
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int token = c_token(warp_m, i, lane, e);
          const int64_t m = bt.m0 + token, n = bt.n0 + c_col(warp_n, j, lane, e);
          if (m >= a.M || n >= a.N) continue;
          float y = dev::quiet_nan();
          if (sh.ok[token])  // one range: S, or Y with activation groups
            y = a.group > 0 ? linear_output(a, n, S[i][j][e])
                            : linear_epilogue(a, m, n, S[i][j][e], 0.0);
          static_cast<T*>(a.out)[m * a.N + n] = dev::from_float<T>(y);
        }
    __syncthreads();  // sh.ok, sh.zero and the ring belong to the next tile
  }
}

template <int kBits, typename T>
void launch_mma(const LinearArgs& a, bool zero, cudaStream_t stream) {
  const int64_t tiles = mma::block_count(a.M, a.N);
  if (zero) {
    spike_linear_mma_kernel<kBits, true, T>
        <<<dev::grid_size(tiles), mma::kThreads, 0, stream>>>(a);
  } else {
    spike_linear_mma_kernel<kBits, false, T>
        <<<dev::grid_size(tiles), mma::kThreads, 0, stream>>>(a);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool spike_linear_mma_applies(const LinearArgs& a) {
  // c' fits int8: signed |s*Q| <= 127 needs P <= 7, unsigned Q - off needs P <= 8.
  const bool codes_fit = a.sign ? a.P <= 7 : a.P <= 8;
  return a.backend != Backend::kSpike && a.M >= mma::kBlockM && (a.bits == 2 || a.bits == 4) &&
         a.hi == nullptr && codes_fit && a.group_size > 0 && a.group_size % 32 == 0 &&
         a.group_size <= mma::kMaxGroup && a.N % 4 == 0 && a.qweight != nullptr &&
         aligned16(a.qweight);
}

void launch_spike_linear_mma(const LinearArgs& a, cudaStream_t stream) {
  // Zero points enter D through zero' (unsigned codes, or the offset of 8-plane codes).
  const bool zero = a.zero != nullptr || (a.sign == nullptr && a.P == 8);
  dev::dispatch_out_float(a.out_type, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (a.bits == 2) {
      launch_mma<2, T>(a, zero, stream);
    } else {
      launch_mma<4, T>(a, zero, stream);
    }
  });
}

}  // namespace spikeops
