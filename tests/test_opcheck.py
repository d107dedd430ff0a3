"""``torch.library.opcheck`` on every op of torch.ops.spikeops: schema (no hidden mutation or
aliasing), autograd registration, fake (meta) kernels against the real ones, and AOT dispatch with
dynamic shapes. Sample inputs are small and built through the public API (encode, pack)."""

import pytest
import torch
from torch.library import opcheck

import spikeops
from spikeops import Encoding

OPS = torch.ops.spikeops
I32, F32 = torch.int32, torch.float32
M, K, N, GS = 5, 40, 24, 16   # W = 2 words (the last one partial), G = 3 groups

# name -> (Encoding, with a salient mask, static scale/zero)
ENCODINGS = {
    "minmax4": (Encoding("minmax", 4), False, None),
    "minmax8": (Encoding("minmax", 8), False, None),
    "absmax4-gamma": (Encoding("absmax", 4, gamma=0.7), False, None),
    "absmean3": (Encoding("absmean", 3), False, None),
    "static-signed": (Encoding("static", 4), False, "signed"),
    "static-unsigned": (Encoding("static", 4), False, "unsigned"),
    "oat8": (Encoding("oat", 8, theta=(0.5, 2.0)), False, None),
    "salient-minmax": (Encoding("minmax", 4, salient_bits=8), True, None),
    "salient-absmax": (Encoding("absmax", 3, salient_bits=6), True, None),
    "salient-absmean": (Encoding("absmean", 4, salient_bits=5), True, None),
}


def dtype_id(v):
    """Readable test ids for dtypes (pytest's default for other values)."""
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def activations(device, dtype=F32, m=M):
    return (torch.randn(m, K, device=device) * 2).to(dtype)


def encode_args(name, device, dtype=F32, m=M):
    """Arguments of gif_encode for one entry of ENCODINGS."""
    enc, salient, static = ENCODINGS[name]
    x = activations(device, dtype, m)
    mask = (torch.arange(K, device=device) % 7 == 3) if salient else None
    scale = torch.rand(m, device=device) / 4 + 0.05 if static else None
    zero = (torch.randint(0, 16, (m,), device=device, dtype=I32) if static == "unsigned"
            else None)
    theta = enc.theta or (0.0, 0.0)
    return (x, enc.mode, enc.bits, enc.gamma or 1.0, mask, enc.salient_bits if salient else 0,
            scale, zero, theta[0], theta[1])


def spikes(name, device):
    enc, salient, static = ENCODINGS[name]
    kw = {}
    if salient:
        kw["salient_mask"] = torch.arange(K, device=device) % 7 == 3
    if static:
        kw["scale"] = torch.rand(M, device=device) / 4 + 0.05
        if static == "unsigned":
            kw["zero"] = torch.randint(0, 16, (M,), device=device, dtype=I32)
    return spikeops.encode(activations(device), enc, **kw)


def fields(st):
    """(planes, sign, hi, scale, zero), absent ones None, as the ops take them."""
    return st.planes, st.sign, st.hi, st.scale, st.zero


def gptq(device, bits=4, group_size=GS, k=K, n=N):
    """The kernel form (qweight, qzeros, scales, g_idx) of random codes and stored zero points
    (taken with zero_offset 1: true zero points 1 .. 2^bits)."""
    groups = -(-k // group_size)
    q = torch.randint(0, 2**bits, (k, n), device=device)
    stored = torch.randint(0, 2**bits, (groups, n), device=device)
    scales = (torch.rand(groups, n, device=device) / 16 + 0.01).half()
    g_idx = (torch.arange(k, device=device) // group_size).to(I32)
    return spikeops.pack(q, bits, 0), spikeops.pack(stored, bits, 1), scales, g_idx


# Every encoding on float32 input; the other input dtypes on a few of them.
ENCODE_CASES = ([(name, torch.float32) for name in ENCODINGS]
                + [(name, torch.float16) for name in ("minmax4", "absmax4-gamma", "salient-minmax")]
                + [("absmean3", torch.float64), ("oat8", torch.bfloat16)])


@pytest.mark.parametrize("name, dtype", ENCODE_CASES, ids=dtype_id)
def test_gif_encode(device, name, dtype):
    opcheck(OPS.gif_encode, encode_args(name, device, dtype))


@pytest.mark.parametrize("name", ["minmax4", "static-signed", "oat8"])
def test_gif_encode_zero_tokens(device, name):
    opcheck(OPS.gif_encode, encode_args(name, device, m=0))


@pytest.mark.parametrize("out", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("name", ["minmax4", "absmax4-gamma", "oat8", "salient-minmax",
                                  "static-unsigned"])
def test_spike_decode(device, name, out):
    opcheck(OPS.spike_decode, (*fields(spikes(name, device)), K, out))


@pytest.mark.parametrize("name, negative", [("minmax4", False), ("absmax4-gamma", False),
                                            ("absmax4-gamma", True), ("oat8", True)])
def test_spike_counts(device, name, negative):
    st = spikes(name, device)
    opcheck(OPS.spike_counts, (st.planes, st.sign, negative))


@pytest.mark.parametrize("name", ["minmax4", "absmax4-gamma", "oat8"])
def test_spike_stats(device, name):
    st = spikes(name, device)
    opcheck(OPS.spike_stats, (st.planes, st.sign))


@pytest.mark.parametrize("per_plane", [False, True])
@pytest.mark.parametrize("name", ["absmax4-gamma", "salient-absmax", "oat8", "minmax4"])
def test_spike_accumulate(device, name, per_plane):
    planes, sign, hi, _, _ = fields(spikes(name, device))
    w = torch.randint(-128, 128, (K, N), dtype=torch.int8, device=device)
    opcheck(OPS.spike_accumulate, (planes, sign, hi, w, per_plane))


# Encodings that give every combination of the optional spike fields: zero only (minmax),
# sign only (absmax), hi + zero (salient minmax), hi + sign (salient absmax, oat).
LINEAR_ENCODINGS = ["minmax4", "absmax4-gamma", "salient-minmax", "salient-absmax", "oat8"]


# Without and with a float32 bias on every encoding; a float16 bias on one.
LINEAR_CASES = ([(name, None) for name in LINEAR_ENCODINGS]
                + [(name, torch.float32) for name in LINEAR_ENCODINGS])


@pytest.mark.parametrize("backend", ["spike", "int"])
@pytest.mark.parametrize("name, bias", LINEAR_CASES,
                         ids=lambda v: "no-bias" if v is None else
                         f"bias-{dtype_id(v)}" if isinstance(v, torch.dtype) else None)
def test_spike_linear(device, name, backend, bias):
    planes, sign, hi, scale, zero = fields(spikes(name, device))
    qweight, qzeros, scales, g_idx = gptq(device)
    b = torch.randn(N, device=device) if bias else None
    codes = [(qweight, None, None)]
    if device == "cpu":  # the CPU layout, in place of qweight
        packed, sums = spikeops.ops.cpu_layout(qweight, 4, GS, K)
        codes.append((None, packed, sums))
    for q, packed, sums in codes:
        opcheck(OPS.spike_linear, (planes, sign, hi, scale, zero, q, qzeros, scales, g_idx,
                                   packed, sums, b, 4, GS, 1, torch.float16, backend))


@pytest.mark.parametrize("out", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("bits, layout", [(2, GS), (8, 0)])
def test_spike_linear_bits_and_out_dtypes(device, bits, layout, out):
    planes, sign, hi, scale, zero = fields(spikes("salient-absmean", device))
    qweight, qzeros, scales, g_idx = gptq(device, bits)
    opcheck(OPS.spike_linear, (planes, sign, hi, scale, zero, qweight, qzeros, scales, g_idx,
                               None, None,
                               None, bits, layout, 0, out, "auto"))


@pytest.mark.parametrize("group_size", [GS, K])
@pytest.mark.parametrize("bits, act_order", [(2, False), (4, False), (4, True), (8, True)])
def test_gptq_dequantize(device, bits, act_order, group_size):
    # group_size 0 makes the op read g_idx, as for act-order layers.
    qweight, qzeros, scales, g_idx = gptq(device, bits, group_size)
    opcheck(OPS.gptq_dequantize, (qweight, qzeros, scales, g_idx, None,
                                  bits, 0 if act_order else group_size, 1))


@pytest.mark.parametrize("k, group_size", [(K, GS), (K, K), (37, 8), (200, 256)])
def test_cpu_layout(k, group_size):
    """The CPU layout and its inverse: CPU tensors only (the layout is the CPU kernels')."""
    qweight = spikeops.pack(torch.randint(0, 16, (k, N)), 4, 0)
    opcheck(OPS.cpu_layout, (qweight, 4, group_size, k))
    packed, _ = OPS.cpu_layout(qweight, 4, group_size, k)
    opcheck(OPS.cpu_layout_qweight, (packed, k, N))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("na, nb", [("absmax4-gamma", "minmax4"), ("salient-minmax", "oat8")])
def test_spike_matmul(device, na, nb, causal):
    # A's M = 5 rows as 5 heads of one query, or one head of 5 queries; B's 5 rows as one kv
    # head of 5 keys, 4 or 5 of them read.
    a, b = fields(spikes(na, device)), fields(spikes(nb, device))
    opcheck(OPS.spike_matmul, (*a, *b, K, 1, 5, 1, 4, causal, torch.float32))
    opcheck(OPS.spike_matmul, (*a, *b, K, 1, 1, 1, 5, causal, torch.float16))


@pytest.mark.parametrize("nb", ["static-signed", "minmax4", "salient-minmax"])
def test_prob_matmul(device, nb):
    # B's M = 5 rows as one kv head of 5 value channels (K tokens); 4 query heads of 2 rows.
    b = fields(spikes(nb, device))
    probs = torch.softmax(torch.randn(1, 4, 2, K, device=device), -1)
    token_scale = torch.rand(1, K + 3, device=device) + 0.5
    opcheck(OPS.prob_matmul, (probs, token_scale, *b, 1))


@pytest.mark.parametrize("name", ["absmax4-gamma", "minmax4"])
def test_channel_major_write(device, name):
    # M = 5 token rows as G = 5 rows of one token, written at token 33 of 2 words.
    planes, sign, _, _, _ = fields(spikes(name, device))
    out = torch.zeros(planes.shape[0] + (sign is not None), 5 * K, 2, dtype=I32, device=device)
    opcheck(OPS.channel_major_write, (planes, sign, out, K, 33))


@pytest.mark.parametrize("n", [0, 3])
def test_feedback_encode(device, n):
    # G = 2 matrices, n rows each, K = 40 channels (a partial second word).
    x = torch.randn(2, n, K, device=device)
    feedback = torch.randn(2, K, K, device=device).triu(1) / K
    opcheck(OPS.feedback_encode, (x, feedback, 4, 0.9))
