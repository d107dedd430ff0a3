"""Boundary checks (docs/ops.md): every bad input raises ValueError (values, shapes, bits,
modes) or TypeError (dtypes) whose message names the argument, through the Python API and
directly through torch.ops.spikeops (the C++ checks). Edge-but-valid inputs must not crash.

Each case is ``(call, exception, pattern)``: ``call(device)`` must raise ``exception`` with a
message matching ``pattern``. Op-level calls start from valid arguments and override some of
them; an override is a value, or a function of the valid argument dict.
"""

import math
import sys

import pytest
import torch

import spikeops
from spikeops import Encoding, GPTQWeight, SpikeLinear, reference
from helpers import kernel_args, make_layer

MINMAX4 = spikeops.Encoding("minmax", 4)

OPS = torch.ops.spikeops
I32, F32 = torch.int32, torch.float32
M, K, N, GS = 3, 40, 16, 16          # tokens, inputs (W = 2 words, last one partial), outputs
G, W = -(-K // GS), (K + 31) // 32   # groups, words per token


# ----------------------------------------------------------------------------- builders
def gptq_tensors(device, bits=4, k=K, n=N, group_size=GS):
    """Valid v1 GPTQ tensors (stored zero = true zero - 1) of random codes."""
    groups = -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), device=device)
    z = torch.randint(0, 2**bits - 1, (groups, n), device=device)
    return dict(qweight=spikeops.pack(q, bits, 0), qzeros=spikeops.pack(z, bits, 1),
                scales=(torch.rand(groups, n, device=device) / 8 + 0.01).half(),
                g_idx=(torch.arange(k, device=device) // group_size).to(I32))


def kernel_tensors(device, bits=4, k=K, n=N, group_size=GS):
    """The kernel form of a valid GPTQ layer, as spike_linear and gptq_dequantize take it."""
    w = weight(device, bits, k, n, group_size)
    return dict(qweight=w.gptq_tensors()["qweight"], qzeros=w.qzeros, scales=w.scales,
                g_idx=w.g_idx, packed=None,
                code_sums=None, zero_offset=w.zero_offset)


def cpu_layout(device):
    """The CPU layout (packed, code_sums) of a valid 4-bit layer, on ``device``."""
    packed, sums = spikeops.ops.cpu_layout(gptq_tensors("cpu")["qweight"], 4, GS, K)
    return packed.to(device), sums.to(device)


def weight(device, bits=4, k=K, n=N, group_size=GS):
    return GPTQWeight(**gptq_tensors(device, bits, k, n, group_size), bits=bits,
                      group_size=group_size, sym=False, checkpoint_format="gptq", in_features=k)


def spikes(device, enc=None, shape=(M, K), salient=None):
    enc = enc or Encoding("minmax", 4)
    return spikeops.encode(torch.randn(shape, device=device), enc, salient_mask=salient)


def salient_mask(device, k=K):
    return torch.arange(k, device=device) % 5 == 0


def override(defaults: dict, over: dict) -> dict:
    for name, value in over.items():
        defaults[name] = value(defaults) if callable(value) else value
    return defaults


def op_fields(device, enc=None, salient=False):
    """The spike fields of a SpikeTensor as op arguments (absent ones None)."""
    st = spikes(device, enc, salient=salient_mask(device) if salient else None)
    return dict(planes=st.planes, sign=st.sign,
                hi=st.hi, scale=st.scale,
                zero=st.zero)


def encode_op(device, **over):
    args = dict(x=torch.randn(M, K, device=device), mode="minmax", bits=4, gamma=1.0,
                salient_mask=None, salient_bits=0,
                scale=None, zero=None, theta_nor=0.0, theta_out=0.0)
    return OPS.gif_encode(**override(args, over))


def static_op(device, **over):
    """gif_encode in static unsigned mode with a valid per-token scale and zero."""
    base = dict(mode="static", scale=lambda a: torch.full((M,), 0.1, device=device),
                zero=lambda a: torch.full((M,), 8, dtype=I32, device=device))
    base.update(over)
    return encode_op(device, **base)


def decode_op(device, enc=None, **over):
    args = dict(op_fields(device, enc), K=K, dtype=F32)
    return OPS.spike_decode(**override(args, over))


def counts_op(device, enc=None, **over):
    f = op_fields(device, enc or Encoding("absmax", 4))
    args = dict(planes=f["planes"], sign=f["sign"], negative=False)
    return OPS.spike_counts(**override(args, over))


def stats_op(device, enc=None, **over):
    f = op_fields(device, enc or Encoding("absmax", 4))
    args = dict(planes=f["planes"], sign=f["sign"])
    return OPS.spike_stats(**override(args, over))


def accumulate_op(device, **over):
    f = op_fields(device, Encoding("absmax", 4))
    args = dict(planes=f["planes"], sign=f["sign"], hi=f["hi"],
                w=torch.randint(-3, 4, (K, N), dtype=torch.int8, device=device), per_plane=False)
    return OPS.spike_accumulate(**override(args, over))


def linear_op(device, enc=None, **over):
    args = dict(op_fields(device, enc), **kernel_tensors(device), bias=None,
                bits=4, group_size=GS, out_dtype=torch.float16, backend="auto")
    return OPS.spike_linear(**override(args, over))


def dequantize_op(device, **over):
    args = {k: v for k, v in kernel_tensors(device).items() if k != "code_sums"}
    args.update(bits=4, group_size=GS)
    return OPS.gptq_dequantize(**override(args, over))


def layout_op(device, **over):
    args = dict(qweight=gptq_tensors(device)["qweight"], bits=4, group_size=GS, K=K)
    return OPS.cpu_layout(**override(args, over))


def layout_qweight_op(device, **over):
    args = dict(packed=cpu_layout(device)[0], K=K, N=N)
    return OPS.cpu_layout_qweight(**override(args, over))


def gptq_weight(device, **over):
    args = dict(gptq_tensors(device), bits=4, group_size=GS, sym=False, checkpoint_format="gptq")
    return GPTQWeight(**override(args, over))


def encode_py(device, x=None, enc=None, **kw):
    x = torch.randn(M, K, device=device) if x is None else x
    return spikeops.encode(x, enc or Encoding("minmax", 4), **kw)


def static_py(device, **kw):
    return encode_py(device, enc=Encoding("static", 4), **kw)


def linear_py(device, st=None, w=None, **kw):
    st = spikes(device) if st is None else st
    return spikeops.spike_linear(st, weight(device) if w is None else w, **kw)


def accumulate_py(device, st=None, w=None, **kw):
    st = spikes(device, Encoding("absmax", 4)) if st is None else st
    w = torch.randint(-3, 4, (K, N), dtype=torch.int8, device=device) if w is None else w
    return spikeops.spike_accumulate(st, w, **kw)


def module(device, **kw):
    args = dict(weight=weight(device), enc=Encoding("minmax", 4))
    args.update(kw)
    return SpikeLinear(**args)


def wrong_device(tensor_fn):
    """The same tensor on the 'meta' device (the only second device a CPU-only machine has)."""
    return lambda a: tensor_fn(a).to("meta")


CPU_ONLY_REASON = ("value checks (g_idx range, static scale/zero, zero range) run on CPU tensors "
                   "only; CUDA kernels guard their reads instead (csrc/checks.cpp)")


def cpu_only(call):
    """A case whose check reads tensor values: the op checks them on CPU only."""
    def run(device):
        if device != "cpu":
            pytest.skip(CPU_ONLY_REASON)
        return call(device)
    return run


def case(call, exc, pattern, id, marks=(), cpu=False):
    """One parametrized entry; ``cpu=True`` for checks of tensor values, which the ops make on
    CPU tensors only."""
    return pytest.param(cpu_only(call) if cpu else call, exc, pattern, id=id, marks=marks)


T = torch.randn  # shorthand for float tensors in the cases below


# ----------------------------------------------------------------------------- Python API
PY_CASES = [
    # Encoding: modes, bits, gamma, salient_bits, theta
    case(lambda d: Encoding("spiky"), ValueError, "mode", "Encoding-mode-unknown"),
    case(lambda d: Encoding("minmax", 0), ValueError, "bits", "Encoding-bits-0"),
    case(lambda d: Encoding("absmax", 1), ValueError, "bits", "Encoding-bits-1-absmax"),
    case(lambda d: Encoding("absmean", 1), ValueError, "bits", "Encoding-bits-1-absmean"),
    case(lambda d: Encoding("minmax", 17), ValueError, "bits", "Encoding-bits-17"),
    case(lambda d: Encoding("minmax", 4.0), TypeError, "bits", "Encoding-bits-float"),
    case(lambda d: Encoding("absmax", 4, gamma=0.0), ValueError, "gamma", "Encoding-gamma-0"),
    case(lambda d: Encoding("absmax", 4, gamma=-0.5), ValueError, "gamma", "Encoding-gamma-neg"),
    case(lambda d: Encoding("absmax", 4, gamma=1.5), ValueError, "gamma", "Encoding-gamma-1.5"),
    case(lambda d: Encoding("absmax", 4, gamma=math.nan), ValueError,
         "gamma", "Encoding-gamma-nan"),
    case(lambda d: Encoding("absmax", 4, gamma=math.inf), ValueError,
         "gamma", "Encoding-gamma-inf"),
    case(lambda d: Encoding("absmax", 4, gamma="1"), TypeError, "gamma", "Encoding-gamma-str"),
    case(lambda d: Encoding("minmax", 4, salient_bits=4), ValueError, "salient_bits",
         "Encoding-salient_bits-equal"),
    case(lambda d: Encoding("minmax", 4, salient_bits=3), ValueError, "salient_bits",
         "Encoding-salient_bits-below"),
    case(lambda d: Encoding("minmax", 4, salient_bits=17), ValueError, "salient_bits",
         "Encoding-salient_bits-17"),
    case(lambda d: Encoding("oat", 4, salient_bits=8, theta=(1.0, 2.0)), ValueError,
         "salient_bits", "Encoding-salient_bits-oat"),
    case(lambda d: Encoding("static", 4, salient_bits=8), ValueError, "salient_bits",
         "Encoding-salient_bits-static"),
    case(lambda d: Encoding("oat", theta=(1.0, 2.0, 3.0)), TypeError, "theta",
         "Encoding-theta-three"),
    case(lambda d: Encoding("oat", theta=(2.0, 1.0)), ValueError,
         "theta", "Encoding-theta-unordered"),
    case(lambda d: Encoding("oat", theta=(1.0, 1.0)), ValueError, "theta", "Encoding-theta-equal"),
    case(lambda d: Encoding("oat", theta=(-1.0, 2.0)), ValueError,
         "theta", "Encoding-theta-negative"),
    case(lambda d: Encoding("oat", theta=(0.0, 2.0)), ValueError, "theta", "Encoding-theta-zero"),
    case(lambda d: Encoding("oat", theta=(math.nan, 2.0)), ValueError,
         "theta", "Encoding-theta-nan"),
    case(lambda d: Encoding("oat", theta=(1.0, math.inf)), ValueError,
         "theta", "Encoding-theta-inf"),
    case(lambda d: Encoding("minmax", theta=(1.0, 2.0)), ValueError, "theta",
         "Encoding-theta-non-oat"),
    case(lambda d: Encoding("oat", 0, theta=(1.0, 2.0)), ValueError, "bits",
         "Encoding-bits-0-oat"),
    case(lambda d: Encoding("oat", 17, theta=(1.0, 2.0)), ValueError, "bits",
         "Encoding-bits-17-oat"),
    case(lambda d: Encoding("oat", 8, theta=(1.0, 2.0), planes=8), TypeError, "planes",
         "Encoding-planes"),
    case(lambda d: Encoding("static", 4, gamma=0.5), ValueError, "gamma",
         "Encoding-gamma-static"),
    case(lambda d: Encoding("oat", 4, gamma=0.5), ValueError, "gamma", "Encoding-gamma-oat"),

    # encode: x, enc, salient_mask
    case(lambda d: encode_py(d, torch.randint(0, 5, (M, K), device=d)), TypeError, "x",
         "encode-x-int"),
    case(lambda d: encode_py(d, torch.ones(M, K, dtype=torch.bool, device=d)), TypeError, "x",
         "encode-x-bool"),
    case(lambda d: encode_py(d, [[1.0, 2.0]]), TypeError, "x", "encode-x-list"),
    case(lambda d: encode_py(d, torch.tensor(1.0, device=d)), ValueError, "x", "encode-x-0dim"),
    case(lambda d: encode_py(d, torch.randn(M, 0, device=d)), ValueError, "x", "encode-x-K0"),
    case(lambda d: spikeops.encode(T(M, K, device=d), "minmax"), TypeError, "enc",
         "encode-enc-str"),
    case(lambda d: encode_py(d, enc=Encoding("minmax", 4, salient_bits=8),
                             salient_mask=torch.ones(K, dtype=I32, device=d)),
         TypeError, "salient_mask", "encode-salient_mask-int"),
    case(lambda d: encode_py(d, enc=Encoding("minmax", 4, salient_bits=8),
                             salient_mask=salient_mask(d, K + 1)),
         ValueError, "salient_mask", "encode-salient_mask-length"),
    case(lambda d: encode_py(d, enc=Encoding("minmax", 4, salient_bits=8),
                             salient_mask=salient_mask(d)[None]),
         ValueError, "salient_mask", "encode-salient_mask-2d"),
    case(lambda d: encode_py(d, salient_mask=salient_mask(d)), ValueError, "salient_mask",
         "encode-salient_mask-without-salient_bits"),
    case(lambda d: encode_py(d, enc=Encoding("minmax", 4, salient_bits=8)), ValueError,
         "salient_mask", "encode-salient_bits-without-salient_mask"),
    case(lambda d: encode_py(d, enc=Encoding("oat", 4)), ValueError, "theta",
         "encode-oat-without-theta"),
    case(lambda d: encode_py(d, enc=Encoding("absmax", 4, salient_bits=8),
                             salient_mask=salient_mask("meta")),
         ValueError, "salient_mask", "encode-salient_mask-device"),

    # encode: static scale / zero
    case(lambda d: static_py(d), ValueError, "scale", "encode-static-no-scale"),
    case(lambda d: static_py(d, scale="0.1"), TypeError, "scale", "encode-static-scale-str"),
    case(lambda d: static_py(d, scale=True), TypeError, "scale", "encode-static-scale-bool"),
    case(lambda d: static_py(d, scale=torch.ones(M, dtype=I32, device=d)), TypeError, "scale",
         "encode-static-scale-int-tensor"),
    case(lambda d: static_py(d, scale=torch.ones(M + 1, device=d)), ValueError, "scale",
         "encode-static-scale-length"),
    case(lambda d: static_py(d, scale=torch.ones(M, device="meta")), ValueError, "scale",
         "encode-static-scale-device"),
    case(lambda d: static_py(d, scale=0.0), ValueError, "scale", "encode-static-scale-0"),
    case(lambda d: static_py(d, scale=torch.tensor([0.1, -0.1, 0.1], device=d)), ValueError,
         "scale", "encode-static-scale-negative"),
    case(lambda d: static_py(d, scale=math.nan), ValueError, "scale", "encode-static-scale-nan"),
    case(lambda d: static_py(d, scale=math.inf), ValueError, "scale", "encode-static-scale-inf"),
    case(lambda d: static_py(d, scale=1e40), ValueError, "scale", "encode-static-scale-1e40"),
    case(lambda d: static_py(d, scale=0.1, zero=1.5), TypeError,
         "zero", "encode-static-zero-float"),
    case(lambda d: static_py(d, scale=0.1, zero=torch.ones(M, device=d)), TypeError, "zero",
         "encode-static-zero-float-tensor"),
    case(lambda d: static_py(d, scale=0.1, zero=torch.ones(2, dtype=I32, device=d)), ValueError,
         "zero", "encode-static-zero-length"),
    case(lambda d: static_py(d, scale=0.1, zero=20000), ValueError, "zero",
         "encode-static-zero-range"),
    case(lambda d: static_py(d, scale=0.1, zero=-20000), ValueError, "zero",
         "encode-static-zero-range-neg"),
    case(lambda d: static_py(d, scale=0.1, zero=2**40), ValueError, "zero",
         "encode-static-zero-int-overflow"),
    case(lambda d: static_py(d, scale=0.1, zero=torch.tensor([2**32 + 1], device=d)), ValueError,
         "zero", "encode-static-zero-int64-wraps"),
    case(lambda d: encode_py(d, enc=Encoding("static", 1), scale=0.1), ValueError, "bits",
         "encode-static-signed-bits-1"),
    case(lambda d: encode_py(d, scale=0.1), ValueError, "scale", "encode-scale-non-static"),
    case(lambda d: encode_py(d, enc=Encoding("absmax", 4), zero=3), ValueError, "zero",
         "encode-zero-non-static"),

    # SpikeTensor.decode / counts (incl. tampered fields reaching the C++ checks)
    case(lambda d: spikes(d).decode(torch.int32), TypeError, "dtype", "decode-dtype-int32"),
    case(lambda d: spikes(d).counts(negative=True), ValueError, "negative",
         "counts-negative-without-sign"),
    case(lambda d: spikes(d)._replace(planes=spikes(d).planes.float()).decode(), TypeError,
         "planes", "decode-planes-float"),
    case(lambda d: spikes(d)._replace(planes=spikes(d).planes[0]).counts(), ValueError,
         "planes", "counts-planes-2d"),
    case(lambda d: spikes(d)._replace(scale=torch.ones(M, 2, device=d)).decode(), ValueError,
         "scale", "decode-scale-shape"),

    # GPTQWeight
    case(lambda d: gptq_weight(d, qweight=lambda a: a["qweight"].long()), TypeError, "qweight",
         "GPTQWeight-qweight-int64"),
    case(lambda d: gptq_weight(d, qweight=lambda a: a["qweight"].tolist()), TypeError, "qweight",
         "GPTQWeight-qweight-list"),
    case(lambda d: gptq_weight(d, qzeros=lambda a: a["qzeros"].float()), TypeError, "qzeros",
         "GPTQWeight-qzeros-float"),
    case(lambda d: gptq_weight(d, scales=lambda a: a["scales"].float()), TypeError, "scales",
         "GPTQWeight-scales-float32"),
    case(lambda d: gptq_weight(d, g_idx=lambda a: a["g_idx"].float()), TypeError, "g_idx",
         "GPTQWeight-g_idx-float"),
    case(lambda d: gptq_weight(d, bits=5), ValueError, "bits", "GPTQWeight-bits-5"),
    case(lambda d: gptq_weight(d, bits=0), ValueError, "bits", "GPTQWeight-bits-0"),
    case(lambda d: gptq_weight(d, bits=16), ValueError, "bits", "GPTQWeight-bits-16"),
    case(lambda d: gptq_weight(d, bits="4"), TypeError, "bits", "GPTQWeight-bits-str"),
    case(lambda d: gptq_weight(d, checkpoint_format="awq"), ValueError, "checkpoint_format",
         "GPTQWeight-format-unknown"),
    case(lambda d: gptq_weight(d, group_size=0), ValueError,
         "group_size", "GPTQWeight-group_size-0"),
    case(lambda d: gptq_weight(d, group_size=16.0), TypeError, "group_size",
         "GPTQWeight-group_size-float"),
    case(lambda d: gptq_weight(d, qweight=lambda a: a["qweight"][:-1]), ValueError, "qweight",
         "GPTQWeight-qweight-rows"),
    case(lambda d: gptq_weight(d, qweight=lambda a: a["qweight"][0]), ValueError, "qweight",
         "GPTQWeight-qweight-1d"),
    case(lambda d: gptq_weight(d, qzeros=lambda a: a["qzeros"][:, :1]), ValueError, "qzeros",
         "GPTQWeight-qzeros-cols"),
    case(lambda d: gptq_weight(d, qzeros=lambda a: a["qzeros"][:1]), ValueError, "qzeros",
         "GPTQWeight-qzeros-groups"),
    case(lambda d: gptq_weight(d, scales=lambda a: a["scales"][:1]), ValueError, "scales",
         "GPTQWeight-scales-groups"),
    case(lambda d: gptq_weight(d, scales=lambda a: a["scales"][:, :-1]), ValueError, "scales",
         "GPTQWeight-scales-cols"),
    # K comes from g_idx, so a g_idx of the wrong length shows up as a qweight of the wrong shape.
    case(lambda d: gptq_weight(d, g_idx=lambda a: torch.zeros(K + 8, dtype=I32, device=d)),
         ValueError, "g_idx|qweight", "GPTQWeight-g_idx-length"),
    case(lambda d: gptq_weight(d, g_idx=lambda a: a["g_idx"][None]), ValueError, "g_idx",
         "GPTQWeight-g_idx-2d"),
    case(lambda d: gptq_weight(d, g_idx=lambda a: a["g_idx"] - 1), ValueError, "g_idx",
         "GPTQWeight-g_idx-negative"),
    case(lambda d: gptq_weight(d, g_idx=lambda a: a["g_idx"] + 1), ValueError, "g_idx",
         "GPTQWeight-g_idx-ge-G"),
    case(lambda d: gptq_weight(d, g_idx=lambda a: a["g_idx"].long() * 0 + G), ValueError, "g_idx",
         "GPTQWeight-g_idx-int64-ge-G"),
    case(lambda d: gptq_weight(d, scales=lambda a: a["scales"].to("meta")), ValueError, "scales",
         "GPTQWeight-scales-device"),
    case(lambda d: gptq_weight(d, bits=3, g_idx=lambda a: torch.zeros(10, dtype=I32, device=d)),
         ValueError, "qweight", "GPTQWeight-3bit-qweight-rows-for-K"),

    # spike_linear
    case(lambda d: linear_py(d, st=spikes(d).planes), TypeError, "st", "spike_linear-st-tensor"),
    case(lambda d: linear_py(d, w=gptq_tensors(d)["qweight"]), TypeError, "w",
         "spike_linear-w-tensor"),
    case(lambda d: linear_py(d, st=spikes(d, shape=(M, K + 8))), ValueError, "in_features",
         "spike_linear-K-mismatch"),
    case(lambda d: linear_py(d, st=spikes(d, shape=(M, K - 1))), ValueError, "in_features",
         "spike_linear-K-mismatch-same-W"),
    case(lambda d: linear_py(d, out_dtype=torch.int32), TypeError, "out_dtype",
         "spike_linear-out_dtype-int32"),
    case(lambda d: linear_py(d, out_dtype=torch.float64), TypeError, "out_dtype",
         "spike_linear-out_dtype-float64"),
    case(lambda d: linear_py(d, backend="cuda"), ValueError, "backend", "spike_linear-backend"),
    case(lambda d: linear_py(d, bias=torch.zeros(N, dtype=I32, device=d)), TypeError, "bias",
         "spike_linear-bias-int"),
    case(lambda d: linear_py(d, bias=torch.zeros(N + 1, device=d)), ValueError, "bias",
         "spike_linear-bias-length"),
    case(lambda d: linear_py(d, bias=torch.zeros(1, N, device=d)), ValueError, "bias",
         "spike_linear-bias-2d"),
    case(lambda d: linear_py(d, bias=torch.zeros(N, device="meta")), ValueError, "bias",
         "spike_linear-bias-device"),
    case(lambda d: linear_py(d, st=spikes(d)._replace(planes=spikes(d).planes.float())),
         TypeError, "planes", "spike_linear-planes-float"),

    # spike_stats
    case(lambda d: stats_op(d, planes=lambda a: a["planes"].long()), TypeError, "planes",
         "spike_stats-planes-int64"),
    case(lambda d: stats_op(d, planes=lambda a: a["planes"][0]), ValueError, "planes",
         "spike_stats-planes-2d"),
    case(lambda d: stats_op(d, planes=lambda a: a["planes"].repeat(6, 1, 1)), ValueError,
         "planes", "spike_stats-planes-too-many"),
    case(lambda d: stats_op(d, sign=lambda a: a["sign"][:, :1]), ValueError, "sign",
         "spike_stats-sign-shape"),
    case(lambda d: stats_op(d, sign=lambda a: a["sign"].float()), TypeError, "sign",
         "spike_stats-sign-float"),

    # spike_accumulate
    case(lambda d: accumulate_py(d, st=spikes(d).planes), TypeError, "st",
         "spike_accumulate-st-tensor"),
    case(lambda d: accumulate_py(d, w=torch.ones(K, N, dtype=I32, device=d)), TypeError, "w",
         "spike_accumulate-w-int32"),
    case(lambda d: accumulate_py(d, w=torch.ones(K, dtype=torch.int8, device=d)), ValueError,
         "w", "spike_accumulate-w-1d"),
    case(lambda d: accumulate_py(d, w=torch.ones(K + 1, N, dtype=torch.int8, device=d)),
         ValueError, "w", "spike_accumulate-K-mismatch"),
    case(lambda d: accumulate_py(d, w=torch.ones(K, N, dtype=torch.int8, device="meta")),
         ValueError, "w", "spike_accumulate-w-device"),
    case(lambda d: accumulate_py(d, per_plane=1), TypeError, "per_plane",
         "spike_accumulate-per_plane-int"),

    # SpikeLinear
    case(lambda d: module(d, weight=gptq_tensors(d)["qweight"]), TypeError, "weight",
         "SpikeLinear-weight-tensor"),
    case(lambda d: module(d, enc="minmax"), TypeError, "enc", "SpikeLinear-enc-str"),
    case(lambda d: module(d, enc=Encoding("static", 4)), ValueError, "enc", "SpikeLinear-static"),
    case(lambda d: module(d, backend="fast"), ValueError, "backend", "SpikeLinear-backend"),
    case(lambda d: module(d, bias=torch.zeros(N, dtype=torch.int64, device=d)), TypeError,
         "bias", "SpikeLinear-bias-int"),
    case(lambda d: module(d, bias=torch.zeros(N - 1, device=d)), ValueError, "bias",
         "SpikeLinear-bias-length"),
    case(lambda d: module(d, bias=torch.zeros(N, device="meta")), ValueError, "bias",
         "SpikeLinear-bias-device"),
    case(lambda d: module(d, enc=Encoding("minmax", 4, salient_bits=8),
                          salient_mask=salient_mask(d).to(torch.uint8)),
         TypeError, "salient_mask", "SpikeLinear-salient_mask-uint8"),
    case(lambda d: module(d, enc=Encoding("minmax", 4, salient_bits=8),
                          salient_mask=salient_mask(d, K - 1)),
         ValueError, "salient_mask", "SpikeLinear-salient_mask-length"),
    case(lambda d: module(d, salient_mask=salient_mask(d)), ValueError, "salient_mask",
         "SpikeLinear-salient_mask-without-salient_bits"),
    case(lambda d: module(d, enc=Encoding("absmax", 4, salient_bits=8)), ValueError,
         "salient_mask", "SpikeLinear-salient_bits-without-salient_mask"),
    case(lambda d: module(d, enc=Encoding("oat", 4)), ValueError, "theta",
         "SpikeLinear-oat-without-theta"),
    case(lambda d: module(d).from_spikes(spikes(d), torch.int32), TypeError, "out_dtype",
         "SpikeLinear-from_spikes-out_dtype"),
    case(lambda d: module(d)(torch.randint(0, 3, (M, K), device=d)), TypeError, "x",
         "SpikeLinear-forward-x-int"),
    case(lambda d: module(d)(torch.randn(M, K + 32, device=d)), ValueError, "x|K|in_features",
         "SpikeLinear-forward-K-mismatch"),
    case(lambda d: module(d)(torch.randn(M, K - 7, device=d)), ValueError, "x|K|in_features",
         "SpikeLinear-forward-K-mismatch-same-W"),
]


@pytest.mark.parametrize("call, exc, pattern", PY_CASES)
def test_python_api_rejects(device, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(device)


# ----------------------------------------------------------------------------- op level (C++)


OP_CASES = [
    # gif_encode
    case(lambda d: encode_op(d, x=torch.randint(0, 5, (M, K), dtype=I32, device=d)), TypeError,
         "x", "gif_encode-x-int"),
    case(lambda d: encode_op(d, x=T(K, device=d)), ValueError, "x", "gif_encode-x-1d"),
    case(lambda d: encode_op(d, x=torch.tensor(1.0, device=d)), ValueError,
         "x", "gif_encode-x-0dim"),
    case(lambda d: encode_op(d, x=T(2, M, K, device=d)), ValueError, "x", "gif_encode-x-3d"),
    case(lambda d: encode_op(d, x=T(M, 0, device=d)), ValueError, "x", "gif_encode-x-K0"),
    case(lambda d: encode_op(d, x=torch.empty(1, 2**23 + 1, dtype=torch.float16, device=d)),
         ValueError, "x", "gif_encode-x-K-above-2^23"),
    case(lambda d: encode_op(d, mode="rate"), ValueError, "mode", "gif_encode-mode"),
    case(lambda d: encode_op(d, bits=0), ValueError, "bits", "gif_encode-bits-0"),
    case(lambda d: encode_op(d, bits=17), ValueError, "bits", "gif_encode-bits-17"),
    case(lambda d: encode_op(d, bits=-3), ValueError, "bits", "gif_encode-bits-neg"),
    case(lambda d: encode_op(d, mode="absmax", bits=1), ValueError, "bits",
         "gif_encode-bits-1-absmax"),
    case(lambda d: encode_op(d, mode="absmean", bits=1), ValueError, "bits",
         "gif_encode-bits-1-absmean"),
    case(lambda d: encode_op(d, mode="static", bits=1, scale=lambda a: torch.ones(M, device=d)),
         ValueError, "bits", "gif_encode-bits-1-static-signed"),
    case(lambda d: encode_op(d, mode="oat", bits=0, theta_nor=1.0, theta_out=2.0), ValueError,
         "bits", "gif_encode-bits-0-oat"),
    case(lambda d: encode_op(d, mode="oat", bits=17, theta_nor=1.0, theta_out=2.0), ValueError,
         "bits", "gif_encode-bits-17-oat"),
    case(lambda d: encode_op(d, mode="absmax", gamma=0.0), ValueError,
         "gamma", "gif_encode-gamma-0"),
    case(lambda d: encode_op(d, mode="absmax", gamma=1.0001), ValueError, "gamma",
         "gif_encode-gamma-above-1"),
    case(lambda d: encode_op(d, mode="absmean", gamma=-1.0), ValueError, "gamma",
         "gif_encode-gamma-neg"),
    case(lambda d: encode_op(d, mode="absmax", gamma=math.nan), ValueError, "gamma",
         "gif_encode-gamma-nan"),
    case(lambda d: encode_op(d, salient_mask=lambda a: salient_mask(d).float(), salient_bits=8),
         TypeError, "salient_mask", "gif_encode-salient_mask-float"),
    case(lambda d: encode_op(d, salient_mask=lambda a: salient_mask(d, K + 1), salient_bits=8),
         ValueError, "salient_mask", "gif_encode-salient_mask-length"),
    case(lambda d: encode_op(d, salient_mask=lambda a: salient_mask(d), salient_bits=4),
         ValueError, "salient_bits", "gif_encode-salient_bits-equal"),
    case(lambda d: encode_op(d, salient_mask=lambda a: salient_mask(d), salient_bits=17),
         ValueError, "salient_bits", "gif_encode-salient_bits-17"),
    case(lambda d: encode_op(d, mode="oat", bits=8, theta_nor=1.0, theta_out=2.0,
                             salient_mask=lambda a: salient_mask(d), salient_bits=12),
         ValueError, "salient_mask", "gif_encode-salient_mask-oat"),
    case(lambda d: static_op(d, salient_mask=lambda a: salient_mask(d), salient_bits=8),
         ValueError, "salient_mask", "gif_encode-salient_mask-static"),
    case(lambda d: static_op(d, scale=None), ValueError, "scale",
         "gif_encode-static-no-scale"),
    case(lambda d: static_op(d, scale=lambda a: torch.ones(M, dtype=torch.float64, device=d)),
         TypeError, "scale", "gif_encode-static-scale-float64"),
    case(lambda d: static_op(d, scale=lambda a: torch.ones(M + 1, device=d)), ValueError, "scale",
         "gif_encode-static-scale-shape"),
    case(lambda d: static_op(d, scale=lambda a: torch.ones(M, 1, device=d)), ValueError, "scale",
         "gif_encode-static-scale-2d"),
    case(lambda d: static_op(d, scale=lambda a: torch.tensor([1.0, 0.0, 1.0], device=d)),
         ValueError, "scale", "gif_encode-static-scale-0", cpu=True),
    case(lambda d: static_op(d, scale=lambda a: torch.tensor([1.0, -2.0, 1.0], device=d)),
         ValueError, "scale", "gif_encode-static-scale-neg", cpu=True),
    case(lambda d: static_op(d, scale=lambda a: torch.tensor([1.0, math.nan, 1.0], device=d)),
         ValueError, "scale", "gif_encode-static-scale-nan", cpu=True),
    case(lambda d: static_op(d, zero=lambda a: torch.ones(M, device=d)), TypeError, "zero",
         "gif_encode-static-zero-float"),
    case(lambda d: static_op(d, zero=lambda a: torch.ones(M + 1, dtype=I32, device=d)), ValueError,
         "zero", "gif_encode-static-zero-shape"),
    case(lambda d: static_op(d, zero=lambda a: torch.tensor([0, 10001, 0], dtype=I32, device=d)),
         ValueError, "zero", "gif_encode-static-zero-range", cpu=True),
    case(lambda d: encode_op(d, scale=lambda a: torch.ones(M, device=d)), ValueError, "scale",
         "gif_encode-scale-non-static"),
    case(lambda d: encode_op(d, mode="absmax", zero=lambda a: torch.ones(M, dtype=I32, device=d)),
         ValueError, "zero", "gif_encode-zero-non-static"),
    case(lambda d: encode_op(d, mode="oat", bits=8), ValueError,
         "theta", "gif_encode-theta-missing"),
    case(lambda d: encode_op(d, mode="oat", bits=8, theta_nor=2.0, theta_out=1.0), ValueError,
         "theta", "gif_encode-theta-unordered"),
    case(lambda d: encode_op(d, mode="oat", bits=8, theta_nor=-1.0, theta_out=1.0), ValueError,
         "theta", "gif_encode-theta-negative"),
    case(lambda d: encode_op(d, mode="oat", bits=8, theta_nor=math.nan, theta_out=1.0), ValueError,
         "theta", "gif_encode-theta-nan"),
    case(lambda d: encode_op(d, mode="oat", bits=8, theta_nor=1.0, theta_out=1e39), ValueError,
         "theta", "gif_encode-theta-float32-overflow"),
    case(lambda d: encode_op(d, theta_nor=1.0, theta_out=2.0), ValueError, "theta",
         "gif_encode-theta-non-oat"),

    # spike_decode
    case(lambda d: decode_op(d, planes=lambda a: a["planes"].float()), TypeError, "planes",
         "spike_decode-planes-float"),
    case(lambda d: decode_op(d, planes=lambda a: a["planes"][0]), ValueError, "planes",
         "spike_decode-planes-2d"),
    case(lambda d: decode_op(d, planes=lambda a: a["planes"][:0]), ValueError, "planes",
         "spike_decode-planes-P0"),
    case(lambda d: decode_op(d, planes=lambda a: a["planes"][:1].expand(17, M, W).contiguous()),
         ValueError, "planes", "spike_decode-planes-P17"),
    case(lambda d: decode_op(d, Encoding("absmax", 4), sign=lambda a: a["sign"][:, :1]),
         ValueError, "sign", "spike_decode-sign-shape"),
    case(lambda d: decode_op(d, Encoding("absmax", 4), sign=lambda a: a["sign"].long()),
         TypeError, "sign", "spike_decode-sign-int64"),
    case(lambda d: decode_op(d, hi=lambda a: torch.zeros(M + 1, W, dtype=I32, device=d)),
         ValueError, "hi", "spike_decode-hi-shape"),
    case(lambda d: decode_op(d, hi=lambda a: torch.zeros(M, W, device=d)), TypeError, "hi",
         "spike_decode-hi-float"),
    case(lambda d: decode_op(d, scale=lambda a: a["scale"].expand(M, 2).contiguous()), ValueError,
         "scale", "spike_decode-scale-R2-without-hi"),
    case(lambda d: decode_op(d, scale=lambda a: a["scale"].half()), TypeError, "scale",
         "spike_decode-scale-float16"),
    case(lambda d: decode_op(d, zero=lambda a: a["zero"][:1]), ValueError, "zero",
         "spike_decode-zero-shape"),
    case(lambda d: decode_op(d, zero=lambda a: a["zero"].float()), TypeError, "zero",
         "spike_decode-zero-float"),
    case(lambda d: decode_op(d, zero=lambda a: torch.full_like(a["zero"], 1 << 20)), ValueError,
         "zero", "spike_decode-zero-range", cpu=True),
    case(lambda d: decode_op(d, K=0), ValueError, "K", "spike_decode-K-0"),
    case(lambda d: decode_op(d, K=K + 32), ValueError, "K", "spike_decode-W-mismatch"),
    case(lambda d: decode_op(d, dtype=torch.int32), TypeError, "dtype", "spike_decode-dtype-int32"),
    case(lambda d: decode_op(d, dtype=torch.float64), TypeError, "dtype",
         "spike_decode-dtype-float64"),

    # spike_counts
    case(lambda d: counts_op(d, planes=lambda a: a["planes"].double()), TypeError, "planes",
         "spike_counts-planes-float"),
    case(lambda d: counts_op(d, planes=lambda a: a["planes"][0]), ValueError, "planes",
         "spike_counts-planes-2d"),
    case(lambda d: counts_op(d, sign=lambda a: a["sign"][:1]), ValueError, "sign",
         "spike_counts-sign-shape"),
    case(lambda d: counts_op(d, Encoding("minmax", 4), negative=True), ValueError, "negative",
         "spike_counts-negative-without-sign"),

    # spike_accumulate
    case(lambda d: accumulate_op(d, w=lambda a: a["w"].int()), TypeError, "w",
         "spike_accumulate-w-int32"),
    case(lambda d: accumulate_op(d, w=lambda a: a["w"][:, 0]), ValueError, "w",
         "spike_accumulate-w-1d"),
    case(lambda d: accumulate_op(d, w=lambda a: a["w"].repeat(2, 1)), ValueError, "w",
         "spike_accumulate-W-mismatch"),
    case(lambda d: accumulate_op(d, planes=lambda a: a["planes"].float()), TypeError, "planes",
         "spike_accumulate-planes-float"),
    case(lambda d: accumulate_op(d, hi=lambda a: torch.zeros(M, W + 1, dtype=I32, device=d)),
         ValueError, "hi", "spike_accumulate-hi-shape"),
    case(lambda d: accumulate_op(d, sign=lambda a: a["sign"].t().contiguous()), ValueError,
         "sign", "spike_accumulate-sign-shape"),

    # spike_linear
    case(lambda d: linear_op(d, planes=lambda a: a["planes"].float()), TypeError, "planes",
         "spike_linear-planes-float"),
    case(lambda d: linear_op(d, planes=lambda a: a["planes"][0]), ValueError, "planes",
         "spike_linear-planes-2d"),
    case(lambda d: linear_op(d, Encoding("absmax", 4), sign=lambda a: a["sign"][:, :1]),
         ValueError, "sign", "spike_linear-sign-shape"),
    case(lambda d: linear_op(d, hi=lambda a: torch.zeros(M, W + 1, dtype=I32, device=d)),
         ValueError, "hi", "spike_linear-hi-shape"),
    case(lambda d: linear_op(d, scale=lambda a: a["scale"][:1]), ValueError, "scale",
         "spike_linear-scale-shape"),
    case(lambda d: linear_op(d, scale=lambda a: a["scale"].double()), TypeError, "scale",
         "spike_linear-scale-float64"),
    case(lambda d: linear_op(d, zero=lambda a: a["zero"].expand(M, 2).contiguous()), ValueError,
         "zero", "spike_linear-zero-shape"),
    case(lambda d: linear_op(d, qweight=lambda a: a["qweight"].long()), TypeError, "qweight",
         "spike_linear-qweight-int64"),
    case(lambda d: linear_op(d, qweight=lambda a: a["qweight"][:-1]), ValueError, "qweight",
         "spike_linear-qweight-rows"),
    case(lambda d: linear_op(d, bits=8), ValueError, "qweight", "spike_linear-qweight-rows-bits"),
    case(lambda d: linear_op(d, qzeros=lambda a: a["qzeros"].float()), TypeError, "qzeros",
         "spike_linear-qzeros-float"),
    case(lambda d: linear_op(d, qzeros=lambda a: a["qzeros"][:, :1]), ValueError, "qzeros",
         "spike_linear-qzeros-shape"),
    case(lambda d: linear_op(d, scales=lambda a: a["scales"].float()), TypeError, "scales",
         "spike_linear-scales-float32"),
    case(lambda d: linear_op(d, group_size=GS // 2), ValueError, "groups",
         "spike_linear-group_size-G-mismatch"),
    case(lambda d: linear_op(d, scales=lambda a: a["scales"][0]), ValueError, "scales",
         "spike_linear-scales-1d"),
    case(lambda d: linear_op(d, g_idx=lambda a: a["g_idx"].long()), TypeError, "g_idx",
         "spike_linear-g_idx-int64"),
    case(lambda d: linear_op(d, g_idx=lambda a: a["g_idx"][None]), ValueError, "g_idx",
         "spike_linear-g_idx-2d"),
    case(lambda d: linear_op(d, group_size=0, g_idx=lambda a: a["g_idx"] - 1), ValueError,
         "g_idx", "spike_linear-g_idx-negative", cpu=True),
    case(lambda d: linear_op(d, group_size=0, g_idx=lambda a: a["g_idx"] + 1), ValueError,
         "g_idx", "spike_linear-g_idx-ge-G", cpu=True),
    case(lambda d: linear_op(d, bias=lambda a: torch.zeros(N, dtype=I32, device=d)), TypeError,
         "bias", "spike_linear-bias-int"),
    case(lambda d: linear_op(d, bias=lambda a: torch.zeros(N, dtype=torch.float16, device=d)),
         TypeError, "bias", "spike_linear-bias-float16"),
    case(lambda d: linear_op(d, bias=lambda a: torch.zeros(N + 1, device=d)), ValueError, "bias",
         "spike_linear-bias-length"),
    case(lambda d: linear_op(d, bits=3), ValueError, "bits", "spike_linear-bits-3"),
    case(lambda d: linear_op(d, bits=5), ValueError, "bits", "spike_linear-bits-5"),
    case(lambda d: linear_op(d, bits=0), ValueError, "bits", "spike_linear-bits-0"),
    case(lambda d: linear_op(d, bits=16), ValueError, "bits", "spike_linear-bits-16"),
    case(lambda d: linear_op(d, group_size=-1), ValueError, "group_size",
         "spike_linear-group_size-neg"),
    case(lambda d: linear_op(d, packed=lambda a: cpu_layout(d)[0]), ValueError, "code_sums",
         "spike_linear-packed-alone"),
    case(lambda d: linear_op(d, packed=lambda a: cpu_layout(d)[0].int(),
                             code_sums=lambda a: cpu_layout(d)[1]), TypeError, "packed",
         "spike_linear-packed-int32"),
    case(lambda d: linear_op(d, packed=lambda a: cpu_layout(d)[0][:, :1],
                             code_sums=lambda a: cpu_layout(d)[1]), ValueError, "packed",
         "spike_linear-packed-shape"),
    case(lambda d: linear_op(d, packed=lambda a: cpu_layout(d)[0],
                             code_sums=lambda a: cpu_layout(d)[1][:1]), ValueError, "code_sums",
         "spike_linear-code_sums-shape"),
    case(lambda d: linear_op(d, group_size=0, packed=lambda a: cpu_layout(d)[0],
                             code_sums=lambda a: cpu_layout(d)[1]), ValueError, "packed",
         "spike_linear-packed-act-order"),
    case(lambda d: linear_op(d, qweight=lambda a: None), ValueError, "qweight",
         "spike_linear-no-codes"),
    case(lambda d: linear_op(d, zero_offset=2), ValueError, "zero_offset",
         "spike_linear-zero_offset"),
    case(lambda d: linear_op(d, out_dtype=torch.int32), TypeError, "out_dtype",
         "spike_linear-out_dtype-int32"),
    case(lambda d: linear_op(d, out_dtype=torch.float64), TypeError, "out_dtype",
         "spike_linear-out_dtype-float64"),
    case(lambda d: linear_op(d, backend="cuda"), ValueError, "backend", "spike_linear-backend"),
    case(lambda d: linear_op(d, **kernel_tensors(d, k=K + 32)), ValueError, "planes|K",
         "spike_linear-W-mismatch"),

    # gptq_dequantize
    case(lambda d: dequantize_op(d, bits=3), ValueError, "bits", "gptq_dequantize-bits-3"),
    case(lambda d: dequantize_op(d, bits=5), ValueError, "bits", "gptq_dequantize-bits-5"),
    case(lambda d: dequantize_op(d, group_size=-1), ValueError, "group_size",
         "gptq_dequantize-group_size-neg"),
    case(lambda d: dequantize_op(d, qweight=lambda a: a["qweight"].long()), TypeError, "qweight",
         "gptq_dequantize-qweight-int64"),
    case(lambda d: dequantize_op(d, qweight=lambda a: a["qweight"][:-1]), ValueError, "qweight",
         "gptq_dequantize-qweight-rows"),
    case(lambda d: dequantize_op(d, scales=lambda a: a["scales"].float()), TypeError, "scales",
         "gptq_dequantize-scales-float32"),
    case(lambda d: dequantize_op(d, qzeros=lambda a: a["qzeros"][:1]), ValueError, "qzeros",
         "gptq_dequantize-qzeros-shape"),
    case(lambda d: dequantize_op(d, g_idx=lambda a: a["g_idx"][:0]), ValueError, "g_idx",
         "gptq_dequantize-g_idx-empty"),
    case(lambda d: dequantize_op(d, group_size=0, g_idx=lambda a: torch.full_like(a["g_idx"], -1)),
         ValueError, "g_idx", "gptq_dequantize-g_idx-negative", cpu=True),
    case(lambda d: dequantize_op(d, group_size=0, g_idx=lambda a: torch.full_like(a["g_idx"], G)),
         ValueError, "g_idx", "gptq_dequantize-g_idx-ge-G", cpu=True),

    # cpu_layout, cpu_layout_qweight: every check comes before the one of the device, so that
    # these cases give the same errors on any device
    case(lambda d: layout_op(d, qweight=lambda a: a["qweight"].long()), TypeError,
         "cpu_layout: qweight must be a torch.int32 tensor, got torch.int64",
         "cpu_layout-qweight-int64"),
    case(lambda d: layout_op(d, qweight=lambda a: a["qweight"][:-1]), ValueError,
         r"cpu_layout: qweight must have shape \[5, 16\], got \[4, 16\]",
         "cpu_layout-qweight-rows"),
    case(lambda d: layout_op(d, qweight=lambda a: a["qweight"][0]), ValueError,
         r"qweight must have shape \[ceil\(K / 8\), N\] with N >= 1, got \[16\]",
         "cpu_layout-qweight-1d"),
    case(lambda d: layout_op(d, qweight=lambda a: a["qweight"][:, :0]), ValueError,
         r"qweight must have shape .* N >= 1, got \[5, 0\]", "cpu_layout-qweight-no-columns"),
    case(lambda d: layout_op(d, K=0), ValueError, r"cpu_layout: K must be in \[1, 8388608\], "
         "got 0", "cpu_layout-K-0"),
    case(lambda d: layout_op(d, K=2**23 + 8), ValueError, "K must be in .* got 8388616",
         "cpu_layout-K-huge"),
    case(lambda d: layout_op(d, bits=2), ValueError, "CPU layout holds only 4-bit codes .* "
         "got bits = 2, group_size = 16, K = 40", "cpu_layout-bits-2"),
    case(lambda d: layout_op(d, group_size=0), ValueError, "uniform groups .* group_size = 0",
         "cpu_layout-act-order"),
    case(lambda d: layout_op(d, group_size=12), ValueError, "multiple of 8 .* group_size = 12",
         "cpu_layout-group_size-12"),
    case(lambda d: layout_op(d, group_size=4100, K=4100), ValueError,
         "at most 4096 channels .* K = 4100", "cpu_layout-one-group-too-large"),
    case(lambda d: layout_qweight_op(d, packed=lambda a: a["packed"].int()), TypeError,
         "cpu_layout_qweight: packed must be a torch.uint8 tensor, got torch.int32",
         "cpu_layout_qweight-packed-int32"),
    case(lambda d: layout_qweight_op(d, packed=lambda a: a["packed"][:, :1]), ValueError,
         r"cpu_layout_qweight: packed must have shape \[1, 5, 64\], got \[1, 1, 64\]",
         "cpu_layout_qweight-packed-shape"),
    case(lambda d: layout_qweight_op(d, N=N + 16), ValueError,
         r"packed must have shape \[2, 5, 64\]", "cpu_layout_qweight-N-other-layer"),
    case(lambda d: layout_qweight_op(d, K=0), ValueError, "cpu_layout_qweight: K must be in",
         "cpu_layout_qweight-K-0"),
    case(lambda d: layout_qweight_op(d, N=0), ValueError, "N must be >= 1, got 0",
         "cpu_layout_qweight-N-0"),
]


@pytest.mark.parametrize("call, exc, pattern", OP_CASES)
def test_op_rejects(device, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(device)


DEVICE_CASES = [
    pytest.param(lambda d: encode_op(d, salient_mask=lambda a: salient_mask("meta"),
                                     salient_bits=8), "salient_mask", id="gif_encode-salient_mask"),
    pytest.param(lambda d: static_op(d, scale=lambda a: torch.ones(M, device="meta")), "scale",
                 id="gif_encode-static-scale"),
    pytest.param(lambda d: decode_op(d, scale=wrong_device(lambda a: a["scale"])), "scale",
                 id="spike_decode-scale"),
    pytest.param(lambda d: counts_op(d, sign=wrong_device(lambda a: a["sign"])), "sign",
                 id="spike_counts-sign"),
    pytest.param(lambda d: stats_op(d, sign=wrong_device(lambda a: a["sign"])), "sign",
                 id="spike_stats-sign"),
    pytest.param(lambda d: accumulate_op(d, w=wrong_device(lambda a: a["w"])), "w",
                 id="spike_accumulate-w"),
    pytest.param(lambda d: linear_op(d, qweight=wrong_device(lambda a: a["qweight"])),
                 "qweight", id="spike_linear-qweight"),
    pytest.param(lambda d: linear_op(d, bias=lambda a: torch.zeros(N, device="meta")), "bias",
                 id="spike_linear-bias"),
    pytest.param(lambda d: dequantize_op(d, scales=wrong_device(lambda a: a["scales"])),
                 "scales", id="gptq_dequantize-scales"),
    pytest.param(lambda d: layout_op(d, qweight=wrong_device(lambda a: a["qweight"])),
                 "qweight must be a CPU tensor", id="cpu_layout-qweight"),
    pytest.param(lambda d: layout_qweight_op(d, packed=wrong_device(lambda a: a["packed"])),
                 "packed must be a CPU tensor", id="cpu_layout_qweight-packed"),
]


class KernelOf:
    """``torch.ops.spikeops`` whose ops run the kernel registered for one device's dispatch key,
    whatever devices their arguments are on. A 'meta' tensor among real ones would otherwise
    make the dispatcher pick the Meta (fake) kernel; this reaches the C++ host entry, whose
    device checks are what the DEVICE_CASES test, with no second real device needed."""

    def __init__(self, device: str):
        key = torch._C.DispatchKey.CUDA if device == "cuda" else torch._C.DispatchKey.CPU
        self.keys = torch._C.DispatchKeySet(key)

    def __getattr__(self, name):
        op = getattr(torch.ops.spikeops, name).default
        args = op._schema.arguments  # arguments not given take the schema's default
        return lambda **kw: op.redispatch(
            self.keys, *(kw[a.name] if a.name in kw else a.default_value for a in args))


@pytest.mark.parametrize("call, pattern", DEVICE_CASES)
def test_op_device_mismatch(device, call, pattern, monkeypatch):
    """One tensor on 'meta': the device's C++ host entry names it."""
    monkeypatch.setattr(sys.modules[__name__], "OPS", KernelOf(device))
    with pytest.raises(ValueError, match=pattern):
        call(device)


# ----------------------------------------------------------------------------- edge but valid
EDGE_ENCODINGS = [
    pytest.param(Encoding("minmax", 4), False, id="minmax4"),
    pytest.param(Encoding("absmax", 3, gamma=0.5), False, id="absmax3"),
    pytest.param(Encoding("absmean", 4), False, id="absmean4"),
    pytest.param(Encoding("minmax", 2, salient_bits=8), True, id="minmax2-salient8"),
    pytest.param(Encoding("absmax", 4, salient_bits=6), True, id="absmax4-salient6"),
    pytest.param(Encoding("oat", 6, theta=(0.5, 2.0)), False, id="oat6"),
]


def run_consumers(st, w, backend, bias=None):
    """Every consumer of ``st``; both spike_linear backends must agree bit for bit."""
    y = spikeops.spike_linear(st, w, bias=bias, out_dtype=F32, backend=backend)
    other = spikeops.spike_linear(st, w, bias=bias, out_dtype=F32,
                                  backend="int" if backend == "spike" else "spike")
    assert torch.equal(y, other)
    acc = spikeops.spike_accumulate(st, torch.ones(st.shape[-1], 5, dtype=torch.int8,
                                                   device=st.planes.device))
    return y, st.decode(), st.counts(), acc


@pytest.mark.parametrize("enc, salient", EDGE_ENCODINGS)
def test_zero_tokens(device, enc, salient):
    w = weight(device)
    st = spikes(device, enc, shape=(2, 0, K), salient=salient_mask(device) if salient else None)
    y, x_hat, counts, acc = run_consumers(st, w, "spike")
    assert y.shape == (2, 0, N) and x_hat.shape == (2, 0, K)
    assert counts.shape == (st.num_planes, 0) and acc.shape[1:] == (0, 5)
    assert SpikeLinear(w, enc, salient_mask=salient_mask(device) if salient else None)(
        torch.randn(0, K, device=device)).shape == (0, N)


def test_zero_tokens_static(device):
    x = torch.randn(0, K, device=device)
    st = spikeops.encode(x, Encoding("static", 4), scale=torch.ones(0, device=device),
                         zero=torch.ones(0, dtype=I32, device=device))
    assert st.decode().shape == (0, K)
    assert spikeops.spike_linear(st, weight(device)).shape == (0, N)


@pytest.mark.parametrize("enc, salient", EDGE_ENCODINGS)
def test_single_channel(device, enc, salient):
    w = weight(device, k=1, group_size=1)
    mask = torch.ones(1, dtype=torch.bool, device=device) if salient else None
    st = spikes(device, enc, shape=(M, 1), salient=mask)
    y, x_hat, counts, acc = run_consumers(st, w, "int", bias=torch.ones(N, device=device))
    assert y.shape == (M, N) and x_hat.shape == (M, 1) and torch.isfinite(y).all()
    f = dict(st._asdict())
    del f["shape"]
    expect = reference.spike_linear(**f, **kernel_args(w), bias=torch.ones(N, device=device),
                                    out_dtype=F32)
    assert torch.equal(y, expect)


@pytest.mark.parametrize("enc, salient", EDGE_ENCODINGS)
def test_all_zero_activations(device, enc, salient):
    w = weight(device)
    mask = salient_mask(device) if salient else None
    st = spikeops.encode(torch.zeros(M, K, device=device), enc, salient_mask=mask)
    bias = torch.randn(N, device=device)
    y, x_hat, counts, acc = run_consumers(st, w, "spike", bias=bias)
    assert torch.equal(x_hat, torch.zeros_like(x_hat))
    assert torch.equal(y, bias.expand(M, N))
    assert not counts.any() and not acc.any()


GARBAGE_ENCODINGS = [
    pytest.param(Encoding("minmax", 4), False, id="minmax4-zero"),
    pytest.param(Encoding("absmax", 4), False, id="absmax4-sign"),
    pytest.param(Encoding("minmax", 4, salient_bits=8), True, id="minmax-salient-hi-zero"),
    pytest.param(Encoding("oat", 8, theta=(0.5, 2.0)), False, id="oat-hi-sign"),
]


@pytest.mark.parametrize("backend", ["spike", "int"])
@pytest.mark.parametrize("enc, salient", GARBAGE_ENCODINGS)
@pytest.mark.parametrize("k", [5, K], ids=lambda k: f"K{k}")
def test_garbage_bits_beyond_K(device, k, enc, salient, backend):
    """Bits of channels >= K in the last word (encode never sets them) must be ignored, and never
    used to index g_idx or weight rows: the result equals the call on the clean (masked) words."""
    w = weight(device, k=k, group_size=4)
    words = (k + 31) // 32
    st = spikes(device, enc, shape=(M, k), salient=salient_mask(device, k) if salient else None)
    junk = reference.pack_bits(torch.arange(32 * words)[None] >= k)[0, -1].item()

    def dirty(t):
        if t is None:
            return None
        t = t.clone()
        t[..., -1] |= junk
        return t

    noisy = st._replace(planes=dirty(st.planes), sign=dirty(st.sign), hi=dirty(st.hi))
    assert not torch.equal(noisy.planes, st.planes)
    y_clean = spikeops.spike_linear(st, w, out_dtype=F32, backend=backend)
    assert torch.equal(spikeops.spike_linear(noisy, w, out_dtype=F32, backend=backend), y_clean)
    assert torch.equal(noisy.decode(), st.decode())
    acc = torch.randint(-3, 4, (k, N), dtype=torch.int8, device=device)
    assert torch.equal(spikeops.spike_accumulate(noisy, acc), spikeops.spike_accumulate(st, acc))
    assert torch.equal(spikeops.spike_accumulate(noisy, acc, per_plane=True),
                       spikeops.spike_accumulate(st, acc, per_plane=True))


# ----------------------------------------------------------------------------- spike_matmul
def matmul_op(device, **over):
    """spike_matmul on valid operands: A = 4 heads x 3 queries, B = 2 kv heads x 3 keys."""
    def fields(prefix, enc, rows):
        st = spikes(device, enc, shape=(rows, K))
        return {f"{prefix}_{n}": t
                for n, t in zip(("planes", "sign", "hi", "scale", "zero"), st[:5])}

    args = dict(fields("a", Encoding("absmax", 4), 4 * M), **fields("b", Encoding("minmax", 4),
                                                                     2 * M),
                K=K, batch=1, heads=4, kv_heads=2, keys=M, causal=False, out_dtype=F32)
    return OPS.spike_matmul(**override(args, over))


def heads(device, shape, enc=None):
    return spikes(device, enc, shape=shape)


MATMUL_CASES = [
    case(lambda d: matmul_op(d, a_planes=lambda a: a["a_planes"].float()), TypeError,
         r"\(a\): planes", "spike_matmul-a-planes-float"),
    case(lambda d: matmul_op(d, b_scale=lambda a: a["b_scale"][:1]), ValueError,
         r"\(b\): scale", "spike_matmul-b-scale-shape"),
    case(lambda d: matmul_op(d, b_zero=lambda a: a["b_zero"] + 20000), ValueError,
         r"\(b\): zero", "spike_matmul-b-zero-range", cpu=True),
    case(lambda d: matmul_op(d, K=K + 32), ValueError, "K", "spike_matmul-K-words"),
    case(lambda d: matmul_op(d, K=0), ValueError, "K", "spike_matmul-K-zero"),
    case(lambda d: matmul_op(d, heads=3), ValueError, "kv_heads", "spike_matmul-heads-gqa"),
    case(lambda d: matmul_op(d, heads=8, kv_heads=4), ValueError, "a_planes",
         "spike_matmul-heads-rows"),
    case(lambda d: matmul_op(d, kv_heads=4), ValueError, "b_planes|kv_heads",
         "spike_matmul-kv_heads-rows"),
    case(lambda d: matmul_op(d, keys=M + 1), ValueError, "keys", "spike_matmul-keys-beyond"),
    case(lambda d: matmul_op(d, keys=-1), ValueError, "keys", "spike_matmul-keys-negative"),
    case(lambda d: matmul_op(d, keys=M - 1, causal=True), ValueError, "causal",
         "spike_matmul-causal-keys"),
    case(lambda d: matmul_op(d, out_dtype=torch.float64), TypeError, "out_dtype",
         "spike_matmul-out_dtype"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 2, M, K)), torch.zeros(3)),
         TypeError, "b must be a spikeops.SpikeTensor", "spike_matmul-py-b-type"),
    case(lambda d: spikeops.spike_matmul(heads(d, (2, M, K)), heads(d, (1, 2, M, K))),
         ValueError, "a must be spikes of a", "spike_matmul-py-a-3d"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 2, M, K)),
                                                   heads(d, (1, 2, M, K + 1))),
         ValueError, "b must have shape", "spike_matmul-py-K"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 3, M, K)),
                                                   heads(d, (1, 2, M, K))),
         ValueError, "multiple", "spike_matmul-py-gqa"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 2, M, K)),
                                                   heads(d, (1, 2, M, K)), keys=M + 1),
         ValueError, "keys", "spike_matmul-py-keys"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 2, M, K)),
                                                   heads(d, (1, 2, M, K)), causal=1),
         TypeError, "causal", "spike_matmul-py-causal"),
    case(lambda d: spikeops.spike_matmul(heads(d, (1, 2, M, K)),
                                                   heads(d, (1, 2, M, K)),
                                                   out_dtype=torch.float64),
         TypeError, "out_dtype", "spike_matmul-py-out_dtype"),
]


@pytest.mark.parametrize("call, exc, pattern", MATMUL_CASES)
def test_spike_matmul_rejects(device, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(device)


# ----------------------------------------------------------------------------- meta tensors
def test_meta_tensors_raise_instead_of_returning_garbage():
    lin = spikeops.SpikeLinear(make_layer(64, 16, 4, 32)[0], MINMAX4).to("meta")
    with pytest.raises(ValueError, match="device"):
        lin(torch.randn(2, 64))
    st = spikeops.encode(torch.randn(2, 64), MINMAX4)
    with pytest.raises(ValueError, match="scale"):
        spikeops.ops.spike_decode(st.planes, None, None, st.scale.to("meta"), st.zero, 64,
                                  torch.float32)
    with pytest.raises(ValueError, match="bits"):  # fakes check what they can
        spikeops.ops.gif_encode(torch.randn(2, 64, device="meta"), "minmax", 99)
