// The CUDA kernel of spike_linear as templates over the weight bits; csrc/cuda/linear.cu says what
// it computes and how. Each csrc/cuda/linear_w*.cu instantiates one bit width, so that the
// instantiations compile in parallel (one file took most of the CUDA build).
#pragma once

#include <climits>

#include "cuda/device.cuh"

namespace spikeops {
namespace {

using dev::kFullMask;

constexpr int kCols = 32;          // output columns per tile: one per lane
constexpr int kPieceChunks = 4;    // 32-channel chunks per piece: one group of 128 when aligned
// Blocks of a launch; a block walks tiles grid-stride, so its g_idx analysis serves many tiles
// of a long prefill.
constexpr int64_t kMaxBlocks = 4096;

// Warps per block. Small token tiles need few registers, and more warps per tile mean fewer
// rounds (a round costs a global-memory latency) and more weight loads in flight: that is what
// bounds a decode step at N = 4096, where a layer has only 128 column tiles for 132 SMs.
template <int kMT>
constexpr int kWarpsFor = kMT <= 2 ? 16 : 8;

template <int kBits>
struct Packing {
  static constexpr int kPerWord = 32 / kBits;                  // channels per qweight word
  static constexpr int kRows = kBits;                          // qweight rows per chunk
  static constexpr int kVecs = kPerWord / 4;                   // u8x4 vectors per word
  static constexpr uint32_t kField = (1u << kBits) - 1u;
  static constexpr uint32_t kRowBits = (1u << kPerWord) - 1u;  // channels of one row
  static constexpr uint32_t kBytes = kField * 0x01010101u;     // one field in every byte
};

// How the channels fall into groups, set up by every block.
struct GroupLayout {
  int valid;          // every g_idx entry read is in [0, G)
  int uniform;        // group_size > 0
  int64_t gs;         // uniform: channels per group (with activation groups: per activation
                      // group, the unit of the walk and of the fold)
  int64_t groups;     // groups walked, in ascending order
  int64_t per_group;  // pieces per group
  int64_t pieces;
};

// A piece: chunks [chunk0, chunk0 + chunks) of group g, channels restricted to [lo, hi) and,
// when scan is set, to those whose g_idx is g. With activation groups g is the activation group
// (the scale column) and wg the weight group that holds it; otherwise wg == g.
struct Piece {
  int64_t g, wg, chunk0, chunks, lo, hi;
  bool scan;
};

template <int kMT>
struct LinearShared {
  static constexpr int kWarps = kWarpsFor<kMT>;
  int64_t part[kWarps][kMT][2][kCols];  // each warp's partial D[m, r] of its piece
  float piece_scale[kWarps][kCols];     // float32(scales[g, n]) of that piece's group
  int64_t piece_group[kWarps];          // its group; -1 past the last piece
  struct Codes {
    int32_t code[kMT][32];              // int backend: c = s*Q - zero[m, r] of the chunk
    uint32_t code8[kMT][2][8];          // the same per range as int8, in dp4a byte order
  } codes[kWarps];
  int32_t zero[kMT][2];                 // zero[m, r], 0 when absent (no activation groups)
  int32_t piece_zero[kWarps][kMT];      // activation groups: zero[m, u] of each warp's piece
  int ok[kMT];                          // token < M and its zero points in range
  GroupLayout layout;
};

__device__ __forceinline__ int32_t dp4a_u8s8(uint32_t a, uint32_t b, int32_t c) {
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The group layout into sh.layout (block-wide; ends with a barrier). Act-order layers check
// every g_idx entry once.
template <int kThreads>
__device__ void group_layout(const LinearArgs& a, GroupLayout& L) {
  if (threadIdx.x == 0) L.valid = 1;
  __syncthreads();
  if (a.group_size == 0) {
    bool valid = true;
    for (int64_t k = threadIdx.x; k < a.K; k += kThreads) {
      const int64_t v = __ldg(a.g_idx + k);
      valid = valid && v >= 0 && v < a.G;
    }
    if (!valid) L.valid = 0;
  }
  if (threadIdx.x == 0) {
    L.uniform = a.group_size > 0;
    if (a.group > 0) {
      // Activation groups (whole words, each inside one uniform weight group): the walk and
      // the fold go by activation group, which fixes its weight group.
      L.gs = a.group;
      L.groups = a.R;
      L.per_group = (a.group / 32 + kPieceChunks - 1) / kPieceChunks;
    } else if (L.uniform) {
      const int64_t gs = a.group_size;
      // A group of gs channels spans gs / 32 chunks when aligned, else at most this many.
      const int64_t chunks = gs % 32 == 0 ? gs / 32 : (gs + 31) / 32 + 1;
      L.gs = gs;
      L.groups = a.G;
      L.per_group = (chunks + kPieceChunks - 1) / kPieceChunks;
    } else {
      L.gs = 0;
      L.groups = a.G;
      L.per_group = (a.W + kPieceChunks - 1) / kPieceChunks;
    }
    L.pieces = L.groups * L.per_group;
  }
  __syncthreads();
}

template <bool kGroups>
__device__ Piece piece_at(const LinearArgs& a, const GroupLayout& L, int64_t index) {
  Piece pc;
  pc.g = index / L.per_group;
  const int64_t first = (index % L.per_group) * kPieceChunks;
  int64_t end;
  if (L.uniform) {
    pc.lo = pc.g * L.gs;
    pc.hi = min(pc.lo + L.gs, a.K);
    pc.chunk0 = pc.lo / 32 + first;
    end = (pc.hi + 31) / 32;
  } else {
    pc.lo = 0;
    pc.hi = a.K;
    pc.chunk0 = first;
    end = a.W;
  }
  pc.chunks = max(int64_t(0), min(int64_t(kPieceChunks), end - pc.chunk0));
  pc.scan = !L.uniform;
  pc.wg = kGroups ? weight_group_of(a, pc.g) : pc.g;
  return pc;
}

// zero[m, r] of token m of the tile for range r, or with activation groups zero[m, u] of the
// warp's piece (range 0; there is no range 1).
template <bool kGroups, int kMT>
__device__ __forceinline__ int32_t zero_of(const LinearShared<kMT>& sh, int warp, int m, int r) {
  return kGroups ? (r ? 0 : sh.piece_zero[warp][m]) : sh.zero[m][r];
}

// Channels of word w where some token of the tile has a nonzero code: a spike in any plane, or
// a nonzero zero point of the channel's range. Both backends read weights only for these.
template <bool kGroups, int kMT>
__device__ uint32_t tile_activity(const LinearArgs& a, const LinearShared<kMT>& sh, int64_t m0,
                                  int64_t w, int warp) {
  uint32_t act = 0;
#pragma unroll
  for (int m = 0; m < kMT; ++m) {
    if (!sh.ok[m]) continue;
    const int64_t at = (m0 + m) * a.W + w;
    for (int64_t p = 0; p < a.P; ++p) act |= __ldg(a.planes + p * a.M * a.W + at);
    if (a.zero) {
      const uint32_t hi = a.hi ? __ldg(a.hi + at) : 0u;
      if (zero_of<kGroups>(sh, warp, m, 0)) act |= ~hi;
      if (zero_of<kGroups>(sh, warp, m, 1)) act |= hi;
    }
  }
  return act;
}

// Sum of all fields of a qweight word by shifts, masks and adds (each partial sum fits its
// lane: 2-bit nibbles <= 6, bytes <= 30, 16-bit halves <= 510).
template <int kBits>
__device__ __forceinline__ int32_t word_field_sum(uint32_t w) {
  if (kBits == 2) w = (w & 0x33333333u) + ((w >> 2) & 0x33333333u);
  if (kBits <= 4) w = (w & 0x0f0f0f0fu) + ((w >> 4) & 0x0f0f0f0fu);
  w = (w & 0x00ff00ffu) + ((w >> 8) & 0x00ff00ffu);
  return static_cast<int32_t>((w & 0xffffu) + (w >> 16));
}

// Sum of the weight codes of the channels in `bits` (bit j = channel j of the chunk), visiting
// only those channels; a row where every channel fired (the zero point plane, dense planes) is
// summed in one go.
template <int kBits>
__device__ __forceinline__ int32_t spiking_weight_sum(const uint32_t (&wd)[kBits], uint32_t bits) {
  using Pk = Packing<kBits>;
  int32_t sum = 0;
#pragma unroll
  for (int row = 0; row < Pk::kRows; ++row) {
    uint32_t left = (bits >> (row * Pk::kPerWord)) & Pk::kRowBits;
    if (left == Pk::kRowBits) {
      sum += word_field_sum<kBits>(wd[row]);
      continue;
    }
    while (left) {
      const int t = __ffs(left) - 1;
      left &= left - 1;
      sum += static_cast<int32_t>((wd[row] >> (t * kBits)) & Pk::kField);
    }
  }
  return sum;
}

// spike backend, one chunk (word w): D[m][r] += sum over planes of 2^p * (positive minus
// negative spiking weights), each spike's weight taken as q - z.
template <int kBits, int kMT, bool kGroups>
__device__ void spike_chunk(const LinearArgs& a, const LinearShared<kMT>& sh, int64_t m0,
                            int64_t w, uint32_t member, const uint32_t (&wd)[kBits], int32_t z,
                            int warp, int64_t (&D)[kMT][2]) {
  const int64_t ranges = kGroups ? 1 : a.R;  // activation groups never have ranges
#pragma unroll
  for (int m = 0; m < kMT; ++m) {
    if (!sh.ok[m]) continue;
    const int64_t at = (m0 + m) * a.W + w;
    const uint32_t sign = a.sign ? __ldg(a.sign + at) : 0u;
    const uint32_t hi = a.hi ? __ldg(a.hi + at) : 0u;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (r >= ranges) break;
      const uint32_t in_range = member & (ranges == 1 ? kFullMask : r ? hi : ~hi);
      if (!in_range) continue;
      int64_t d = 0;
      for (int64_t p = 0; p < a.P; ++p) {
        const uint32_t bits = __ldg(a.planes + p * a.M * a.W + at) & in_range;
        if (!bits) continue;  // a silent spike word adds nothing
        const uint32_t pos = bits & ~sign, neg = bits & sign;
        const int32_t part = spiking_weight_sum<kBits>(wd, pos) - spiking_weight_sum<kBits>(wd, neg);
        const int32_t count = __popc(pos) - __popc(neg);
        d += (int64_t(1) << p) * (part - z * count);
      }
      const int32_t zero = zero_of<kGroups>(sh, warp, m, r);
      if (zero) {  // the zero point plane: every channel of the range fires once
        const int32_t part = spiking_weight_sum<kBits>(wd, in_range);
        d -= static_cast<int64_t>(zero) * (part - z * __popc(in_range));
      }
      D[m][r] += d;
    }
  }
}

// int backend, one chunk (word w): D[m][r] += sum c * q - z * sum c.
template <int kBits, int kMT, bool kGroups>
__device__ void int_chunk(const LinearArgs& a, LinearShared<kMT>& sh, int64_t m0, int64_t w,
                          uint32_t member, uint32_t act, const uint32_t (&wd)[kBits], int32_t z,
                          int warp, int lane, int64_t (&D)[kMT][2]) {
  using Pk = Packing<kBits>;
  auto& cs = sh.codes[warp];
  // Byte of channel `lane` in the dp4a vectors: field t of row i lands in byte t / kVecs of
  // vector i * kVecs + t % kVecs, where (word >> (t % kVecs) * kBits) & kBytes puts it.
  const int t = lane % Pk::kPerWord;
  const int byte = ((lane / Pk::kPerWord) * Pk::kVecs + t % Pk::kVecs) * 4 + t / Pk::kVecs;
  int32_t csum[kMT][2];
  uint32_t hi_word[kMT];
  bool fits = true;
#pragma unroll
  for (int m = 0; m < kMT; ++m) {
    int32_t c = 0;
    int r = 0;
    hi_word[m] = 0;
    if (sh.ok[m]) {
      const int64_t at = (m0 + m) * a.W + w;
      hi_word[m] = a.hi ? __ldg(a.hi + at) : 0u;
      r = range_of(hi_word[m], lane);
      if ((member >> lane) & 1u) {
        c = signed_value(plane_code(a.planes + at, a.M * a.W, a.P, lane),
                         a.sign ? __ldg(a.sign + at) : 0u, lane) - zero_of<kGroups>(sh, warp, m, r);
      }
    }
    const int32_t c0 = r ? 0 : c, c1 = r ? c : 0;
    cs.code[m][lane] = c;
    reinterpret_cast<int8_t*>(cs.code8[m][0])[byte] = static_cast<int8_t>(c0);
    reinterpret_cast<int8_t*>(cs.code8[m][1])[byte] = static_cast<int8_t>(c1);
    fits = fits && c >= -128 && c <= 127;
    csum[m][0] = __reduce_add_sync(kFullMask, c0);
    csum[m][1] = !kGroups && a.R == 2 ? __reduce_add_sync(kFullMask, c1) : 0;
  }
  fits = __all_sync(kFullMask, fits);
  __syncwarp();

  int32_t acc[kMT][2] = {};
  if (fits) {
#pragma unroll
    for (int row = 0; row < Pk::kRows; ++row) {
#pragma unroll
      for (int v = 0; v < Pk::kVecs; ++v) {
        const uint32_t weights = (wd[row] >> (v * kBits)) & Pk::kBytes;
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          acc[m][0] = dp4a_u8s8(weights, cs.code8[m][0][row * Pk::kVecs + v], acc[m][0]);
          if (!kGroups && a.R == 2) acc[m][1] = dp4a_u8s8(weights, cs.code8[m][1][row * Pk::kVecs + v], acc[m][1]);
        }
      }
    }
  } else {
#pragma unroll
    for (int row = 0; row < Pk::kRows; ++row) {
      uint32_t left = (act >> (row * Pk::kPerWord)) & Pk::kRowBits;
      while (left) {
        const int f = __ffs(left) - 1;
        left &= left - 1;
        const int32_t q = static_cast<int32_t>((wd[row] >> (f * kBits)) & Pk::kField);
        const int ch = row * Pk::kPerWord + f;
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          const int32_t cq = cs.code[m][ch] * q;  // |c| < 2^17, q < 2^8
          if ((hi_word[m] >> ch) & 1u) {
            acc[m][1] += cq;
          } else {
            acc[m][0] += cq;
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMT; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r)
      D[m][r] += static_cast<int64_t>(acc[m][r]) - static_cast<int64_t>(z) * csum[m][r];
  __syncwarp();  // the next chunk rewrites this warp's codes
}

// One piece for one warp: D[m][r] of the tile's tokens and this lane's column n.
template <int kBits, int kMT, bool kSpike, bool kGroups>
__device__ void run_piece(const LinearArgs& a, LinearShared<kMT>& sh, const Piece& pc,
                          int64_t m0, int64_t n, int warp, int lane, int64_t (&D)[kMT][2],
                          float& scale) {
  using Pk = Packing<kBits>;
  const bool column = n < a.N;
  const int32_t z = column ? zero_at(a, pc.wg, n) : 0;
  scale = column ? scale_at(a, pc.wg, n) : 0.f;

  uint32_t member[kPieceChunks], act[kPieceChunks];
#pragma unroll
  for (int c = 0; c < kPieceChunks; ++c) {
    member[c] = act[c] = 0;
    if (c >= pc.chunks) continue;
    const int64_t w = pc.chunk0 + c;
    // Only channels k < K of this group: no stray bit past K ever names a weight row.
    uint32_t mk = dev::range_bits(w, pc.lo, pc.hi);
    if (pc.scan) {
      const int64_t k = 32 * w + lane;
      mk &= __ballot_sync(kFullMask, k < a.K && __ldg(a.g_idx + k) == pc.g);
    }
    member[c] = mk;
    act[c] = mk ? mk & tile_activity<kGroups>(a, sh, m0, w, warp) : 0u;
  }
  // All weight words of the piece are requested before any is used.
  uint32_t wd[kPieceChunks][kBits];
#pragma unroll
  for (int c = 0; c < kPieceChunks; ++c)
#pragma unroll
    for (int row = 0; row < Pk::kRows; ++row) {
      const bool needed = column && ((act[c] >> (row * Pk::kPerWord)) & Pk::kRowBits);
      wd[c][row] = needed ? static_cast<uint32_t>(__ldg(
                                a.qweight + ((pc.chunk0 + c) * Pk::kRows + row) * a.N + n))
                          : 0u;
    }
#pragma unroll
  for (int c = 0; c < kPieceChunks; ++c) {
    if (!act[c]) continue;
    if (kSpike) {
      spike_chunk<kBits, kMT, kGroups>(a, sh, m0, pc.chunk0 + c, member[c], wd[c], z, warp, D);
    } else {
      int_chunk<kBits, kMT, kGroups>(a, sh, m0, pc.chunk0 + c, member[c], act[c], wd[c], z, warp, lane, D);
    }
  }
}

// The epilogue's running sums of one output (m, n): groups arrive in ascending order. With
// activation groups `group` is the activation group u, which lies in one weight group: its
// S_u = 0.0 + double(float32(scales[g, n]) * float32(D[u])) is a single term, and S[0] holds
// Y = sum over u ascending of double(scale[m, u]) * S_u instead (from +0.0; read for m < M).
template <bool kGroups>
struct Fold {
  double S[2] = {0.0, 0.0};
  int64_t group = -1;
  float scale = 0.f;
  int64_t D[2] = {0, 0};

  __device__ void close(const LinearArgs& a, int64_t tm) {
    if (group < 0) return;
    if constexpr (kGroups) {
      if (tm < a.M)
        S[0] += scale_term(a, tm, group,
                           0.0 + static_cast<double>(scale * static_cast<float>(D[0])));
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r)
        if (r < a.R) S[r] += static_cast<double>(scale * static_cast<float>(D[r]));
    }
  }
  __device__ void add(const LinearArgs& a, int64_t tm, int64_t g, float g_scale, int64_t d0,
                      int64_t d1) {
    if (g != group) {
      close(a, tm);
      group = g;
      scale = g_scale;
      D[0] = D[1] = 0;
    }
    D[0] += d0;
    D[1] += d1;
  }
};

__device__ void store(const LinearArgs& a, int64_t i, float y) {
  switch (a.out_type) {
    case FloatType::kHalf: static_cast<__half*>(a.out)[i] = __float2half_rn(y); break;
    case FloatType::kBFloat16: static_cast<__nv_bfloat16*>(a.out)[i] = __float2bfloat16_rn(y); break;
    default: static_cast<float*>(a.out)[i] = y; break;  // kFloat
  }
}

// The kernel body. kGroups: the call has activation groups (a.group > 0), instantiated as a
// kernel of its own (spike_linear_grouped_kernel) so that the kernels without them keep their
// registers and launch bounds.
template <int kBits, int kMT, bool kSpike, bool kGroups>
__device__ __forceinline__ void spike_linear_body(const LinearArgs& a) {
  constexpr int kWarps = kWarpsFor<kMT>;
  __shared__ LinearShared<kMT> sh;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  group_layout<32 * kWarps>(a, sh.layout);
  const GroupLayout& L = sh.layout;
  const int64_t m_tiles = (a.M + kMT - 1) / kMT, n_tiles = (a.N + kCols - 1) / kCols;
  // Token tiles of the same columns are neighbours, so their weight reads meet in L2.
  for (int64_t tile = blockIdx.x; tile < m_tiles * n_tiles; tile += gridDim.x) {
    const int64_t m0 = (tile % m_tiles) * kMT, n = (tile / m_tiles) * kCols + lane;
    if (threadIdx.x < kMT) {
      const int64_t tm = m0 + threadIdx.x;
      int32_t z0 = 0, z1 = 0;
      if (tm < a.M && a.zero) {
        z0 = a.zero[tm * a.R];
        z1 = a.R == 2 ? a.zero[tm * a.R + 1] : 0;
      }
      // A zero point past kZeroLimit could overflow the int32 codes: the token becomes NaN.
      const bool ok = tm < a.M && zero_in_range(z0) && zero_in_range(z1);
      sh.ok[threadIdx.x] = ok;
      sh.zero[threadIdx.x][0] = ok ? z0 : 0;
      sh.zero[threadIdx.x][1] = ok ? z1 : 0;
    }
    __syncthreads();
    if (kGroups && a.zero) {  // (z0 above read column 0 of R) every column of every token
      for (int64_t i = threadIdx.x; i < kMT * a.R; i += 32 * kWarps) {
        const int64_t tm = m0 + i / a.R;
        if (tm < a.M && !zero_in_range(a.zero[tm * a.R + i % a.R])) sh.ok[i / a.R] = 0;
      }
      __syncthreads();
    }

    Fold<kGroups> fold;  // used by the threads below kMT * 32: token m = warp, column n
    for (int64_t base = 0; L.valid && base < L.pieces; base += kWarps) {
      const int64_t index = base + warp;
      if (index < L.pieces) {
        const Piece pc = piece_at<kGroups>(a, L, index);
        if (kGroups) {  // the zero points of the piece's activation group
          if (lane < kMT)
            sh.piece_zero[warp][lane] =
                a.zero && sh.ok[lane] ? a.zero[(m0 + lane) * a.R + pc.g] : 0;
          __syncwarp();
        }
        int64_t D[kMT][2] = {};
        float scale;
        run_piece<kBits, kMT, kSpike, kGroups>(a, sh, pc, m0, n, warp, lane, D, scale);
#pragma unroll
        for (int m = 0; m < kMT; ++m) {
          sh.part[warp][m][0][lane] = D[m][0];
          sh.part[warp][m][1][lane] = D[m][1];
        }
        sh.piece_scale[warp][lane] = scale;
        if (lane == 0) sh.piece_group[warp] = pc.g;
      } else if (lane == 0) {
        sh.piece_group[warp] = -1;
      }
      __syncthreads();
      if (threadIdx.x < kMT * 32) {
        for (int w = 0; w < kWarps && sh.piece_group[w] >= 0; ++w)
          fold.add(a, m0 + warp, sh.piece_group[w], sh.piece_scale[w][lane],
                   sh.part[w][warp][0][lane], sh.part[w][warp][1][lane]);
      }
      __syncthreads();
    }

    if (threadIdx.x < kMT * 32) {
      const int64_t tm = m0 + warp;
      fold.close(a, tm);
      if (tm < a.M && n < a.N) {
        float y = dev::quiet_nan();
        if (L.valid && sh.ok[warp])
          y = kGroups ? linear_output(a, n, fold.S[0])
                          : linear_epilogue(a, tm, n, fold.S[0], fold.S[1]);
        store(a, tm * a.N + n, y);
      }
    }
    __syncthreads();  // sh.ok and sh.zero belong to the next tile
  }
}

template <int kBits, int kMT, bool kSpike>
__global__ void __launch_bounds__(32 * kWarpsFor<kMT>) spike_linear_kernel(const LinearArgs a) {
  spike_linear_body<kBits, kMT, kSpike, false>(a);
}

// With activation groups (int backend only). The bound of one block per SM lets ptxas go past
// 128 registers where it otherwise spilled (kMT = 8, 4-bit: 128 registers, 136 bytes spilled);
// with it no instantiation spills, at 95 to 184 registers (nvcc 13.0, sm_80 / sm_90).
template <int kBits, int kMT>
__global__ void __launch_bounds__(32 * kWarpsFor<kMT>, 1)
    spike_linear_grouped_kernel(const LinearArgs a) {
  spike_linear_body<kBits, kMT, false, true>(a);
}

template <int kBits, int kMT, bool kSpike, bool kGroups>
void launch_tiles(const LinearArgs& a, cudaStream_t stream) {
  const int64_t tiles = ((a.M + kMT - 1) / kMT) * ((a.N + kCols - 1) / kCols);
  const unsigned grid = dev::grid_size(std::min(tiles, kMaxBlocks));
  if constexpr (kGroups) {
    spike_linear_grouped_kernel<kBits, kMT><<<grid, 32 * kWarpsFor<kMT>, 0, stream>>>(a);
  } else {
    spike_linear_kernel<kBits, kMT, kSpike><<<grid, 32 * kWarpsFor<kMT>, 0, stream>>>(a);
  }
}

// Tokens per tile: every weight word is read once per tile, so decode batches up to 8 tokens
// share one read; smaller tiles keep the dp4a work of padding tokens off small batches.
template <int kBits, bool kSpike, bool kGroups>
void launch_tokens(const LinearArgs& a, cudaStream_t stream) {
  if (a.M == 1) {
    launch_tiles<kBits, 1, kSpike, kGroups>(a, stream);
  } else if (a.M == 2) {
    launch_tiles<kBits, 2, kSpike, kGroups>(a, stream);
  } else if (a.M <= 4) {
    launch_tiles<kBits, 4, kSpike, kGroups>(a, stream);
  } else {
    launch_tiles<kBits, 8, kSpike, kGroups>(a, stream);
  }
}

// The kernel of kBits-bit weights, either backend (see csrc/cuda/linear.cu).
template <int kBits>
void launch_bits(const LinearArgs& a, cudaStream_t stream) {
  if (a.group > 0) {
    // Activation groups: the int kernel for every backend (the same integers, hence the same
    // bits; see csrc/cuda/linear.cu), so that groups add no spike-backend instantiations.
    launch_tokens<kBits, false, true>(a, stream);
  } else if (a.backend == Backend::kSpike) {
    launch_tokens<kBits, true, false>(a, stream);
  } else {
    launch_tokens<kBits, false, false>(a, stream);  // int, and auto (see csrc/cuda/linear.cu)
  }
}

}  // namespace
}  // namespace spikeops
