"""spike_linear, gptq_dequantize and spike_accumulate against reference.py (bit for bit) and
against independent float64 / int64 computations."""


import copy

import pytest
import torch

import spikeops
from spikeops import Encoding, reference
from helpers import assert_within_spec, exact_weight, kernel_args, make_layer

MINMAX4 = spikeops.Encoding("minmax", 4)

ENCODINGS = {
    "minmax4": (spikeops.Encoding("minmax", 4), False),
    "minmax8": (spikeops.Encoding("minmax", 8), False),
    "absmax4-g0.5": (spikeops.Encoding("absmax", 4, gamma=0.5), False),
    "absmean3": (spikeops.Encoding("absmean", 3), False),
    "minmax4-salient6": (spikeops.Encoding("minmax", 4, salient_bits=6), True),
    "absmax4-salient8": (spikeops.Encoding("absmax", 4, salient_bits=8), True),
    "oat8": (spikeops.Encoding("oat", 8, theta=(0.8, 2.5)), False),
    "minmax16": (spikeops.Encoding("minmax", 16), False),
}

# (bits, group_size, act_order, sym, format, K): every bit width, group size and zero format,
# with K ragged against 32 and against the group.
WEIGHTS = [
    (4, 128, False, True, "gptq", 256),
    (4, 128, True, True, "gptq", 264),
    (4, 32, False, False, "gptq", 200),
    (4, -1, False, False, "gptq_v2", 136),
    (2, 64, True, False, "gptq", 208),
    (2, 32, False, True, "gptq_v2", 96),
    (3, 64, False, True, "gptq", 192),
    (3, 32, True, False, "gptq", 128),
    (8, 128, False, True, "gptq", 300),
    (8, 48, True, False, "gptq_v2", 100),
    (8, -1, False, True, "gptq_v2", 36),
]
WEIGHT_IDS = [f"w{b}-g{g}{'-act' if a else ''}-{'sym' if s else 'asym'}-{f}-K{K}"
              for b, g, a, s, f, K in WEIGHTS]


def spikes_for(x, name, device):
    enc, salient = ENCODINGS[name]
    mask = (torch.rand(x.shape[-1], device=device) < 0.15) if salient else None
    return spikeops.encode(x, enc, salient_mask=mask)


def linear_args(st, w, bias, out_dtype, backend):
    return (st.planes, st.sign, st.hi, st.scale, st.zero, *w.kernel_args(),
            None if bias is None else bias.float(), w.kernel_bits, w.kernel_group_size,
            w.zero_offset, out_dtype, backend)


def check_linear(device, st, w, layer, bias=None, out_dtype=torch.float16):
    """Both backends identical; identical to reference.py; within the tolerance of docs/ops.md
    of the float64 result."""
    y_int = spikeops.spike_linear(st, w, bias, out_dtype, backend="int")
    y_spike = spikeops.spike_linear(st, w, bias, out_dtype, backend="spike")
    y_auto = spikeops.spike_linear(st, w, bias, out_dtype)
    assert torch.equal(y_int, y_spike) and torch.equal(y_int, y_auto)
    ref = reference.spike_linear(*linear_args(st, w, bias, out_dtype, "auto"))
    torch.testing.assert_close(y_int.reshape(ref.shape).cpu(), ref.cpu(), rtol=0, atol=0,
                               equal_nan=True)
    _, q, z, scales, g_idx = layer
    assert_within_spec(y_int, st.decode(torch.float32), exact_weight(q, z, scales, g_idx), bias)
    return y_int


@pytest.mark.parametrize("bits, group_size, act, sym, fmt, K", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("enc_name", ["minmax4", "absmax4-g0.5", "minmax4-salient6", "oat8"])
def test_spike_linear_weights(device, bits, group_size, act, sym, fmt, K, enc_name):
    layer = make_layer(K, 72, bits, group_size, act, sym, fmt, device=device)
    x = torch.randn(5, K, device=device) * 2
    check_linear(device, spikes_for(x, enc_name, device), layer[0], layer)


@pytest.mark.parametrize("enc_name", list(ENCODINGS))
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_spike_linear_encodings(device, enc_name, out_dtype):
    layer = make_layer(200, 130, 4, 64, act_order=True, sym=False, device=device)
    bias = torch.randn(130, device=device).to(out_dtype)
    x = torch.randn(2, 3, 200, device=device)
    y = check_linear(device, spikes_for(x, enc_name, device), layer[0], layer, bias, out_dtype)
    assert y.shape == (2, 3, 130) and y.dtype == out_dtype


@pytest.mark.parametrize("M", [1, 2, 33, 70])
def test_spike_linear_tokens_and_wide_n(device, M):
    """M across the CPU token chunk (32) and N across several column blocks plus a tail."""
    layer = make_layer(160, 64 * 3 + 17, 4, 32, device=device)
    x = torch.randn(M, 160, device=device)
    check_linear(device, spikes_for(x, "absmean3", device), layer[0], layer)


def test_spike_linear_large_codes_no_overflow(device):
    """16-bit codes times 8-bit weights over K = 4096 in one group exceed int32: the integer
    sums must stay exact (the int backend splits them, the spike backend shifts in int64)."""
    layer = make_layer(4096, 40, 8, -1, sym=False, device=device)
    x = torch.randn(2, 4096, device=device) * 100
    x[:, 0] = 5000.0  # a wide range: codes near 2^16 - 1, zero points far from 0
    check_linear(device, spikes_for(x, "minmax16", device), layer[0], layer)


def test_spike_linear_nan_row_and_noncontiguous(device):
    layer = make_layer(96, 40, 4, 32, device=device)
    x = torch.randn(40, 4, 96, device=device).transpose(0, 1)  # non-contiguous [4, 40, 96]
    x[1, 3, 7] = float("nan")
    x[2, 0, 0] = float("inf")
    st = spikeops.encode(x, ENCODINGS["minmax4"][0])
    y = spikeops.spike_linear(st, layer[0], out_dtype=torch.float32)
    bad = torch.zeros(4, 40, dtype=torch.bool)
    bad[1, 3] = bad[2, 0] = True
    assert torch.isnan(y[bad.to(device)]).all()
    assert torch.isfinite(y[~bad.to(device)]).all()
    clean = spikeops.encode(x.contiguous(), ENCODINGS["minmax4"][0])
    assert torch.equal(spikeops.spike_linear(clean, layer[0], out_dtype=torch.float32)[~bad],
                       y[~bad])


def test_spike_linear_silent_input(device):
    """All-zero activations: no spike fires and y is the bias, in every encoding."""
    layer = make_layer(64, 16, 4, 32, device=device)
    bias = torch.randn(16, device=device)
    for name in ENCODINGS:
        st = spikes_for(torch.zeros(3, 64, device=device), name, device)
        for backend in ("int", "spike"):
            y = spikeops.spike_linear(st, layer[0], bias, torch.float32, backend)
            assert torch.equal(y, bias.expand(3, 16)), (name, backend)


def test_spike_linear_module(device):
    layer = make_layer(128, 48, 4, 64, device=device)
    enc = spikeops.Encoding("minmax", 4, salient_bits=6)
    mask = torch.zeros(128, dtype=torch.bool, device=device)
    mask[::9] = True
    bias = torch.randn(48, device=device).half()
    lin = spikeops.SpikeLinear(layer[0], enc, bias=bias, salient_mask=mask)
    x = torch.randn(3, 128, device=device).half()
    y = lin(x)
    st = spikeops.encode(x, enc, salient_mask=mask)
    assert y.dtype == torch.float16
    assert torch.equal(y, spikeops.spike_linear(st, layer[0], bias, torch.float16))
    assert torch.equal(lin(x.double()), spikeops.spike_linear(st, layer[0], bias,
                                                              torch.float32).double())


@pytest.mark.parametrize("bits, group_size, act, sym, fmt, K", WEIGHTS, ids=WEIGHT_IDS)
def test_gptq_dequantize(device, bits, group_size, act, sym, fmt, K):
    w, q, z, scales, g_idx = make_layer(K, 40, bits, group_size, act, sym, fmt, device=device)
    W = w.dequantize()
    expect = (scales.float()[g_idx] * (q - z[g_idx]).float()).half().t()  # one rounding
    assert W.dtype == torch.float16 and torch.equal(W.cpu(), expect)
    assert torch.equal(W.cpu(), reference.gptq_dequantize(
        w.qweight, w.qzeros, w.scales, w.g_idx, w.packed, w.kernel_bits, w.kernel_group_size,
        w.zero_offset).cpu())


@pytest.mark.parametrize("enc_name", ["minmax4", "absmax4-salient8", "oat8", "absmean3"])
@pytest.mark.parametrize("per_plane", [False, True])
def test_spike_accumulate(device, enc_name, per_plane):
    K, N = 77, 19
    x = torch.randn(2, 3, K, device=device)
    st = spikes_for(x, enc_name, device)
    w = torch.randint(-128, 128, (K, N), dtype=torch.int8, device=device)
    acc = spikeops.spike_accumulate(st, w, per_plane)
    ref = reference.spike_accumulate(st.planes, st.sign, st.hi, w, per_plane)
    assert acc.dtype == torch.int64 and torch.equal(acc.cpu(), ref.cpu())
    total = acc if not per_plane else sum((acc[p] << p) for p in range(acc.shape[0]))
    # Independent: the signed codes s*Q recovered from the decoded values, in float64.
    x_hat = st.decode(torch.float32).reshape(-1, K).double()
    R = st.scale.shape[1]
    r = reference.unpack_bits(st.hi, K).long() if st.hi is not None else torch.zeros_like(x_hat).long()
    zero = st.zero.double().gather(1, r) if st.zero is not None else 0.0
    codes = torch.round(x_hat / st.scale.double().gather(1, r) + zero).long()
    expect = torch.stack([(codes * (r == i)) @ w.long() for i in range(R)])
    assert torch.equal(total.cpu(), expect.cpu())


def test_spike_accumulate_ternary_is_add_subtract(device):
    """Ternary weights: every output is a sum of +-codes of the inputs, i.e. additions only."""
    K, N = 64, 8
    st = spikeops.encode(torch.randn(4, K, device=device), spikeops.Encoding("absmax", 5))
    w = torch.randint(-1, 2, (K, N), dtype=torch.int8, device=device)
    codes = reference._codes(st.planes.cpu(), st.sign.cpu(), K)
    plus = torch.stack([codes[:, w[:, n].cpu() == 1].sum(1) for n in range(N)], 1)
    minus = torch.stack([codes[:, w[:, n].cpu() == -1].sum(1) for n in range(N)], 1)
    assert torch.equal(spikeops.spike_accumulate(st, w)[0].cpu(), plus - minus)


def test_module_dtype_casts_keep_fp16_scales(device):
    """model.to(bfloat16) / .float() cast the bias but never the fp16 group scales."""
    layer = make_layer(64, 24, 4, 32, device=device)
    lin = spikeops.SpikeLinear(layer[0], spikeops.Encoding("minmax", 4),
                               bias=torch.randn(24, device=device).half())
    scales = lin.gptq.scales.clone()
    x = torch.randn(2, 64, device=device)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        lin.to(dtype)
        assert lin.gptq.scales.dtype == torch.float16 and torch.equal(lin.gptq.scales, scales)
        assert lin.bias.dtype == dtype and lin(x.to(dtype)).dtype == dtype
    assert lin.kernel_bias.dtype == torch.float32


@pytest.mark.parametrize("bits, group_size, act, sym, fmt, K", WEIGHTS, ids=WEIGHT_IDS)
def test_kernel_form(device, bits, group_size, act, sym, fmt, K):
    """GPTQWeight's kernel form, from the independent builder's codes: the true zero points
    (stored fields + zero_offset), the float16 scales as given, the codes (in qweight or the CPU
    layout, which packs back to the same qweight) and the group layout (uniform unless
    act-order)."""
    w, q, z, scales, g_idx = make_layer(K, 40, bits, group_size, act, sym, fmt, device=device)
    held_q, held_z = w.codes()
    assert torch.equal(held_z.cpu(), z.to(torch.int32)) and torch.equal(held_q.cpu(), q.int())
    assert w.scales.dtype == torch.float16 and torch.equal(w.scales.cpu(), scales)
    assert (w.qweight is None) == (w.packed is not None)
    gs = K if group_size == -1 else group_size
    assert w.kernel_group_size == (0 if act else gs)


def test_module_state_dict_and_moves_rebuild_the_kernel_form(device):
    """The state dict holds the checkpoint tensors only; loading one rebuilds the kernel form,
    so the module computes with the loaded weights."""
    a = spikeops.SpikeLinear(make_layer(64, 24, 4, 32, seed=1, device=device)[0],
                             spikeops.Encoding("minmax", 4), bias=torch.randn(24, device=device))
    b = spikeops.SpikeLinear(make_layer(64, 24, 4, 32, sym=False, seed=2, device=device)[0],
                             spikeops.Encoding("minmax", 4), bias=torch.randn(24, device=device))
    assert list(a.state_dict()) == ["qweight", "qzeros", "scales", "g_idx", "bias"]
    x = torch.randn(3, 64, device=device)
    before = b(x)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b(x), a(x)) and not torch.equal(b(x), before)
    assert all(torch.equal(t, a.state_dict()[k]) for k, t in b.state_dict().items())
    moved = copy.deepcopy(a).to("meta")
    assert all(t is None or t.is_meta for t in moved.gptq.kernel_args() + (moved.kernel_bias,))
    assert moved.gptq.qweight is not None  # the CPU layout is for CPU tensors only
    assert moved(x.to("meta")).is_meta  # the op arguments followed the move
    back = moved.to_empty(device=device)  # meta -> device: the kernel form for that device
    back.load_state_dict(a.state_dict())
    assert torch.equal(back(x), a(x))
    assert (back.gptq.packed is not None) == (a.gptq.packed is not None)


def test_module_load_state_dict_checks_the_tensors():
    """load_state_dict refuses GPTQ tensors of another dtype or shape, or missing ones, naming
    them."""
    lin = spikeops.SpikeLinear(make_layer(64, 24, 4, 32)[0], None)
    state = lin.state_dict()
    with pytest.raises(RuntimeError, match="scales"):
        lin.load_state_dict({**state, "scales": state["scales"].float()})
    with pytest.raises(RuntimeError, match="qzeros"):
        lin.load_state_dict({**state, "qzeros": state["qzeros"][:1]})
    with pytest.raises(RuntimeError, match="Missing key.*g_idx"):
        lin.load_state_dict({k: t for k, t in state.items() if k != "g_idx"})


def test_float_activations_dequantize_once(device, monkeypatch):
    """enc=None keeps W_hat in x's dtype between calls and drops it when spikes come back."""
    lin = spikeops.SpikeLinear(make_layer(64, 24, 4, 32, device=device)[0], None)
    W = lin.dequantize().float()
    calls = []
    real = spikeops.ops.gptq_dequantize
    monkeypatch.setattr(spikeops.ops, "gptq_dequantize", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 64, device=device)
    y = lin(x)
    assert torch.equal(lin(x), y) and len(calls) == 1
    torch.testing.assert_close(y, x @ W.t(), rtol=0, atol=0)
    lin(x.double())
    assert len(calls) == 2 and lin.dense_weight.dtype == torch.float64
    lin.set_encoding(spikeops.Encoding("minmax", 4))
    assert lin.dense_weight is None


ISA_CASES = [  # (K, N, group_size, act_order, encoding name, M): ragged K and N, every range;
    # M >= 8 runs AMX tiles of 16 tokens where the CPU has them (the last block padded)
    (256, 72, 128, False, "minmax4", 1), (264, 40, 8, False, "absmax4-g0.5", 3),
    (200, 130, -1, False, "minmax4-salient6", 5), (136, 17, 8, False, "oat8", 2),
    (96, 33, 32, False, "minmax8", 4), (128, 48, 32, False, "absmean3", 0),
    (128, 48, 32, True, "minmax4", 2), (4096, 32, -1, False, "absmax4-salient8", 1),
    (256, 72, 128, False, "minmax4", 16), (264, 40, 8, False, "absmax4-g0.5", 37),
    (200, 130, -1, False, "minmax4-salient6", 19), (96, 33, 32, False, "minmax8", 64),
    (128, 48, 32, False, "absmean3", 8), (4096, 32, -1, False, "absmax4-salient8", 20),
    (520, 100, 40, False, "minmax4", 33),
]


@pytest.mark.parametrize("M, share", [(1, 0.002), (1, 0.2), (16, 0.0), (16, 0.2), (40, 0.0)])
def test_auto_on_sparse_spikes(M, share):
    """Sparse and dense spikes on the CPU layout: auto (the dot-product kernel) gives the same
    bits as both backends and the reference."""
    w = make_layer(1024, 48, 4, 64, sym=False, device="cpu")[0]
    x = torch.randn(M, 1024) * (torch.rand(M, 1024) < share)
    x[:, 0] = 2.0  # three spikes per token at least
    st = spikeops.encode(x, spikeops.Encoding("absmax", 4))
    ref = reference.spike_linear(*linear_args(st, w, None, torch.float32, "auto"))
    for backend in ("auto", "int", "spike"):
        y = spikeops.spike_linear(st, w, None, torch.float32, backend=backend)
        assert torch.equal(y, ref), backend


def assert_isa_paths_identical(st, w, bias, monkeypatch):
    """Every ISA path the CPU has, and each cap below it, gives the reference's bits."""
    from spikeops import _C
    ref = reference.spike_linear(*linear_args(st, w, bias, torch.float32, "int"))
    seen = set()
    for isa in ("", "avx512vnni", "avx2", "generic"):  # the best the CPU has, then capped
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
        seen.add(_C.cpu_isa())
        y = spikeops.spike_linear(st, w, bias, torch.float32, backend="int")
        assert torch.equal(y.reshape(ref.shape), ref), isa
    assert "generic" in seen


@pytest.mark.parametrize("K, N, gs, act, enc_name, M", ISA_CASES)
def test_cpu_isa_paths_are_identical(K, N, gs, act, enc_name, M, monkeypatch):
    """The AMX, AVX-512 VNNI and AVX2 paths on the CPU layout (where the CPU has them) and the
    generic kernel give the reference's bits; SPIKEOPS_CPU_ISA=avx512vnni, =avx2 or =generic
    caps the choice. Act-order layers and 8-bit signed codes have no CPU layout or do not fit
    it."""
    w = make_layer(K, N, 4, gs, act_order=act, sym=False, device="cpu")[0]
    assert (w.packed is None) == act
    st = spikes_for(torch.randn(M, K) * 2, enc_name, "cpu")
    assert_isa_paths_identical(st, w, torch.randn(N), monkeypatch)


@pytest.mark.parametrize("enc_name", ["minmax4", "absmax4-g0.5", "minmax4-salient6"])
def test_cpu_isa_paths_with_silent_tokens_in_a_span(enc_name, monkeypatch):
    """The vector kernels walk tokens in spans of 16 (blocks of 4 inside each group): blocks,
    and single tokens, whose groups are silent are skipped inside a span and its last, partial
    block; the bits stay the reference's."""
    K, N = 256, 80
    w = make_layer(K, N, 4, 64, sym=False, device="cpu")[0]
    x = torch.randn(37, K) * 2
    x[4:8] = 0             # a whole block of the first span
    x[17] = 0              # one token of a block in the second span
    x[20:36, :64] = 0      # group 0 silent in most of a span
    x[36] = 0              # the last, partial block
    assert_isa_paths_identical(spikes_for(x, enc_name, "cpu"), w, None, monkeypatch)


@pytest.mark.parametrize("value", ["", "1", "0"])
def test_pdl_switch_accepts_on_and_off(value, monkeypatch):
    """SPIKEOPS_PDL (unset or empty, 1, 0) only chooses how the CUDA decode kernel is launched:
    the CPU's outputs do not depend on it (tests/test_cuda.py runs the CUDA cases both ways)."""
    w = make_layer(256, 40, 4, 64, device="cpu")[0]
    st = spikeops.encode(torch.randn(2, 256), Encoding("minmax", 4))
    y = spikeops.spike_linear(st, w)
    monkeypatch.setenv("SPIKEOPS_PDL", value)
    assert torch.equal(spikeops.spike_linear(st, w), y)


@pytest.mark.parametrize("value", ["off", "2", " 1", "true"])
def test_pdl_switch_refuses_other_values(value, monkeypatch):
    """Any other value is refused on every call, naming the variable and the value, so that a
    misspelt switch never times the wrong launch in silence."""
    w = make_layer(64, 8, 4, 32, device="cpu")[0]
    st = spikeops.encode(torch.randn(1, 64), Encoding("minmax", 4))
    monkeypatch.setenv("SPIKEOPS_PDL", value)
    with pytest.raises(ValueError, match=f"spike_linear: SPIKEOPS_PDL must be 0 or 1 \\(or "
                                         f"unset\\), got '{value}'"):
        spikeops.spike_linear(st, w)


PREFILL_CASES = [  # (K, N, group_size, encoding name, M): AVX-512's blocks of six tokens from
    # 16 tokens on (spans of 18: M = 18, 19, 36, 37 at their edges), ragged K and N (a last task
    # of fewer than four column tiles, a partial tile), groups of 128, 64, 8 and one group,
    # centered minmax codes (one and two ranges), signed codes, and minmax8's zero point term
    (256, 72, 128, "minmax4", 16), (264, 40, 8, "absmax4-g0.5", 17),
    (200, 130, -1, "minmax4-salient6", 18), (96, 33, 32, "minmax8", 19),
    (520, 100, 40, "minmax4", 23), (256, 200, 64, "absmax4-g0.5", 24),
    (136, 17, 8, "minmax4", 25), (4096, 32, -1, "absmax4-salient8", 36),
    (256, 72, 64, "minmax4-salient6", 37), (128, 48, 64, "minmax8", 40),
]


@pytest.mark.parametrize("K, N, gs, enc_name, M", PREFILL_CASES)
def test_cpu_isa_paths_in_blocks_of_six(K, N, gs, enc_name, M, monkeypatch):
    """The register-blocked AVX-512 kernel (blocks of six tokens, the fold from its registers,
    the codes laid out with AVX-512) gives the reference's bits, as the other paths, with tokens
    and blocks of eight channels silent inside a block, and rows whose zero points are too far
    for centered codes (every row of the call then runs with the zero point term)."""
    w = make_layer(K, N, 4, gs, sym=False, device="cpu")[0]
    x = torch.randn(M, K) * 2
    x[1] = 0                   # one silent token inside the first block
    x[6:12, : K // 2] = 0      # a block silent in its first groups
    x[:, 8:16] = 0             # one block of eight channels silent in every token
    st = spikes_for(x, enc_name, "cpu")
    assert_isa_paths_identical(st, w, torch.randn(N), monkeypatch)
    if st.zero is not None:    # far zero points: x + 100 has its zero point near -250
        x[M - 1] += 100
        assert_isa_paths_identical(spikes_for(x, enc_name, "cpu"), w, None, monkeypatch)


# ----------------------------------------------------------------------------- random configurations and dtypes
def test_bias_survives_double():
    lin = spikeops.SpikeLinear(make_layer(64, 16, 4, 32)[0], MINMAX4, bias=torch.randn(16))
    lin.double()
    assert lin(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64


def test_random_configurations_against_the_reference_and_thread_counts():
    """A few hundred random small problems: both backends and both thread counts give the
    reference's bits."""
    gen = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    modes = [Encoding("minmax", 4), Encoding("absmax", 3, gamma=0.7), Encoding("absmean", 5),
             Encoding("minmax", 2, salient_bits=5), Encoding("oat", 6, theta=(0.5, 3.0))]
    try:
        for case in range(240):
            K = int(torch.randint(1, 150, (), generator=gen))
            N = int(torch.randint(1, 40, (), generator=gen))
            M = int(torch.randint(0, 6, (), generator=gen))
            bits = (2, 3, 4, 8)[case % 4]
            gs = (-1, 8, 32, 64)[(case // 4) % 4]
            w = make_layer(K, N, bits, gs, act_order=case % 3 == 0, sym=case % 2 == 0,
                           seed=case)[0]
            enc = modes[case % len(modes)]
            mask = torch.rand(K, generator=gen) < 0.2 if enc.salient_bits else None
            x = torch.randn(M, K, generator=gen) * 3
            st = spikeops.encode(x, enc, salient_mask=mask)
            f = {k: v for k, v in st._asdict().items() if k != "shape"}
            ref = reference.spike_linear(**f, **kernel_args(w), bias=None,
                                         out_dtype=torch.float32)
            for n in (1, 2):
                torch.set_num_threads(n)
                for backend in ("int", "spike"):
                    y = spikeops.spike_linear(st, w, out_dtype=torch.float32, backend=backend)
                    assert torch.equal(y, ref), (case, n, backend)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("K, N", [(576, 192), (1536, 576)])
@pytest.mark.parametrize("M", [1, 2])
def test_small_calls_run_serially_with_the_same_bits(K, N, M):
    """The int backend's column tasks run on one thread below kThreadWork multiply-adds a
    thread (csrc/cpu/int_layout.cpp): 576 -> 192 at decode does, 1536 -> 576 runs on two; both
    give the reference's bits, on one thread and on two."""
    threads = torch.get_num_threads()
    w = make_layer(K, N, 4, 128, sym=False)[0]
    for enc in (Encoding("absmax", 4), Encoding("minmax", 4)):
        st = spikeops.encode(torch.randn(M, K) * 2, enc)
        f = {k: v for k, v in st._asdict().items() if k != "shape"}
        ref = reference.spike_linear(**f, **kernel_args(w), bias=None, out_dtype=torch.float32)
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                y = spikeops.spike_linear(st, w, out_dtype=torch.float32, backend="int")
                assert torch.equal(y, ref), (enc, n)
        finally:
            torch.set_num_threads(threads)
