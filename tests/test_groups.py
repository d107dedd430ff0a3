"""Activation groups (per-group thresholds, docs/ops.md "The spike format"): every op that reads
or produces scales, on every device, against reference.py bit for bit and against float64 /
int64 computations written here from the contract."""

import math

import pytest
import torch

import spikeops
from spikeops import Encoding, ops, reference
from helpers import assert_within_spec, exact_weight, make_layer

MODES = [("minmax", 4), ("absmax", 4), ("absmean", 3), ("minmax", 8), ("absmax", 8)]


def _rows(M, K, device, seed=0):
    """Activations whose groups differ in range by orders of magnitude (what groups are for)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * torch.logspace(-2, 1, K).roll(K // 3)
    return x.to(device)


def _fields(st):
    return st.planes, st.sign, st.hi, st.scale, st.zero


@pytest.mark.parametrize("K, group", [(256, 32), (200, 64), (100, 64), (300, 128), (64, 128)])
@pytest.mark.parametrize("mode, bits", MODES)
def test_encode_decode_match_the_reference(device, K, group, mode, bits):
    """gif_encode per (row, group) equals reference.py bit for bit (ragged last group, a group
    wider than K), and decode equals the reference too."""
    x = _rows(5, K, device)
    enc = Encoding(mode, bits, group=group)
    st = spikeops.encode(x, enc)
    ref = reference.gif_encode(x.cpu(), mode, bits, 1.0, group=group)
    R = -(-K // group)
    assert st.scale.shape == (5, R) and st.group == group
    for got, want in zip(_fields(st), ref):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got.cpu(), want), mode
    assert torch.equal(st.decode().cpu(),
                       reference.spike_decode(*ref, K, torch.float32, group=group))


@pytest.mark.parametrize("mode", ["minmax", "absmax", "absmean"])
def test_each_group_is_a_row_of_its_own(mode):
    """Independent check: the spikes of group u are those of encoding that group's channels
    alone, per token (statistics, scale, zero point, codes)."""
    K, group = 160, 64
    x = _rows(7, K, "cpu", seed=3)
    st = spikeops.encode(x, Encoding(mode, 4, gamma=0.75, group=group))
    x_hat = st.decode(torch.float64)
    for u, k0 in enumerate(range(0, K, group)):
        alone = spikeops.encode(x[:, k0:k0 + group], Encoding(mode, 4, gamma=0.75))
        assert torch.equal(st.scale[:, u], alone.scale[:, 0])
        if st.zero is not None:
            assert torch.equal(st.zero[:, u], alone.zero[:, 0])
        assert torch.equal(x_hat[:, k0:k0 + group], alone.decode(torch.float64))


def test_groups_lower_the_error_of_spread_rows():
    """What groups are for: rows whose channel groups differ in range encode with a smaller
    error per group than with one threshold per token."""
    x = _rows(16, 512, "cpu")
    err = {g: (spikeops.encode(x, Encoding("absmax", 4, group=g)).decode(torch.float64)
               - x.double()).pow(2).mean().item() for g in (0, 64)}
    assert err[64] < 0.5 * err[0]


@pytest.mark.parametrize("mode", ["minmax", "absmax"])
def test_non_finite_row_is_nan_in_every_group(device, mode):
    """A row holding NaN encodes NaN scales in every group, no spikes, and gives a NaN row in
    spike_linear (every backend, as without groups); the other rows are untouched."""
    x = _rows(3, 256, device)
    x[1, 150] = float("nan")
    st = spikeops.encode(x, Encoding(mode, 4, group=64))
    assert torch.isnan(st.scale[1]).all() and not torch.isnan(st.scale[[0, 2]]).any()
    assert int(st.planes[:, 1].abs().sum()) == 0
    if st.zero is not None:
        assert int(st.zero[1].abs().sum()) == 0
    w = make_layer(256, 24, 4, 128, device=device)[0]
    for backend in ("int", "spike", "auto"):
        y = spikeops.spike_linear(st, w, torch.ones(24, device=device), torch.float32,
                                  backend=backend)
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all(), backend


@pytest.mark.parametrize("zero", [False, True])
def test_static_scales_per_group(device, zero):
    """Static encodings take one scale (and zero) per token and group, [R] or [M, R]."""
    K, group, M = 100, 32, 4
    R = -(-K // group)
    x = _rows(M, K, device)
    scale = torch.rand(M, R, device=device) + 0.1
    z = torch.randint(-3, 4, (R,), device=device, dtype=torch.int32) if zero else None
    st = spikeops.encode(x, Encoding("static", 4, group=group), scale=scale, zero=z)
    ref = reference.gif_encode(x.cpu(), "static", 4, 1.0, scale=scale.cpu(),
                               zero=None if z is None else z.expand(M, R).cpu(), group=group)
    for got, want in zip(_fields(st), ref):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match=r"R = 4"):
        spikeops.encode(x, Encoding("static", 4, group=group), scale=scale[:, :2])
    with pytest.raises(TypeError, match="activation groups"):
        spikeops.encode(x, Encoding("static", 4, group=group), scale=0.5)


# (K, weight group_size, activation group, bits): equal groups, activation groups dividing the
# weight group, one weight group, ragged K.
LINEAR = [(256, 64, 64, 4), (256, 128, 64, 4), (264, 128, 32, 4), (200, -1, 64, 4),
          (192, 64, 32, 2), (300, 128, 128, 8), (128, 32, 32, 4)]


@pytest.mark.parametrize("K, gs, group, bits", LINEAR)
@pytest.mark.parametrize("mode, abits", [("minmax", 4), ("absmax", 4), ("absmean", 3),
                                         ("absmax", 8)])
def test_spike_linear_with_groups(device, K, gs, group, bits, mode, abits):
    """Both backends, the reference, and the float64 result within the tolerance of
    docs/ops.md: y = sum over activation groups of scale[m, u] * S_u."""
    layer = make_layer(K, 40, bits, gs, sym=False, device=device)
    w = layer[0]
    st = spikeops.encode(_rows(9, K, device), Encoding(mode, abits, group=group))
    bias = torch.randn(40, device=device)
    ys = {b: spikeops.spike_linear(st, w, bias, torch.float32, backend=b)
          for b in ("int", "spike", "auto")}
    assert torch.equal(ys["int"], ys["spike"]) and torch.equal(ys["int"], ys["auto"])
    ref = reference.spike_linear(*_fields(st), *[t if t is None else t.cpu()
                                                 for t in w.kernel_args()],
                                 bias.cpu(), w.kernel_bits, w.kernel_group_size, w.zero_offset,
                                 torch.float32, "auto", group)
    assert torch.equal(ys["int"].cpu(), ref)
    _, q, z, scales, g_idx = layer
    assert_within_spec(ys["int"], st.decode(torch.float32), exact_weight(q, z, scales, g_idx),
                       bias)


def test_spike_linear_epilogue_by_hand():
    """The epilogue of docs/ops.md written out in float64 from the integer sums: D per
    activation group, float32 product with the weight scale, the sum over columns in float64."""
    K, N, gs, group = 256, 24, 128, 64
    w, q, z, scales, g_idx = make_layer(K, N, 4, gs, sym=False)
    st = spikeops.encode(_rows(3, K, "cpu"), Encoding("minmax", 4, group=group))
    y = spikeops.spike_linear(st, w, None, torch.float32, backend="int")
    codes = reference._codes(st.planes, st.sign, K)
    col = torch.arange(K) // group
    c = codes - st.zero[:, col].long()
    wd = q - z[g_idx]
    for m in range(3):
        for n in range(N):
            Y = 0.0
            for u in range(K // group):
                ks = col == u
                D = int((c[m, ks] * wd[ks, n]).sum())
                g = u * group // gs
                S = float(torch.tensor(float(scales[g, n]), dtype=torch.float32)
                          * torch.tensor(float(D), dtype=torch.float32))
                Y += float(st.scale[m, u]) * S
            assert float(y[m, n]) == float(torch.tensor(Y, dtype=torch.float32))


@pytest.mark.parametrize("per_plane", [False, True])
def test_spike_accumulate_per_group(device, per_plane):
    """[R, M, N] per activation group; their sum is the accumulation without groups."""
    K, N, group = 200, 17, 64
    x = _rows(4, K, device)
    st = spikeops.encode(x, Encoding("absmax", 5, group=group))
    w = torch.randint(-128, 128, (K, N), dtype=torch.int8, device=device)
    acc = spikeops.spike_accumulate(st, w, per_plane)
    ref = reference.spike_accumulate(*_fields(st)[:3], w.cpu(), per_plane, group=group)
    assert torch.equal(acc.cpu(), ref)
    R = -(-K // group)
    assert acc.shape[-3] == R
    codes = reference._codes(st.planes.cpu(), st.sign.cpu(), K)
    total = acc.sum(-3) if not per_plane else (
        acc * (2 ** torch.arange(acc.shape[0], device=device)).view(-1, 1, 1, 1)).sum((0, 1))
    assert torch.equal(total.cpu(), codes @ w.cpu().long())


def test_spike_linear_module_and_refusals():
    """A SpikeLinear takes grouped encodings its weight groups hold; others are refused when
    the encoding is set, and the op refuses them too."""
    w = make_layer(256, 32, 4, 128)[0]
    layer = spikeops.SpikeLinear(w, Encoding("absmax", 4, group=64))
    x = _rows(5, 256, "cpu")
    y = layer(x)
    st = spikeops.encode(x, layer.enc)
    assert torch.equal(y, layer.from_spikes(st, x.dtype))
    with pytest.raises(ValueError, match="inside this layer's weight groups"):
        layer.set_encoding(Encoding("absmax", 4, group=96))
    with pytest.raises(ValueError, match="inside this layer's weight groups"):
        spikeops.SpikeLinear(make_layer(256, 32, 4, 128, act_order=True)[0],
                             Encoding("absmax", 4, group=64))
    st96 = spikeops.encode(x, Encoding("absmax", 4, group=96))
    with pytest.raises(ValueError, match="activation groups must lie inside"):
        spikeops.spike_linear(st96, w)


def test_encoding_refusals_and_label():
    assert Encoding("absmax", 4, group=64).label == "absmax4g64"
    for bad in (-32, 48, 1):
        with pytest.raises(ValueError, match="multiple of 32"):
            Encoding("absmax", 4, group=bad)
    with pytest.raises(TypeError, match="group"):
        Encoding("absmax", 4, group=64.0)
    with pytest.raises(ValueError, match="group combines"):
        Encoding("oat", 4, theta=(0.5, 2.0), group=64)
    with pytest.raises(ValueError, match="group combines"):
        Encoding("minmax", 4, salient_bits=8, group=64)


def test_op_refusals():
    x = torch.randn(2, 100)
    with pytest.raises(ValueError, match="positive multiple of 32"):
        ops.gif_encode(x, "absmax", 4, group=40)
    with pytest.raises(ValueError, match="does not combine"):
        ops.gif_encode(x, "oat", 4, theta_nor=0.5, theta_out=1.0, group=32)
    with pytest.raises(ValueError, match="does not combine"):
        ops.gif_encode(x, "minmax", 4, salient_mask=torch.zeros(100, dtype=torch.bool),
                       salient_bits=8, group=32)
    planes, sign, hi, scale, zero = ops.gif_encode(x, "absmax", 4, group=32)
    with pytest.raises(ValueError, match=r"scale must have shape \[2, 2\]"):
        ops.spike_decode(planes, sign, hi, scale, zero, 100, torch.float32, 64)


def test_fake_kernels_give_the_shapes():
    """torch.compile's fakes know the scale columns of groups."""
    x = torch.randn(3, 200, device="meta")
    planes, sign, hi, scale, zero = ops.gif_encode(x, "minmax", 4, group=64)
    assert scale.shape == (3, 4) and zero.shape == (3, 4)
    w = torch.zeros(200, 5, dtype=torch.int8, device="meta")
    assert ops.spike_accumulate(planes, None, None, w, False, 64).shape == (4, 3, 5)


def test_straight_through_gradient_with_groups():
    """fake_quantize with groups: forward equals encode/decode, gamma gets a finite gradient
    summed over the groups' scales."""
    x = _rows(4, 128, "cpu").requires_grad_()
    gamma = torch.tensor(0.9, requires_grad=True)
    enc = Encoding("absmax", 4, group=32)
    y = spikeops.fake_quantize(x, enc, gamma=gamma)
    assert torch.equal(y.detach(), spikeops.encode(x.detach(), Encoding(
        "absmax", 4, gamma=0.9, group=32)).decode())
    y.pow(2).sum().backward()
    assert x.grad is not None and math.isfinite(float(gamma.grad)) and float(gamma.grad) != 0


def test_statistics_count_the_activation_groups():
    """Energy accounting with groups (docs/energy.md): the integer sums are kept per
    activation group, so A = K / group replaces G in the shift term and G * R in the epilogue."""
    K, N, group = 256, 48, 64
    layer = spikeops.SpikeLinear(make_layer(K, N, 4, 128)[0], Encoding("absmax", 4, group=group))
    with spikeops.track(layer) as tracker:
        layer(_rows(6, K, "cpu"))
    (stats,) = tracker.layers()
    assert (stats.act_groups, stats.ranges, stats.groups) == (K // group, 1, K // 128)
    assert stats.epilogue_mults() == 6 * N * (K // group)
    assert stats.shifts() == 6 * N * (K // group) * stats.P


# (K, N, weight group_size, activation group): the unit of the CPU layout's dot-product kernels
# is the activation group, equal to the weight group, smaller than it (sum(q) over the unit by a
# dot product with ones for zero points), in one weight group, ragged K (a multiple of 8, as the
# CPU layout needs) and N, a group wider than K.
ISA_GROUPS = [(256, 72, 128, 128), (256, 72, 128, 64), (264, 40, 128, 32), (200, 130, -1, 64),
              (520, 33, 128, 64), (96, 48, -1, 128), (128, 17, 64, 64), (264, 40, -1, 32)]


def _assert_isa_paths_identical_groups(st, w, bias, monkeypatch):
    """Every ISA path the CPU has, each cap below it and both backends give reference.py's bits
    on grouped spikes."""
    from spikeops import _C
    ref = reference.spike_linear(*_fields(st), *w.kernel_args(), bias, w.kernel_bits,
                                 w.kernel_group_size, w.zero_offset, torch.float32, "int",
                                 st.group)
    seen = set()
    for isa in ("", "avx512vnni", "avx2", "generic"):  # the best the CPU has, then capped
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
        seen.add(_C.cpu_isa())
        for backend in ("int", "auto"):
            y = spikeops.spike_linear(st, w, bias, torch.float32, backend=backend)
            assert torch.equal(y, ref), (isa, backend)
    assert "generic" in seen


@pytest.mark.parametrize("M", [1, 5, 16, 37])
@pytest.mark.parametrize("K, N, gs, group", ISA_GROUPS)
@pytest.mark.parametrize("mode, abits", [("minmax", 4), ("absmax", 4), ("minmax", 8),
                                         ("absmean", 3)])
def test_cpu_isa_paths_with_groups(K, N, gs, group, mode, abits, M, monkeypatch):
    """The AMX (from 8 tokens, where the CPU has it), AVX-512 VNNI and AVX2 kernels on the CPU
    layout fold per activation group; with silent tokens and silent groups (skipped units) their
    bits are the reference's."""
    w = make_layer(K, N, 4, gs, sym=False, device="cpu")[0]
    assert w.packed is not None
    x = _rows(M, K, "cpu", seed=M + K)
    if M > 4:
        x[2] = 0                      # a silent token
        x[3:, :group] = 0             # the first group silent in the later tokens
        x[M - 1, K - group // 2:] = 0  # (part of) the last group of the last token
    st = spikeops.encode(x, Encoding(mode, abits, group=group))
    _assert_isa_paths_identical_groups(st, w, torch.randn(N), monkeypatch)


@pytest.mark.parametrize("shift", [0.0, 5.0, -5.0])
def test_cpu_isa_paths_with_groups_far_zero_points(shift, monkeypatch):
    """minmax groups of one sign have zero points far from the codes (down to -10^4): the zero
    point terms of units smaller than their weight group stay exact in every path."""
    K, N, M = 384, 48, 21
    w = make_layer(K, N, 4, 128, sym=False, device="cpu")[0]
    x = _rows(M, K, "cpu", seed=11).abs() + shift
    x[4, 64:128] = 3.0                # a constant group: one value, scale clamped
    st = spikeops.encode(x, Encoding("minmax", 4, group=32))
    # zero points outside [15 - 127, 128] take the unsigned codes and the zero point term
    assert shift == 0.0 or int(st.zero.min()) < -112 or int(st.zero.max()) > 128
    _assert_isa_paths_identical_groups(st, w, None, monkeypatch)
