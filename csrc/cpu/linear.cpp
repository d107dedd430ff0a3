// CPU kernels of spike_linear, spike_accumulate and gptq_dequantize.
//
// Both spike_linear backends first turn one token's spikes into lists of terms bucketed by
// unit: (weight group, range), or the activation group (which lies in one weight group), then
// sweep output columns in blocks of kBlock whose accumulators stay in
// registers, reading only the weight rows named by the terms:
//   int   : a term is (channel k, code c = s*Q - zero[r]); D[g, r] = sum c * (q - z).
//   spike : a term is a spike (channel k, plane p, sign); per plane, the weight codes of positive
//           spikes are added and those of negative spikes subtracted, then shifted by p. The
//           zero point of unsigned encodings acts as one more always-firing plane of weight
//           -zero[r]. Silent words are skipped while the lists are built.
// Both produce the same integers D[g, r], and share the float epilogue, so their outputs are
// identical bit for bit (r: the scale column, a range or an activation group):
//   y[m, n] = float32( sum_r double(scale[m, r]) * S_r[n] + bias[n] ),
//   S_r[n]  = sum_g double( float32(scales[g, n]) * float32(D[g, r]) )     (g ascending).
// With activation groups S_r has one term, and the r-th term of the sum over r is added as soon
// as it is known (into S[0], which then holds that sum).
#include <ATen/Parallel.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "cpu/kernels.h"

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

// The bits of the last spike word that name channels < K.
inline uint32_t last_word_mask(int64_t K) { return (K % 32) ? ((1u << (K % 32)) - 1u) : ~0u; }

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

// The units terms are bucketed by: with activation groups the scale columns (each in one weight
// group), else the pairs (weight group g, range r) as unit g * R + r.
int64_t units(const SpikeFields& sp, const WeightFields& w) { return sp.group ? sp.R : w.G * sp.R; }

inline int64_t unit_of(const SpikeFields& sp, const WeightFields& w, int64_t k, int64_t r) {
  return sp.group ? r : group_of(w, k) * sp.R + r;
}

// int backend: bucket `unit` holds the nonzero codes of its channels.
void build_code_terms(const SpikeFields& sp, const WeightFields& weights, int64_t m, Terms& t) {
  const uint32_t last_mask = last_word_mask(weights.K);
  bucket_terms(t, units(sp, weights), true, [&](auto&& add) {
    for (int64_t w = 0; w < sp.W; ++w) {
      uint32_t q_bits[kMaxPlanes];
      uint32_t any = 0;
      for (int64_t p = 0; p < sp.P; ++p) {
        q_bits[p] = word_at(sp.planes + (p * sp.M + m) * sp.W, w, sp.W, last_mask);
        any |= q_bits[p];
      }
      const uint32_t sgn = sp.sign ? sp.sign[m * sp.W + w] : 0u;
      const uint32_t hib = sp.hi ? sp.hi[m * sp.W + w] : 0u;
      const int64_t k_end = std::min<int64_t>(32 * w + 32, weights.K);
      if (!any && !sp.zero) continue;  // a silent word adds nothing without a zero point
      for (int64_t k = 32 * w; k < k_end; ++k) {
        const int j = static_cast<int>(k - 32 * w);
        const int32_t q = signed_value(plane_code(q_bits, 1, sp.P, j), sgn, j);
        const int64_t r = scale_column(sp, w, hib, j);
        const int32_t c = q - (sp.zero ? sp.zero[m * sp.R + r] : 0);
        if (c != 0) add(unit_of(sp, weights, k, r), static_cast<int32_t>(k), c);
      }
    }
  });
}

// spike backend: bucket (unit * planes + p) * 2 + negative, where plane P is the zero point
// plane (every channel fires once) present only for unsigned encodings with a zero point.
int64_t spike_planes(const SpikeFields& sp, int64_t m) {
  bool any_zero = false;
  for (int64_t r = 0; sp.zero && r < sp.R; ++r) any_zero = any_zero || sp.zero[m * sp.R + r];
  return sp.P + (any_zero ? 1 : 0);
}

inline int64_t spike_bucket(int64_t unit, int64_t planes, int64_t p) {
  return (unit * planes + p) * 2;
}

void build_spike_terms(const SpikeFields& sp, const WeightFields& weights, int64_t m, Terms& t) {
  const uint32_t last_mask = last_word_mask(weights.K);
  const int64_t planes = spike_planes(sp, m);
  bucket_terms(t, spike_bucket(units(sp, weights), planes, 0), false, [&](auto&& add) {
    for (int64_t w = 0; w < sp.W; ++w) {
      const uint32_t sgn = sp.sign ? sp.sign[m * sp.W + w] : 0u;
      const uint32_t hib = sp.hi ? sp.hi[m * sp.W + w] : 0u;
      for (int64_t p = 0; p < planes; ++p) {
        uint32_t bits = p < sp.P ? word_at(sp.planes + (p * sp.M + m) * sp.W, w, sp.W, last_mask)
                                : last_mask | (w == sp.W - 1 ? 0u : ~0u);
        while (bits) {  // only the channels that spiked
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          const int64_t k = 32 * w + j;
          const int64_t r = scale_column(sp, w, hib, j);
          const int64_t neg = p < sp.P ? (sgn >> j) & 1u : 0;
          add(spike_bucket(unit_of(sp, weights, k, r), planes, p) + neg, static_cast<int32_t>(k),
              0);
        }
      }
    }
  });
}

#define SPIKEOPS_ALWAYS_INLINE __attribute__((always_inline))
#define SPIKEOPS_INLINE SPIKEOPS_ALWAYS_INLINE inline

// Accumulators of one block of output columns for one token.
struct BlockAcc {
  int64_t D[kBlock];
  double S[2][kBlock];
};

// 16 int32 lanes as a GCC vector: each multiversioned clone lowers it to its own ISA (one zmm,
// two ymm or four xmm registers); aligned(4) allows unaligned loads from the weight rows.
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));
constexpr int kLanes = 16;
constexpr int64_t kPrefetchTerms = 32;
static_assert(kBlock % kLanes == 0, "a block is a whole number of vectors");

// Where the codes of channel k lie for 16 columns c..c+15 (c a multiple of 16): 16 dwords, one
// per column, the code at bit shift(k), mask bits wide. GPTQ's qweight holds them in row
// k / (32 / bits); the CPU layout in its 64-byte row [c / 16, k / 8] (layout_code).
struct QweightRows {
  const int32_t* qweight;
  int64_t N;
  int bits;
  SPIKEOPS_INLINE const uint32_t* lanes(int64_t k, int64_t c) const {
    return reinterpret_cast<const uint32_t*>(qweight + (k >> log2_codes_per_word(bits)) * N + c);
  }
  SPIKEOPS_INLINE int shift(int64_t k) const {
    return bits * static_cast<int>(k & ((1 << log2_codes_per_word(bits)) - 1));
  }
  SPIKEOPS_INLINE uint32_t mask() const { return (1u << bits) - 1u; }
};

struct LayoutRows {
  const uint8_t* packed;
  int64_t KB;
  SPIKEOPS_INLINE const uint32_t* lanes(int64_t k, int64_t c) const {
    return reinterpret_cast<const uint32_t*>(packed + ((c >> 4) * KB + (k >> 3)) * 64);
  }
  SPIKEOPS_INLINE int shift(int64_t k) const {
    return 8 * static_cast<int>(k & 3) + 4 * static_cast<int>((k >> 2) & 1);
  }
  SPIKEOPS_INLINE uint32_t mask() const { return 15u; }
};

// acc[n] += c * q[k, n0 + n] for a run of terms (k, c); kSign = +1 / -1 adds / subtracts the
// codes of spikes, with no multiply. kCols > 0 (a full block) keeps the accumulators in vector
// registers; kCols = 0 is the scalar path of the last, partial block.
template <int kSign, int64_t kCols, typename Rows>
SPIKEOPS_INLINE void add_rows(int32_t* __restrict acc, const Rows& rows, int64_t n0,
                              int64_t cols, const int32_t* ks, const int32_t* cs, int64_t count) {
  const uint32_t mask = rows.mask();
  if constexpr (kCols > 0) {
    constexpr int kVecs = kCols / kLanes;
    v16i sum[kVecs];
    for (int j = 0; j < kVecs; ++j) sum[j] = *reinterpret_cast<const v16i*>(acc + kLanes * j);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t k = ks[i];
      const int shift = rows.shift(k);
      // The rows of one block lie far apart, a stride the hardware prefetchers do not follow:
      // fetch the rows of a term a few terms ahead ourselves.
      if (i + kPrefetchTerms < count) {
        for (int j = 0; j < kVecs; ++j)
          __builtin_prefetch(rows.lanes(ks[i + kPrefetchTerms], n0 + kLanes * j));
      }
      for (int j = 0; j < kVecs; ++j) {
        const v16u w = *reinterpret_cast<const v16u*>(rows.lanes(k, n0 + kLanes * j));
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
      const int shift = rows.shift(k);
      const int32_t c = kSign ? kSign : cs[i];
      for (int64_t n = 0; n < cols; ++n) {
        const int64_t col = n0 + n;
        acc[n] += c * static_cast<int32_t>((rows.lanes(k, col & ~int64_t(15))[col & 15] >> shift)
                                           & mask);
      }
    }
  }
}

// What the epilogue reads of group g for the block's columns, widened once per group and
// block: zero points and float32 scales (the loops vectorize in the multiversioned clones).
struct GroupRow {
  int32_t z[kBlock];
  float scale[kBlock];
};

// Zero points from their GPTQ fields, with the field width known to the compiler, so that the
// loop vectorizes.
template <int kBits>
SPIKEOPS_INLINE void unpack_zeros(const int32_t* words, int64_t cols, int32_t offset,
                                  int32_t* z) {
  constexpr int kPerWord = 32 / kBits;
  for (int64_t n = 0; n < cols; ++n)
    z[n] = gptq_field(words[n / kPerWord], kBits * static_cast<int>(n % kPerWord),
                      (1u << kBits) - 1u) + offset;
}

SPIKEOPS_INLINE void load_group(const WeightFields& w, int64_t g, int64_t n0, int64_t cols,
                                GroupRow& row) {
  const uint16_t* s = w.scales + g * w.N + n0;
  for (int64_t n = 0; n < cols; ++n) row.scale[n] = half_to_float(s[n]);
  // n0 is a multiple of kBlock: the block's zero fields start at a word boundary.
  const int32_t* words = w.qzeros + g * ((w.N * w.bits + 31) / 32) + (n0 * w.bits) / 32;
  switch (w.bits) {
    case 2: unpack_zeros<2>(words, cols, w.zero_offset, row.z); break;
    case 4: unpack_zeros<4>(words, cols, w.zero_offset, row.z); break;
    default: unpack_zeros<8>(words, cols, w.zero_offset, row.z); break;
  }
}

// The group rows of the block a thread works on, each loaded when a task first needs it: a
// thread's tasks walk the tokens of one block before the next, which so share the conversions.
// Direct-mapped on at most kSlots groups, which bounds the memory for any G. Inlined, as
// load_group, into the multiversioned callers.
class GroupRows {
 public:
  explicit GroupRows(int64_t G)
      : slots_(std::min(G, kSlots)), row_(new GroupRow[slots_]), group_(slots_, -1) {}

  SPIKEOPS_ALWAYS_INLINE const GroupRow& get(const WeightFields& w, int64_t g, int64_t n0,
                                              int64_t cols) {
    if (n0 != n0_) {
      std::fill(group_.begin(), group_.end(), -1);
      n0_ = n0;
    }
    const int64_t s = g % slots_;
    if (group_[s] != g) {
      load_group(w, g, n0, cols, row_[s]);
      group_[s] = g;
    }
    return row_[s];
  }

 private:
  static constexpr int64_t kSlots = 1024;
  int64_t slots_;
  std::unique_ptr<GroupRow[]> row_;
  std::vector<int64_t> group_;
  int64_t n0_ = -1;
};

// D[g, r] of one block into S_r (the epilogue's per-range sums), or, with activation groups,
// the term double(scale[m, r]) * S_r into S[0] (the epilogue's sum over columns).
SPIKEOPS_INLINE void fold_group(const LinearArgs& a, int64_t m, const GroupRow& row,
                                BlockAcc& acc, int64_t r, int64_t cols) {
  if (a.group) {
    for (int64_t n = 0; n < cols; ++n)
      acc.S[0][n] += scale_term(a, m, r, static_cast<double>(row.scale[n] *
                                                             static_cast<float>(acc.D[n])));
  } else {
    for (int64_t n = 0; n < cols; ++n)
      acc.S[r][n] += static_cast<double>(row.scale[n] * static_cast<float>(acc.D[n]));
  }
}

// A unit with no nonzero code adds S_r = +0.0: nothing without activation groups; with them the
// term double(scale[m, r]) * 0.0 into S[0], which is +0.0 for a finite scale and NaN for the
// NaN scales of a non-finite row, whose outputs are thus NaN as without groups (docs/ops.md).
SPIKEOPS_INLINE void fold_silent(const LinearArgs& a, int64_t m, BlockAcc& acc, int64_t r,
                                 int64_t cols) {
  if (!a.group) return;
  const double term = scale_term(a, m, r, 0.0);
  for (int64_t n = 0; n < cols; ++n) acc.S[0][n] += term;
}

// The weight group and scale column of bucket unit b (units, above), in ascending order of both.
SPIKEOPS_INLINE void unit_place(const LinearArgs& a, int64_t b, int64_t* g, int64_t* r) {
  if (a.group) {
    *g = weight_group_of(a, b), *r = b;
  } else {
    *g = b / a.R, *r = b % a.R;
  }
}

template <int64_t kCols, typename Rows>
SPIKEOPS_INLINE void int_block_cols(const LinearArgs& a, const Rows& rows, const Terms& t,
                                    int64_t m, int64_t n0, int64_t cols_arg, GroupRows& groups,
                                    BlockAcc& acc) {
  const int64_t cols = kCols ? kCols : cols_arg;
  const int32_t maxq = (1 << a.bits) - 1;
  // Terms per int32 partial sum: |c * q| summed that many times stays below 2^31.
  const int64_t run = std::max<int64_t>(1, INT32_MAX / (static_cast<int64_t>(t.cmax) * maxq + 1));
  int32_t part[kBlock];
  for (int64_t b = 0; b < units(a, a); ++b) {
    const int64_t lo = t.start[b], hi = t.start[b + 1];
    int64_t g, r;
    unit_place(a, b, &g, &r);
    if (lo == hi) {
      fold_silent(a, m, acc, r, cols);
      continue;
    }
    const GroupRow& row = groups.get(a, g, n0, cols);
    std::fill(acc.D, acc.D + cols, 0);
    for (int64_t i = lo; i < hi; i += run) {
      std::fill(part, part + cols, 0);
      add_rows<0, kCols>(part, rows, n0, cols, &t.k[i], &t.c[i], std::min(run, hi - i));
      for (int64_t n = 0; n < cols; ++n) acc.D[n] += part[n];
    }
    for (int64_t n = 0; n < cols; ++n) acc.D[n] -= static_cast<int64_t>(row.z[n]) * t.csum[b];
    fold_group(a, m, row, acc, r, cols);
  }
}

template <int64_t kCols, typename Rows>
SPIKEOPS_INLINE void spike_block_cols(const LinearArgs& a, const Rows& rows, const Terms& t,
                                      int64_t m, int64_t n0, int64_t cols_arg, GroupRows& groups,
                                      BlockAcc& acc) {
  const int64_t cols = kCols ? kCols : cols_arg;
  const int64_t planes = spike_planes(a, m);
  int32_t part[kBlock];
  for (int64_t b = 0; b < units(a, a); ++b) {
    int64_t g, r;
    unit_place(a, b, &g, &r);
    const GroupRow* row = nullptr;
    for (int64_t p = 0; p < planes; ++p) {
      const int32_t* s = t.start.data() + spike_bucket(b, planes, p);
      const int64_t npos = s[1] - s[0], nneg = s[2] - s[1];
      if (npos + nneg == 0) continue;
      if (!row) row = &groups.get(a, g, n0, cols), std::fill(acc.D, acc.D + cols, 0);
      std::fill(part, part + cols, 0);
      add_rows<1, kCols>(part, rows, n0, cols, &t.k[s[0]], nullptr, npos);
      add_rows<-1, kCols>(part, rows, n0, cols, &t.k[s[1]], nullptr, nneg);
      // Plane p weighs 2^p; the zero-point plane weighs -zero[r]. Each spike also carried the
      // weight zero point z, removed here once per plane: sum s*(q - z) = part - z * count.
      const int64_t weight = p < a.P ? (int64_t(1) << p) : -a.zero[m * a.R + r];
      const int64_t count = npos - nneg;
      for (int64_t n = 0; n < cols; ++n)
        acc.D[n] += weight * (static_cast<int64_t>(part[n]) - row->z[n] * count);
    }
    if (row) {
      fold_group(a, m, *row, acc, r, cols);
    } else {
      fold_silent(a, m, acc, r, cols);
    }
  }
}

// The block kernels on the codes where the call holds them: qweight, else the CPU layout. `f`
// must be always_inline, as everything the multiversioned callers inline: a function left out
// of line would be compiled for the baseline ISA only.
template <typename F>
SPIKEOPS_INLINE void with_rows(const WeightFields& w, F&& f) {
  if (w.qweight) {
    f(QweightRows{w.qweight, w.N, w.bits});
  } else {
    f(LayoutRows{w.packed, (w.K + 7) / 8});
  }
}

// Compiled for x86-64-v4, v3 and the baseline, picked at load time (cpu/isa.h).
SPIKEOPS_TARGET_CLONES
void int_block(const LinearArgs& a, const Terms& t, int64_t m, int64_t n0, int64_t cols,
               GroupRows& groups, BlockAcc& acc) {
  with_rows(a, [&](const auto& rows) SPIKEOPS_ALWAYS_INLINE {
    cols == kBlock ? int_block_cols<kBlock>(a, rows, t, m, n0, cols, groups, acc)
                   : int_block_cols<0>(a, rows, t, m, n0, cols, groups, acc);
  });
}

SPIKEOPS_TARGET_CLONES
void spike_block(const LinearArgs& a, const Terms& t, int64_t m, int64_t n0, int64_t cols,
                 GroupRows& groups, BlockAcc& acc) {
  with_rows(a, [&](const auto& rows) SPIKEOPS_ALWAYS_INLINE {
    cols == kBlock ? spike_block_cols<kBlock>(a, rows, t, m, n0, cols, groups, acc)
                   : spike_block_cols<0>(a, rows, t, m, n0, cols, groups, acc);
  });
}

template <typename out_t>
void store_block(const LinearArgs& a, int64_t m, int64_t n0, int64_t cols, const BlockAcc& acc,
                 out_t* y) {
  for (int64_t n = 0; n < cols; ++n) {
    float v;
    if (a.group) {  // S[0] holds the sum over the columns
      v = linear_output(a, n0 + n, acc.S[0][n]);
    } else {
      v = linear_epilogue(a, m, n0 + n, acc.S[0][n], a.R == 2 ? acc.S[1][n] : 0.0);
    }
    y[m * a.N + n0 + n] = static_cast<out_t>(v);
  }
}

}  // namespace

void spike_linear(const LinearArgs& a) {
  // auto is int, on the CPU layout and in the portable kernel alike (docs/ops.md, spike_linear's
  // backends, says why).
  const bool use_spike = a.backend == Backend::kSpike;
  if (!use_spike) {
    const Isa isa = int_layout_isa(a);
    if (isa != Isa::kGeneric) {
      spike_linear_int_layout(a, isa);
      return;
    }
  }

  const int64_t blocks = (a.N + kBlock - 1) / kBlock;
  std::vector<Terms> terms(std::min(a.M, kTokenChunk));
  dispatch_out_float(a.out_type, [&](auto tag) {
    using T = decltype(tag);
    T* y = static_cast<T*>(a.out);
    for (int64_t m0 = 0; m0 < a.M; m0 += kTokenChunk) {
      const int64_t tokens = std::min(kTokenChunk, a.M - m0);
      at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
          use_spike ? build_spike_terms(a, a, m0 + i, terms[i])
                    : build_code_terms(a, a, m0 + i, terms[i]);
      });
      at::parallel_for(0, blocks * tokens, 1, [&](int64_t begin, int64_t end) {
        BlockAcc acc;
        GroupRows groups(a.G);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t i = task % tokens, n0 = (task / tokens) * kBlock;
          const int64_t cols = std::min(kBlock, a.N - n0);
          for (int r = 0; r < 2; ++r) std::fill(acc.S[r], acc.S[r] + cols, 0.0);
          if (use_spike) {
            spike_block(a, terms[i], m0 + i, n0, cols, groups, acc);
          } else {
            int_block(a, terms[i], m0 + i, n0, cols, groups, acc);
          }
          store_block(a, m0 + i, n0, cols, acc, y);
        }
      });
    }
  });
}

void spike_accumulate(const AccumulateArgs& a) {
  // spike_linear's spike terms with one group holding every channel and no weights; the spikes
  // carry no zero point (the op takes none), so the terms count s * Q only (docs/ops.md).
  WeightFields one_group{};
  one_group.K = a.K, one_group.G = 1, one_group.group_size = a.K;
  const int64_t N = a.N;
  at::parallel_for(0, a.M, 1, [&](int64_t begin, int64_t end) {
    Terms t;
    std::vector<int32_t> part(N);
    for (int64_t m = begin; m < end; ++m) {
      build_spike_terms(a, one_group, m, t);
      for (int64_t p = 0; p < a.P; ++p) {
        for (int64_t r = 0; r < a.R; ++r) {  // one weight group: unit r is scale column r
          const int32_t* st = t.start.data() + spike_bucket(r, a.P, p);
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
  // Tiles of kCols output rows walked k-major: each row segment of codes is read contiguously
  // (walking one n over all k would stride N words per load), and the tile's kCols output rows
  // stay in cache while they fill.
  constexpr int64_t kCols = 64;
  at::parallel_for(0, (a.N + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * kCols, n1 = std::min(a.N, n0 + kCols);
      for (int64_t k = 0; k < a.K; ++k) {
        const int64_t g = group_of(a, k);
        for (int64_t n = n0; n < n1; ++n) {
          const float v = scale_at(a, g, n) * static_cast<float>(code_at(a, k, n) - zero_at(a, g, n));
          o[n * a.K + k] = static_cast<c10::Half>(v);
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace spikeops
