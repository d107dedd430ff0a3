#include "checks.h"

#include "matmul_math.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace spikeops {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t d = 0; d < t.dim(); ++d) os << (d ? ", " : "") << t.size(d);
  os << "]";
  return os.str();
}

std::string shape_str(std::initializer_list<int64_t> dims) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (int64_t d : dims) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  os << "]";
  return os.str();
}

void check_shape(const char* op, const at::Tensor& t, const char* name,
                 std::initializer_list<int64_t> want) {
  bool ok = t.dim() == static_cast<int64_t>(want.size());
  int64_t d = 0;
  for (int64_t w : want) ok = ok && t.size(d++) == w;
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must have shape ", shape_str(want), ", got ",
                    shape_str(t));
}


// Values of CPU tensors are checked here. CUDA kernels never synchronize for such checks: they
// guard every index they read instead (see cuda/), and the Python layer validates values once.
bool host_readable(const at::Tensor& t) { return t.device().is_cpu(); }

// The CPU layout's rule (layout_group, kernel_args.h) for a layer of `bits`-bit codes, K
// channels and group_size; `what` names what the message refuses.
void check_layout_group(const char* op, const char* what, int64_t bits, int64_t group_size,
                        int64_t K) {
  TORCH_CHECK_VALUE(layout_group(bits, group_size, K) > 0, op, ": ", what, " holds only 4-bit ",
                    "codes in uniform groups (group_size > 0) of a multiple of 8 channels, or in ",
                    "one group (group_size >= K), of at most ", kMaxLayoutGroup, " channels ",
                    "(one group: K rounded up to a multiple of 8); got bits = ", bits,
                    ", group_size = ", group_size, ", K = ", K);
}

}  // namespace

void check_dtype(const char* op, const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, op, ": ", name, " must be a ", dtype_name(want),
                   " tensor, got ", dtype_name(t.scalar_type()));
}

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kUInt16: return "torch.uint16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return FloatType::kHalf;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat;
    case at::kDouble: return FloatType::kDouble;
    default: TORCH_CHECK_TYPE(false, "spikeops: no kernel for ", dtype_name(t));
  }
}

Mode parse_mode(const std::string& mode) {
  if (mode == "minmax") return Mode::kMinMax;
  if (mode == "absmax") return Mode::kAbsMax;
  if (mode == "absmean") return Mode::kAbsMean;
  if (mode == "static") return Mode::kStatic;
  if (mode == "oat") return Mode::kOat;
  TORCH_CHECK_VALUE(false, "gif_encode: mode must be one of 'minmax', 'absmax', 'absmean', ",
                    "'static', 'oat', got '", mode, "'");
}

void check_same_device(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

namespace {
// An input's dtype, shape and device (on the device of `ref`), checked in that order.
void check_tensor(const char* op, const at::Tensor& t, const char* name, at::ScalarType want,
                  std::initializer_list<int64_t> shape, const at::Tensor& ref,
                  const char* ref_name) {
  check_dtype(op, t, name, want);
  check_shape(op, t, name, shape);
  check_same_device(op, t, name, ref, ref_name);
}
}  // namespace

void check_float_out_dtype(const char* op, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op, ": ",
                   name, " must be torch.float16, torch.bfloat16 or torch.float32, got ",
                   dtype_name(dtype));
}

void check_bits(const char* op, const std::string& mode_name, bool is_signed, int64_t bits,
                int64_t salient_bits) {
  const Mode mode = parse_mode(mode_name);
  // A signed code spends one bit on the sign, except oat whose `bits` counts magnitude planes.
  const int64_t min_bits = (is_signed && mode != Mode::kOat) ? 2 : 1;
  TORCH_CHECK_VALUE(bits >= min_bits && bits <= kMaxPlanes, op, ": bits must be in [", min_bits,
                    ", ", kMaxPlanes, "] for mode '", mode_name, "'",
                    (mode == Mode::kStatic && is_signed ? " (signed: no zero given)" : ""),
                    ", got ", bits);
  TORCH_CHECK_VALUE(salient_bits == 0 || (salient_bits > bits && salient_bits <= kMaxPlanes), op,
                    ": salient_bits must be in (bits, ", kMaxPlanes, "] = (", bits, ", ",
                    kMaxPlanes, "], got ", salient_bits);
}

EncodeArgs check_encode(Inputs& in, const at::Tensor& x, const std::string& mode, int64_t bits,
                        double gamma, const OptTensor& salient_mask, int64_t salient_bits,
                        const OptTensor& scale, const OptTensor& zero, double theta_nor,
                        double theta_out, int64_t group) {
  const char* op = "gif_encode";
  EncodeArgs e{};
  e.mode = parse_mode(mode);
  const auto xt = x.scalar_type();
  TORCH_CHECK_TYPE(xt == at::kHalf || xt == at::kBFloat16 || xt == at::kFloat || xt == at::kDouble,
                   op, ": x must be a float16, bfloat16, float32 or float64 tensor, got ",
                   dtype_name(xt));
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must have shape [M, K], got ", shape_str(x));
  e.M = x.size(0);
  e.K = x.size(1);
  TORCH_CHECK_VALUE(e.K >= 1 && e.K <= kMaxK, op, ": x must have 1 <= K <= ", kMaxK,
                    " channels, got K = ", e.K);
  e.x = in.bytes(x);
  e.x_type = float_type(xt);
  e.W = (e.K + 31) / 32;

  const bool is_static = e.mode == Mode::kStatic;
  TORCH_CHECK_VALUE(is_static || !scale, op, ": scale is only taken by mode 'static', got a ",
                    "tensor with mode '", mode, "'");
  TORCH_CHECK_VALUE(is_static || !zero, op, ": zero is only taken by mode 'static', got a ",
                    "tensor with mode '", mode, "'");
  e.is_signed = e.mode == Mode::kAbsMax || e.mode == Mode::kAbsMean || e.mode == Mode::kOat ||
                (is_static && !zero);
  TORCH_CHECK_VALUE(!salient_mask || e.mode == Mode::kMinMax || e.mode == Mode::kAbsMax ||
                        e.mode == Mode::kAbsMean,
                    op, ": salient_mask combines with modes 'minmax', 'absmax', 'absmean', got ",
                    "mode '", mode, "'");
  TORCH_CHECK_VALUE(salient_mask || salient_bits == 0, op, ": salient_bits is only taken with ",
                    "a salient_mask (pass 0), got ", salient_bits);
  TORCH_CHECK_VALUE(!salient_mask || salient_bits != 0, op, ": a salient_mask needs ",
                    "salient_bits in (bits, ", kMaxPlanes, "], got 0");
  check_bits(op, mode, e.is_signed, bits, salient_bits);
  e.bits = static_cast<int>(bits);
  e.salient_bits = static_cast<int>(salient_bits);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0.0 && gamma <= 1.0, op,
                    ": gamma must be in (0, 1], got ", gamma);
  e.gamma = static_cast<float>(gamma);

  if (salient_mask) {
    check_tensor(op, *salient_mask, "salient_mask", at::kBool, {e.K}, x, "x");
    e.salient = reinterpret_cast<const uint8_t*>(in.data<bool>(*salient_mask));
  }
  const int top_bits = e.salient_bits ? e.salient_bits : e.bits;
  e.P = (e.is_signed && e.mode != Mode::kOat) ? top_bits - 1 : top_bits;
  check_group(op, group);
  TORCH_CHECK_VALUE(group == 0 || (!salient_mask && e.mode != Mode::kOat), op, ": group (",
                    "activation groups) does not combine with salient channels or mode 'oat', ",
                    "whose two ranges are the token's scale columns; got group = ", group,
                    " with mode '", mode, "'", (salient_mask ? " and a salient_mask" : ""));
  e.group = group;
  e.R = (e.salient_bits || e.mode == Mode::kOat) ? 2 : scale_columns(false, group, e.W);

  if (is_static) {
    // One value per token, or per token and activation group: [M] or [M, R].
    const auto per_token = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
      if (group > 0) {
        check_tensor(op, t, name, dtype, {e.M, e.R}, x, "x");
      } else {
        check_tensor(op, t, name, dtype, {e.M}, x, "x");
      }
    };
    TORCH_CHECK_VALUE(scale.has_value(), op, ": mode 'static' needs scale, a float32 tensor of ",
                      "shape ", group > 0 ? shape_str({e.M, e.R}) : shape_str({e.M}));
    per_token(*scale, "scale", at::kFloat);
    e.static_scale = in.data<float>(*scale);
    if (host_readable(*scale)) {
      for (int64_t i = 0; i < scale->numel(); ++i)
        TORCH_CHECK_VALUE(std::isfinite(e.static_scale[i]) && e.static_scale[i] > 0.f, op,
                          ": scale must be positive and finite, got ", e.static_scale[i],
                          " at flat index ", i);
    }
    if (zero) {
      per_token(*zero, "zero", at::kInt);
      e.static_zero = in.data<int32_t>(*zero);
      if (host_readable(*zero)) {
        for (int64_t i = 0; i < zero->numel(); ++i)
          TORCH_CHECK_VALUE(zero_in_range(e.static_zero[i]), op, ": zero must be in [-",
                            kZeroLimit, ", ", kZeroLimit, "], got ", e.static_zero[i],
                            " at flat index ", i);
      }
    }
  }

  if (e.mode == Mode::kOat) {
    e.theta_nor = static_cast<float>(theta_nor);
    e.theta_out = static_cast<float>(theta_out);
    TORCH_CHECK_VALUE(std::isfinite(e.theta_nor) && std::isfinite(e.theta_out) &&
                          e.theta_nor > 0.f && e.theta_nor < e.theta_out,
                      op, ": mode 'oat' needs 0 < theta_nor < theta_out (finite in float32), ",
                      "got theta_nor = ", theta_nor, ", theta_out = ", theta_out);
  } else {
    TORCH_CHECK_VALUE(theta_nor == 0.0 && theta_out == 0.0, op,
                      ": theta_nor and theta_out are only taken by mode 'oat' (pass 0), got ",
                      theta_nor, ", ", theta_out, " with mode '", mode, "'");
  }
  return e;
}

void check_group(const char* op, int64_t group) {
  TORCH_CHECK_VALUE(group >= 0 && group % 32 == 0 && group <= kMaxK, op, ": group (channels ",
                    "per activation group) must be 0 (none) or a positive multiple of 32, got ",
                    group);
}

SpikeFields check_spike_bits(const char* op, Inputs& in, const at::Tensor& planes,
                             const OptTensor& sign, const OptTensor& hi, int64_t group) {
  SpikeFields s{};
  check_group(op, group);
  TORCH_CHECK_VALUE(group == 0 || !hi, op, ": group (activation groups) does not combine with ",
                    "hi (two ranges), got group = ", group, " and a hi tensor");
  check_dtype(op, planes, "planes", at::kInt);
  TORCH_CHECK_VALUE(planes.dim() == 3, op, ": planes must have shape [P, M, W], got ",
                    shape_str(planes));
  s.P = planes.size(0);
  s.M = planes.size(1);
  s.W = planes.size(2);
  TORCH_CHECK_VALUE(s.P >= 1 && s.P <= kMaxPlanes, op, ": planes must hold 1 to ", kMaxPlanes,
                    " planes, got P = ", s.P);
  TORCH_CHECK_VALUE(s.W >= 1, op, ": planes must hold at least one word per token, got W = 0");
  s.planes = in.words(planes);
  // sign and hi: one int32 word per token and 32 channels, like a plane.
  const auto word_mask = [&](const OptTensor& t, const char* name) -> const uint32_t* {
    if (!t) return nullptr;
    check_dtype(op, *t, name, at::kInt);
    check_shape(op, *t, name, {s.M, s.W});
    check_same_device(op, *t, name, planes, "planes");
    return in.words(*t);
  };
  s.sign = word_mask(sign, "sign");
  s.hi = word_mask(hi, "hi");
  s.group = group;
  s.R = scale_columns(hi.has_value(), group, s.W);
  return s;
}

SpikeFields check_spikes(const char* op, Inputs& in, const at::Tensor& planes,
                         const OptTensor& sign, const OptTensor& hi, const at::Tensor& scale,
                         const OptTensor& zero, int64_t group) {
  SpikeFields s = check_spike_bits(op, in, planes, sign, hi, group);
  check_tensor(op, scale, "scale", at::kFloat, {s.M, s.R}, planes, "planes");
  s.scale = in.data<float>(scale);
  if (zero) {
    check_tensor(op, *zero, "zero", at::kInt, {s.M, s.R}, planes, "planes");
    s.zero = in.data<int32_t>(*zero);
    if (host_readable(*zero)) {
      // Codes minus zeros stay far from int32 overflow (see kZeroLimit).
      for (int64_t i = 0; i < s.M * s.R; ++i)
        TORCH_CHECK_VALUE(zero_in_range(s.zero[i]), op, ": zero must be in [-", kZeroLimit, ", ",
                          kZeroLimit, "], got ", s.zero[i], " at flat index ", i);
    }
  }
  return s;
}

void check_linear_groups(const char* op, const SpikeFields& s, const WeightFields& w) {
  TORCH_CHECK_VALUE(activation_groups_fit(s.group, w.group_size, w.K), op,
                    ": activation groups must lie inside the weight groups: group_size a ",
                    "multiple of group, or one weight group (group_size >= K); act-order ",
                    "layers (group_size 0) take no activation groups. Got group = ", s.group,
                    ", group_size = ", w.group_size, ", K = ", w.K);
}

void check_spike_width(const char* op, const SpikeFields& s, int64_t K, const char* k_source) {
  TORCH_CHECK_VALUE(s.W == (K + 31) / 32, op, ": planes must hold ceil(K / 32) = ",
                    (K + 31) / 32, " words per token for K = ", K, " (from ", k_source,
                    "), got W = ", s.W);
}

WeightFields check_weights(const char* op, Inputs& in, const OptTensor& qweight,
                           const at::Tensor& qzeros, const at::Tensor& scales,
                           const at::Tensor& g_idx, const OptTensor& packed, int64_t bits,
                           int64_t group_size, int64_t zero_offset) {
  WeightFields w{};
  TORCH_CHECK_VALUE(bits == 2 || bits == 4 || bits == 8, op,
                    ": bits must be 2, 4 or 8 (3-bit weights are repacked to 4-bit codes by ",
                    "spikeops.GPTQWeight), got ", bits);
  TORCH_CHECK_VALUE(group_size >= 0, op, ": group_size must be >= 0 (0: the groups are given ",
                    "by g_idx), got ", group_size);
  TORCH_CHECK_VALUE(zero_offset == 0 || zero_offset == 1, op, ": zero_offset must be 0 (v2 ",
                    "zero points) or 1 (v1: stored zero = true zero - 1), got ", zero_offset);
  w.bits = static_cast<int>(bits);
  w.group_size = group_size;
  w.zero_offset = static_cast<int>(zero_offset);
  check_dtype(op, qzeros, "qzeros", at::kInt);
  check_dtype(op, scales, "scales", at::kHalf);
  check_dtype(op, g_idx, "g_idx", at::kInt);
  TORCH_CHECK_VALUE(g_idx.dim() == 1 && g_idx.size(0) >= 1 && g_idx.size(0) <= kMaxK, op,
                    ": g_idx must have shape [K] with 1 <= K <= ", kMaxK, ", got ",
                    shape_str(g_idx));
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) >= 1 && scales.size(1) >= 1, op,
                    ": scales must have shape [G, N] with G, N >= 1, got ", shape_str(scales));
  w.K = g_idx.size(0);
  w.G = scales.size(0);
  w.N = scales.size(1);
  check_same_device(op, g_idx, "g_idx", scales, "scales");
  if (group_size > 0) {
    TORCH_CHECK_VALUE(w.G == (w.K + group_size - 1) / group_size, op, ": scales must hold ",
                      "ceil(K / group_size) = ", (w.K + group_size - 1) / group_size,
                      " groups for K = ", w.K, " and group_size = ", group_size, ", got G = ",
                      w.G);
  }
  TORCH_CHECK_VALUE(qweight || packed, op, ": the codes must be given, as qweight or as the CPU ",
                    "layout packed; got neither");
  if (qweight) {
    const int64_t per_word = 32 / bits;
    check_tensor(op, *qweight, "qweight", at::kInt, {(w.K + per_word - 1) / per_word, w.N},
                 scales, "scales");
    w.qweight = in.data<int32_t>(*qweight);
  }
  if (packed) {
    check_layout_group(op, "packed, the CPU layout,", bits, group_size, w.K);
    check_tensor(op, *packed, "packed", at::kByte, {(w.N + 15) / 16, (w.K + 7) / 8, 64},
                 scales, "scales");
    TORCH_CHECK_VALUE(packed->device().is_cpu(), op, ": packed is the CPU layout, for CPU ",
                      "tensors only; got ", packed->device());
    w.packed = in.data<uint8_t>(*packed);
  }
  check_shape(op, qzeros, "qzeros", {w.G, (w.N * bits + 31) / 32});
  check_same_device(op, qzeros, "qzeros", scales, "scales");
  w.qzeros = in.data<int32_t>(qzeros);
  w.scales = reinterpret_cast<const uint16_t*>(in.data<at::Half>(scales));
  w.g_idx = in.data<int32_t>(g_idx);
  // Only an act-order layout (group_size 0) reads g_idx's values, and only then are they
  // checked: once per call on the CPU; CUDA kernels guard them instead (csrc/cuda/launchers.h).
  if (group_size == 0 && host_readable(g_idx)) {
    for (int64_t k = 0; k < w.K; ++k)
      TORCH_CHECK_VALUE(w.g_idx[k] >= 0 && w.g_idx[k] < w.G, op, ": g_idx values must be in ",
                        "[0, G) = [0, ", w.G, "), got g_idx[", k, "] = ", w.g_idx[k]);
  }
  return w;
}

void check_code_sums(const char* op, Inputs& in, const OptTensor& code_sums,
                     const at::Tensor& scales, WeightFields& w) {
  TORCH_CHECK_VALUE(code_sums.has_value() == (w.packed != nullptr), op, ": packed and ",
                    "code_sums come together (both None, or spikeops.GPTQWeight's CPU layout), ",
                    "got one");
  if (!code_sums) return;
  check_tensor(op, *code_sums, "code_sums", at::kUInt16, {w.G, w.N}, scales, "scales");
  w.code_sums = in.data<uint16_t>(*code_sums);
}

Backend parse_backend(const char* op, const std::string& backend) {
  if (backend == "spike") return Backend::kSpike;
  if (backend == "int") return Backend::kInt;
  TORCH_CHECK_VALUE(backend == "auto", op, ": backend must be 'auto', 'spike' or 'int', got '",
                    backend, "'");
  return Backend::kAuto;
}

bool programmatic_launch_allowed(const char* op) {
  const char* v = std::getenv("SPIKEOPS_PDL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(v, "0") == 0, op, ": SPIKEOPS_PDL must be 0 or 1 (or unset), "
                    "got '", v, "'");
  return false;
}

const float* check_bias(const char* op, Inputs& in, const OptTensor& bias,
                        const at::Tensor& scales, int64_t N) {
  if (!bias) return nullptr;
  check_tensor(op, *bias, "bias", at::kFloat, {N}, scales, "scales");
  return in.data<float>(*bias);
}

MatmulArgs check_matmul(Inputs& in, const at::Tensor& a_planes, const OptTensor& a_sign,
                        const OptTensor& a_hi, const at::Tensor& a_scale,
                        const OptTensor& a_zero, const at::Tensor& b_planes,
                        const OptTensor& b_sign, const OptTensor& b_hi,
                        const at::Tensor& b_scale, const OptTensor& b_zero, int64_t K,
                        int64_t batch, int64_t heads, int64_t kv_heads, int64_t keys,
                        bool causal, at::ScalarType out_dtype) {
  const char* op = "spike_matmul";
  MatmulArgs g{};
  g.a = check_spikes("spike_matmul (a)", in, a_planes, a_sign, a_hi, a_scale, a_zero, 0);
  g.b = check_spikes("spike_matmul (b)", in, b_planes, b_sign, b_hi, b_scale, b_zero, 0);
  check_same_device(op, b_planes, "b_planes", a_planes, "a_planes");
  TORCH_CHECK_VALUE(K >= 1 && K <= kMatmulMaxK, op, ": K must be in [1, ", kMatmulMaxK,
                    "] (exact float64 sums, docs/ops.md), got ", K);
  check_spike_width("spike_matmul (a)", g.a, K, "K");
  check_spike_width("spike_matmul (b)", g.b, K, "K");
  TORCH_CHECK_VALUE(batch >= 1 && heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, op,
                    ": batch, heads and kv_heads must be >= 1 with heads a multiple of ",
                    "kv_heads, got batch = ", batch, ", heads = ", heads, ", kv_heads = ",
                    kv_heads);
  TORCH_CHECK_VALUE(g.a.M % (batch * heads) == 0, op, ": a_planes must hold batch * heads * Ma",
                    " rows (batch = ", batch, ", heads = ", heads, "), got M = ", g.a.M);
  TORCH_CHECK_VALUE(g.b.M % (batch * kv_heads) == 0, op, ": b_planes must hold batch * ",
                    "kv_heads * Lb rows (batch = ", batch, ", kv_heads = ", kv_heads,
                    "), got M = ", g.b.M);
  g.K = K, g.batch = batch, g.heads = heads, g.kv_heads = kv_heads;
  g.Ma = g.a.M / (batch * heads);
  g.Lb = g.b.M / (batch * kv_heads);
  TORCH_CHECK_VALUE(keys >= 0 && keys <= g.Lb, op, ": keys must be in [0, Lb] = [0, ", g.Lb,
                    "] (rows of b per batch and kv head), got ", keys);
  TORCH_CHECK_VALUE(!causal || keys >= g.Ma, op, ": causal needs keys >= Ma = ", g.Ma,
                    " (query i is key N - Ma + i), got keys = ", keys);
  g.N = keys;
  g.causal = causal;
  check_float_out_dtype(op, out_dtype, "out_dtype");
  g.out_type = float_type(out_dtype);
  return g;
}

MatmulArgs check_prob_matmul(Inputs& in, const at::Tensor& probs, const at::Tensor& token_scale,
                             const at::Tensor& b_planes, const OptTensor& b_sign,
                             const OptTensor& b_hi, const at::Tensor& b_scale,
                             const OptTensor& b_zero, int64_t kv_heads) {
  const char* op = "prob_matmul";
  check_dtype(op, probs, "probs", at::kFloat);
  TORCH_CHECK_VALUE(probs.dim() == 4 && probs.size(0) >= 1 && probs.size(1) >= 1 &&
                        probs.size(3) >= 1 && probs.size(3) <= kMatmulMaxK,
                    op, ": probs must have shape [batch, heads, Ma, K] with batch, heads >= 1 ",
                    "and K in [1, ", kMatmulMaxK, "], got ", shape_str(probs));
  MatmulArgs g{};
  g.batch = probs.size(0), g.heads = probs.size(1), g.Ma = probs.size(2), g.K = probs.size(3);
  TORCH_CHECK_VALUE(kv_heads >= 1 && g.heads % kv_heads == 0, op, ": kv_heads must be >= 1 ",
                    "and divide probs' heads (", g.heads, "), got ", kv_heads);
  g.kv_heads = kv_heads;
  check_dtype(op, token_scale, "token_scale", at::kFloat);
  check_same_device(op, token_scale, "token_scale", probs, "probs");
  TORCH_CHECK_VALUE(token_scale.dim() == 2 && token_scale.size(0) == g.batch * kv_heads &&
                        token_scale.size(1) >= g.K,
                    op, ": token_scale must have shape [batch * kv_heads, S] = [",
                    g.batch * kv_heads, ", S >= K = ", g.K, "], got ", shape_str(token_scale));
  g.b = check_spikes("prob_matmul (b)", in, b_planes, b_sign, b_hi, b_scale, b_zero, 0);
  check_same_device(op, b_planes, "b_planes", probs, "probs");
  check_spike_width("prob_matmul (b)", g.b, g.K, "probs' K");
  TORCH_CHECK_VALUE(g.b.M % (g.batch * kv_heads) == 0, op, ": b_planes must hold batch * ",
                    "kv_heads * Lb rows (batch = ", g.batch, ", kv_heads = ", kv_heads,
                    "), got M = ", g.b.M);
  g.a = SpikeFields{nullptr, nullptr, nullptr, nullptr, nullptr, 8, g.batch * g.heads * g.Ma,
                    (g.K + 31) / 32, 1, 0};
  g.Lb = g.N = g.b.M / (g.batch * kv_heads);
  g.out_type = FloatType::kFloat;
  return g;
}

ChannelMajorArgs check_channel_major_write(Inputs& in, const at::Tensor& planes,
                                           const OptTensor& sign, const at::Tensor& out,
                                           int64_t K, int64_t start) {
  const char* op = "channel_major_write";
  const SpikeFields s = check_spike_bits(op, in, planes, sign, c10::nullopt, 0);
  TORCH_CHECK_VALUE(K >= 1, op, ": K must be >= 1, got ", K);
  check_spike_width(op, s, K, "K");
  check_dtype(op, out, "out", at::kInt);
  check_same_device(op, out, "out", planes, "planes");
  const int64_t P = s.P + (s.sign != nullptr);
  TORCH_CHECK_VALUE(out.dim() == 3 && out.size(0) == P && out.size(1) >= K &&
                        out.size(1) % K == 0 && s.M % (out.size(1) / K) == 0,
                    op, ": out must have shape [P + (sign given), G * K, words] = [", P,
                    ", G * ", K, ", words] with G dividing the ", s.M, " token rows, got ",
                    shape_str(out));
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous (it is written in ",
                    "place), got strides ", out.strides());
  ChannelMajorArgs a{};
  a.P = s.P, a.K = K, a.Wt = s.W, a.G = out.size(1) / K, a.T = s.M / a.G;
  a.words = out.size(2), a.start = start;
  TORCH_CHECK_VALUE(start >= 0 && start + a.T <= 32 * a.words, op, ": tokens start .. start + T",
                    " = ", start, " .. ", start + a.T, " must lie in out's ", 32 * a.words,
                    " token bits (", a.words, " words)");
  a.planes = s.planes, a.sign = s.sign;
  return a;
}

FeedbackEncodeArgs check_feedback_encode(Inputs& in, const at::Tensor& x,
                                         const at::Tensor& feedback, int64_t bits, double gamma) {
  const char* op = "feedback_encode";
  check_dtype(op, x, "x", at::kFloat);
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(2) >= 1 && x.size(2) <= kMaxFeedbackK, op,
                    ": x must have shape [G, N, K] with 1 <= K <= ", kMaxFeedbackK, ", got ",
                    shape_str(x));
  FeedbackEncodeArgs a{};
  a.G = x.size(0), a.N = x.size(1), a.K = x.size(2), a.W = (a.K + 31) / 32;
  check_tensor(op, feedback, "feedback", at::kFloat, {a.G, a.K, a.K}, x, "x");
  check_bits(op, "minmax", false, bits, 0);
  a.bits = static_cast<int>(bits);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma > 0.0 && gamma <= 1.0, op,
                    ": gamma must be in (0, 1], got ", gamma);
  a.gamma = static_cast<float>(gamma);
  a.x = in.data<float>(x);
  a.feedback = in.data<float>(feedback);
  return a;
}

// ---- the CPU layout ----------------------------------------------------------------------
namespace {

// A tensor the CPU layout is made from or into: the CPU kernels alone read that layout.
void check_cpu(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor (the CPU layout ",
                    "is for the CPU kernels), got ", t.device());
}

void check_layout_k(const char* op, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1 && K <= kMaxK, op, ": K must be in [1, ", kMaxK, "], got ", K);
}

}  // namespace

void check_cpu_layout(const at::Tensor& qweight, int64_t bits, int64_t group_size, int64_t K) {
  const char* op = "cpu_layout";
  check_layout_k(op, K);
  check_layout_group(op, "the CPU layout", bits, group_size, K);
  check_dtype(op, qweight, "qweight", at::kInt);
  TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.size(1) >= 1, op, ": qweight must have shape ",
                    "[ceil(K / 8), N] with N >= 1, got ", shape_str(qweight));
  check_shape(op, qweight, "qweight", {(K + 7) / 8, qweight.size(1)});
  check_cpu(op, qweight, "qweight");
}

void check_layout_qweight(const at::Tensor& packed, int64_t K, int64_t N) {
  const char* op = "cpu_layout_qweight";
  check_layout_k(op, K);
  TORCH_CHECK_VALUE(N >= 1, op, ": N must be >= 1, got ", N);
  check_dtype(op, packed, "packed", at::kByte);
  check_shape(op, packed, "packed", {(N + 15) / 16, (K + 7) / 8, 64});
  check_cpu(op, packed, "packed");
}

}  // namespace spikeops
