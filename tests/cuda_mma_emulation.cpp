// Host emulation of the tensor-core prefill kernel of spike_linear (csrc/cuda/linear_mma.cu), built
// by tests/test_cuda_mma_layout.py with g++. Every index comes from csrc/cuda/mma_layout.h, the
// header the kernel uses; what the hardware does with those indices (cp.async, ldmatrix,
// mma.sync m16n8k32 .s8, dp4a, shuffles) is written here independently from the PTX ISA
// ("Matrix Fragments for mma.m16n8k32" with .s8 operands, "ldmatrix"), so that a wrong map in
// the header gives wrong outputs here.
//
//   cuda_mma_emulation maps          prints the maps (one "name i j k value" per line)
//   cuda_mma_emulation run IN OUT    reads a case, writes y (float32 [M, N]) and D (int64
//                                    [G, M, N], the group sums as the kernel forms them)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/mma_layout.h"

using namespace spikeops;
using namespace spikeops::mma;

#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "check failed: %s (line %d)\n", #cond, __LINE__); \
      std::exit(3);                                                        \
    }                                                                      \
  } while (0)

// ---------------------------------------------------------------------------------------------
// The PTX ISA's fragment layouts of mma.m16n8k32 with .s8 operands (groupID = lane >> 2,
// threadID_in_group = lane % 4). Element i of a fragment is byte i % 4 of register i / 4.
struct RowCol {
  int row, col;
};
RowCol ptx_a(int lane, int i) {  // a0..a15, A is 16 x 32
  const int g = lane >> 2, t = lane % 4;
  const int row = (i < 4 || (i >= 8 && i < 12)) ? g : g + 8;
  const int col = i < 8 ? t * 4 + (i & 3) : t * 4 + (i & 3) + 16;
  return {row, col};
}
RowCol ptx_b(int lane, int i) {  // b0..b7, B is 32 x 8
  const int g = lane >> 2, t = lane % 4;
  return {i < 4 ? t * 4 + (i & 3) : t * 4 + (i & 3) + 16, g};
}
RowCol ptx_c(int lane, int i) {  // c0..c3, C is 16 x 8
  const int g = lane >> 2, t = lane % 4;
  return {i < 2 ? g : g + 8, t * 2 + (i & 1)};
}

int8_t byte_of(uint32_t reg, int i) { return static_cast<int8_t>((reg >> (8 * i)) & 0xffu); }

// One mma.sync.m16n8k32.row.col.s32.s8.s8.s32 of a warp: acc[lane][0..3] += A * B.
void mma_warp(const uint32_t A[32][4], const uint32_t B[32][2], int32_t acc[32][4]) {
  int a[16][32], b[32][8];
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 16; ++i) {
      const RowCol rc = ptx_a(lane, i);
      a[rc.row][rc.col] = byte_of(A[lane][i / 4], i % 4);
    }
    for (int i = 0; i < 8; ++i) {
      const RowCol rc = ptx_b(lane, i);
      b[rc.row][rc.col] = byte_of(B[lane][i / 4], i % 4);
    }
  }
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const RowCol rc = ptx_c(lane, i);
      int64_t sum = acc[lane][i];
      for (int k = 0; k < 32; ++k) sum += a[rc.row][k] * b[k][rc.col];
      CHECK(sum >= INT32_MIN && sum <= INT32_MAX);  // the int32 accumulator never wraps
      acc[lane][i] = static_cast<int32_t>(sum);
    }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j .. 8j + 7 give the row addresses of matrix
// j (16 bytes each); lane l receives in register j the 4 bytes 4 * (l % 4) .. of row l / 4.
void ldmatrix_x4(const uint8_t* smem, int size, const int addr[32], uint32_t out[32][4]) {
  for (int lane = 0; lane < 32; ++lane) CHECK(addr[lane] % 16 == 0 && addr[lane] + 16 <= size);
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j)
      std::memcpy(&out[lane][j], smem + addr[8 * j + lane / 4] + 4 * (lane % 4), 4);
}

int32_t dp4a_s8(uint32_t a, uint32_t b, int32_t c) {
  for (int i = 0; i < 4; ++i) c += byte_of(a, i) * byte_of(b, i);
  return c;
}

// ---------------------------------------------------------------------------------------------
void print_maps() {
  for (int wm = 0; wm < kWarpsM; ++wm)
    for (int i = 0; i < kTilesM; ++i)
      for (int lane = 0; lane < 32; ++lane)
        std::printf("ldmatrix %d %d %d %d\n", wm, i, lane, a_ldmatrix_offset(wm, i, lane));
  for (int tid = 0; tid < kThreads; ++tid)
    for (int half = 0; half < 2; ++half) {
      const CodeBuild cb = code_build(tid);
      const int at = code_offset(cb.token, code_position(cb, half));
      std::printf("code_store %d %d %d\n", tid, half, at);
    }
  for (int bits : {2, 4})
    for (int wn = 0; wn < kWarpsN; ++wn)
      for (int j = 0; j < kTilesN; ++j)
        for (int reg = 0; reg < 2; ++reg)
          for (int lane = 0; lane < 32; ++lane)
            std::printf("weight_load%d %d %d %d %d\n", bits, wn, j, reg * 32 + lane,
                        weight_offset(weight_load(bits, wn, j, lane, reg)));
  for (int P = 1; P <= kMaxP; ++P)
    for (int sign = 0; sign < 2; ++sign)
      for (int u = 0; u < spike_units(P, sign); ++u) {
        const SpikeCopy c = spike_copy(u);
        std::printf("spike_copy %d %d %d %d\n", P, sign, u, c.row * kBlockM + c.token);
      }
  for (int bits : {2, 4})
    for (int u = 0; u < weight_units(bits); ++u) {
      const WeightCopy c = weight_copy(u, bits);
      std::printf("weight_copy %d %d %d\n", bits, u, (c.kind * 8 + c.row) * 1000 + c.col);
    }
}

// ---------------------------------------------------------------------------------------------
struct Case {
  int64_t M, N, K, W, P, bits, gs, G;
  bool has_sign, has_zero, has_bias;
  std::vector<uint32_t> planes, sign;
  std::vector<float> scale, scales, bias;
  std::vector<int32_t> zero, qweight, zeros;
};

template <typename V>
void read_into(FILE* f, V& v, size_t n) {
  v.resize(n);
  if (n) CHECK(std::fread(v.data(), sizeof(v[0]), n, f) == n);
}

Case read_case(const char* path) {
  FILE* f = std::fopen(path, "rb");
  CHECK(f);
  int64_t h[11];
  CHECK(std::fread(h, sizeof(int64_t), 11, f) == 11);
  Case c{h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8] != 0, h[9] != 0, h[10] != 0,
         {}, {}, {}, {}, {}, {}, {}, {}};
  read_into(f, c.planes, c.P * c.M * c.W);
  read_into(f, c.sign, c.has_sign ? c.M * c.W : 0);
  read_into(f, c.scale, c.M);
  read_into(f, c.zero, c.has_zero ? c.M : 0);
  read_into(f, c.qweight, (c.K * c.bits + 31) / 32 * c.N);
  read_into(f, c.zeros, c.G * c.N);
  read_into(f, c.scales, c.G * c.N);
  read_into(f, c.bias, c.has_bias ? c.N : 0);
  std::fclose(f);
  return c;
}

// The kernel's block loop (linear_mma.cu) on one thread, every "thread" and "lane" of the block
// in turn, step by step between the kernel's barriers.
void run(const Case& c, std::vector<float>& y, std::vector<int64_t>& D) {
  const int64_t M = c.M, N = c.N, K = c.K, P = c.P;
  const int bits = static_cast<int>(c.bits);
  const int32_t off = !c.has_sign && P == 8 ? 128 : 0;
  const uint32_t flip = off ? 0x80808080u : 0u;
  const bool with_zero = c.has_zero || off != 0;
  const int64_t q_rows = (K * bits + 31) / 32;
  const int64_t tiles = block_count(M, N);
  y.assign(M * N, 0.f);
  D.assign(c.G * M * N, 0);
  std::vector<int> out_written(M * N, 0);
  static Shared sh;

  for (int64_t block = 0; block < tiles; ++block) {
    const BlockTile bt = block_tile(block, M);
    for (int tid = 0; tid < kBlockM; ++tid) {
      const int64_t m = bt.m0 + tid;
      const int32_t z = m < M && c.has_zero ? c.zero[m] : 0;
      const bool ok = m < M && zero_in_range(z);
      sh.ok[tid] = ok;
      sh.zero[tid] = ok ? z - off : 0;
    }
    static int32_t acc[kWarps][kTilesM][kTilesN][32][4];
    static int32_t colsum[kWarps][kTilesN][32];
    static double S[kWarps][kTilesM][kTilesN][32][4];
    std::memset(acc, 0, sizeof(acc));
    std::memset(colsum, 0, sizeof(colsum));
    std::memset(S, 0, sizeof(S));

    for (int64_t t = 0; t < c.W; ++t) {
      // cp.async of k-tile t into its slot: poison first, so that a word no copy writes is
      // caught by the comparison; every destination written exactly once.
      Stage& s = sh.stage[t % kStages];
      std::memset(&s, 0xa5, sizeof(s));
      std::vector<int> hits(sizeof(Stage) / 4, 0);
      auto put = [&](void* dst, const void* src, int bytes, bool valid) {
        const size_t at = (static_cast<uint8_t*>(dst) - reinterpret_cast<uint8_t*>(&s));
        CHECK(at % bytes == 0 && at + bytes <= sizeof(Stage));
        for (int i = 0; i < bytes / 4; ++i) CHECK(++hits[at / 4 + i] == 1);
        if (valid) {
          std::memcpy(dst, src, bytes);
        } else {
          std::memset(dst, 0, bytes);
        }
      };
      for (int tid = 0; tid < kThreads; ++tid) {
        for (int u = tid; u < spike_units(P, c.has_sign); u += kThreads) {
          const SpikeCopy sc = spike_copy(u);
          const int64_t m = bt.m0 + sc.token;
          const bool valid = m < M;
          const uint32_t* base = sc.row < P ? c.planes.data() : c.sign.data();
          const int64_t i = valid ? spike_source(sc, P, M, c.W, m, t) : 0;
          CHECK(!valid || i < (sc.row < P ? P * M * c.W : M * c.W));
          put(&s.spikes[sc.row][sc.token], base + i, 4, valid);
        }
        const int64_t g = 32 * t / c.gs;
        for (int u = tid; u < weight_units(bits); u += kThreads) {
          const WeightCopy wc = weight_copy(u, bits);
          const int64_t n = bt.n0 + wc.col, r = t * bits + wc.row;
          bool valid = n < N;
          const void* src = nullptr;
          void* dst;
          if (wc.kind == 0) {
            valid = valid && r < q_rows;
            if (valid) src = &c.qweight[r * N + n];
            dst = &s.weights[wc.row][wc.col];
          } else if (wc.kind == 1) {
            if (valid) src = &c.zeros[g * N + n];
            dst = &s.zeros[wc.col];
          } else {
            if (valid) src = &c.scales[g * N + n];
            dst = &s.scales[wc.col];
          }
          CHECK(!valid || n + 4 <= N);
          put(dst, src, 16, valid);
        }
      }

      // Codes (after the first barrier): every byte of the code buffer written once.
      std::memset(sh.codes, 0x5a, sizeof(sh.codes));
      std::vector<int> code_hits(sizeof(sh.codes), 0);
      for (int tid = 0; tid < kThreads; ++tid) {
        const CodeBuild cb = code_build(tid);
        uint32_t plane[kMaxP];
        for (int p = 0; p < kMaxP; ++p) plane[p] = p < P ? s.spikes[p][cb.token] : 0u;
        const uint32_t sign = c.has_sign ? s.spikes[P][cb.token] : 0u;
        const uint32_t keep = word_channels(t, K);
        for (int half = 0; half < 2; ++half) {
          const int pos = code_position(cb, half);
          const uint32_t v =
              code_bytes(plane, sign, keep, flip, k_channel(bits, pos), k_stride(bits));
          const int at = code_offset(cb.token, pos);
          CHECK(at % 4 == 0 && at + 4 <= static_cast<int>(sizeof(sh.codes)));
          for (int i = 0; i < 4; ++i) CHECK(++code_hits[at + i] == 1);
          std::memcpy(sh.codes + at, &v, 4);
        }
      }

      // Tensor cores (after the second barrier), warp by warp.
      const int valid = static_cast<int>(K - 32 * t < 32 ? K - 32 * t : 32);
      const bool last = t == c.W - 1 || 32 * (t + 1) % c.gs == 0;
      for (int warp = 0; warp < kWarps; ++warp) {
        const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
        uint32_t A[kTilesM][32][4];
        for (int i = 0; i < kTilesM; ++i) {
          int addr[32];
          for (int lane = 0; lane < 32; ++lane) addr[lane] = a_ldmatrix_offset(warp_m, i, lane);
          ldmatrix_x4(sh.codes, sizeof(sh.codes), addr, A[i]);
        }
        for (int j = 0; j < kTilesN; ++j) {
          uint32_t B[32][2];
          for (int lane = 0; lane < 32; ++lane)
            for (int reg = 0; reg < 2; ++reg) {
              const WeightLoad l = weight_load(bits, warp_n, j, lane, reg);
              const int at = weight_offset(l);
              CHECK(at >= 0 && at < kMaxRows * kRowStride && l.row < bits);
              const uint32_t keep = valid == 32 ? 0xffffffffu : weight_keep(bits, lane, reg, valid);
              const uint32_t word = (&s.weights[0][0])[at];
              B[lane][reg] = weight_bytes(word, bits, l.shift, s.zeros[l.col], keep);
              int32_t& cs = colsum[warp][j][lane];
              if (with_zero) cs = dp4a_s8(B[lane][reg], 0x01010101u, cs);
            }
          for (int i = 0; i < kTilesM; ++i) mma_warp(A[i], B, acc[warp][i][j]);
        }
        if (!last) continue;
        const int64_t g = 32 * t / c.gs;
        for (int j = 0; j < kTilesN; ++j) {
          int32_t* cs = colsum[warp][j];
          if (with_zero)
            for (int mask : {1, 2}) {  // __shfl_xor_sync: all lanes read, then all write
              int32_t next[32];
              for (int lane = 0; lane < 32; ++lane) next[lane] = cs[lane] + cs[lane ^ mask];
              std::memcpy(cs, next, sizeof(next));
            }
          for (int lane = 0; lane < 32; ++lane) {
            const int32_t col_sum[2] = {with_zero ? cs[colsum_lane(lane, 0)] : 0,
                                        with_zero ? cs[colsum_lane(lane, 1)] : 0};
            for (int i = 0; i < kTilesM; ++i)
              for (int e = 0; e < 4; ++e) {
                const int token = c_token(warp_m, i, lane, e), col = c_col(warp_n, j, lane, e);
                const int32_t zero = with_zero ? sh.zero[token] : 0;
                int32_t& a = acc[warp][i][j][lane][e];
                fold_group(S[warp][i][j][lane][e], a, zero, col_sum[e & 1], s.scales[col]);
                const int64_t m = bt.m0 + token, n = bt.n0 + col;
                if (m < M && n < N)
                  D[(g * M + m) * N + n] =
                      static_cast<int64_t>(a) - static_cast<int64_t>(zero) * col_sum[e & 1];
                a = 0;
              }
          }
          // after the shuffles every lane resets its own partial sum
          for (int lane = 0; lane < 32; ++lane) cs[lane] = 0;
        }
      }
    }

    for (int warp = 0; warp < kWarps; ++warp) {
      const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
      for (int i = 0; i < kTilesM; ++i)
        for (int j = 0; j < kTilesN; ++j)
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              const int token = c_token(warp_m, i, lane, e);
              const int64_t m = bt.m0 + token, n = bt.n0 + c_col(warp_n, j, lane, e);
              if (m >= M || n >= N) continue;
              float v = __builtin_nanf("");
              if (sh.ok[token]) {
                double d = static_cast<double>(c.scale[m]) * S[warp][i][j][lane][e];
                if (c.has_bias) d += static_cast<double>(c.bias[n]);
                v = static_cast<float>(d);
              }
              CHECK(++out_written[m * N + n] == 1);
              y[m * N + n] = v;
            }
    }
  }
  for (int v : out_written) CHECK(v == 1);
}

int main(int argc, char** argv) {
  if (argc == 2 && !std::strcmp(argv[1], "maps")) {
    print_maps();
    return 0;
  }
  CHECK(argc == 4 && !std::strcmp(argv[1], "run"));
  const Case c = read_case(argv[2]);
  std::vector<float> y;
  std::vector<int64_t> D;
  run(c, y, D);
  FILE* f = std::fopen(argv[3], "wb");
  CHECK(f);
  CHECK(std::fwrite(y.data(), sizeof(float), y.size(), f) == y.size());
  CHECK(std::fwrite(D.data(), sizeof(int64_t), D.size(), f) == D.size());
  std::fclose(f);
  return 0;
}
