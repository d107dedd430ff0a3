// Index maps and element arithmetic of the tensor-core prefill kernel of spike_linear
// (csrc/cuda/linear_mma.cu): which thread copies which words into which shared-memory slot, how the
// int8 codes are built and where they are stored (the swizzle), which bytes each lane's ldmatrix
// and weight loads fetch, which output each accumulator register holds, and the fold. Plain C++
// with SPIKE_HD functions and no CUDA intrinsics, so that tests/test_cuda_mma_layout.py compiles
// it with g++ and emulates a whole block through exactly these maps against the PTX ISA's
// documented fragment layouts (written there independently) before any GPU time is spent.
//
// Terms as in docs/ops.md: M tokens, K channels, N columns, P planes, W words per token row.
// A k-tile is one spike word: 32 channels, one m16n8k32 step, always inside one weight group.
#pragma once

#include <cstdint>

#include "spike_math.h"

namespace spikeops {
namespace mma {

constexpr int kBlockM = 64;            // tokens per block
constexpr int kBlockN = 128;           // columns per block
constexpr int kWarpsM = 2, kWarpsN = 4;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;  // 256
constexpr int kWarpM = kBlockM / kWarpsM;  // 32 tokens per warp: two m16 tiles
constexpr int kWarpN = kBlockN / kWarpsN;  // 32 columns per warp: four n8 tiles
constexpr int kTilesM = kWarpM / 16, kTilesN = kWarpN / 8;
constexpr int kStages = 6;             // k-tiles in flight (cp.async ring)
constexpr int kMaxP = 8;               // planes of codes that fit int8 after the offset
constexpr int kMaxRows = 4;            // qweight rows per k-tile: 32 channels * bits / 32
// Words per qweight row in shared memory: 8 words of padding put row r + 1 of a column 8 banks
// after row r, so that the words of one weight load of a warp (4-bit: lane quad t reads row t,
// 4 rows x 8 columns) fall into distinct banks; 136 * 4 bytes keeps every row 16-byte aligned
// for cp.async.
constexpr int kRowStride = kBlockN + 8;
constexpr int kCodeRow = 32;           // bytes of codes per token and k-tile
// int32 sums of one group stay exact (|c'| <= 128, |q - z| <= 16: 2^11 per channel).
constexpr int64_t kMaxGroup = int64_t(1) << 20;

// One stage of the ring: the raw spike words of a k-tile (planes, then sign, per token), its
// qweight rows, and the zero points and scales of its group for the block's columns.
struct Stage {
  uint32_t spikes[kMaxP + 1][kBlockM];
  uint32_t weights[kMaxRows][kRowStride];
  int32_t zeros[kBlockN];
  float scales[kBlockN];
};

struct Shared {
  Stage stage[kStages];
  uint8_t codes[kBlockM * kCodeRow];  // int8 codes of the current k-tile, swizzled
  int32_t zero[kBlockM];              // zero' = zero[m] - offset (0 for signed codes); with
                                      // activation groups that of the current group
  float act_scale[kBlockM];           // activation groups: scale[m, u] of the current group
  int32_t ok[kBlockM];                // token < M and its zero points within kZeroLimit
};

// ---------------------------------------------------------------------------------------------
// Global tile -> (m, k, n). Blocks are numbered token tile fastest, so that the blocks that
// share a column tile (and read the same weights) run together and meet in L2.
struct BlockTile {
  int64_t m0, n0;
};
SPIKE_HD int64_t block_count(int64_t M, int64_t N) {
  return ((M + kBlockM - 1) / kBlockM) * ((N + kBlockN - 1) / kBlockN);
}
SPIKE_HD BlockTile block_tile(int64_t block, int64_t M) {
  const int64_t m_tiles = (M + kBlockM - 1) / kBlockM;
  return BlockTile{(block % m_tiles) * kBlockM, (block / m_tiles) * kBlockN};
}

// Bits of word w that name channels k < K.
SPIKE_HD uint32_t word_channels(int64_t w, int64_t K) {
  const int64_t left = K - 32 * w;
  return left >= 32 ? 0xffffffffu : left <= 0 ? 0u : (1u << left) - 1u;
}

// ---------------------------------------------------------------------------------------------
// cp.async maps. Spike words: unit u of a k-tile is row u / kBlockM (plane p < P, or the sign
// word at row P) of token u % kBlockM; 4-byte copies, because a token row of W words is 16-byte
// aligned only when W is a multiple of 4. Consecutive threads take consecutive tokens: coalesced.
struct SpikeCopy {
  int row, token;
};
SPIKE_HD SpikeCopy spike_copy(int unit) { return SpikeCopy{unit / kBlockM, unit % kBlockM}; }
SPIKE_HD int spike_units(int64_t P, bool sign) {
  return static_cast<int>(P + (sign ? 1 : 0)) * kBlockM;
}
// Source word of a spike copy (valid when m < M): plane row -> planes, row P -> sign.
SPIKE_HD int64_t spike_source(const SpikeCopy& c, int64_t P, int64_t M, int64_t W, int64_t m,
                              int64_t w) {
  return c.row < P ? (c.row * M + m) * W + w : m * W + w;
}

// Weight words: 16-byte copies of 4 consecutive columns of one qweight row. Units [0, rows * 32)
// are the k-tile's qweight rows (kBits rows), then 32 units of zero points and 32 of scales.
constexpr int kChunksPerRow = kBlockN / 4;
struct WeightCopy {
  int kind;   // 0 qweight row, 1 zeros, 2 scales
  int row;    // qweight row within the k-tile (kind 0)
  int col;    // first of the 4 columns within the block
};
SPIKE_HD WeightCopy weight_copy(int unit, int rows) {
  const int rows_units = rows * kChunksPerRow;
  if (unit < rows_units) return WeightCopy{0, unit / kChunksPerRow, 4 * (unit % kChunksPerRow)};
  unit -= rows_units;
  return WeightCopy{1 + unit / kChunksPerRow, 0, 4 * (unit % kChunksPerRow)};
}
SPIKE_HD int weight_units(int rows) { return (rows + 2) * kChunksPerRow; }

// ---------------------------------------------------------------------------------------------
// K positions. Position p (0..31) of a k-tile, the k index of the mma, holds channel
// k_channel(bits, p) of the spike word; any permutation gives the same sums as long as A and B
// use the same one. For 4-bit weights lane t's registers (positions 4t .. 4t + 3 and
// 16 + 4t .. 19 + 4t) hold the even and the odd channels of qweight word t, so that a register
// is one mask of that word (word & 0x0f0f0f0f, (word >> 4) & 0x0f0f0f0f). 2-bit weights keep
// channels in order: a register is 4 consecutive fields of one word.
SPIKE_HD int k_channel(int bits, int p) {
  return bits == 4 ? 8 * (p % 16 / 4) + 2 * (p % 4) + p / 16 : p;
}
// Channels of consecutive positions of a register differ by this many.
SPIKE_HD int k_stride(int bits) { return bits == 4 ? 2 : 1; }

// Codes. Thread i builds positions 4q .. 4q + 3 and 16 + 4q .. 19 + 4q (q = i % 4) of token
// i / 4: two words of int8 codes, lowest position in the lowest byte.
struct CodeBuild {
  int token, q;
};
SPIKE_HD CodeBuild code_build(int thread) { return CodeBuild{thread / 4, thread % 4}; }
SPIKE_HD int code_position(const CodeBuild& b, int half) { return 16 * half + 4 * b.q; }

// Bits j0, j0 + stride, j0 + 2 stride, j0 + 3 stride of x, one per byte (bit 0 of byte i). The
// multiply places shifted copies of the masked bits; for stride 1 (copies 7 bits apart) none
// overlap, for stride 2 (bits 0, 2, 4, 6 shifted by 0, 6, 12, 18) overlaps fall on bits 6, 12
// and 18 only, whose carries stop at bits 7, 13 and 19: bits 0, 8, 16 and 24 are exact.
SPIKE_HD uint32_t spread(uint32_t x, int j0, int stride) {
  const uint32_t v = stride == 1 ? ((x >> j0) & 0xfu) * 0x00204081u
                                 : ((x >> j0) & 0x55u) * 0x00041041u;
  return v & 0x01010101u;
}

// c' = s*Q - offset of the channels j0 + stride * i (i < 4) of one token as int8 bytes, from its
// plane words (plane[p], 0 for p >= P: a fixed trip count keeps the array in registers), sign
// word (0 for unsigned codes) and keep (channels k < K). flip is 0x80808080 for the offset 128
// (unsigned 8-plane codes: Q - 128 is Q ^ 0x80 as int8), else 0. Negation per byte is
// (Q ^ 0xff) + 1, which never carries into the next byte because a sign bit counts only where
// Q > 0 (masked here, as the format promises anyway).
SPIKE_HD uint32_t code_bytes(const uint32_t (&plane)[kMaxP], uint32_t sign, uint32_t keep,
                             uint32_t flip, int j0, int stride) {
  uint32_t q = 0, any = 0;
  for (int p = 0; p < kMaxP; ++p) {
    q |= spread(plane[p], j0, stride) << p;
    any |= plane[p];
  }
  const uint32_t neg = spread(sign & any, j0, stride) * 0xffu;
  const uint32_t c = ((q ^ neg) + (neg & 0x01010101u)) ^ flip;
  return c & (spread(keep, j0, stride) * 0xffu);
}

// Swizzle: byte offset of position p (a multiple of 4) of token in Shared::codes. A token row
// is two 16-byte halves (positions 0-15, 16-31); tokens 4-7 of every 8 swap their halves, so
// that the 8 rows of one ldmatrix matrix fall into 8 distinct 16-byte bank groups.
SPIKE_HD int code_offset(int token, int p) {
  const int half = (p / 16) ^ ((token >> 2) & 1);
  return token * kCodeRow + half * 16 + (p % 16);
}

// ldmatrix.x4 of the A fragment of m16 tile `tile` of warp row `warp_m`: lane l gives the address
// of row l % 8 of matrix l / 8; matrix j covers tokens (j & 1) * 8 .. + 7 and channels
// (j >> 1) * 16 .. + 15, so that register j of the result is fragment register a_j of m16n8k32.
SPIKE_HD int a_ldmatrix_offset(int warp_m, int tile, int lane) {
  const int j = lane / 8;
  const int token = warp_m * kWarpM + tile * 16 + (j & 1) * 8 + lane % 8;
  return code_offset(token, (j >> 1) * 16);
}

// ---------------------------------------------------------------------------------------------
// Weights. Fragment register `reg` (positions 16 reg + 4t .. + 3, t = lane % 4) of n8 tile
// `tile` of warp column `warp_n` holds column lane / 4 of that tile: from one word of qweight
// row `row` (packed along K: channel k is field k % (32 / bits) of row k / (32 / bits)), the
// fields of its positions' channels, which start at bit `shift`.
struct WeightLoad {
  int row, col, shift;
};
SPIKE_HD WeightLoad weight_load(int bits, int warp_n, int tile, int lane, int reg) {
  const int per_word = 32 / bits;
  const int k = k_channel(bits, reg * 16 + 4 * (lane % 4));
  return WeightLoad{k / per_word, warp_n * kWarpN + tile * 8 + lane / 4, (k % per_word) * bits};
}
SPIKE_HD int weight_offset(const WeightLoad& l) { return l.row * kRowStride + l.col; }

// The 4 codes q of a register as bytes (4-bit: every other field, one mask; 2-bit: 4
// consecutive fields) minus the zero point z, as int8 (q - z in [-16, 15] for the zero points
// [0, 2^bits] of docs/ops.md): each byte is biased by 128 so that the subtraction never borrows
// from its neighbour, and the bias is flipped off again. keep is 0xff per byte of a channel
// k < K (zero bytes elsewhere, so padded channels add nothing).
SPIKE_HD uint32_t weight_bytes(uint32_t word, int bits, int shift, int32_t z, uint32_t keep) {
  uint32_t q = 0;
  if (bits == 4) {
    q = (word >> shift) & 0x0f0f0f0fu;
  } else {
    for (int i = 0; i < 4; ++i) q |= ((word >> (shift + bits * i)) & 3u) << (8 * i);
  }
  const uint32_t d = ((q | 0x80808080u) - static_cast<uint32_t>(z) * 0x01010101u) ^ 0x80808080u;
  return d & keep;
}
// keep of weight_bytes for register reg of lane: bytes whose channel is below valid (the
// channels of the k-tile below K).
SPIKE_HD uint32_t weight_keep(int bits, int lane, int reg, int valid) {
  uint32_t keep = 0;
  for (int i = 0; i < 4; ++i)
    if (k_channel(bits, reg * 16 + 4 * (lane % 4) + i) < valid) keep |= 0xffu << (8 * i);
  return keep;
}

// ---------------------------------------------------------------------------------------------
// Accumulators: register e of the m16n8 tile (tile_m, tile_n) of warp (warp_m, warp_n) holds
// token c_token, column c_col of the block.
SPIKE_HD int c_token(int warp_m, int tile_m, int lane, int e) {
  return warp_m * kWarpM + tile_m * 16 + lane / 4 + 8 * (e >> 1);
}
SPIKE_HD int c_col(int warp_n, int tile_n, int lane, int e) {
  return warp_n * kWarpN + tile_n * 8 + 2 * (lane % 4) + (e & 1);
}
// The lane whose weight registers hold column c_col: lane quad of column (lane % 4) * 2 + (e & 1)
// of the n8 tile (any lane of that quad after the quad's sums are reduced).
SPIKE_HD int colsum_lane(int lane, int e) { return 4 * (2 * (lane % 4) + (e & 1)); }

// The fold of one group into S (docs/ops.md, spike_linear): D = sum c' (q - z) - zero' sum (q - z)
// exactly in int64, then one float32 product and a double sum, as every other kernel does.
SPIKE_HD void fold_group(double& S, int32_t acc, int32_t zero, int32_t colsum, float scale) {
  const int64_t D = static_cast<int64_t>(acc) - static_cast<int64_t>(zero) * colsum;
  S += static_cast<double>(scale * static_cast<float>(D));
}

// The fold with activation groups, at the end of activation group u (inside one weight group,
// whose float32 scale is `scale`): S_u = 0.0 + double(scale * float32(D)) is its only term, and
// Y += double(scale[m, u]) * S_u (kernel_args.h, scale_term), u ascending from Y = +0.
SPIKE_HD void fold_column(double& Y, int32_t acc, int32_t zero, int32_t colsum, float scale,
                          float act_scale) {
  double S = 0.0;
  fold_group(S, acc, zero, colsum, scale);
  Y += static_cast<double>(act_scale) * S;
}

}  // namespace mma
}  // namespace spikeops
