// CPU kernels of spike_linear, spike_accumulate and gptq_dequantize.
//
// Both spike_linear backends first turn one token's spikes into lists of terms bucketed by
// (group, range), then sweep output columns in blocks of kBlock whose accumulators stay in
// registers, reading only the weight rows named by the terms:
//   int   : a term is (channel k, code c = s*Q - zero[r]); D[g, r] = sum c * (q - z).
//   spike : a term is a spike (channel k, plane p, sign); per plane, the weight codes of positive
//           spikes are added and those of negative spikes subtracted, then shifted by p. The
//           zero point of unsigned encodings acts as one more always-firing plane of weight
//           -zero[r]. Silent words are skipped while the lists are built.
// Both produce the same integers D[g, r], and share the float epilogue, so their outputs are
// identical bit for bit:
//   y[m, n] = float32( sum_r double(scale[m, r]) * S_r[n] + bias[n] ),
//   S_r[n]  = sum_g double( float32(scales[g, n]) * float32(D[g, r]) )     (g ascending).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

// Hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIKEOPS_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPIKEOPS_MULTIVERSION
#endif

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kBlock = 128;       // output columns per task
constexpr int64_t kTokenChunk = 128;  // tokens whose term lists are built at once

// A token's terms, bucketed: bucket b holds terms [start[b], start[b + 1]).
struct Terms {
  std::vector<int32_t> k;      // channel
  std::vector<int32_t> c;      // int backend: code s*Q - zero[r]
  std::vector<int64_t> csum;   // int backend: sum of c per bucket
  std::vector<int32_t> start;
  int32_t cmax = 0;            // int backend: largest |c|
};

// Words of one token row with the bits of channels >= K cleared, so that no stray bit can name a
// weight row past the end.
inline uint32_t word_at(const uint32_t* row, int64_t w, int64_t W, uint32_t last_mask) {
  return w == W - 1 ? row[w] & last_mask : row[w];
}

// What the term builders read: the spikes and how their channels fall into groups.
struct Layer {
  const uint32_t* planes;  // [P, M, W]
  const uint32_t* sign;    // [M, W] or null
  const uint32_t* hi;      // [M, W] or null
  const int32_t* zero;     // [M, R] or null
  const int32_t* g_idx;    // [K], read only when group_size == 0
  int64_t group_size;      // > 0: group of k = k / group_size
  int64_t P, M, W, R, K, G;
  uint32_t last_mask;

  int64_t group(int64_t k) const {
    return group_size > 0 ? k / group_size : static_cast<int64_t>(g_idx[k]);
  }
};

// Counting sort of (bucket, channel, code) triples into t; emit(f) calls f(bucket, k, c) for
// every term, twice (count pass, fill pass), so it must be deterministic.
template <typename Emit>
void bucket_terms(Terms& t, int64_t buckets, bool with_codes, const Emit& emit) {
  t.start.assign(buckets + 1, 0);
  emit([&](int64_t b, int32_t, int32_t) { ++t.start[b + 1]; });
  for (int64_t b = 0; b < buckets; ++b) t.start[b + 1] += t.start[b];
  const int64_t total = t.start[buckets];
  t.k.resize(total);
  if (with_codes) {
    t.c.resize(total);
    t.csum.assign(buckets, 0);
  }
  std::vector<int32_t> fill(t.start.begin(), t.start.end() - 1);
  t.cmax = 0;
  emit([&](int64_t b, int32_t k, int32_t c) {
    const int32_t i = fill[b]++;
    t.k[i] = k;
    if (with_codes) {
      t.c[i] = c;
      t.csum[b] += c;
      t.cmax = std::max(t.cmax, c < 0 ? -c : c);
    }
  });
}

// int backend: bucket (g, r) holds the nonzero codes of the channels of group g in range r.
void build_code_terms(const Layer& L, int64_t m, Terms& t) {
  bucket_terms(t, L.G * L.R, true, [&](auto&& add) {
    for (int64_t w = 0; w < L.W; ++w) {
      uint32_t q_bits[kMaxPlanes];
      uint32_t any = 0;
      for (int64_t p = 0; p < L.P; ++p) {
        q_bits[p] = word_at(L.planes + (p * L.M + m) * L.W, w, L.W, L.last_mask);
        any |= q_bits[p];
      }
      const uint32_t sgn = L.sign ? L.sign[m * L.W + w] : 0u;
      const uint32_t hib = L.hi ? L.hi[m * L.W + w] : 0u;
      const int64_t k_end = std::min<int64_t>(32 * w + 32, L.K);
      if (!any && !L.zero) continue;  // a silent word adds nothing without a zero point
      for (int64_t k = 32 * w; k < k_end; ++k) {
        const int j = static_cast<int>(k - 32 * w);
        const int32_t q = signed_value(plane_code(q_bits, 1, L.P, j), sgn, j);
        const int r = range_of(hib, j);
        const int32_t c = q - (L.zero ? L.zero[m * L.R + r] : 0);
        if (c != 0) add(L.group(k) * L.R + r, static_cast<int32_t>(k), c);
      }
    }
  });
}

// spike backend: bucket ((g * planes + p) * R + r) * 2 + negative, where plane P is the zero point
// plane (every channel fires once) present only for unsigned encodings.
int64_t spike_planes(const Layer& L, int64_t m) {
  return L.P + ((L.zero && (L.zero[m * L.R] || (L.R == 2 && L.zero[m * L.R + 1]))) ? 1 : 0);
}

void build_spike_terms(const Layer& L, int64_t m, Terms& t) {
  const int64_t planes = spike_planes(L, m);
  bucket_terms(t, L.G * planes * L.R * 2, false, [&](auto&& add) {
    for (int64_t w = 0; w < L.W; ++w) {
      const uint32_t sgn = L.sign ? L.sign[m * L.W + w] : 0u;
      const uint32_t hib = L.hi ? L.hi[m * L.W + w] : 0u;
      for (int64_t p = 0; p < planes; ++p) {
        uint32_t bits = p < L.P ? word_at(L.planes + (p * L.M + m) * L.W, w, L.W, L.last_mask)
                                : L.last_mask | (w == L.W - 1 ? 0u : ~0u);
        while (bits) {  // only the channels that spiked
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          const int64_t k = 32 * w + j;
          const int64_t r = range_of(hib, j);
          const int64_t neg = p < L.P ? (sgn >> j) & 1u : 0;
          add(((L.group(k) * planes + p) * L.R + r) * 2 + neg, static_cast<int32_t>(k), 0);
        }
      }
    }
  });
}

// Accumulators of one block of output columns for one token.
struct BlockAcc {
  int64_t D[kBlock];
  double S[2][kBlock];
};

#define SPIKEOPS_INLINE __attribute__((always_inline)) inline

// 16 int32 lanes as a GCC vector: each multiversioned clone lowers it to its own ISA (one zmm,
// two ymm or four xmm registers); aligned(4) allows unaligned loads from the weight rows.
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
constexpr int64_t kPrefetchTerms = 32;
static_assert(kBlock % kLanes == 0, "a block is a whole number of vectors");

// acc[n] += c * q[k, n0 + n] for a run of terms (k, c); kSign = +1 / -1 adds / subtracts the
// codes of spikes, with no multiply. kCols > 0 (a full block) keeps the accumulators in vector
// registers; kCols = 0 is the scalar path of the last, partial block.
template <int kSign, int64_t kCols>
SPIKEOPS_INLINE void add_rows(int32_t* __restrict acc, const int32_t* __restrict qweight,
                              int64_t N, int64_t n0, int64_t cols, int bits,
                              const int32_t* ks, const int32_t* cs, int64_t count) {
  const int log_per_word = log2_codes_per_word(bits);
  const int per_word_mask = (1 << log_per_word) - 1;
  const uint32_t mask = (1u << bits) - 1u;
  if constexpr (kCols > 0) {
    constexpr int kVecs = kCols / kLanes;
    v16i sum[kVecs];
    for (int j = 0; j < kVecs; ++j) sum[j] = *reinterpret_cast<const v16i*>(acc + kLanes * j);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k = ks[i];
      const int32_t* row = qweight + (k >> log_per_word) * N + n0;
      const int shift = bits * static_cast<int>(k & per_word_mask);
      // The rows of one block lie N words apart, a stride the hardware prefetchers do not
      // follow: fetch the row of a term a few packed rows ahead ourselves.
      if (i + kPrefetchTerms < count) {
        const char* ahead = reinterpret_cast<const char*>(
            qweight + (static_cast<int64_t>(ks[i + kPrefetchTerms]) >> log_per_word) * N + n0);
        for (int64_t line = 0; line < kCols * 4; line += 64) __builtin_prefetch(ahead + line);
      }
      for (int j = 0; j < kVecs; ++j) {
        const v16u w = *reinterpret_cast<const v16u*>(row + kLanes * j);
        const v16i q = reinterpret_cast<v16i>((w >> shift) & mask);
        if constexpr (kSign > 0) sum[j] += q;
        else if constexpr (kSign < 0) sum[j] -= q;
        else sum[j] += cs[i] * q;
      }
    }
    for (int j = 0; j < kVecs; ++j) *reinterpret_cast<v16i*>(acc + kLanes * j) = sum[j];
  } else {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k = ks[i];
      const int32_t* row = qweight + (k >> log_per_word) * N + n0;
      const int shift = bits * static_cast<int>(k & per_word_mask);
      const int32_t c = kSign ? kSign : cs[i];
      for (int64_t n = 0; n < cols; ++n) acc[n] += c * gptq_field(row[n], shift, mask);
    }
  }
}

// One spike_linear call: its spikes as term sources, and its weights.
struct Job {
  Layer L;
  const int32_t* qweight;  // [ceil(K*bits/32), N]
  const int32_t* zeros;    // true weight zero points z, [G, N]
  const float* scales;     // [G, N]
  int64_t N;
  int bits;
};

// D[g, r] of one block into S_r (the epilogue's per-range sums).
SPIKEOPS_INLINE void fold_group(const Job& a, BlockAcc& acc, int64_t g, int64_t r,
                                int64_t n0, int64_t cols) {
  const float* sc = a.scales + g * a.N + n0;
  for (int64_t n = 0; n < cols; ++n)
    acc.S[r][n] += static_cast<double>(sc[n] * static_cast<float>(acc.D[n]));
}

template <int64_t kCols>
SPIKEOPS_INLINE void int_block_cols(const Job& a, const Terms& t, int64_t n0,
                                    int64_t cols_arg, BlockAcc& acc) {
  const int64_t cols = kCols ? kCols : cols_arg;
  const int32_t maxq = (1 << a.bits) - 1;
  // Terms per int32 partial sum: |c * q| summed that many times stays below 2^31.
  const int64_t run = std::max<int64_t>(1, INT32_MAX / (static_cast<int64_t>(t.cmax) * maxq + 1));
  int32_t part[kBlock];
  for (int64_t g = 0; g < a.L.G; ++g) {
    const int32_t* z = a.zeros + g * a.N + n0;
    for (int64_t r = 0; r < a.L.R; ++r) {
      const int64_t b = g * a.L.R + r, lo = t.start[b], hi = t.start[b + 1];
      if (lo == hi) continue;
      std::fill(acc.D, acc.D + cols, 0);
      for (int64_t i = lo; i < hi; i += run) {
        std::fill(part, part + cols, 0);
        add_rows<0, kCols>(part, a.qweight, a.N, n0, cols, a.bits, &t.k[i], &t.c[i],
                    std::min(run, hi - i));
        for (int64_t n = 0; n < cols; ++n) acc.D[n] += part[n];
      }
      for (int64_t n = 0; n < cols; ++n) acc.D[n] -= static_cast<int64_t>(z[n]) * t.csum[b];
      fold_group(a, acc, g, r, n0, cols);
    }
  }
}

template <int64_t kCols>
SPIKEOPS_INLINE void spike_block_cols(const Job& a, const Terms& t, int64_t m, int64_t n0,
                                      int64_t cols_arg, BlockAcc& acc) {
  const int64_t cols = kCols ? kCols : cols_arg;
  const int64_t planes = spike_planes(a.L, m);
  int32_t part[kBlock];
  for (int64_t g = 0; g < a.L.G; ++g) {
    const int32_t* z = a.zeros + g * a.N + n0;
    for (int64_t r = 0; r < a.L.R; ++r) {
      bool any = false;
      for (int64_t p = 0; p < planes; ++p) {
        const int64_t b = ((g * planes + p) * a.L.R + r) * 2;
        const int32_t* s = t.start.data() + b;
        const int64_t npos = s[1] - s[0], nneg = s[2] - s[1];
        if (npos + nneg == 0) continue;
        if (!any) std::fill(acc.D, acc.D + cols, 0), any = true;
        std::fill(part, part + cols, 0);
        add_rows<1, kCols>(part, a.qweight, a.N, n0, cols, a.bits, &t.k[s[0]], nullptr, npos);
        add_rows<-1, kCols>(part, a.qweight, a.N, n0, cols, a.bits, &t.k[s[1]], nullptr, nneg);
        // Plane p weighs 2^p; the zero-point plane weighs -zero[r]. Each spike also carried the
        // weight zero point z, removed here once per plane: sum s*(q - z) = part - z * count.
        const int64_t weight = p < a.L.P ? (int64_t(1) << p) : -a.L.zero[m * a.L.R + r];
        const int64_t count = npos - nneg;
        for (int64_t n = 0; n < cols; ++n)
          acc.D[n] += weight * (static_cast<int64_t>(part[n]) - z[n] * count);
      }
      if (any) fold_group(a, acc, g, r, n0, cols);
    }
  }
}

SPIKEOPS_MULTIVERSION
void int_block(const Job& a, const Terms& t, int64_t n0, int64_t cols, BlockAcc& acc) {
  cols == kBlock ? int_block_cols<kBlock>(a, t, n0, cols, acc) : int_block_cols<0>(a, t, n0, cols, acc);
}

SPIKEOPS_MULTIVERSION
void spike_block(const Job& a, const Terms& t, int64_t m, int64_t n0, int64_t cols,
                 BlockAcc& acc) {
  cols == kBlock ? spike_block_cols<kBlock>(a, t, m, n0, cols, acc)
                 : spike_block_cols<0>(a, t, m, n0, cols, acc);
}

template <typename out_t>
void store_block(const Job& a, const float* scale, const float* bias, int64_t m,
                 int64_t n0, int64_t cols, const BlockAcc& acc, out_t* y) {
  for (int64_t n = 0; n < cols; ++n) {
    double v = static_cast<double>(scale[m * a.L.R]) * acc.S[0][n];
    if (a.L.R == 2) v += static_cast<double>(scale[m * a.L.R + 1]) * acc.S[1][n];
    if (bias) v += static_cast<double>(bias[n0 + n]);
    y[m * a.N + n0 + n] = static_cast<out_t>(static_cast<float>(v));
  }
}

Layer make_layer(const SpikeFields& s, const int32_t* g_idx, int64_t group_size, int64_t K,
                 int64_t G) {
  Layer L;
  L.planes = s.planes;
  L.sign = s.sign;
  L.hi = s.hi;
  L.zero = s.zero;
  L.g_idx = g_idx;
  L.group_size = group_size;
  L.P = s.P, L.M = s.M, L.W = s.W, L.R = s.R, L.K = K, L.G = G;
  L.last_mask = (K % 32) ? ((1u << (K % 32)) - 1u) : ~0u;
  return L;
}

}  // namespace

// auto's measure of sparsity: at most K / kEventShare spikes for the whole call, times M / 4
// beyond four tokens (the dot-product kernels share each weight load among the tokens, the
// spike backend does not); unsigned encodings never qualify (their zero point is a plane in
// which every channel fires). Set from the crossover measured in docs/performance.md, "The CPU
// engine".
constexpr int64_t kEventShare = 64;

bool few_events(const LinearArgs& a) {
  if (a.zero) return false;
  const int64_t limit = a.K / kEventShare * std::max<int64_t>(1, a.M / 4);
  int64_t events = 0;
  for (int64_t i = 0; i < a.P * a.M * a.W && events <= limit; ++i)
    events += popcount32(a.planes[i]);
  return events <= limit;
}

void spike_linear(const LinearArgs& a) {
  // auto: the generic int backend never does more work than the spike backend (each nonzero
  // code is one term, and it has at least one spike). The dot-product kernels on the CPU layout
  // read every weight block that any token needs, so on very sparse inputs the spike backend,
  // which adds only the weight rows of spikes, is faster: auto takes it there.
  bool use_spike = a.backend == Backend::kSpike;
  if (!use_spike) {
    const IntIsa isa = int_layout_isa(a);
    if (isa != IntIsa::kGeneric) {
      use_spike = a.backend == Backend::kAuto && few_events(a);
      if (!use_spike) {
        spike_linear_int_layout(a, isa);
        return;
      }
    }
  }
  Job job;
  job.L = make_layer(a, a.g_idx, a.group_size, a.K, a.G);
  job.qweight = a.qweight;
  job.zeros = a.zeros;
  job.scales = a.scales;
  job.N = a.N;
  job.bits = a.bits;

  const int64_t blocks = (a.N + kBlock - 1) / kBlock;
  std::vector<Terms> terms(std::min(a.M, kTokenChunk));
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    T* y = static_cast<T*>(a.out);
    for (int64_t m0 = 0; m0 < a.M; m0 += kTokenChunk) {
      const int64_t tokens = std::min(kTokenChunk, a.M - m0);
      at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          use_spike ? build_spike_terms(job.L, m0 + i, terms[i])
                    : build_code_terms(job.L, m0 + i, terms[i]);
      });
      at::parallel_for(0, blocks * tokens, 1, [&](int64_t begin, int64_t end) {
        BlockAcc acc;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t i = task % tokens, n0 = (task / tokens) * kBlock;
          const int64_t cols = std::min(kBlock, a.N - n0);
          for (int r = 0; r < 2; ++r) std::fill(acc.S[r], acc.S[r] + cols, 0.0);
          if (use_spike) {
            spike_block(job, terms[i], m0 + i, n0, cols, acc);
          } else {
            int_block(job, terms[i], n0, cols, acc);
          }
          store_block(job, a.scale, a.bias, m0 + i, n0, cols, acc, y);
        }
      });
    }
  });
}

void spike_accumulate(const AccumulateArgs& a) {
  // One group holds every channel; no zero point: acc counts s * Q only (docs/ops.md).
  SpikeFields bits_only = a;
  bits_only.zero = nullptr;
  const Layer L = make_layer(bits_only, nullptr, a.K, a.K, 1);
  const int64_t N = a.N;
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    Terms t;
    std::vector<int32_t> part(N);
    for (int64_t m = begin; m < end; ++m) {
      build_spike_terms(L, m, t);
      for (int64_t p = 0; p < a.P; ++p) {
        for (int64_t r = 0; r < a.R; ++r) {
          const int32_t* st = t.start.data() + (p * a.R + r) * 2;
          std::fill(part.begin(), part.end(), 0);
          for (int32_t i = st[0]; i < st[2]; ++i) {  // |sum| <= K * 128 < 2^31
            const int8_t* row = a.w + static_cast<int64_t>(t.k[i]) * N;
            if (i < st[1]) {
              for (int64_t n = 0; n < N; ++n) part[n] += row[n];
            } else {
              for (int64_t n = 0; n < N; ++n) part[n] -= row[n];
            }
          }
          int64_t* dst = a.out + ((a.per_plane ? p * a.R + r : r) * a.M + m) * N;
          const int shift = a.per_plane ? 0 : static_cast<int>(p);
          for (int64_t n = 0; n < N; ++n) dst[n] += static_cast<int64_t>(part[n]) << shift;
        }
      }
    }
  });
}

void gptq_dequantize(const DequantizeArgs& a) {
  c10::Half* o = static_cast<c10::Half*>(a.out);
  // Tiles of kCols output rows walked k-major: each qweight row segment is read contiguously
  // (walking one n over all k would stride N words per load), and the tile's kCols output rows
  // stay in cache while they fill.
  constexpr int64_t kCols = 64;
  at::parallel_for(0, (a.N + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kCols, n1 = std::min(a.N, n0 + kCols);
      for (int64_t k = 0; k < a.K; ++k) {
        const int64_t g = group_of(a, k);
        for (int64_t n = n0; n < n1; ++n) {
          const int32_t q = gptq_code(a.qweight, a.N, k, n, a.bits);
          const int32_t z = a.zeros[g * a.N + n];
          const float v = a.scales[g * a.N + n] * static_cast<float>(q - z);
          o[n * a.K + k] = static_cast<c10::Half>(v);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace spikeops
