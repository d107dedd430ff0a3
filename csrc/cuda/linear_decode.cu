// spike_linear for decode: M <= 16 tokens on 4-bit layers with uniform groups, a streaming
// kernel meant to read the packed weights at memory bandwidth. csrc/cuda/linear.cu routes here what
// spike_linear_decode_applies accepts; it computes that file's contract (same integers D, same
// fold, same epilogue), so its outputs are the CPU's bits.
//
// Work split. A block owns 32 output columns and a tile of kMT tokens, and walks all of K: no
// split-K across blocks, so no workspace and no inter-block order. Its 128 threads form 16
// workers of 8 lanes; lane l reads columns n0 + 4l .. n0 + 4l + 3 of a qweight row (8 channels
// of 4 columns) with one 16-byte load, so a worker moves one 128-byte row segment per load and a
// warp four. In round t worker w takes group t * 16 + w, in chunks of at most 16 rows (128
// channels; 8 rows for large token tiles); all loads of a chunk are issued at once, those of the
// next chunk before the block waits at its barrier, so weights stay in flight while the codes
// are built and the sums folded. Blocks of the same columns and other tokens are grid
// neighbours: their weight reads meet in L2.
//
// Codes. Before each chunk the block builds the int8 codes of its tokens for the chunks of the
// round. A build unit is one token and spike word (32 channels): it loads the P plane words, sign
// and hi, negates and offsets bit-sliced (32 channels per instruction), and turns the 8 bit
// planes into bytes (an 8 x 8 bit transpose per byte, then a 4 x 4 byte transpose by
// byte_perm). Per qweight row and token it leaves two words, the codes of the row's even and
// odd channels, which face the nibbles (word & 0x0f0f0f0f) and ((word >> 4) & 0x0f0f0f0f) in
// dp4a; all 8 lanes of a worker read them from shared memory as a broadcast.
//
// Zero points. The codes c = s*Q - zero[m, r] are bounded only by kZeroLimit, so no int8 form of
// them exists in general, and the device cannot pick a fallback per token without a second
// launch. The kernel multiplies c' = s*Q - off instead (off = 128 for unsigned 8-plane codes,
// else 0), which is int8 for every input spike_linear_decode_applies accepts, and uses
//   D = sum c' q - z * sum c' - zero' * (sum q - z * count),   zero' = zero[m, r] - off,
// summed over the channels of the chunk in range r. sum c' comes from popcounts of the bit
// slices, sum q from one dp4a per nibble vector against bytes of 1 (and, for R = 2, against the
// token's range bits), count from the chunk's bounds. No call needs a device-side check.
//
// Exactness. The identity above is one of integers. Per channel its terms are at most
// 128 * 15 + 16 * 128 + 10128 * 16 < 2^17.4 (|c'| <= 128, q <= 15, z <= 16 as the contract
// expects, |zero'| <= kZeroLimit + 128), so the int32 sums of a group are exact while
// group_size <= kMaxGroup = 8192 (1.4e9 < 2^31): D equals the CPU's int64 D. float(D) and
// float32(scales[g, n]) * float(D) round as on the CPU (no FMA: --fmad=false). At the end of
// its group a worker stores that product; after the round's barrier one thread per (token,
// column) adds the round's products to S_r in worker order, which is ascending g, in double, from
// S = +0: the CPU's sequence, plus +-0 for the groups it skips (no change for finite scales, as
// in csrc/cuda/linear.cu). The epilogue is the CPU's expression.
//
// Activation groups (group > 0; one range). The unit of the walk is then the activation group
// (each inside one weight group, whose zero points and scales it loads): worker w of round t
// takes activation group t * 16 + w, the build units also store zero' = zero[m, u] - off of each
// worker's group, and the fold adds Y += double(scale[m, u]) * (0.0 + double(product)) per group
// in worker order (ascending u) instead of S_r += double(product); the epilogue is
// float32(Y + bias[n]). Only the kR = 1 instantiations contain this code.
//
// Bandwidth. At M = 1 a block has 16 x 2 KB = 32 KB of weights in flight per chunk, and three
// blocks fit an SM (<= 170 registers): 96 KB per SM, three times the ~32 KB that Little's law
// asks at ~4.5 TB/s and ~1 us latency over 132 SMs. 4096 -> 11008 gives 344 blocks for 396
// slots, one wave. 4096 -> 4096 gives 128 blocks, one per SM, in two rounds: 32 KB per SM in
// flight, and the second round's loads leave only after the first round's dp4a, so a lone block
// streams in bursts (so does a long K: 11008 -> 4096 takes six rounds); a second stage of loads
// (registers or a cp.async ring) is the next step there. Per 16 bytes of weights a lane spends
// about 20 + 8 * kMT * R instructions (2 dp4a per word, token and range), under the issue rate
// at M = 1; from M = 8 on dp4a bounds the kernel (tensor cores are the next step), and each
// block rebuilds the codes of its tokens (~4 instructions per channel and token, about a quarter
// of the dp4a time).
//
// Launch. On compute capability 9.0 and later, unless SPIKEOPS_PDL=0 (docs/ops.md), the kernel
// is launched with programmatic dependent launch (its rules: csrc/cuda/device.cuh): it may start
// once every block of the kernel before it in the stream has called dev::allow_dependents (the
// encoders do once their loads of x are out) or exited. Until its wait it only prefetches into
// L2 what its first chunk reads, never a load into registers, which would read a weight written
// by that kernel stale; so it is correct behind any kernel, an in-place weight update included.
// Right after the wait the block allows its own dependents, so a ProjectionGroup's next
// projection prefetches while this one streams.
#include "cuda/device.cuh"

namespace spikeops {
namespace {

constexpr int kCols = 32;            // output columns per block
constexpr int kLanes = 8;            // lanes per worker, 4 columns each
constexpr int kWorkers = 16;         // workers per block: 128 threads
constexpr int kMaxTokens = 16;
constexpr int64_t kMaxGroup = 8192;  // int32 sums of a group stay exact (see above)

// Shapes per token tile kMT and range count kR. The accumulators grow with kMT * kR, so large
// tiles take chunks of 8 rows (every lane holds 4 words per row in flight) and one block fewer
// per SM. kVec words per token and row: the codes of each range (even, odd channels), then for
// R = 2 bytes of 1 at the range-1 channels.
template <int kMT, int kR>
struct Tile {
  static constexpr int kThreads = kLanes * kWorkers;
  static constexpr int kMinBlocks = kMT * kR <= 4 ? 3 : 1;  // small tiles: <= 170 registers
  static constexpr int kRows = kMT * kR <= 4 ? 16 : 8;  // qweight rows per chunk
  static constexpr int kWords = kRows / 4;              // spike words per chunk
  static constexpr int kChunk = 8 * kRows;              // channels per chunk
  static constexpr int kVec = 4 * kR - 2;
  static constexpr int kRowWords = kMT * kVec;
  // +2 words: the two workers of a half-warp read 64-bit words two banks apart.
  static constexpr int kSlot = kRows * kRowWords + 2;
  static constexpr int kFold = (kMT * kCols + kThreads - 1) / kThreads;  // outputs per thread
  static constexpr int kUnits = kWorkers * kMT * kWords;                 // build units per step
};

template <int kMT, int kR>
struct DecodeShared {
  using T = Tile<kMT, kR>;
  uint32_t code[kWorkers][T::kSlot];                     // [row][token][kVec] per worker
  int code_sum[kWorkers][kMT][kR][T::kWords];            // sum of c' per spike word
  int hi_count[kR == 2 ? kWorkers : 1][kMT][T::kWords];  // range-1 channels per spike word
  alignas(16) float prod[kWorkers][kMT][kR][kCols];      // scale * float(D) of the group
  int32_t zero[kMT][2];                                  // zero' = zero[m, r] - off
  int32_t unit_zero[kWorkers][kMT];  // activation groups: zero' = zero[m, u] - off per worker
  int ok[kMT];  // token < M and its zero points in range
};

// What the host derives once per call.
struct DecodePlan {
  int64_t unit;    // channels per unit of the walk: group_size, or the activation group
  int64_t units;   // units: G, or R with activation groups
  int64_t chunks;  // chunks per unit
  int32_t off;     // 128: unsigned 8-plane codes enter dp4a as Q - 128
  int32_t zero;    // some zero' may be nonzero: sum q is needed
  int32_t vec;     // qweight rows are 16-byte aligned: one load per 4 columns
  int32_t early;   // launched with programmatic dependent launch: may start beside the encoder
};

// The channels [lo, hi) of one worker's chunk (empty when hi <= lo) and their unit g (weight
// group, or activation group); its qweight rows are [row0(), row0() + rows()).
struct Chunk {
  int64_t g, lo, hi;
  __device__ int64_t row0() const { return lo / 8; }
  __device__ int64_t rows() const { return hi > lo ? (hi + 7) / 8 - lo / 8 : 0; }
};

template <typename T>
__device__ __forceinline__ Chunk chunk_of(const LinearArgs& a, const DecodePlan& plan,
                                          int64_t step, int slot) {
  Chunk c;
  c.g = (step / plan.chunks) * kWorkers + slot;
  const int64_t g_lo = c.g * plan.unit;
  c.lo = g_lo + (step % plan.chunks) * T::kChunk;
  c.hi = c.g < plan.units ? min(min(c.lo + T::kChunk, g_lo + plan.unit), a.K) : c.lo;
  return c;
}

__device__ __forceinline__ int32_t dp4a(uint32_t weights, uint32_t codes, int32_t c) {
  int32_t d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(weights), "r"(codes), "r"(c));
  return d;
}

// Words n .. n + 3 of a row (cols of them exist): one 16-byte load that skips L1 (the weights
// are read once), or one guarded load per word when the row is not 16-byte aligned.
__device__ __forceinline__ uint4 load4(const void* row, int64_t n, int64_t cols, bool vec) {
  const uint32_t* p = static_cast<const uint32_t*>(row) + n;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (vec) {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  } else {
    if (cols > 0) v.x = __ldg(p);
    if (cols > 1) v.y = __ldg(p + 1);
    if (cols > 2) v.z = __ldg(p + 2);
    if (cols > 3) v.w = __ldg(p + 3);
  }
  return v;
}

// Exchanges bits (p, c + s) and (p + s, c) of an 8 x 8 bit matrix per byte (rows lo, hi).
__device__ __forceinline__ void swap_bits(uint32_t& lo, uint32_t& hi, int s, uint32_t mask) {
  const uint32_t t = ((lo >> s) ^ hi) & mask;
  hi ^= t;
  lo ^= t << s;
}

// Byte b of x[p] holds bit p of channels 8b .. 8b + 7 (bit c: channel 8b + c); afterwards
// byte b of x[c] holds the code of channel 8b + c (bit p: plane p).
__device__ __forceinline__ void transpose_bits(uint32_t (&x)[8]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) swap_bits(x[p], x[p + 4], 4, 0x0f0f0f0fu);
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // rows 0, 1, 4, 5
    const int p = (i & 1) + 4 * (i >> 1);
    swap_bits(x[p], x[p + 2], 2, 0x33333333u);
  }
#pragma unroll
  for (int p = 0; p < 8; p += 2) swap_bits(x[p], x[p + 1], 1, 0x55555555u);
}

// From the transposed bytes of one spike word, the dp4a words of its 4 rows: row b gets, at
// rows[b * stride + v] and [... + v + 1], the codes of channels 8b + {0, 2, 4, 6} and
// 8b + {1, 3, 5, 7} (byte j = channel 8b + 2j + h): a 4 x 4 byte transpose per parity h.
__device__ __forceinline__ void store_rows(const uint32_t (&x)[8], uint32_t* rows, int stride,
                                           int v) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t t0 = __byte_perm(x[h], x[2 + h], 0x5140);
    const uint32_t t1 = __byte_perm(x[h], x[2 + h], 0x7362);
    const uint32_t t2 = __byte_perm(x[4 + h], x[6 + h], 0x5140);
    const uint32_t t3 = __byte_perm(x[4 + h], x[6 + h], 0x7362);
    rows[0 * stride + v + h] = __byte_perm(t0, t2, 0x5410);
    rows[1 * stride + v + h] = __byte_perm(t0, t2, 0x7632);
    rows[2 * stride + v + h] = __byte_perm(t1, t3, 0x5410);
    rows[3 * stride + v + h] = __byte_perm(t1, t3, 0x7632);
  }
}

// One build unit: token tm, spike word w, channels `keep` (0 for a padding or NaN token, a
// spike word outside the chunk, and bits past K). rows: the worker's codes of the word's first
// row for this token; sums[r], *count: sum of c' per range and the range-1 channels.
template <int kR>
__device__ void build_word(const LinearArgs& a, const DecodePlan& plan, int64_t tm, int64_t w,
                           uint32_t keep, uint32_t* rows, int stride, int* sums, int* count) {
  const int64_t at = tm * a.W + w;
  uint32_t y[8];
#pragma unroll
  for (int p = 0; p < 8; ++p)
    y[p] = keep && p < a.P ? __ldg(a.planes + p * a.M * a.W + at) & keep : 0u;
  const uint32_t sign = keep && a.sign ? __ldg(a.sign + at) & keep : 0u;
  const uint32_t hi = keep && a.hi ? __ldg(a.hi + at) & keep : 0u;
  // s*Q in 8-bit two's complement where the sign bit is set: (Q ^ 0xff) + 1, the +1 rippled
  // through the slices (Q <= 127 for signed codes: P <= 7).
  if (sign) {
    uint32_t carry = sign;
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const uint32_t t = y[p] ^ sign;
      y[p] = t ^ carry;
      carry &= t;
    }
  }
  y[7] ^= plan.off ? keep : 0u;  // Q - 128 for unsigned 8-plane codes
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const uint32_t in_range = kR == 1 ? dev::kFullMask : r ? hi : ~hi;
    uint32_t x[8];
    int sum = 0;
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      x[p] = y[p] & in_range;
      sum += p < 7 ? __popc(x[p]) << p : -(__popc(x[p]) << 7);
    }
    sums[r] = sum;
    transpose_bits(x);
    store_rows(x, rows, stride, 2 * r);
  }
  if (kR == 2) {
    uint32_t x[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) x[c] = (hi >> c) & 0x01010101u;
    store_rows(x, rows, stride, 4);
    *count = __popc(hi);
  }
}

__device__ __forceinline__ void store_out(const LinearArgs& a, int64_t i, float y) {
  switch (a.out_type) {
    case FloatType::kHalf: static_cast<__half*>(a.out)[i] = __float2half_rn(y); break;
    case FloatType::kBFloat16:
      static_cast<__nv_bfloat16*>(a.out)[i] = __float2bfloat16_rn(y);
      break;
    default: static_cast<float*>(a.out)[i] = y; break;  // kFloat
  }
}

// kGrouped: activation groups (kR == 1), a separate instantiation so that the kernels without
// them keep their registers.
template <int kMT, int kR, bool kGrouped>
__global__ void __launch_bounds__(Tile<kMT, kR>::kThreads, Tile<kMT, kR>::kMinBlocks)
    spike_linear_decode_kernel(const LinearArgs a, const DecodePlan plan) {
  using T = Tile<kMT, kR>;
  extern __shared__ __align__(16) unsigned char smem[];
  DecodeShared<kMT, kR>& sh = *reinterpret_cast<DecodeShared<kMT, kR>*>(smem);
  const int tid = threadIdx.x, slot = tid / kLanes, lane = tid % kLanes;
  const int64_t m_tiles = (a.M + kMT - 1) / kMT;
  const int64_t m0 = (blockIdx.x % m_tiles) * kMT, n0 = (blockIdx.x / m_tiles) * kCols;
  const int64_t n = n0 + 4 * lane, cols = min(int64_t(4), a.N - n);  // cols <= 0: no column
  const int64_t rounds = (plan.units + kWorkers - 1) / kWorkers, steps = rounds * plan.chunks;
  const bool vec = plan.vec;
  static_assert(!kGrouped || kR == 1, "activation groups never have two ranges");
  constexpr bool grouped = kGrouped;

  // The worker's chunk and its weights in flight: qweight rows, and the group's zero points
  // and scales with its first chunk.
  Chunk ch = chunk_of<T>(a, plan, 0, slot);
  // Started early (the header's Launch), the block may run beside the kernel before it: it
  // prefetches what issue(0) loads (qweight rows, the group's scales and zero points) and waits
  // for that kernel before any load or store.
  if (dev::kGridDependency && plan.early && cols > 0) {
    const int64_t row0 = ch.row0(), rows = ch.rows();
#pragma unroll
    for (int i = 0; i < T::kRows; ++i)
      if (i < rows) dev::prefetch_l2(a.qweight + (row0 + i) * a.N + n);
    if (ch.g < plan.units) {
      const int64_t wg = grouped ? weight_group_of(a, ch.g) : ch.g;
      dev::prefetch_l2(scale_address(a, wg, n));
      dev::prefetch_l2(qzeros_row(a, wg) + n / 8);  // 8 zero points per word, n % 4 == 0
    }
  }
  dev::wait_for_previous_grid();
  dev::allow_dependents();
  uint4 wd[T::kRows], zq = make_uint4(0u, 0u, 0u, 0u), sc = zq;
  auto issue = [&](int64_t step) {
    const int64_t row0 = ch.row0(), rows = ch.rows();
#pragma unroll
    for (int i = 0; i < T::kRows; ++i)
      wd[i] = cols > 0 && i < rows ? load4(a.qweight + (row0 + i) * a.N, n, cols, vec)
                                   : make_uint4(0u, 0u, 0u, 0u);
    if (step % plan.chunks == 0 && cols > 0 && ch.g < plan.units) {
      uint32_t z[4] = {0u, 0u, 0u, 0u}, s[4] = {0u, 0u, 0u, 0u};
      const int64_t wg = grouped ? weight_group_of(a, ch.g) : ch.g;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (i < cols) {
          z[i] = zero_at(a, wg, n + i);
          s[i] = __float_as_uint(scale_at(a, wg, n + i));
        }
      zq = make_uint4(z[0], z[1], z[2], z[3]);
      sc = make_uint4(s[0], s[1], s[2], s[3]);
    }
  };
  issue(0);

  if (tid < kMT) {
    const int64_t tm = m0 + tid;
    int32_t z0 = 0, z1 = 0;
    if (tm < a.M && a.zero) {
      z0 = a.zero[tm * a.R];
      z1 = a.R == 2 ? a.zero[tm * a.R + 1] : 0;
    }
    // A zero point past kZeroLimit would break the int32 bounds: the token becomes NaN.
    bool ok = tm < a.M && zero_in_range(z0) && zero_in_range(z1);
    if (grouped && a.zero && ok)  // every activation group's zero point
      for (int64_t u = 1; u < a.R; ++u) ok = ok && zero_in_range(a.zero[tm * a.R + u]);
    sh.ok[tid] = ok;
    sh.zero[tid][0] = ok ? z0 - plan.off : 0;
    sh.zero[tid][1] = ok ? z1 - plan.off : 0;
  }
  __syncthreads();

  int32_t acc[kMT][kR][4] = {};  // D of the worker's group so far
  double S[T::kFold][kR] = {};   // the fold of outputs tid + k * kThreads

  for (int64_t step = 0; step < steps; ++step) {
    // Codes of every worker's chunk of this step.
    for (int u = tid; u < T::kUnits; u += T::kThreads) {
      const int s = u / (kMT * T::kWords), m = u / T::kWords % kMT, i = u % T::kWords;
      const Chunk c = chunk_of<T>(a, plan, step, s);
      const int64_t w = c.lo / 32 + i;
      const uint32_t keep = sh.ok[m] && 32 * w < c.hi ? dev::channel_bits(w, a.K) : 0u;
      int sums[kR], count = 0;
      build_word<kR>(a, plan, m0 + m, w, keep, sh.code[s] + (4 * i * kMT + m) * T::kVec,
                     T::kRowWords, sums, &count);
#pragma unroll
      for (int r = 0; r < kR; ++r) sh.code_sum[s][m][r][i] = sums[r];
      if (kR == 2) sh.hi_count[kR - 1 ? s : 0][m][i] = count;
      if (grouped && i == 0) {  // zero' of the worker's activation group
        const int32_t z =
            a.zero && sh.ok[m] && c.g < plan.units ? a.zero[(m0 + m) * a.R + c.g] : 0;
        sh.unit_zero[s][m] = sh.ok[m] ? z - plan.off : 0;
      }
    }
    __syncthreads();

    // The chunk's dp4a sums: acc += sum c' q per token and range, q_sum = sum q and
    // q_hi[m] = sum q over token m's range-1 channels (both only where a zero' can be nonzero).
    const int64_t row0 = ch.row0(), rows = ch.rows();
    int32_t q_sum[4] = {}, q_hi[kMT][4] = {};
#pragma unroll
    for (int i = 0; i < T::kRows; ++i) {
      if (i >= rows) break;
      // Nibbles of channels past K (the last row's tail) hold anything: clear them.
      const int64_t left = a.K - 8 * (row0 + i);
      const uint32_t in_k = left >= 8 ? dev::kFullMask : (1u << (4 * left)) - 1u;
      const uint32_t words[4] = {wd[i].x, wd[i].y, wd[i].z, wd[i].w};
      uint32_t even[4], odd[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        even[c] = words[c] & in_k & 0x0f0f0f0fu;
        odd[c] = (words[c] & in_k) >> 4 & 0x0f0f0f0fu;
        if (plan.zero) q_sum[c] = dp4a(odd[c], 0x01010101u, dp4a(even[c], 0x01010101u, q_sum[c]));
      }
      const uint32_t* row = sh.code[slot] + i * T::kRowWords;
#pragma unroll
      for (int m = 0; m < kMT; ++m) {
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          const uint2 code = *reinterpret_cast<const uint2*>(row + m * T::kVec + 2 * r);
#pragma unroll
          for (int c = 0; c < 4; ++c)
            acc[m][r][c] = dp4a(odd[c], code.y, dp4a(even[c], code.x, acc[m][r][c]));
        }
        if (kR == 2 && plan.zero) {
          const uint2 ones = *reinterpret_cast<const uint2*>(row + m * T::kVec + 4);
#pragma unroll
          for (int c = 0; c < 4; ++c)
            q_hi[m][c] = dp4a(odd[c], ones.y, dp4a(even[c], ones.x, q_hi[m][c]));
        }
      }
    }
    // The chunk's zero-point terms: acc -= z * sum c' + zero' * (sum q - z * count), per range.
    const int32_t z[4] = {static_cast<int32_t>(zq.x), static_cast<int32_t>(zq.y),
                          static_cast<int32_t>(zq.z), static_cast<int32_t>(zq.w)};
    const int32_t count = static_cast<int32_t>(max(int64_t(0), ch.hi - ch.lo));
#pragma unroll
    for (int m = 0; m < kMT; ++m) {
      int32_t count_hi = 0;  // channels of the chunk in range 1 (R = 1: hi_count has one slot)
#pragma unroll
      for (int i = 0; kR == 2 && i < T::kWords; ++i)
        count_hi += sh.hi_count[kR - 1 ? slot : 0][m][i];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        int32_t code_sum = 0;
#pragma unroll
        for (int i = 0; i < T::kWords; ++i) code_sum += sh.code_sum[slot][m][r][i];
        const int32_t zero = grouped ? sh.unit_zero[slot][m] : sh.zero[m][r];
        const int32_t in_range = kR == 1 ? count : r ? count_hi : count - count_hi;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int32_t q = kR == 1 ? q_sum[c] : r ? q_hi[m][c] : q_sum[c] - q_hi[m][c];
          acc[m][r][c] -= z[c] * code_sum + zero * (q - z[c] * in_range);
        }
      }
    }
    const bool closes = step % plan.chunks == plan.chunks - 1;
    if (closes && ch.g < plan.units) {
      const float s[4] = {__uint_as_float(sc.x), __uint_as_float(sc.y), __uint_as_float(sc.z),
                          __uint_as_float(sc.w)};
#pragma unroll
      for (int m = 0; m < kMT; ++m)
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          float4 p;
          p.x = s[0] * static_cast<float>(acc[m][r][0]);
          p.y = s[1] * static_cast<float>(acc[m][r][1]);
          p.z = s[2] * static_cast<float>(acc[m][r][2]);
          p.w = s[3] * static_cast<float>(acc[m][r][3]);
          *reinterpret_cast<float4*>(&sh.prod[slot][m][r][4 * lane]) = p;
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[m][r][c] = 0;
        }
    }
    if (step + 1 < steps) {
      ch = chunk_of<T>(a, plan, step + 1, slot);
      issue(step + 1);
    }
    __syncthreads();  // products written, codes read

    if (closes) {  // fold the round's groups, ascending
      const int64_t g0 = step / plan.chunks * kWorkers;
      const int groups = static_cast<int>(min(int64_t(kWorkers), plan.units - g0));
#pragma unroll
      for (int k = 0; k < T::kFold; ++k) {
        const int o = tid + k * T::kThreads;
        if (o >= kMT * kCols) break;
        if constexpr (grouped) {  // S[k][0] is Y: one term per activation group (kR == 1)
          const int64_t tm = m0 + o / kCols;
          if (tm < a.M)
            for (int s = 0; s < groups; ++s)
              S[k][0] += scale_term(
                  a, tm, g0 + s, 0.0 + static_cast<double>(sh.prod[s][o / kCols][0][o % kCols]));
        } else {
          for (int s = 0; s < groups; ++s)
#pragma unroll
            for (int r = 0; r < kR; ++r)
              S[k][r] += static_cast<double>(sh.prod[s][o / kCols][r][o % kCols]);
        }
      }
    }
  }

#pragma unroll
  for (int k = 0; k < T::kFold; ++k) {
    const int o = tid + k * T::kThreads;
    const int64_t tm = m0 + o / kCols, col = n0 + o % kCols;
    if (o >= kMT * kCols || tm >= a.M || col >= a.N) continue;
    float y = dev::quiet_nan();
    if (sh.ok[o / kCols])
      y = grouped ? linear_output(a, col, S[k][0])
                      : linear_epilogue(a, tm, col, S[k][0], S[k][kR - 1]);
    store_out(a, tm * a.N + col, y);
  }
}

template <int kMT, int kR, bool kGrouped = false>
void launch_tile(const LinearArgs& a, DecodePlan plan, cudaStream_t stream) {
  constexpr int kChunk = Tile<kMT, kR>::kChunk;
  plan.chunks = (std::min(plan.unit, a.K) + kChunk - 1) / kChunk;
  const int64_t blocks = (a.N + kCols - 1) / kCols * ((a.M + kMT - 1) / kMT);
  const size_t bytes = sizeof(DecodeShared<kMT, kR>);
  if (bytes > 48 * 1024) {  // the default limit of dynamic shared memory
    cudaFuncSetAttribute(spike_linear_decode_kernel<kMT, kR, kGrouped>,
                         cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(Tile<kMT, kR>::kThreads);
  config.dynamicSmemBytes = bytes;
  config.stream = stream;
  cudaLaunchAttribute early = {};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &early;
  config.numAttrs = plan.early ? 1 : 0;
  cudaLaunchKernelEx(&config, spike_linear_decode_kernel<kMT, kR, kGrouped>, a, plan);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool spike_linear_decode_applies(const LinearArgs& a) {
  // c' fits int8: signed codes |s*Q| <= 127 need P <= 7, unsigned ones Q - off need P <= 8.
  return a.bits == 4 && a.backend != Backend::kSpike && a.M <= kMaxTokens &&
         a.group_size > 0 && a.group_size % 32 == 0 && a.group_size <= kMaxGroup &&
         a.P <= (a.sign ? 7 : 8) && a.N < (int64_t(1) << 31);
}

void launch_spike_linear_decode(const LinearArgs& a, cudaStream_t stream) {
  DecodePlan plan;
  // With activation groups the walk and the fold go by activation group (each inside one
  // weight group): D and its product are per activation group, and Y adds one term per group.
  plan.unit = a.group > 0 ? a.group : a.group_size;
  plan.units = a.group > 0 ? a.R : a.G;
  plan.off = !a.sign && a.P == 8 ? 128 : 0;
  plan.zero = a.zero != nullptr || plan.off != 0;
  plan.vec = a.N % 4 == 0 && aligned16(a.qweight);
  // Programmatic dependent launch needs compute capability 9.0 (griddepcontrol); SPIKEOPS_PDL=0
  // turns it off (a.programmatic, docs/ops.md). Without it the launch waits for the previous
  // kernel as always.
  int device = 0, major = 0;
  const bool known = a.programmatic && cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess;
  plan.early = known && major >= 9;
  // Tokens per block: all of them (one read of the weights) up to 16 with one range; R = 2
  // doubles the accumulators, so it takes tiles of at most 4 tokens.
  if (a.group > 0) {  // one range
    if (a.M == 1) launch_tile<1, 1, true>(a, plan, stream);
    else if (a.M == 2) launch_tile<2, 1, true>(a, plan, stream);
    else if (a.M <= 4) launch_tile<4, 1, true>(a, plan, stream);
    else if (a.M <= 8) launch_tile<8, 1, true>(a, plan, stream);
    else launch_tile<16, 1, true>(a, plan, stream);
  } else if (a.R == 1) {
    if (a.M == 1) launch_tile<1, 1>(a, plan, stream);
    else if (a.M == 2) launch_tile<2, 1>(a, plan, stream);
    else if (a.M <= 4) launch_tile<4, 1>(a, plan, stream);
    else if (a.M <= 8) launch_tile<8, 1>(a, plan, stream);
    else launch_tile<16, 1>(a, plan, stream);
  } else {
    if (a.M == 1) launch_tile<1, 2>(a, plan, stream);
    else if (a.M == 2) launch_tile<2, 2>(a, plan, stream);
    else launch_tile<4, 2>(a, plan, stream);
  }
}

}  // namespace spikeops
