"""gif_encode, spike_decode and spike_counts against reference.py (bit for bit) and against
independent float64 bounds and structural invariants of docs/ops.md."""

import itertools
import math

import pytest
import torch

import spikeops
from spikeops import Encoding, ops, reference

MODE_BITS = [("minmax", b) for b in (1, 2, 4, 8, 16)] + \
            [(m, b) for m in ("absmax", "absmean") for b in (2, 3, 5, 8, 16)]
KS = [1, 31, 32, 33, 100, 257]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def assert_same(a, b):
    """Bitwise equality of every SpikeTensor field (NaN scales compare equal), on the CPU (the
    reference runs there)."""
    for name, u, v in zip(("planes", "sign", "hi", "scale", "zero"), a, b):
        assert (u is None) == (v is None), name
        if u is None:
            continue
        u, v = u.cpu(), v.cpu()
        assert u.shape == v.shape and u.dtype == v.dtype, name
        assert torch.equal(u.isnan() if u.is_floating_point() else u,
                           v.isnan() if v.is_floating_point() else v), name
        if u.is_floating_point():
            assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(v)), name


def op_and_reference(x, mode, bits, **kw):
    out = ops.gif_encode(x, mode, bits, **kw)
    assert_same(out, reference.gif_encode(x.cpu(), mode, bits,
                                          **{k: (v.cpu() if torch.is_tensor(v) else v)
                                             for k, v in kw.items()}))
    return out


def bits_of(words, K):
    return reference.unpack_bits(words.cpu(), K)


@pytest.mark.parametrize("mode, bits", MODE_BITS)
@pytest.mark.parametrize("K", KS)
def test_encode_matches_reference(device, mode, bits, K):
    x = torch.randn(6, K, device=device) * 3
    planes, sign, hi, scale, zero = op_and_reference(x, mode, bits, gamma=0.75)
    assert planes.shape == (bits if mode == "minmax" else bits - 1, 6, (K + 31) // 32)
    # Bits past K are zero in every field.
    W = planes.shape[-1]
    for words in (planes.reshape(-1, W), sign):
        if words is not None:
            assert not bits_of(words, 32 * W)[:, K:].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["minmax", "absmax", "absmean", "oat"])
def test_encode_input_dtypes(device, dtype, mode):
    x = (torch.randn(4, 70, device=device) * 2).to(dtype)
    kw = dict(theta_nor=0.5, theta_out=2.0) if mode == "oat" else {}
    op_and_reference(x, mode, 6, **kw)


@pytest.mark.parametrize("mode, bits, salient_bits", [
    ("minmax", 4, 5), ("minmax", 2, 8), ("absmax", 4, 6), ("absmean", 3, 16), ("absmax", 2, 3)])
def test_encode_salient(device, mode, bits, salient_bits):
    K = 90
    mask = torch.rand(K, device=device) < 0.2
    x = torch.randn(5, K, device=device)
    planes, sign, hi, scale, zero = op_and_reference(
        x, mode, bits, gamma=0.9, salient_mask=mask, salient_bits=salient_bits)
    signed = mode != "minmax"
    assert planes.shape[0] == salient_bits - signed and scale.shape == (5, 2)
    assert torch.equal(bits_of(hi, K), mask.cpu().expand(5, K))
    # Normal channels leave the upper planes silent.
    normal_planes = bits - signed
    upper = bits_of(planes[normal_planes:].reshape(-1, planes.shape[-1]), K)
    assert not upper.reshape(-1, 5, K)[:, :, ~mask.cpu()].any()


@pytest.mark.parametrize("planes_p", [1, 4, 16])
def test_encode_oat(device, planes_p):
    x = torch.randn(8, 65, device=device) * 3
    planes, sign, hi, scale, zero = op_and_reference(x, "oat", planes_p, theta_nor=0.7,
                                                     theta_out=2.5)
    assert zero is None and scale.shape == (8, 2)
    # Independent: floor quantization of the clipped value in its range, in float64.
    xc = x.double().clamp(-2.5, 2.5).cpu()
    r = (xc.abs() >= torch.tensor(0.7, dtype=torch.float32).double())
    assert torch.equal(bits_of(hi, 65), r)
    x_hat = spikeops.SpikeTensor(planes, sign, hi, scale, None, tuple(x.shape)).decode().double()
    step = torch.where(r, 2.5, 0.7) / 2**planes_p
    err = (x_hat.cpu() - xc).abs()
    assert bool((err <= step + 1e-6).all())  # floor: never more than one step below |x|


@pytest.mark.parametrize("mode, bits", [("minmax", 4), ("minmax", 8), ("absmax", 5),
                                        ("absmax", 8)])
def test_decode_error_bound(device, mode, bits):
    """Independent float64 bound: without clipping, |x_hat - x| <= s/2 (signed) or s (minmax:
    the rounded zero point adds at most half a step)."""
    x = torch.randn(16, 300, device=device).double()
    st = spikeops.encode(x, spikeops.Encoding(mode, bits))
    x_hat = st.decode(torch.float32).double()
    s = st.scale.double()
    bound = s if mode == "minmax" else s / 2
    assert bool(((x_hat - x).abs() <= bound * (1 + 1e-5) + 1e-7).all())
    # sign never set where Q = 0; zero codes decode to exactly -scale * zero or 0.
    if st.sign is not None:
        q = reference._codes(st.planes.cpu(), None, 300)
        assert not (bits_of(st.sign, 300) & (q == 0)).any()


def test_absmax_gamma_clips(device):
    """gamma < 1: values above gamma * max|x| saturate at qmax, and fewer spikes fire."""
    x = torch.randn(4, 256, device=device)
    full = spikeops.encode(x, spikeops.Encoding("absmax", 4))
    clipped = spikeops.encode(x, spikeops.Encoding("absmax", 4, gamma=0.25))
    assert clipped.scale.lt(full.scale).all()
    qmax = 7
    q = reference._codes(clipped.planes.cpu(), None, 256)
    big = x.abs().cpu() >= (0.25 * x.abs().amax(1, keepdim=True)).cpu() * (1 + 1e-6)
    assert bool((q[big] == qmax).all())


@pytest.mark.parametrize("gamma", [0.6, 0.85, 1.0])
def test_minmax_gamma_clips(device, gamma):
    """Independent float64 check of clipped minmax (docs/ops.md): the codes span
    [gamma * min, gamma * max] about the unclipped zero point; elements inside decode within a
    step of x, those beyond saturate at 0 or qmax; gamma = 1 is the plain encoding's bits."""
    x = torch.randn(8, 200, device=device) * 2
    st = spikeops.encode(x, spikeops.Encoding("minmax", 4, gamma=gamma))
    xd = x.double().cpu()
    mn, mx = xd.amin(1, keepdim=True), xd.amax(1, keepdim=True)
    s = st.scale.double().cpu()
    assert torch.allclose(s, gamma * (mx - mn) / 15, rtol=1e-6)
    assert torch.equal(st.zero.cpu().double(), torch.round(-mn / ((mx - mn) / 15)))
    q = reference._codes(st.planes.cpu(), None, 200)
    inside = (xd >= gamma * mn) & (xd <= gamma * mx)
    x_hat = st.decode(torch.float32).double().cpu()
    assert bool(((x_hat - xd).abs()[inside] <= (s.expand_as(xd)[inside]) * (1 + 1e-5)).all())
    assert bool((q[xd > gamma * mx + s] == 15).all()) and bool((q[xd < gamma * mn - s] == 0).all())
    if gamma == 1.0:
        plain = spikeops.encode(x, spikeops.Encoding("minmax", 4))
        assert all((u is None and v is None) or torch.equal(u, v)
                   for u, v in zip(st[:5], plain[:5]))


def test_absmean_scale_is_exact_mean(device):
    """mean|x| is the exact sum rounded once, whatever the order: a row whose float32
    left-to-right sum loses the small terms still gets the correctly rounded mean."""
    K = 4097
    x = torch.full((2, K), 1.0)
    x[:, 0] = 2.0**25  # float32: 2^25 + 1 == 2^25, so a naive float32 sum drops every 1
    x[1] = x[1].flip(0)
    st = spikeops.encode(x.to(device), spikeops.Encoding("absmean", 4))
    exact = torch.tensor((2.0**25 + K - 1) / K, dtype=torch.float64).float()
    assert torch.equal(st.scale[:, 0].cpu(), exact.expand(2))


def test_static(device):
    x = torch.randn(3, 40, device=device)
    scale = torch.tensor([0.1, 0.2, 0.05], device=device)
    zero = torch.tensor([8, -3, 0], dtype=torch.int32, device=device)
    unsigned = op_and_reference(x, "static", 4, scale=scale, zero=zero)
    assert torch.equal(unsigned[3][:, 0], scale) and torch.equal(unsigned[4][:, 0], zero)
    signed = op_and_reference(x, "static", 4, scale=scale)
    assert signed[1] is not None and signed[4] is None
    st = spikeops.encode(x, spikeops.Encoding("static", 4), scale=0.1, zero=8)
    assert torch.equal(st.planes, ops.gif_encode(x, "static", 4, scale=torch.full_like(scale, 0.1),
                                                 zero=torch.full_like(zero, 8))[0])


def test_nonfinite_rows(device):
    """A row with NaN or Inf decodes to NaN everywhere; other rows are unaffected."""
    x = torch.randn(5, 50, device=device)
    x[1, 3] = float("nan")
    x[3, 0] = float("-inf")
    for mode, kw in [("minmax", {}), ("absmax", {}), ("absmean", {}),
                     ("oat", dict(theta=(0.5, 2.0))), ("minmax", dict(salient_bits=6))]:
        enc = spikeops.Encoding(mode, 4, **kw)
        mask = torch.arange(50, device=device) % 7 == 0 if "salient_bits" in kw else None
        st = spikeops.encode(x, enc, salient_mask=mask)
        x_hat = st.decode()
        assert x_hat[[1, 3]].isnan().all() and not x_hat[[0, 2, 4]].isnan().any(), mode
        assert st.counts()[:, [1, 3]].eq(0).all()
        rows = spikeops.encode(x[[0, 2, 4]], enc, salient_mask=mask)
        assert torch.equal(rows.planes, st.planes[:, [0, 2, 4]])


def test_leading_dims_and_noncontiguous(device):
    x = torch.randn(7, 3, 2, 64, device=device).permute(2, 1, 0, 3)  # [2, 3, 7, 64]
    enc = spikeops.Encoding("absmax", 5, gamma=0.8)
    st = spikeops.encode(x, enc)
    assert st.shape == (2, 3, 7, 64) and st.planes.shape == (4, 42, 2)
    ref = spikeops.encode(x.contiguous().reshape(-1, 64), enc)
    assert all(torch.equal(a, b) for a, b in zip(st[:5], ref[:5]) if a is not None)
    assert st.decode().shape == x.shape


@pytest.mark.parametrize("mode", ["minmax", "absmax"])
def test_counts(device, mode):
    x = torch.randn(9, 100, device=device)
    st = spikeops.encode(x, spikeops.Encoding(mode, 5))
    counts = st.counts()
    expect = torch.stack([bits_of(st.planes[p], 100).sum(1) for p in range(st.num_planes)])
    assert counts.dtype == torch.int64 and torch.equal(counts.cpu(), expect)
    assert torch.equal(counts.cpu(), reference.spike_counts(st.planes.cpu()))
    assert st.firing_rate() == pytest.approx(float(expect.sum()) / (9 * 100 * st.num_planes))
    if mode == "absmax":
        neg = st.counts(negative=True)
        signs = bits_of(st.sign, 100)
        assert torch.equal(neg.cpu(), torch.stack([(bits_of(st.planes[p], 100) & signs).sum(1)
                                                   for p in range(st.num_planes)]))
        assert torch.equal(neg.cpu(), reference.spike_counts(st.planes.cpu(), st.sign.cpu(), True))


def loop_stats(planes, sign):
    """spike_stats by Python loops over words (independent of reference.unpack_bits)."""
    P, M, W = planes.shape
    pl, sg = planes.tolist(), sign.tolist() if sign is not None else None
    out = [0] * (2 * P + 2)
    for m in range(M):
        for w in range(W):
            fired = 0
            for p in range(P):
                word = pl[p][m][w] & 0xFFFFFFFF
                out[p] += bin(word).count("1")
                if sg is not None:
                    out[P + p] += bin(word & sg[m][w] & 0xFFFFFFFF).count("1")
                fired |= word
            out[2 * P] += bin(fired).count("1")
            out[2 * P + 1] += fired == 0
    return out


@pytest.mark.parametrize("P, M, W, density", [(1, 1, 1, 0.5), (4, 1, 128, 0.1), (16, 37, 3, 0.02),
                                              (7, 100, 5, 0.3), (3, 0, 2, 0.5)])
@pytest.mark.parametrize("signed", [False, True])
def test_stats_random_words(device, P, M, W, density, signed):
    """Random words (every bit position, sparse and dense, M over several CPU chunks of 16
    tokens) against reference.py and a Python loop."""
    bits = torch.rand(P, M, W * 32) < density
    bits[:, ::3, 32:] = False  # whole zero words in some tokens (when W > 1)
    weights = 2 ** torch.arange(32, dtype=torch.int64)
    planes = (bits.reshape(P, M, W, 32).long() * weights).sum(-1).to(torch.int64)
    planes = planes.where(planes < 2**31, planes - 2**32).to(torch.int32)
    sign = torch.randint(-2**31, 2**31 - 1, (M, W), dtype=torch.int32) if signed else None
    got = ops.spike_stats(planes.to(device), sign.to(device) if signed else None)
    assert got.dtype == torch.int64 and got.shape == (2 * P + 2,)
    assert torch.equal(got.cpu(), reference.spike_stats(planes, sign))
    assert got.tolist() == loop_stats(planes, sign)


@pytest.mark.parametrize("mode", ["minmax", "absmax"])
def test_stats_agree_with_counts(device, mode):
    x = torch.randn(33, 100, device=device)
    x[3] = 0.0
    st = spikeops.encode(x, spikeops.Encoding(mode, 5))
    P = st.num_planes
    stats = st.stats()
    assert torch.equal(stats[:P], st.counts().sum(1))
    if st.sign is not None:
        assert torch.equal(stats[P:2 * P], st.counts(negative=True).sum(1))
    else:
        assert not stats[P:2 * P].any()
    fired = bits_of(st.planes, 100).any(0)
    assert int(stats[2 * P]) == int(fired.sum())
    assert int(stats[2 * P + 1]) == int((~bits_of(st.planes, 128).any(0).reshape(33, 4, 32)
                                         .any(-1)).sum())


@pytest.mark.parametrize("mode, kw", [("minmax", {}), ("absmean", {}),
                                      ("oat", dict(theta=(0.3, 1.5))),
                                      ("absmax", dict(salient_bits=7))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_matches_reference(device, mode, kw, dtype):
    x = torch.randn(4, 45, device=device)
    enc = spikeops.Encoding(mode, 4, **kw)
    mask = (torch.arange(45, device=device) % 5 == 0) if "salient_bits" in kw else None
    st = spikeops.encode(x, enc, salient_mask=mask)
    got = st.decode(dtype)
    ref = reference.spike_decode(*(t.cpu() if t is not None else None for t in st[:5]), 45, dtype)
    assert got.dtype == dtype and torch.equal(got.cpu(), ref)


def test_random_stress_against_reference(device):
    """Many random rows with wide dynamic ranges, tiny and huge values, constant rows."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        K = int(torch.randint(1, 300, (1,), generator=gen))
        x = torch.randn(6, K, generator=gen) * 10.0 ** float(torch.randint(-30, 30, (1,), generator=gen))
        x[0] = 0.0
        x[1] = 3.25
        x[2, : K // 2] *= 1e-20
        x = x.to(device)
        for mode, bits in [("minmax", 3), ("absmax", 6), ("absmean", 4)]:
            op_and_reference(x, mode, bits, gamma=0.6)
        op_and_reference(x, "oat", 5, theta_nor=math.pi / 3, theta_out=math.e)


def test_decode_float64_widens_the_float32_decode(device):
    """float64 is the float32 decode widened exactly (docs/ops.md, spike_decode)."""
    st = spikeops.encode(torch.randn(3, 70, device=device), spikeops.Encoding("absmax", 4))
    x64 = st.decode(torch.float64)
    assert x64.dtype == torch.float64 and torch.equal(x64, st.decode(torch.float32).double())


@pytest.mark.parametrize("K", [1, 15, 16, 17, 31, 33, 100, 576, 1537])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vector_encoder_matches_scalar(K, dtype, monkeypatch):
    """The one-range encodings run a vectorized encoder on CPUs with AVX-512 (SPIKEOPS_CPU_ISA
    unset) or AVX2 (=avx2); =generic runs the scalar one. Same bits for every mode, ragged K,
    rows of zeros (signed zeros too), NaN and Inf rows and static scales."""
    x = (torch.randn(9, K) * 3).to(dtype)
    x[1] = 0.0
    x[2, ::2] = -0.0
    x[3, K // 2] = float("nan")
    x[4, 0] = float("inf")
    x[5] *= 1e4
    Encoding = spikeops.Encoding
    cases = [(Encoding("minmax", 4), {}), (Encoding("minmax", 8), {}),
             (Encoding("absmax", 4, gamma=0.7), {}), (Encoding("absmean", 3), {}),
             (Encoding("static", 4), dict(scale=0.25, zero=7)),
             (Encoding("static", 5), dict(scale=torch.rand(9) + 0.1))]
    for (enc, kw), isa in itertools.product(cases, ("", "avx2")):
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
        fast = spikeops.encode(x, enc, **kw)
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", "generic")
        slow = spikeops.encode(x, enc, **kw)
        for u, v in zip(fast[:5], slow[:5]):  # planes, sign, hi, scale, zero (absent: None)
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u.isnan() if u.is_floating_point() else u,
                                   v.isnan() if v.is_floating_point() else v)
                assert torch.equal(torch.nan_to_num(u.float()), torch.nan_to_num(v.float()))


def test_tiny_oat_thresholds_and_static_without_tokens():
    with pytest.raises(ValueError, match="normal float32"):
        Encoding("oat", 16, theta=(1e-44, 1e-43))
    for bits in (1, 4):
        st = spikeops.encode(torch.randn(0, 40), Encoding("static", bits), scale=0.1, zero=3)
        assert st.planes.shape == (bits, 0, 2) and st.sign is None
