// The op catalogue: every schema of torch.ops.spikeops and its one host entry. An entry checks
// its inputs once (checks.h), allocates the outputs, fills the kernel's argument struct
// (kernel_args.h) and runs the kernel of the device that dispatched it: cpu::* (cpu/kernels.h)
// or the CUDA launcher (csrc/cuda/launchers.h). Optional inputs are `Tensor?` (None in Python, null
// pointers in the argument structs); outputs an encoding does not produce have shape [0].
// docs/ops.md is the contract of every op. Importing the Python module spikeops._C (this
// library) registers everything.
#include <Python.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <string>
#include <tuple>
#include <vector>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include "checks.h"
#include "cpu/kernels.h"
#include "direct.h"
#include "hadamard_math.h"

#ifdef SPIKEOPS_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launchers.h"
#endif

extern "C" {
// The CPU instruction set spike_linear's int backend uses now: "amx", "avx512vnni", "avx2" or
// "generic" (SPIKEOPS_CPU_ISA caps it); for tests and benchmark records. A refused
// SPIKEOPS_CPU_ISA becomes Python's ValueError (no C++ exception may cross into Python here).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(spikeops::cpu::isa_name(spikeops::cpu::best_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// spikeops.Encoding's check of its bit widths: the rule gif_encode applies (checks.h), raised
// as ValueError. Arguments: (caller, mode, is_signed, bits, salient_bits).
static PyObject* check_bits(PyObject*, PyObject* args) {
  const char* caller;
  const char* mode;
  int is_signed;
  long long bits, salient_bits;
  if (!PyArg_ParseTuple(args, "sspLL", &caller, &mode, &is_signed, &bits, &salient_bits))
    return nullptr;
  try {
    spikeops::check_bits(caller, mode, is_signed != 0, bits, salient_bits);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// layout_group(bits, group_size, K) of kernel_args.h: the channels per group of the CPU layout
// of such a layer, 0 where the layout cannot hold it. spikeops.GPTQWeight asks it whether to hold
// the CPU layout, so that the rule has one definition.
static PyObject* layout_group(PyObject*, PyObject* args) {
  long long bits, group_size, K;
  if (!PyArg_ParseTuple(args, "LLL:layout_group", &bits, &group_size, &K)) return nullptr;
  return PyLong_FromLongLong(spikeops::layout_group(bits, group_size, K));
}

// activation_groups_fit(group, group_size, K) of kernel_args.h: whether spike_linear takes
// spikes with activation groups of `group` channels on such weights. spikeops.SpikeLinear asks
// it when an encoding is set, so that the rule has one definition.
static PyObject* activation_groups_fit(PyObject*, PyObject* args) {
  long long group, group_size, K;
  if (!PyArg_ParseTuple(args, "LLL:activation_groups_fit", &group, &group_size, &K))
    return nullptr;
  return PyBool_FromLong(spikeops::activation_groups_fit(group, group_size, K));
}

// Importing this module loads the shared library, whose static initializers register the ops
// (the pattern of pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_isa", cpu_isa, METH_NOARGS, "spike_linear's CPU instruction set"},
      {"check_bits", check_bits, METH_VARARGS, "gif_encode's rule for bits and salient_bits"},
      {"layout_group", layout_group, METH_VARARGS,
       "layout_group(bits, group_size, K): channels per group of the CPU layout, 0: none"},
      {"activation_groups_fit", activation_groups_fit, METH_VARARGS,
       "activation_groups_fit(group, group_size, K): spike_linear takes such spikes"},
      {"direct_gif_encode", reinterpret_cast<PyCFunction>(spikeops::direct_gif_encode),
       METH_FASTCALL, "gif_encode's CPU entry called directly, or None (csrc/direct.h)"},
      {"direct_spike_linear", reinterpret_cast<PyCFunction>(spikeops::direct_spike_linear),
       METH_FASTCALL, "spike_linear's CPU entry called directly, or None (csrc/direct.h)"},
      {"direct_spike_kv_step", reinterpret_cast<PyCFunction>(spikeops::direct_spike_kv_step),
       METH_FASTCALL, "SpikeKV's CPU step in one call, or None (csrc/direct.h)"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  // The limits the Python layer checks before calling an op, from their one definition
  // (spike_math.h).
  if (module == nullptr ||
      PyModule_AddIntConstant(module, "MAX_PLANES", spikeops::kMaxPlanes) < 0 ||
      PyModule_AddIntConstant(module, "ZERO_LIMIT", spikeops::kZeroLimit) < 0) {
    Py_XDECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace spikeops {
namespace {

// The device whose dispatch key reached an entry; each entry is registered once per device.
enum class Dev { kCpu, kCuda };

#ifdef SPIKEOPS_WITH_CUDA
template <typename Args>
using Launcher = void (*)(const Args&, cudaStream_t);
#define SPIKEOPS_CUDA_LAUNCHER(name) &name
#else
template <typename Args>
using Launcher = std::nullptr_t;  // a CPU-only build has no CUDA kernels
#define SPIKEOPS_CUDA_LAUNCHER(name) nullptr
#endif

// Runs the kernel of device D on `a`. `t` is the input that decides the device (named `name`):
// dispatch can also reach an entry through another argument, such as an empty optional tensor
// on another device, so `t` must be on D.
template <Dev D, typename Args>
void run(const char* op, const at::Tensor& t, const char* name, const Args& a,
         void (*cpu_kernel)(const Args&), Launcher<Args> cuda_launcher) {
  if constexpr (D == Dev::kCpu) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor when the ",
                      "other arguments are, got ", t.device());
    cpu_kernel(a);
  } else {
#ifdef SPIKEOPS_WITH_CUDA
    TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor when the other ",
                      "arguments are, got ", t.device());
    const c10::cuda::CUDAGuard guard(t.device());
    cuda_launcher(a, c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
  }
}

// An output the encoding does not produce (sign of unsigned codes, hi with one range, zero of
// signed codes): shape [0], which the Python layer turns into None (docs/ops.md).
at::Tensor absent_output(const at::TensorOptions& options) { return at::empty({0}, options); }

uint32_t* mutable_words(at::Tensor& t) {
  return reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>());
}

// ---- the host entries --------------------------------------------------------------------

using EncodeResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <Dev D>
EncodeResult gif_encode(const at::Tensor& x, const std::string& mode, int64_t bits, double gamma,
                        const OptTensor& salient_mask, int64_t salient_bits,
                        const OptTensor& scale, const OptTensor& zero, double theta_nor,
                        double theta_out, int64_t group) {
  Inputs in;
  EncodeArgs a = check_encode(in, x, mode, bits, gamma, salient_mask, salient_bits, scale, zero,
                              theta_nor, theta_out, group);
  const auto i32 = x.options().dtype(at::kInt);
  at::Tensor planes = at::empty({a.P, a.M, a.W}, i32);
  at::Tensor sign = a.is_signed ? at::empty({a.M, a.W}, i32) : absent_output(i32);
  const bool has_hi = a.R == 2 && a.group == 0;  // two ranges, not two activation groups
  at::Tensor hi = has_hi ? at::empty({a.M, a.W}, i32) : absent_output(i32);
  at::Tensor scale_out = at::empty({a.M, a.R}, x.options().dtype(at::kFloat));
  at::Tensor zero_out = a.is_signed ? absent_output(i32) : at::empty({a.M, a.R}, i32);
  if (a.M > 0) {
    a.planes = mutable_words(planes);
    a.sign = a.is_signed ? mutable_words(sign) : nullptr;
    a.hi = has_hi ? mutable_words(hi) : nullptr;
    a.scale = scale_out.mutable_data_ptr<float>();
    a.zero = a.is_signed ? nullptr : zero_out.mutable_data_ptr<int32_t>();
    run<D>("gif_encode", x, "x", a, &cpu::gif_encode, SPIKEOPS_CUDA_LAUNCHER(launch_gif_encode));
  }
  return {planes, sign, hi, scale_out, zero_out};
}

template <Dev D>
std::tuple<at::Tensor, at::Tensor, at::Tensor> feedback_encode(const at::Tensor& x,
                                                              const at::Tensor& feedback,
                                                              int64_t bits, double gamma) {
  Inputs in;
  FeedbackEncodeArgs a = check_feedback_encode(in, x, feedback, bits, gamma);
  const int64_t rows = a.G * a.N;
  const auto i32 = x.options().dtype(at::kInt);
  at::Tensor planes = at::empty({a.bits, rows, a.W}, i32);
  at::Tensor scale = at::empty({rows, 1}, x.options());
  at::Tensor zero = at::empty({rows, 1}, i32);
  if (rows > 0) {
    a.planes = mutable_words(planes);
    a.scale = scale.mutable_data_ptr<float>();
    a.zero = zero.mutable_data_ptr<int32_t>();
    run<D>("feedback_encode", x, "x", a, &cpu::feedback_encode,
           SPIKEOPS_CUDA_LAUNCHER(launch_feedback_encode));
  }
  return {planes, scale, zero};
}

template <Dev D>
at::Tensor spike_decode(const at::Tensor& planes, const OptTensor& sign, const OptTensor& hi,
                        const at::Tensor& scale, const OptTensor& zero, int64_t K,
                        at::ScalarType dtype, int64_t group) {
  const char* op = "spike_decode";
  Inputs in;
  DecodeArgs a;
  static_cast<SpikeFields&>(a) = check_spikes(op, in, planes, sign, hi, scale, zero, group);
  TORCH_CHECK_VALUE(K >= 1, op, ": K must be >= 1, got ", K);
  check_spike_width(op, a, K, "K");
  check_float_out_dtype(op, dtype, "dtype");
  at::Tensor out = at::empty({a.M, K}, planes.options().dtype(dtype));
  if (a.M > 0) {
    a.out = out.mutable_data_ptr();
    a.out_type = float_type(dtype);
    a.K = K;
    run<D>(op, planes, "planes", a, &cpu::spike_decode,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_decode));
  }
  return out;
}

template <Dev D>
at::Tensor spike_counts(const at::Tensor& planes, const OptTensor& sign, bool negative) {
  const char* op = "spike_counts";
  Inputs in;
  CountsArgs a;
  static_cast<SpikeFields&>(a) = check_spike_bits(op, in, planes, sign, std::nullopt, 0);
  TORCH_CHECK_VALUE(!negative || a.sign, op,
                    ": negative=True needs sign (a signed encoding), got None");
  at::Tensor out = at::empty({a.P, a.M}, planes.options().dtype(at::kLong));
  if (a.M > 0) {
    a.negative = negative;
    a.counts = out.mutable_data_ptr<int64_t>();
    run<D>(op, planes, "planes", a, &cpu::spike_counts,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_counts));
  }
  return out;
}

template <Dev D>
at::Tensor spike_stats(const at::Tensor& planes, const OptTensor& sign) {
  const char* op = "spike_stats";
  Inputs in;
  StatsArgs a;
  static_cast<SpikeFields&>(a) = check_spike_bits(op, in, planes, sign, std::nullopt, 0);
  // Both kernels add into the output, so it starts from zeros.
  at::Tensor out = at::zeros({2 * a.P + 2}, planes.options().dtype(at::kLong));
  if (a.M > 0) {
    a.stats = out.mutable_data_ptr<int64_t>();
    run<D>(op, planes, "planes", a, &cpu::spike_stats,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_stats));
  }
  return out;
}

template <Dev D>
at::Tensor spike_accumulate(const at::Tensor& planes, const OptTensor& sign, const OptTensor& hi,
                            const at::Tensor& w, bool per_plane, int64_t group) {
  const char* op = "spike_accumulate";
  Inputs in;
  AccumulateArgs a;
  static_cast<SpikeFields&>(a) = check_spike_bits(op, in, planes, sign, hi, group);
  check_dtype(op, w, "w", at::kChar);
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) >= 1 && w.size(0) <= kMaxK, op,
                    ": w must have shape [K, N] with 1 <= K <= ", kMaxK, ", got ", w.sizes());
  check_same_device(op, w, "w", planes, "planes");
  check_spike_width(op, a, w.size(0), "w.shape[0]");
  a.K = w.size(0), a.N = w.size(1);
  // Both kernels add into the output, so it starts from zeros.
  at::Tensor out = at::zeros(per_plane ? at::IntArrayRef{a.P, a.R, a.M, a.N}
                                       : at::IntArrayRef{a.R, a.M, a.N},
                             planes.options().dtype(at::kLong));
  if (out.numel() > 0) {
    a.w = in.data<int8_t>(w);
    a.out = out.mutable_data_ptr<int64_t>();
    a.per_plane = per_plane;
    run<D>(op, planes, "planes", a, &cpu::spike_accumulate,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_accumulate));
  }
  return out;
}

template <Dev D>
at::Tensor spike_linear(const at::Tensor& planes, const OptTensor& sign, const OptTensor& hi,
                        const at::Tensor& scale, const OptTensor& zero,
                        const OptTensor& qweight, const at::Tensor& qzeros,
                        const at::Tensor& scales, const at::Tensor& g_idx,
                        const OptTensor& packed, const OptTensor& code_sums,
                        const OptTensor& bias, int64_t bits, int64_t group_size,
                        int64_t zero_offset, at::ScalarType out_dtype,
                        const std::string& backend, int64_t group) {
  const char* op = "spike_linear";
  Inputs in;
  LinearArgs a;
  static_cast<SpikeFields&>(a) = check_spikes(op, in, planes, sign, hi, scale, zero, group);
  static_cast<WeightFields&>(a) = check_weights(op, in, qweight, qzeros, scales, g_idx, packed,
                                                bits, group_size, zero_offset);
  check_linear_groups(op, a, a);
  check_code_sums(op, in, code_sums, scales, a);
  check_same_device(op, scales, "scales", planes, "planes");
  check_spike_width(op, a, a.K, "g_idx");
  check_float_out_dtype(op, out_dtype, "out_dtype");
  a.backend = parse_backend(op, backend);
  a.programmatic = programmatic_launch_allowed(op);
  a.bias = check_bias(op, in, bias, scales, a.N);
  at::Tensor y = at::empty({a.M, a.N}, planes.options().dtype(out_dtype));
  if (a.M > 0) {
    a.out = y.mutable_data_ptr();
    a.out_type = float_type(out_dtype);
    run<D>(op, planes, "planes", a, &cpu::spike_linear,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_linear));
  }
  return y;
}

template <Dev D>
at::Tensor gptq_dequantize(const OptTensor& qweight, const at::Tensor& qzeros,
                           const at::Tensor& scales, const at::Tensor& g_idx,
                           const OptTensor& packed, int64_t bits, int64_t group_size,
                           int64_t zero_offset) {
  const char* op = "gptq_dequantize";
  Inputs in;
  DequantizeArgs a;
  static_cast<WeightFields&>(a) = check_weights(op, in, qweight, qzeros, scales, g_idx, packed,
                                                bits, group_size, zero_offset);
  at::Tensor out = at::empty({a.N, a.K}, scales.options());
  a.out = out.mutable_data_ptr();
  run<D>(op, scales, "scales", a, &cpu::gptq_dequantize,
         SPIKEOPS_CUDA_LAUNCHER(launch_gptq_dequantize));
  return out;
}

template <Dev D>
at::Tensor spike_matmul(const at::Tensor& a_planes, const OptTensor& a_sign,
                        const OptTensor& a_hi, const at::Tensor& a_scale,
                        const OptTensor& a_zero, const at::Tensor& b_planes,
                        const OptTensor& b_sign, const OptTensor& b_hi,
                        const at::Tensor& b_scale, const OptTensor& b_zero, int64_t K,
                        int64_t batch, int64_t heads, int64_t kv_heads, int64_t keys,
                        bool causal, at::ScalarType out_dtype) {
  Inputs in;
  MatmulArgs a = check_matmul(in, a_planes, a_sign, a_hi, a_scale, a_zero, b_planes, b_sign,
                              b_hi, b_scale, b_zero, K, batch, heads, kv_heads, keys, causal,
                              out_dtype);
  at::Tensor out = at::empty({batch, heads, a.Ma, a.N}, a_planes.options().dtype(out_dtype));
  if (out.numel() > 0) {
    a.out = out.mutable_data_ptr();
    run<D>("spike_matmul", a_planes, "a_planes", a, &cpu::spike_matmul,
           SPIKEOPS_CUDA_LAUNCHER(launch_spike_matmul));
  }
  return out;
}

template <Dev D>
at::Tensor prob_matmul(const at::Tensor& probs, const at::Tensor& token_scale,
                       const at::Tensor& b_planes, const OptTensor& b_sign, const OptTensor& b_hi,
                       const at::Tensor& b_scale, const OptTensor& b_zero, int64_t kv_heads) {
  Inputs in;
  ProbMatmulArgs p{};
  MatmulArgs& m = p.m;
  m = check_prob_matmul(in, probs, token_scale, b_planes, b_sign, b_hi, b_scale, b_zero,
                        kv_heads);
  const int64_t batch = m.batch, heads = m.heads, Ma = m.Ma, K = m.K;
  if constexpr (D == Dev::kCpu) {
    // The fused kernel where the byte kernel serves: the codes made in its rows, no planes.
    if (m.a.M > 0 && m.N > 0 && cpu::prob_matmul_fits(m)) {
      at::Tensor out = at::empty({batch, heads, Ma, m.N}, probs.options());
      at::Tensor steps = at::empty({m.a.M}, probs.options());
      const at::Tensor scales = token_scale.narrow(1, 0, K);  // rows at stride S when contiguous
      p.probs = in.data<float>(probs);
      p.token_scale = token_scale.is_contiguous() ? token_scale.const_data_ptr<float>()
                                                  : in.data<float>(scales);
      p.scale_stride = token_scale.is_contiguous() ? token_scale.size(1) : K;
      p.steps = steps.mutable_data_ptr<float>();
      m.a.scale = p.steps;
      m.out = out.mutable_data_ptr();
      cpu::prob_matmul(p);
      return out;
    }
  }
  // The definition (docs/ops.md, prob_matmul): the weights, their static encoding, spike_matmul.
  const int64_t rows = batch * heads * Ma;
  const at::Tensor weights =
      (probs.reshape({batch, kv_heads, heads / kv_heads, Ma, K}) *
       token_scale.narrow(1, 0, K).reshape({batch, kv_heads, 1, 1, K})).reshape({rows, K});
  const at::Tensor row_max = weights.amax(-1);
  const at::Tensor step = at::where(row_max > 0, row_max / 255, at::ones_like(row_max));
  const auto a = gif_encode<D>(weights, "static", 8, 1.0, c10::nullopt, 0, step,
                               at::zeros({rows}, step.options().dtype(at::kInt)), 0.0, 0.0, 0);
  return spike_matmul<D>(std::get<0>(a), c10::nullopt, c10::nullopt, std::get<3>(a),
                         std::get<4>(a), b_planes, b_sign, b_hi, b_scale, b_zero, K, batch,
                         heads, kv_heads, m.Lb, false,
                         at::kFloat);
}

template <Dev D>
void channel_major_write(const at::Tensor& planes, const OptTensor& sign, at::Tensor& out,
                         int64_t K, int64_t start) {
  Inputs in;
  ChannelMajorArgs a = check_channel_major_write(in, planes, sign, out, K, start);
  if (a.G * a.T == 0) return;
  a.out = mutable_words(out);
  run<D>("channel_major_write", planes, "planes", a, &cpu::channel_major_write,
         SPIKEOPS_CUDA_LAUNCHER(launch_channel_major_write));
}

// x times the +-1 Hadamard matrix H_n per block of n channels (docs/ops.md, hadamard).
template <Dev D>
at::Tensor hadamard(const at::Tensor& x, int64_t n, double scale) {
  const char* op = "hadamard";
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   op, ": x must be a float32, float16, bfloat16 or float64 tensor, got ",
                   dtype_name(dtype));
  TORCH_CHECK_VALUE(n >= 1 && (n & (n - 1)) == 0, op, ": n must be a power of two >= 1, got ", n);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % n == 0, op, ": x's last dimension must be a ",
                    "multiple of n = ", n, ", got x of shape ", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(scale)), op,
                    ": scale must be finite as a float32, got ", scale);
  if constexpr (D == Dev::kCuda) {
    TORCH_CHECK_VALUE(n <= kHadamardCudaMaxN, op, ": n must be <= ", kHadamardCudaMaxN,
                      " on a CUDA device (one block in shared memory), got ", n);
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  if (out.numel() > 0) {
    HadamardArgs a{};
    a.x = xc.const_data_ptr();
    a.out = out.mutable_data_ptr();
    a.type = float_type(dtype);
    a.blocks = out.numel() / n;
    a.n = n;
    a.scale = scale;
    run<D>(op, x, "x", a, &cpu::hadamard, SPIKEOPS_CUDA_LAUNCHER(launch_hadamard));
  }
  return out;
}

// ---- the CPU layout (docs/ops.md, "CPU layout") ------------------------------------------
// CPU tensors only; the entries are registered for CUDA too, where they refuse their input by
// name (ValueError) instead of the dispatcher's NotImplementedError.

std::tuple<at::Tensor, at::Tensor> cpu_layout(const at::Tensor& qweight, int64_t bits,
                                              int64_t group_size, int64_t K) {
  check_cpu_layout(qweight, bits, group_size, K);
  const at::Tensor q = qweight.contiguous();
  LayoutArgs a{};
  a.group_size = group_size;
  a.K = K, a.N = q.size(1), a.G = (K + group_size - 1) / group_size;
  at::Tensor packed = at::empty({(a.N + 15) / 16, (K + 7) / 8, 64}, q.options().dtype(at::kByte));
  at::Tensor code_sums = at::empty({a.G, a.N}, q.options().dtype(at::kUInt16));
  a.qweight = q.data_ptr<int32_t>();
  a.packed = packed.data_ptr<uint8_t>();
  a.code_sums = code_sums.data_ptr<uint16_t>();
  cpu::cpu_layout(a);
  return {packed, code_sums};
}

at::Tensor cpu_layout_qweight(const at::Tensor& packed, int64_t K, int64_t N) {
  check_layout_qweight(packed, K, N);
  const at::Tensor p = packed.contiguous();
  at::Tensor qweight = at::empty({(K + 7) / 8, N}, p.options().dtype(at::kInt));
  LayoutArgs a{};  // no code sums: group_size and G stay 0
  a.qweight = qweight.data_ptr<int32_t>();
  a.packed = p.data_ptr<uint8_t>();
  a.K = K, a.N = N;
  cpu::cpu_layout_qweight(a);
  return qweight;
}

}  // namespace

// ---- direct calls from Python (direct.h) --------------------------------------------------

PyObject* direct_gif_encode(PyObject*, PyObject* const* args, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  if (!direct_call_allowed()) Py_RETURN_NONE;
  DirectArgs in(args, count, 11);
  const at::Tensor& x = in.tensor(0);
  const std::string mode = in.text(1);
  const int64_t bits = in.integer(2);
  const double gamma = in.real(3);
  const OptTensor salient_mask = in.optional_tensor(4);
  const int64_t salient_bits = in.integer(5);
  const OptTensor scale = in.optional_tensor(6), zero = in.optional_tensor(7);
  const double theta_nor = in.real(8), theta_out = in.real(9);
  const int64_t group = in.integer(10);
  if (!in.ok()) Py_RETURN_NONE;
  EncodeResult out;
  {
    WithoutGil released;
    out = gif_encode<Dev::kCpu>(x, mode, bits, gamma, salient_mask, salient_bits, scale, zero,
                                theta_nor, theta_out, group);
  }
  auto& [planes, sign, hi, scale_out, zero_out] = out;
  PyObject* result = PyTuple_New(5);
  Py_ssize_t i = 0;
  for (const at::Tensor* t : {&planes, &sign, &hi, &scale_out, &zero_out}) {
    PyObject* wrapped = result ? THPVariable_Wrap(*t) : nullptr;
    if (wrapped == nullptr) {
      Py_XDECREF(result);
      return nullptr;
    }
    PyTuple_SET_ITEM(result, i++, wrapped);  // steals the reference
  }
  return result;
  END_HANDLE_TH_ERRORS
}

PyObject* direct_spike_linear(PyObject*, PyObject* const* args, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  if (!direct_call_allowed()) Py_RETURN_NONE;
  DirectArgs in(args, count, 18);
  const at::Tensor& planes = in.tensor(0);
  const OptTensor sign = in.optional_tensor(1), hi = in.optional_tensor(2);
  const at::Tensor& scale = in.tensor(3);
  const OptTensor zero = in.optional_tensor(4), qweight = in.optional_tensor(5);
  const at::Tensor& qzeros = in.tensor(6);
  const at::Tensor& scales = in.tensor(7);
  const at::Tensor& g_idx = in.tensor(8);
  const OptTensor packed = in.optional_tensor(9), code_sums = in.optional_tensor(10);
  const OptTensor bias = in.optional_tensor(11);
  const int64_t bits = in.integer(12), group_size = in.integer(13), zero_offset = in.integer(14);
  const at::ScalarType out_dtype = in.dtype(15);
  const std::string backend = in.text(16);
  const int64_t group = in.integer(17);
  if (!in.ok()) Py_RETURN_NONE;
  at::Tensor y;
  {
    WithoutGil released;
    y = spike_linear<Dev::kCpu>(planes, sign, hi, scale, zero, qweight, qzeros, scales, g_idx,
                                packed, code_sums, bias, bits, group_size, zero_offset,
                                out_dtype, backend, group);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// SpikeKV's step on the CPU (python/spikeops/attention.py: SpikeKV.step's rotation, then
// _write and _attend with pv="spike"), the same ATen operations and op entries in the same order,
// so the same bits: q, k and v times the Hadamard rotation as one product (or none); T tokens'
// keys ((k - key_offset) / key_scale, encoded, copied into the key cache's slots of tokens
// start .. start + T) and values (encoded; their scales into value_scale, their words into the
// channel-major value_bits, as wide as Python made them); then the queries times query_scale,
// encoded, QK^T (spike_matmul) times scaling, the mask's -inf, softmax, PV (prob_matmul) and the
// inverse rotation. One call in place of about forty Python-level tensor operations of a few
// microseconds each (docs/performance.md, "Attention on spikes on the CPU").
PyObject* direct_spike_kv_step(PyObject*, PyObject* const* args, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  if (!direct_call_allowed()) Py_RETURN_NONE;
  DirectArgs in(args, count, 28);
  const at::Tensor& q_in = in.tensor(0);
  const at::Tensor& k_in = in.tensor(1);
  const at::Tensor& v_in = in.tensor(2);
  const OptTensor rotation = in.optional_tensor(3);
  const int64_t start = in.integer(4), end = in.integer(5);
  const double scaling = in.real(6);
  const OptTensor mask = in.optional_tensor(7);
  const at::Tensor& key_offset = in.tensor(8);
  const at::Tensor& key_scale = in.tensor(9);
  const at::Tensor& query_scale = in.tensor(10);
  // The key cache: planes [P, rows, W], sign [rows, W] or None, scale [rows, 1], zero [rows, 1]
  // or None, rows = (batch, kv head, token) of max_len tokens; its encoding.
  const at::Tensor& key_planes = in.tensor(11);
  const OptTensor key_sign = in.optional_tensor(12);
  const at::Tensor& key_scales = in.tensor(13);
  const OptTensor key_zero = in.optional_tensor(14);
  const std::string key_mode = in.text(15);
  const int64_t key_bits = in.integer(16);
  const double key_gamma = in.real(17);
  // The value cache: value_bits [planes + 1, (batch, kv head, channel), words], the sign last;
  // value_scale [batch * kv_heads, max_len]; ones [rows, 1]; its encoding. The queries'.
  const at::Tensor& value_bits = in.tensor(18);
  const at::Tensor& value_scale = in.tensor(19);
  const at::Tensor& ones = in.tensor(20);
  const std::string value_mode = in.text(21);
  const int64_t value_bits_per = in.integer(22);
  const double value_gamma = in.real(23);
  const std::string query_mode = in.text(24);
  const int64_t query_bits = in.integer(25);
  const double query_gamma = in.real(26);
  // The keys' error feedback [batch * kv_heads, D, D] (SpikeKV.key_feedback), or None: gif_encode.
  const OptTensor key_feedback = in.optional_tensor(27);
  if (!in.ok()) Py_RETURN_NONE;
  at::Tensor out;
  {
    WithoutGil released;
    const int64_t B = k_in.size(0), G = k_in.size(1), T = k_in.size(2), D = k_in.size(3);
    const int64_t H = q_in.size(1);
    at::Tensor q = q_in, k = k_in, v = v_in;
    if (rotation) {
      const auto rotated = at::cat({q, k, v}, 1).matmul(*rotation).split_with_sizes({H, G, G}, 1);
      q = rotated[0], k = rotated[1], v = rotated[2];
    }
    const int64_t L = key_planes.size(1) / (B * G);
    // encode_rows of rows [M, D]: one range, no salient channels, dynamic scales.
    const auto encode = [D](const at::Tensor& x, const std::string& mode, int64_t bits,
                            double gamma) {
      return gif_encode<Dev::kCpu>(x.reshape({-1, D}), mode, bits, gamma, c10::nullopt, 0,
                                   c10::nullopt, c10::nullopt, 0.0, 0.0, 0);
    };
    // SpikeCache.write: each field ([planes,] rows of B * G * L tokens, width) gets the new
    // tokens' rows in the slots of tokens start .. start + T.
    const auto into_slots = [&](const at::Tensor& field, const at::Tensor& rows) {
      const int64_t width = field.size(-1);
      std::vector<int64_t> slots{B, G, L, width}, fresh{B, G, T, width};
      if (field.dim() == 3) {
        slots.insert(slots.begin(), field.size(0));
        fresh.insert(fresh.begin(), field.size(0));
      }
      field.view(slots).narrow(-2, start, T).copy_(rows.view(fresh));
    };
    const at::Tensor key_rows = (k - key_offset) / key_scale;
    if (key_feedback) {  // minmax keys (SpikeKV): planes, scale and zero
      TORCH_CHECK_VALUE(key_zero.has_value(), "direct_spike_kv_step: the keys' error feedback ",
                        "needs a minmax key cache (a zero point per token)");
      const auto keys = feedback_encode<Dev::kCpu>(
          key_rows.reshape({B * G, T, D}).to(at::kFloat), *key_feedback, key_bits, key_gamma);
      into_slots(key_planes, std::get<0>(keys));
      into_slots(key_scales, std::get<1>(keys));
      into_slots(*key_zero, std::get<2>(keys));
    } else {
      const auto keys = encode(key_rows, key_mode, key_bits, key_gamma);
      into_slots(key_planes, std::get<0>(keys));
      if (key_sign) into_slots(*key_sign, std::get<1>(keys));
      into_slots(key_scales, std::get<3>(keys));
      if (key_zero) into_slots(*key_zero, std::get<4>(keys));
    }
    // ValueCache.write (the width already made by Python).
    const auto values = encode(v, value_mode, value_bits_per, value_gamma);
    value_scale.narrow(1, start, T).copy_(std::get<3>(values).view({-1, T}));
    at::Tensor bits = value_bits;
    channel_major_write<Dev::kCpu>(std::get<0>(values), std::get<1>(values), bits, D, start);
    // SpikeKV._attend.
    const auto queries = encode(q * query_scale, query_mode, query_bits, query_gamma);
    const auto produced = [](const at::Tensor& t) -> OptTensor {
      return t.dim() == 1 ? OptTensor() : OptTensor(t);
    };
    at::Tensor scores =
        spike_matmul<Dev::kCpu>(std::get<0>(queries), produced(std::get<1>(queries)),
                                produced(std::get<2>(queries)), std::get<3>(queries),
                                produced(std::get<4>(queries)), key_planes, key_sign,
                                c10::nullopt, key_scales, key_zero, D, B, H, G, end, false,
                                at::kFloat) *
        scaling;
    if (mask) scores = scores.masked_fill(mask->logical_not(), -INFINITY);
    const at::Tensor probs = at::softmax(scores, -1);
    // ValueCache.spikes(end): the cache's words when they are those of end tokens.
    const int64_t words = (end + 31) / 32;
    const at::Tensor read =
        bits.size(2) == words ? bits : bits.narrow(2, 0, words).contiguous();
    const int64_t vp = read.size(0) - 1;
    out = prob_matmul<Dev::kCpu>(probs, value_scale, read.narrow(0, 0, vp), read.select(0, vp),
                                 c10::nullopt, ones, c10::nullopt, G);
    if (rotation) out = out.matmul(rotation->t());
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

}  // namespace spikeops

TORCH_LIBRARY(spikeops, m) {
  // Activations x [M, K] -> bit-plane spikes (planes [P, M, W], sign, hi, scale [M, R], zero).
  // mode: minmax | absmax | absmean | static | oat; bits counts the sign for signed modes and is
  // the plane count P for oat; scale/zero only for static (zero given = unsigned); theta_* only oat;
  // group > 0: one scale (and zero) per token and activation group of `group` channels.
  m.def(
      "gif_encode(Tensor x, str mode, int bits, float gamma, Tensor? salient_mask, "
      "int salient_bits, Tensor? scale, Tensor? zero, float theta_nor, float theta_out, "
      "int group=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // minmax spikes (planes [bits, G * N, W], scale [G * N, 1], zero [G * N, 1]) of float32 rows
  // x [G, N, K] whose codes are chosen in channel order, each channel's rounding error carried
  // into the later channels l through feedback [G, K, K] (row (g, n) reads matrix g):
  // r_l -= (r_j - s * (Q_j - z)) * feedback[g, j, l]; zero feedback gives gif_encode's minmax.
  m.def("feedback_encode(Tensor x, Tensor feedback, int bits, float gamma) "
        "-> (Tensor, Tensor, Tensor)");
  // Spikes -> x_hat [M, K] = scale[m, r] * (s * Q - zero[m, r]) in float32 (r: the element's
  // scale column), cast to dtype.
  m.def(
      "spike_decode(Tensor planes, Tensor? sign, Tensor? hi, Tensor scale, Tensor? zero, int K, "
      "ScalarType dtype, int group=0) -> Tensor");
  // Set bits per plane and token, int64 [P, M]; negative=True counts only spikes with sign set.
  m.def("spike_counts(Tensor planes, Tensor? sign, bool negative) -> Tensor");
  // One pass of layer statistics, int64 [2P + 2], summed over tokens: spikes per plane [0, P),
  // negative spikes per plane [P, 2P) (zeros without sign), fired channels (set bits of the OR
  // over planes) at 2P, and all-zero words (OR over planes == 0) at 2P + 1.
  m.def("spike_stats(Tensor planes, Tensor? sign) -> Tensor");
  // Exact signed accumulation with int8 weights w [K, N]: int64 [R, M, N] per scale column
  // (range or activation group), or per plane [P, R, M, N] whose 2^p-weighted sum is the total.
  m.def(
      "spike_accumulate(Tensor planes, Tensor? sign, Tensor? hi, Tensor w, bool per_plane, "
      "int group=0) -> Tensor");
  // y [M, N] = x_hat @ W_hat^T + bias on the kernel form of a GPTQ layer: the codes as packed
  // qweight (bits 2/4/8) or, on the CPU, as the CPU layout `packed` of 4-bit codes with its
  // code_sums [G, N] uint16; stored zero points qzeros [G, N*bits/32] (true zero = field +
  // zero_offset), scales [G, N] float16, g_idx [K] int32 (read only when group_size is 0),
  // bias float32 [N]; integer sums per weight group and scale column, float epilogue.
  // backend: spike (event driven) | int (integer codes) | auto; identical bits. group: the
  // spikes' activation group, inside the weight groups.
  m.def(
      "spike_linear(Tensor planes, Tensor? sign, Tensor? hi, Tensor scale, Tensor? zero, "
      "Tensor? qweight, Tensor qzeros, Tensor scales, Tensor g_idx, Tensor? packed, "
      "Tensor? code_sums, Tensor? bias, int bits, int group_size, int zero_offset, "
      "ScalarType out_dtype, str backend, int group=0) -> Tensor");
  // W_hat float16 [N, K] = fp16(float32(scales[g, n]) * float32(q - z)), g the group of k, bit
  // exact, on the weights spike_linear takes (code_sums aside).
  m.def(
      "gptq_dequantize(Tensor? qweight, Tensor qzeros, Tensor scales, Tensor g_idx, "
      "Tensor? packed, int bits, int group_size, int zero_offset) -> Tensor");
  // Exact spike x spike products per head: out [batch, heads, Ma, keys] = A_hat @ B_hat^T with
  // A rows (batch, head, i), B rows (batch, kv head, j) of which the first `keys` per head are
  // read, head h reading kv head h / (heads / kv_heads); integer plane-pair popcounts in int64,
  // one float64 epilogue; causal: key j of query i is -inf when j > keys - Ma + i.
  m.def(
      "spike_matmul(Tensor a_planes, Tensor? a_sign, Tensor? a_hi, Tensor a_scale, "
      "Tensor? a_zero, Tensor b_planes, Tensor? b_sign, Tensor? b_hi, Tensor b_scale, "
      "Tensor? b_zero, int K, "
      "int batch, int heads, int kv_heads, int keys, bool causal, ScalarType out_dtype) "
      "-> Tensor");
  // PV of attention from float probabilities: spike_matmul of A = probs [batch, heads, Ma, K]
  // times B's token scales (row (batch, kv head) of token_scale [batch * kv_heads, S >= K]),
  // encoded per row as static unsigned 8-bit codes of scale max / 255, and B, out float32
  // [batch, heads, Ma, Lb]; on the CPU the codes are made inside the byte kernel.
  m.def(
      "prob_matmul(Tensor probs, Tensor token_scale, Tensor b_planes, Tensor? b_sign, "
      "Tensor? b_hi, Tensor b_scale, Tensor? b_zero, int kv_heads) -> Tensor");
  // T tokens' spike words (token-major rows (g, t), M = G * T, one range) written in place into
  // channel-major words out [P + (sign given), G * K, words] (rows (g, k), token j at bit j) at
  // tokens start .. start + T: earlier tokens kept, later tokens of the words written cleared.
  m.def(
      "channel_major_write(Tensor planes, Tensor? sign, Tensor(a!) out, int K, int start) -> ()");
  // The CPU layout (packed uint8 [ceil(N/16), ceil(K/8), 64], code_sums uint16 [G, N]) of the
  // 4-bit codes of qweight [ceil(K/8), N] in groups of group_size channels, and qweight from it;
  // channels past K are 0 in both.
  m.def("cpu_layout(Tensor qweight, int bits, int group_size, int K) -> (Tensor, Tensor)");
  m.def("cpu_layout_qweight(Tensor packed, int K, int N) -> Tensor");
  // x (float32, float16, bfloat16 or float64, last dimension a multiple of n) times the +-1
  // Sylvester Hadamard matrix H_n per block of n channels: float64 butterflies, each output
  // rounded once to x's dtype, then times scale as torch's `y * scale` does (skipped at 1).
  m.def("hadamard(Tensor x, int n, float scale=1.0) -> Tensor");
}

#define SPIKEOPS_REGISTER(D)                                                 \
  m.impl("gif_encode", &spikeops::gif_encode<spikeops::Dev::D>);             \
  m.impl("feedback_encode", &spikeops::feedback_encode<spikeops::Dev::D>);   \
  m.impl("spike_decode", &spikeops::spike_decode<spikeops::Dev::D>);         \
  m.impl("spike_counts", &spikeops::spike_counts<spikeops::Dev::D>);         \
  m.impl("spike_stats", &spikeops::spike_stats<spikeops::Dev::D>);           \
  m.impl("spike_accumulate", &spikeops::spike_accumulate<spikeops::Dev::D>); \
  m.impl("spike_linear", &spikeops::spike_linear<spikeops::Dev::D>);         \
  m.impl("gptq_dequantize", &spikeops::gptq_dequantize<spikeops::Dev::D>);

#define SPIKEOPS_REGISTER_MATMUL(D)                                  \
  m.impl("spike_matmul", &spikeops::spike_matmul<spikeops::Dev::D>); \
  m.impl("prob_matmul", &spikeops::prob_matmul<spikeops::Dev::D>);   \
  m.impl("channel_major_write", &spikeops::channel_major_write<spikeops::Dev::D>);

#define SPIKEOPS_REGISTER_LAYOUT                         \
  m.impl("cpu_layout", &spikeops::cpu_layout);           \
  m.impl("cpu_layout_qweight", &spikeops::cpu_layout_qweight);

TORCH_LIBRARY_IMPL(spikeops, CPU, m) {
  SPIKEOPS_REGISTER(kCpu)
  SPIKEOPS_REGISTER_MATMUL(kCpu)
  SPIKEOPS_REGISTER_LAYOUT
  m.impl("hadamard", &spikeops::hadamard<spikeops::Dev::kCpu>);
}

#ifdef SPIKEOPS_WITH_CUDA
TORCH_LIBRARY_IMPL(spikeops, CUDA, m) {
  SPIKEOPS_REGISTER(kCuda)
  SPIKEOPS_REGISTER_MATMUL(kCuda)
  SPIKEOPS_REGISTER_LAYOUT
  m.impl("hadamard", &spikeops::hadamard<spikeops::Dev::kCuda>);
}
#endif
