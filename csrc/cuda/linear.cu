// CUDA kernel of spike_linear. It computes the integers of csrc/cpu/linear.cpp,
//   D[g, r] = sum over channels k of group g in range r of (s*Q - zero[r]) * (q - z[g]),
// exactly, and the same float epilogue in the same order, so its outputs equal the CPU's bit for
// bit and its two backends equal each other:
//   S_r[n] = sum over g ascending of double(float32(scales[g, n]) * float32(D[g, r])),
//   y[m, n] = float32(double(scale[m, 0]) * S_0 [+ double(scale[m, 1]) * S_1] [+ bias[n]]).
// (The CPU skips groups whose D it knows to be empty; adding +-0.0 never changes S, so folding
// every group gives the same bits whenever the scales are finite.)
//
// Activation groups (group > 0: one scale, and zero point, per token and group of `group`
// channels; hi is then null, and every activation group lies in one uniform weight group,
// weight_group_of in csrc/kernel_args.h). Every kernel then walks and folds by activation group u
// instead of by weight group: D[u] = sum over the channels of u of (s*Q - zero[m, u]) * (q - z[g])
// with g = weight_group_of(u), S_u = 0.0 + double(float32(scales[g, n]) * float32(D[u])) (its
// only term) and Y += double(scale[m, u]) * S_u for u ascending from Y = +0.0, then
// y = float32(Y + bias[n]) (linear_output). Every column is added, silent ones included (they
// add +0.0 for finite scales, and NaN for the NaN scales of a non-finite row, whose outputs are
// NaN as without groups). A token with any zero[m, u] beyond kZeroLimit gives a NaN row. Grouped
// calls route like ungrouped ones: all three kernels below handle them, each in instantiations
// of its own (so the kernels without groups keep their registers). In this file's kernel a
// grouped call runs the int backend whatever the backend asked (the same integers, so the same
// bits): grouped spike-backend instantiations would only add compile time and spills.
//
// Work split. A block owns a tile of kMT tokens x 32 output columns (lane = column, so every
// qweight load of a warp is one coalesced 128-byte row segment) and walks all K. K is cut into
// pieces: at most kPieceChunks 32-channel chunks of one group. In each round the warps (16 for
// tiles of 1 or 2 tokens, else 8) take as many consecutive pieces; each warp reads the packed
// weight words of its piece once for all kMT tokens (4-bit: 16 loads in flight per lane) and
// leaves the exact int64 partial D of its piece in shared memory. Then the threads of the tile's
// outputs fold the round's partials in piece order:
// partials of one group are summed as integers, and a group is folded into S when the next one
// starts. Pieces are numbered group-major, so S sees the groups in ascending order. Silent
// channels (no spike, no zero point, for any token of the tile) never have their weights read.
//
// Groups. With uniform groups (group_size gs > 0, the GPTQ layout without act-order; decided
// once per layer by spikeops.GPTQWeight), group g is the channel range [g*gs, (g+1)*gs) and its
// pieces are its chunks; g_idx is not read. Otherwise (group_size 0: act-order) every block
// first checks g_idx once, then each group scans all chunks and keeps, by ballot, the channels
// whose g_idx names it: correct for any g_idx, but every group re-reads g_idx and the weights
// of its members (about 10x slower; sort act-order weights at load for speed). A g_idx entry
// outside [0, G) makes every output NaN: no index is derived from it.
//
// Backends, same integers:
//   int   : lane j turns channel j of a chunk into the codes c = s*Q - zero[m, r] of the tile's
//           tokens; codes that fit int8 go through dp4a against the unpacked weight bytes (a
//           4-bit word is two masks away from two u8x4 vectors), wider codes through int32
//           multiply-adds per channel. A chunk's int32 sum is below 2^30; D is int64.
//   spike : per token, range and plane, the weight codes of the spiking channels are added
//           (positive spikes) or subtracted (negative), shifted by p; the zero point of unsigned
//           encodings is one more always-firing plane of weight -zero[m, r] (as on the CPU).
//   auto  : int. Both backends skip the same silent weight rows, so they move the same bytes,
//           and dp4a does in one instruction what the spike loop does in about 20.
//
// The kernel is csrc/cuda/linear_kernel.cuh; cuda/linear_w{2,4,8}.cu instantiate it per bit width.
//
// Decode. Calls of at most 16 tokens on 4-bit layers with uniform groups (of a multiple of 32
// channels, at most 8192) whose codes fit int8 after an offset (P <= 7, or unsigned P = 8) go to
// the streaming kernel of csrc/cuda/linear_decode.cu instead, for backends int and auto: it computes
// the same D with int32 dp4a sums per group and the same fold. It reads every weight row (this
// kernel skips the rows of words silent in every token, which dense activations rarely have).
// The spike backend keeps this kernel. With activation groups its workers take activation groups
// instead of weight groups (chunks of at most one activation group: groups of 32 or 64 channels
// fill a quarter or half of a 128-channel chunk).
//
// Prefill. Calls of at least 64 tokens on 2- and 4-bit layers with uniform groups (of a multiple
// of 32 channels), one range (R = 1: no salient channels, not oat), codes that fit int8 after an
// offset (signed P <= 7, unsigned P <= 8) and N % 4 == 0 go to the tensor-core kernel of
// csrc/cuda/linear_mma.cu, for backends int and auto: mma.sync m16n8k32 on int8 codes c' and weights
// q - z, int32 sums per group, the same D and the same fold (compiled, not yet run on a GPU).
// With activation groups it folds at the end of every activation group (every group / 32
// k-tiles: for groups of 128 channels as often as for weight groups of 128, for groups of 32
// every k-tile, about twice the instructions per k-tile). Everything else, two ranges included,
// stays here.
#include "cuda/launchers.h"

namespace spikeops {

void launch_spike_linear(const LinearArgs& a, cudaStream_t stream) {
  if (spike_linear_decode_applies(a)) {
    launch_spike_linear_decode(a, stream);
    return;
  }
  if (spike_linear_mma_applies(a)) {
    launch_spike_linear_mma(a, stream);
    return;
  }
  switch (a.bits) {
    case 2: launch_spike_linear_w2(a, stream); break;
    case 4: launch_spike_linear_w4(a, stream); break;
    case 8: launch_spike_linear_w8(a, stream); break;
  }
}

}  // namespace spikeops
