#include "direct.h"

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

namespace spikeops {
namespace {

// The dispatch keys of a plain CPU tensor: its backend, its autograd and view-tracking keys
// (absent on inference tensors) and autocast's, for which the ops have no kernel (autocast
// passes them through). Any other key (Conjugate, Negative, Sparse, Meta, functorch's, Python)
// has the dispatcher do something a direct call would not.
const c10::DispatchKeySet kPlainCpu({c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU,
                                     c10::DispatchKey::ADInplaceOrView,
                                     c10::DispatchKey::AutocastCPU});

}  // namespace

bool direct_call_allowed() {
  // Python and functorch modes add their keys to the thread's included set; inference mode
  // only takes ADInplaceOrView out of it.
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  return c10::default_included_set.isSupersetOf(tls.included_) &&
         !at::impl::torch_function_mode_enabled() && !at::hasCallbacks();
}

DirectArgs::DirectArgs(PyObject* const* args, Py_ssize_t count, Py_ssize_t want)
    : args_(args), ok_(count == want), grad_(at::GradMode::is_enabled()) {}

const at::Tensor& DirectArgs::tensor(Py_ssize_t i) {
  PyObject* obj = args_[i];
  if (ok_ && THPVariable_CheckExact(obj)) {
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (kPlainCpu.isSupersetOf(t.key_set()) && !(grad_ && t.requires_grad())) return t;
  }
  ok_ = false;
  return none_;
}

std::optional<at::Tensor> DirectArgs::optional_tensor(Py_ssize_t i) {
  if (args_[i] == Py_None) return std::nullopt;
  return tensor(i);
}

int64_t DirectArgs::integer(Py_ssize_t i) {
  if (ok_ && PyLong_CheckExact(args_[i])) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(args_[i], &overflow);
    if (!overflow) return v;
  }
  ok_ = false;
  return 0;
}

double DirectArgs::real(Py_ssize_t i) {
  // An int converts as the dispatcher converts it (PyFloat_AsDouble); a huge one is left to it.
  if (ok_ && (PyFloat_CheckExact(args_[i]) || PyLong_CheckExact(args_[i]))) {
    const double v = PyFloat_AsDouble(args_[i]);
    if (!PyErr_Occurred()) return v;
    PyErr_Clear();
  }
  ok_ = false;
  return 0.0;
}

std::string DirectArgs::text(Py_ssize_t i) {
  if (ok_ && PyUnicode_CheckExact(args_[i])) {
    Py_ssize_t size = 0;
    const char* s = PyUnicode_AsUTF8AndSize(args_[i], &size);
    if (s != nullptr) return std::string(s, size);
    PyErr_Clear();
  }
  ok_ = false;
  return {};
}

at::ScalarType DirectArgs::dtype(Py_ssize_t i) {
  if (ok_ && THPDtype_Check(args_[i])) return reinterpret_cast<THPDtype*>(args_[i])->scalar_type;
  ok_ = false;
  return at::kFloat;
}

}  // namespace spikeops
