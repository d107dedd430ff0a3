// Direct calls of the ops' CPU entries from Python (spikeops._C.direct_*), past torch.ops'
// generic argument handling, which cost about 3 us a call against about 0.5 us for the entry's
// own checks and allocation (docs/performance.md, "Whole model on the CPU"). A direct call
// takes only what the dispatcher would hand straight to the CPU entry: plain CPU tensors
// (torch.Tensor itself, not a subclass; no conjugate, negative, sparse or functorch view),
// exact Python ints, floats and strings and torch.dtype, no gradient to record, no Python or
// functorch mode, no torch function mode and no RecordFunction callback (a profiler: it records
// the op through the dispatcher). Anything else makes the call return None, and the wrapper in
// python/spikeops/ops.py calls the op through torch.ops instead; either way the entry, with all
// its checks, computes the result.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace spikeops {

// Whether this thread's state lets a direct call stand for the dispatcher's (see above).
bool direct_call_allowed();

// spikeops._C.direct_gif_encode and direct_spike_linear (csrc/ops.cpp): the op's positional
// arguments as its schema orders them (defaults included), its result, or None where a direct
// call does not apply.
PyObject* direct_gif_encode(PyObject*, PyObject* const* args, Py_ssize_t count);
PyObject* direct_spike_linear(PyObject*, PyObject* const* args, Py_ssize_t count);
// spikeops._C.direct_spike_kv_step (csrc/ops.cpp): SpikeKV's CPU step (its write and attend) as
// one call of the ops' CPU entries and ATen operations, or None where a direct call does not
// apply.
PyObject* direct_spike_kv_step(PyObject*, PyObject* const* args, Py_ssize_t count);

// Releases the GIL for the life of the guard, as torch.ops does around an op, also when the
// entry throws.
class WithoutGil {
 public:
  WithoutGil() : state_(PyEval_SaveThread()) {}
  ~WithoutGil() { PyEval_RestoreThread(state_); }
  WithoutGil(const WithoutGil&) = delete;
  WithoutGil& operator=(const WithoutGil&) = delete;

 private:
  PyThreadState* state_;
};

// The positional arguments of a direct call, read in schema order; a value the direct call
// does not take clears ok() (the caller then returns None) and reads as a placeholder.
class DirectArgs {
 public:
  DirectArgs(PyObject* const* args, Py_ssize_t count, Py_ssize_t want);
  bool ok() const { return ok_; }
  const at::Tensor& tensor(Py_ssize_t i);
  std::optional<at::Tensor> optional_tensor(Py_ssize_t i);  // None: absent
  int64_t integer(Py_ssize_t i);
  double real(Py_ssize_t i);
  std::string text(Py_ssize_t i);
  at::ScalarType dtype(Py_ssize_t i);

 private:
  PyObject* const* args_;
  bool ok_;
  bool grad_;  // grad mode is on: an input that requires grad is left to the dispatcher
  at::Tensor none_;
};

}  // namespace spikeops
