// The arithmetic of spike_matmul (docs/ops.md), shared by the CPU kernel (cpu/matmul.cpp) and
// the CUDA kernel (csrc/cuda/matmul.cu) so that both compute the same integers and the same rounding
// by construction. Plain C++ with SPIKE_HD: compiles with nvcc and with the host compiler.
#pragma once

#include <cstdint>

#include "kernel_args.h"

namespace spikeops {

// K of spike_matmul: |c_a c_b| < 2^34 (|s*Q - zero| <= 2^16 - 1 + kZeroLimit < 2^17) times
// K <= 2^16 channels keeps every range-pair sum D below 2^50, exact in int64 and in float64.
constexpr int64_t kMatmulMaxK = int64_t(1) << 16;

// Bits of word w that name channels k < K.
SPIKE_HD uint32_t matmul_valid_bits(int64_t w, int64_t K) {
  const int64_t left = K - 32 * w;
  return left >= 32 ? 0xffffffffu : (1u << left) - 1u;
}

// Bits of a word in range r of an operand with R ranges (hi word h).
SPIKE_HD uint32_t matmul_range_bits(int R, int r, uint32_t h) {
  return R == 1 ? 0xffffffffu : (r ? h : ~h);
}

// sum over the channels of mask m of s * Q, from the plane words of one token and word.
SPIKE_HD int64_t matmul_signed_sum(const uint32_t* words, int64_t P, uint32_t sign, uint32_t m) {
  int64_t s = 0;
  for (int64_t p = 0; p < P; ++p) {
    const uint32_t x = words[p] & m;
    s += static_cast<int64_t>(popcount32(x) - 2 * popcount32(x & sign)) * (int64_t(1) << p);
  }
  return s;
}

// The exact range-pair sums D[2 * ra + rb] += sum over channels k with range ra in A and rb in
// B of (s_a Q_a - za[ra]) (s_b Q_b - zb[rb]) for token row ia of A and row ib of B:
//   sum_{p, p'} 2^(p+p') (popc(A_p & B_p' & ~neg) - popc(A_p & B_p' & neg))   neg = sign_a ^ sign_b
//   - zb * sum s_a Q_a - za * sum s_b Q_b + za zb * (channels in the range pair)
// (a bit set in both planes has Q > 0 on both sides, so its sign bits are meaningful).
SPIKE_HD void matmul_row_pair(const MatmulArgs& g, int64_t ia, int64_t ib, int64_t D[4]) {
  const SpikeFields& A = g.a;
  const SpikeFields& B = g.b;
  uint32_t aw[kMaxPlanes], bw[kMaxPlanes];
  const int64_t W = A.W;
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t p = 0; p < A.P; ++p) aw[p] = load_word(A.planes + (p * A.M + ia) * W + w);
    for (int64_t p = 0; p < B.P; ++p) bw[p] = load_word(B.planes + (p * B.M + ib) * W + w);
    const uint32_t sa = A.sign ? load_word(A.sign + ia * W + w) : 0u;
    const uint32_t sb = B.sign ? load_word(B.sign + ib * W + w) : 0u;
    const uint32_t ha = A.hi ? load_word(A.hi + ia * W + w) : 0u;
    const uint32_t hb = B.hi ? load_word(B.hi + ib * W + w) : 0u;
    const uint32_t valid = matmul_valid_bits(w, g.K), neg = sa ^ sb;
    for (int ra = 0; ra < A.R; ++ra) {
      const uint32_t ma = matmul_range_bits(static_cast<int>(A.R), ra, ha) & valid;
      for (int rb = 0; rb < B.R; ++rb) {
        const uint32_t m = ma & matmul_range_bits(static_cast<int>(B.R), rb, hb);
        if (!m) continue;
        int64_t d = 0;
        for (int64_t pa = 0; pa < A.P; ++pa) {
          const uint32_t x = aw[pa] & m;
          if (!x) continue;
          int32_t part = 0;  // this plane of A against every plane of B: < 2^21 in magnitude
          for (int64_t pb = 0; pb < B.P; ++pb) {
            const uint32_t y = x & bw[pb];
            part += (popcount32(y) - 2 * popcount32(y & neg)) * (1 << pb);
          }
          d += static_cast<int64_t>(part) * (int64_t(1) << pa);
        }
        const int64_t za = A.zero ? A.zero[ia * A.R + ra] : 0;
        const int64_t zb = B.zero ? B.zero[ib * B.R + rb] : 0;
        if (zb) d -= zb * matmul_signed_sum(aw, A.P, sa, m);
        if (za) d -= za * matmul_signed_sum(bw, B.P, sb, m);
        if (za && zb) d += za * zb * popcount32(m);
        D[2 * ra + rb] += d;
      }
    }
  }
}

// The one rounding of spike_matmul: the range pairs in the order (0,0), (0,1), (1,0), (1,1),
// each float64(scale_a) * float64(scale_b) (exact) * float64(D) (one rounding), summed in
// float64, then rounded to float32 (the caller casts to out_dtype).
SPIKE_HD float matmul_epilogue(const MatmulArgs& g, int64_t ia, int64_t ib, const int64_t D[4]) {
  double acc = 0.0;
  for (int ra = 0; ra < g.a.R; ++ra)
    for (int rb = 0; rb < g.b.R; ++rb) {
      const double s = static_cast<double>(g.a.scale[ia * g.a.R + ra]) *
                       static_cast<double>(g.b.scale[ib * g.b.R + rb]);
      acc += s * static_cast<double>(D[2 * ra + rb]);
    }
  return static_cast<float>(acc);
}

// Row of B read by output (batch n, head h, key j), and whether key j is masked for query i.
SPIKE_HD int64_t matmul_b_row(const MatmulArgs& g, int64_t n, int64_t h, int64_t j) {
  return (n * g.kv_heads + h / (g.heads / g.kv_heads)) * g.Lb + j;
}
SPIKE_HD bool matmul_masked(const MatmulArgs& g, int64_t i, int64_t j) {
  return g.causal && j > g.N - g.Ma + i;
}

// channel_major_write (docs/ops.md): word w of channel-major row `row` = (g, k) of plane p (P:
// the sign) after the write, w in [start / 32, ceil((start + T) / 32)): the bits of tokens before
// start kept, token j in [start, start + T) bit k of token row (g, j - start), later tokens 0. A
// sign bit is written where the channel has a plane bit (a code 0 has no sign).
SPIKE_HD uint32_t channel_major_word(const ChannelMajorArgs& a, int64_t p, int64_t row,
                                     int64_t w) {
  const int64_t g = row / a.K, k = row % a.K, first = 32 * w;
  const int64_t kept = a.start - first;  // tokens of the word before start: [0, 32) or none
  uint32_t word = kept > 0 ? a.out[(p * a.G * a.K + row) * a.words + w] & ((1u << kept) - 1u)
                           : 0u;
  const int64_t j0 = first > a.start ? first : a.start;
  const int64_t j1 = first + 32 < a.start + a.T ? first + 32 : a.start + a.T;
  const int64_t plane_stride = a.G * a.T * a.Wt;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t at = (g * a.T + j - a.start) * a.Wt + k / 32;  // token row's word of channel k
    uint32_t bits = p < a.P ? a.planes[p * plane_stride + at] : 0u;
    if (p == a.P) {
      for (int64_t q = 0; q < a.P; ++q) bits |= a.planes[q * plane_stride + at];
      bits &= a.sign[at];
    }
    word |= ((bits >> (k % 32)) & 1u) << (j - first);
  }
  return word;
}

}  // namespace spikeops

