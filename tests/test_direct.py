"""The direct calls of gif_encode's and spike_linear's CPU entries (spikeops._C.direct_*,
csrc/direct.h): the dispatcher's bits and errors where they apply, None (the dispatcher runs
the op) wherever the dispatcher would do more than call the entry."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import spikeops
from spikeops import Encoding, _C
from helpers import make_layer

_ops = torch.ops.spikeops


def encode_args(x, enc, mask=None, scale=None, zero=None):
    """gif_encode's positional arguments, in schema order, as spikeops.ops passes them."""
    theta = enc.theta or (0.0, 0.0)
    return (x, enc.mode, enc.bits, 1.0 if enc.gamma is None else enc.gamma, mask,
            enc.salient_bits if mask is not None else 0, scale, zero, theta[0], theta[1],
            enc.group)


def linear_args(st, w, bias=None, out_dtype=torch.float32, backend="auto"):
    """spike_linear's positional arguments, in schema order."""
    return (st.planes, st.sign, st.hi, st.scale, st.zero, *w.kernel_args(), bias, w.kernel_bits,
            w.kernel_group_size, w.zero_offset, out_dtype, backend, st.group)


def layer_and_spikes(M=3, K=256, N=40, enc=Encoding("absmax", 4)):
    w = make_layer(K, N, 4, 64, sym=False)[0]
    return w, spikeops.encode(torch.randn(M, K) * 2, enc)


ENCODE_CASES = [  # (encoding, salient mask, static scale, static zero)
    (Encoding("minmax", 4), False, None, None),
    (Encoding("absmax", 4, gamma=0.5), False, None, None),
    (Encoding("absmean", 3, group=64), False, None, None),
    (Encoding("minmax", 4, salient_bits=6), True, None, None),
    (Encoding("oat", 8, theta=(0.8, 2.5)), False, None, None),
    (Encoding("static", 4), False, torch.full((5,), 0.1), torch.full((5,), 7, dtype=torch.int32)),
]


@pytest.mark.parametrize("case", range(len(ENCODE_CASES)))
def test_direct_gif_encode_equals_the_dispatcher(case):
    enc, salient, scale, zero = ENCODE_CASES[case]
    x = torch.randn(5, 200, dtype=torch.bfloat16) * 3
    mask = torch.rand(200) < 0.2 if salient else None
    args = encode_args(x, enc, mask, scale, zero)
    direct = _C.direct_gif_encode(*args)
    assert direct is not None
    for d, o in zip(direct, _ops.gif_encode.default(*args)):
        assert d.dtype == o.dtype and torch.equal(d, o)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("enc", [Encoding("minmax", 4), Encoding("absmax", 4, group=64)],
                         ids=["minmax4", "absmax4g64"])
def test_direct_spike_linear_equals_the_dispatcher(bias, out_dtype, enc):
    w, st = layer_and_spikes(enc=enc)
    args = linear_args(st, w, torch.randn(40) if bias else None, out_dtype)
    direct = _C.direct_spike_linear(*args)
    assert direct is not None and direct.dtype == out_dtype
    assert torch.equal(direct, _ops.spike_linear.default(*args))


def test_direct_calls_under_no_grad_and_inference_mode():
    """Runner decodes under no_grad; inference mode takes one key out of the thread's set."""
    w, st = layer_and_spikes()
    want = _ops.spike_linear.default(*linear_args(st, w))
    for guard in (torch.no_grad, torch.inference_mode):
        with guard():
            got = _C.direct_spike_linear(*linear_args(st, w))
            assert got is not None and torch.equal(got, want)


def test_direct_errors_are_the_ops():
    """Values are checked by the same entry, with the same exception and message."""
    w, st = layer_and_spikes()
    bad_mode = (torch.randn(2, 64), "maxmin") + encode_args(torch.randn(2, 64), Encoding())[2:]
    cases = [(_C.direct_spike_linear, _ops.spike_linear.default, linear_args(st, w, backend="x"),
              ValueError),
             (_C.direct_spike_linear, _ops.spike_linear.default,
              linear_args(st, w, out_dtype=torch.float64), TypeError),
             (_C.direct_gif_encode, _ops.gif_encode.default, bad_mode, ValueError)]
    for direct_call, op, args, error in cases:
        with pytest.raises(error) as direct:
            direct_call(*args)
        with pytest.raises(error) as dispatched:
            op(*args)
        assert str(direct.value) == str(dispatched.value)


class _Subclass(torch.Tensor):
    pass


def _not_plain_arguments(w, st):
    """Argument lists a direct call must leave to the dispatcher, by what makes them so."""
    args = linear_args(st, w)
    yield "a tensor subclass", (st.planes.as_subclass(_Subclass),) + args[1:]
    yield "a negative view", args[:3] + (torch._neg_view(st.scale),) + args[4:]
    yield "a meta tensor", (st.planes.to("meta"),) + args[1:]
    yield "a bool for an int", args[:12] + (True,) + args[13:]
    yield "a float for an int", args[:12] + (4.0,) + args[13:]
    yield "too few arguments", args[:-1]


def test_direct_call_leaves_other_arguments_to_the_dispatcher():
    w, st = layer_and_spikes()
    for what, args in _not_plain_arguments(w, st):
        assert _C.direct_spike_linear(*args) is None, what


def test_direct_call_leaves_gradients_modes_and_profilers_to_the_dispatcher():
    w, st = layer_and_spikes()
    scale = st.scale.clone().requires_grad_()
    with_grad = linear_args(st._replace(scale=scale), w)
    assert _C.direct_spike_linear(*with_grad) is None
    with torch.no_grad():  # no gradient to record
        assert _C.direct_spike_linear(*with_grad) is not None

    class Dispatch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Function(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    for mode in (Dispatch(), Function(), torch.profiler.profile()):
        with mode:
            assert _C.direct_spike_linear(*linear_args(st, w)) is None, type(mode).__name__
            assert _C.direct_gif_encode(*encode_args(torch.randn(2, 64), Encoding())) is None
    assert _C.direct_spike_linear(*linear_args(st, w)) is not None


def test_profiles_still_show_the_ops():
    """Under a profiler the wrappers call the ops through the dispatcher, which records them."""
    w = make_layer(128, 24, 4, 64)[0]
    layer = spikeops.SpikeLinear(w, Encoding("absmax", 4))
    with torch.no_grad(), torch.profiler.profile() as prof:
        layer(torch.randn(1, 128))
    names = {e.key for e in prof.key_averages()}
    assert {"spikeops::gif_encode", "spikeops::spike_linear"} <= names
