"""spike_matmul (docs/ops.md): bit for bit against spikeops.reference, and within the documented
rounding of an independent float64 computation of decoded A x decoded B^T (codes read from the
planes here, not through the op or the reference), for every combination of signed, unsigned
and two-range operands, grouped-query heads, causal masks and a partly filled key cache."""

import pytest
import torch

import spikeops
from spikeops import Encoding, reference
from spikeops.attention import spike_matmul

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ENCODINGS = {
    "absmax4": Encoding("absmax", 4),
    "absmax8": Encoding("absmax", 8),
    "minmax4": Encoding("minmax", 4),
    "minmax8": Encoding("minmax", 8),
    "minmax16": Encoding("minmax", 16),
    "absmax16": Encoding("absmax", 16),
    "salient-minmax": Encoding("minmax", 4, salient_bits=8),
    "oat6": Encoding("oat", 6, theta=(0.5, 2.0)),
}
PAIRS = [("absmax4", "absmax4"), ("absmax8", "absmax8"), ("minmax4", "absmax8"),
         ("absmax4", "minmax4"), ("minmax16", "minmax16"), ("absmax16", "absmax16"),
         ("salient-minmax", "absmax4"), ("oat6", "salient-minmax")]


def encode(device, name, shape, offset=0.0):
    enc = ENCODINGS[name]
    mask = torch.arange(shape[-1], device=device) % 5 == 1 if enc.salient_bits else None
    return spikeops.encode(torch.randn(shape, device=device) * 2 + offset, enc,
                           salient_mask=mask)


def exact_decode(st) -> torch.Tensor:
    """x_hat in float64 without rounding: scale * (s * Q - zero), bits read one by one."""
    K = st.shape[-1]
    M = st.planes.shape[1]
    def bit(words):  # int32 [..., W] -> int64 [..., W, 32]
        return (words.to(torch.int64).unsqueeze(-1) >> torch.arange(32)) & 1

    planes = bit(st.planes.cpu()).flatten(-2)[..., :K]
    q = sum(planes[p].double() * 2.0**p for p in range(planes.shape[0]))
    if st.sign is not None:
        q = torch.where(bit(st.sign.cpu()).flatten(-2)[..., :K].bool(), -q, q)
    r = (bit(st.hi.cpu()).flatten(-2)[..., :K] if st.hi is not None
         else torch.zeros(M, K, dtype=torch.int64))
    z = st.zero.cpu().double().gather(1, r) if st.zero is not None else 0.0
    return (st.scale.cpu().double().gather(1, r) * (q - z)).reshape(st.shape)


def mask_causal(y: torch.Tensor, Ma: int, keys: int) -> torch.Tensor:
    i = torch.arange(Ma)[:, None]
    j = torch.arange(keys)[None, :]
    return y.masked_fill(j > keys - Ma + i, float("-inf"))


def check(device, a, b, keys, causal, out_dtype):
    y = spike_matmul(a, b, keys=keys, causal=causal, out_dtype=out_dtype)
    ref = reference.spike_matmul(a.planes, a.sign, a.hi, a.scale, a.zero, b.planes, b.sign,
                                 b.hi, b.scale, b.zero, a.shape[-1], a.shape[0], a.shape[1],
                                 b.shape[1], keys, causal, out_dtype)
    assert y.dtype == out_dtype and y.shape == ref.shape
    assert torch.equal(y, ref), f"max diff {(y.double() - ref.double()).abs().max()}"
    # The one rounding of docs/ops.md: float32 (then out_dtype) of a float64 sum of at most 4
    # products of exact integers and exact scale products.
    group = a.shape[1] // b.shape[1]
    xa = exact_decode(a)
    xb = exact_decode(b)[:, :, :keys].repeat_interleave(group, 1).transpose(-1, -2)
    exact = xa @ xb
    # float64's own rounding of that matmul (K products summed), where the true sum cancels
    slack = a.shape[-1] * 2.0**-52 * (xa.abs() @ xb.abs())
    if causal:
        exact = mask_causal(exact, a.shape[2], keys)
    eps = max(torch.finfo(out_dtype).eps, torch.finfo(torch.float32).eps)
    tiny = torch.finfo(out_dtype).tiny
    finite = torch.isfinite(exact)
    err = (y.double().cpu() - exact).abs()
    bound = eps * exact.abs() + slack + tiny
    assert bool((err[finite] <= bound[finite]).all()), (err - bound)[finite].max()
    assert torch.equal(torch.isinf(y.cpu()), ~finite)
    return y


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("na, nb", PAIRS)
def test_exact_pairs(device, na, nb, causal):
    # 70 channels: 3 words, the last partial; 6 query heads on 3 kv heads; 7 of 9 keys read.
    a = encode(device, na, (2, 6, 5, 70))
    b = encode(device, nb, (2, 3, 9, 70), offset=0.3)
    check(device, a, b, 7, causal, torch.float32)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_out_dtypes_and_decode_shape(device, out_dtype):
    # Decode: one query per head against 2,048 keys of head_dim 64 (SmolLM2's 9 / 3 heads).
    a = encode(device, "absmax4", (1, 9, 1, 64))
    b = encode(device, "absmax4", (1, 3, 2048, 64))
    check(device, a, b, 2048, True, out_dtype)


def test_head_dim_128_sixteen_planes_needs_int64(device):
    # 15 magnitude planes x head_dim 128 at full scale: sums beyond int32 (docs/ops.md, bound).
    x = torch.full((1, 1, 2, 128), 3.0, device=device)
    a = spikeops.encode(x, Encoding("absmax", 16))
    y = check(device, a, a, 2, False, torch.float32)
    assert (2**15 - 1) ** 2 * 128 > 2**31
    assert torch.allclose(y.double(), torch.full_like(y.double(), 9.0 * 128))


def test_nonfinite_rows_and_no_keys(device):
    x = torch.randn(1, 2, 3, 40, device=device)
    x[0, 1, 2, 5] = float("nan")
    a = spikeops.encode(x, Encoding("absmax", 4))
    b = encode(device, "minmax4", (1, 1, 4, 40))
    y = spike_matmul(a, b)
    assert torch.isnan(y[0, 1, 2]).all() and torch.isfinite(y[0, :, :2]).all()
    assert spike_matmul(a, b, keys=0).shape == (1, 2, 3, 0)


def test_bits_beyond_K_ignored(device):
    a = encode(device, "minmax4", (1, 1, 2, 40))
    b = encode(device, "absmax4", (1, 1, 3, 40))
    y = spike_matmul(a, b)
    # Set every bit past channel 40 of every word of A's planes and of B's sign: no change.
    junk = torch.tensor([0, -256], dtype=torch.int32, device=device)
    a2 = a._replace(planes=a.planes | junk)
    b2 = b._replace(planes=b.planes | junk, sign=b.sign | junk)
    assert torch.equal(spike_matmul(a2, b2), y)


@pytest.mark.parametrize("K", [1, 32, 33, 64, 65, 100, 2048])
@pytest.mark.parametrize("na, nb", [("absmax8", "minmax4"), ("absmax8", "minmax8"),
                                    ("minmax4", "absmax4"), ("absmax8", "absmax8"),
                                    ("minmax8", "absmax4"), ("minmax16", "absmax16")])
def test_vector_kernel_matches_scalar(K, na, nb, monkeypatch):
    """On CPUs with AVX-512 VNNI one-range products of at most 8 planes on one side and 7 on the
    other run on bytes (VPDPBUSD, 16 keys a task; B's planes made bytes by GFNI, or plane by
    plane with SPIKEOPS_CPU_ISA=avx512vnni or without GFNI), others with VPOPCNTDQ 8 keys at
    once; with AVX2 (SPIKEOPS_CPU_ISA=avx2, or a CPU without AVX-512) on 16-bit integers
    (VPMADDWD) or, where no pair sum saturates, bytes (VPMADDUBSW), 8 keys a task, others with
    popcounts; with SPIKEOPS_CPU_ISA=generic the scalar kernel runs. Same outputs for ragged K (odd word counts: the half last word), 37 keys
    (partial groups of 8 and 16), zero points on either side, signs on either or both sides,
    the unsigned bytes from either side, causal."""
    a = encode("cpu", na, (1, 4, 3, K))
    b = encode("cpu", nb, (1, 2, 37, K), offset=0.3)
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", "")
    fast = check("cpu", a, b, 37, True, torch.float32)
    for isa in ("avx512vnni", "avx2", "generic"):
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
        assert torch.equal(spike_matmul(a, b, keys=37, causal=True), fast), isa



@pytest.mark.parametrize("na, nb", [("absmax8", "minmax4"), ("minmax8", "minmax4"),
                                    ("minmax8", "absmax4")])
def test_byte_kernel_epilogue_large_zero_points(na, nb, monkeypatch):
    """The byte kernel's float32 epilogue (8 keys in float64 lanes, D converted from its two
    32-bit halves) against the scalar kernel where the zero points are at their limit (rows far
    from 0: |zero| clamped to 10^4) on either side, so that D reaches ~2^40: bit for bit, causal,
    a partial last block of keys."""
    a = spikeops.encode(torch.randn(1, 2, 3, 200) * 0.01 + (40.0 if na.startswith("minmax")
                                                            else 0.0), ENCODINGS[na])
    b = spikeops.encode(torch.randn(1, 1, 27, 200) * 0.01 - 60.0, ENCODINGS[nb]) \
        if nb.startswith("minmax") else encode("cpu", nb, (1, 1, 27, 200))
    assert (b.zero is None or b.zero.abs().max() == 10**4)
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", "")
    fast = spike_matmul(a, b, keys=25, causal=True)
    for isa in ("avx2", "generic"):
        monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
        assert torch.equal(spike_matmul(a, b, keys=25, causal=True), fast), isa
    assert torch.equal(fast, reference.spike_matmul(a.planes, a.sign, a.hi, a.scale, a.zero,
                                                    b.planes, b.sign, b.hi, b.scale, b.zero,
                                                    200, 1, 2, 1, 25, True))

# ---------------------------------------------------------------------------- prob_matmul
VALUE_ENCODINGS = {
    "codes4": Encoding("static", 4),   # the value cache's: s*Q with scale 1
    "codes8": Encoding("static", 8),   # 7 planes, the most the fused kernel takes beside 8
    "minmax4": Encoding("minmax", 4),  # zero points: S_a enters the integers
    "absmax16": Encoding("absmax", 16),  # 15 planes: gif_encode then spike_matmul
    "salient-minmax": Encoding("minmax", 4, salient_bits=8),  # two ranges: likewise
}


def values(name, shape):
    enc = ENCODINGS.get(name) or VALUE_ENCODINGS[name]
    x = torch.randn(shape) * 3
    if enc.mode == "static":
        return spikeops.encode(torch.round(x), enc, scale=1.0)
    mask = torch.arange(shape[-1]) % 5 == 1 if enc.salient_bits else None
    return spikeops.encode(x, enc, salient_mask=mask)


def prob_matmul_composed(probs, token_scale, b, kv_heads):
    """What SpikeKV.spike_pv computed before prob_matmul: the weights, their static 8-bit
    encoding, spike_matmul."""
    batch, heads, Ma, K = probs.shape
    w = (probs.view(batch, kv_heads, heads // kv_heads, Ma, K) *
         token_scale[:, :K].reshape(batch, kv_heads, 1, 1, K)).view(probs.shape)
    top = w.amax(-1).reshape(-1)
    step = torch.where(top > 0, top / 255, torch.ones_like(top))
    return spike_matmul(spikeops.encode(w, Encoding("static", 8), scale=step, zero=0), b)


def prob_matmul(probs, token_scale, b, kv_heads):
    return spikeops.ops.prob_matmul(probs, token_scale, b.planes, b.sign, b.hi, b.scale, b.zero,
                                    kv_heads)


@pytest.mark.parametrize("K", [1, 31, 32, 33, 64, 65, 100, 2049])
@pytest.mark.parametrize("name", list(VALUE_ENCODINGS))
@pytest.mark.parametrize("isa", ["", "avx512vnni", "avx2", "generic"])
def test_prob_matmul_bit_identical(K, name, isa, monkeypatch):
    """prob_matmul equals the composition it replaces (encode the weights, then spike_matmul)
    and the reference bit for bit: grouped-query heads, 1 and 3 query rows, token scales read
    at a row stride past K, peaked, flat and all-zero probability rows; with AVX2 the codes
    are made inside the byte kernel (the value codes of at most 7 planes; on AVX-512 VNNI as
    bytes, made by GFNI, or plane by plane with SPIKEOPS_CPU_ISA=avx512vnni; with
    SPIKEOPS_CPU_ISA=avx2 or a CPU without AVX-512 as 16-bit integers, or bytes for the 4-bit
    value codes), otherwise
    (SPIKEOPS_CPU_ISA=generic, 15 planes, two ranges) the op composes gif_encode and
    spike_matmul."""
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
    batch, kv_heads, D = 2, 3, 40
    for Ma, group in ((1, 3), (3, 2)):
        heads = kv_heads * group
        probs = torch.softmax(torch.randn(batch, heads, Ma, K) * 4, -1)
        probs[0, 0, 0] = 0  # a row without a positive weight: scale 1
        token_scale = torch.rand(batch * kv_heads, K + 5) * 2 + 1e-3
        b = values(name, (batch, kv_heads, D, K))
        got = prob_matmul(probs, token_scale, b, kv_heads)
        assert got.shape == (batch, heads, Ma, D) and got.dtype == torch.float32
        assert torch.equal(got, prob_matmul_composed(probs, token_scale, b, kv_heads))
        ref = reference.prob_matmul(probs, token_scale, *(b.planes, b.sign, b.hi, b.scale,
                                                          b.zero), kv_heads)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("isa", ["", "avx2", "generic"])
def test_prob_matmul_nonfinite_and_strided(isa, monkeypatch):
    """A row holding NaN gives NaN outputs (gif_encode's non-finite row), as the composition
    does; a weight of +Inf (a scale gif_encode refuses) raises ValueError on both paths; a
    token_scale that is not contiguous is read as given."""
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", isa)
    probs = torch.softmax(torch.randn(1, 4, 2, 70), -1)
    probs[0, 1, 1, 3] = float("nan")
    token_scale = (torch.rand(140, 2) + 0.5).t()  # [2, 140], stride 1 along rows: not contiguous
    b = values("codes4", (1, 2, 64, 70))
    got = prob_matmul(probs, token_scale, b, 2)
    assert got[0, 1, 1].isnan().all() and not got[0, 1, 0].isnan().any()
    torch.testing.assert_close(got, prob_matmul_composed(probs, token_scale, b, 2), rtol=0,
                               atol=0, equal_nan=True)
    probs[0, 1, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="scale"):
        prob_matmul(probs, token_scale, b, 2)
    with pytest.raises(ValueError, match="scale"):
        prob_matmul_composed(probs, token_scale, b, 2)


@pytest.mark.parametrize("change, exc, words", [
    (dict(probs=torch.zeros(1, 4, 1, 70, dtype=torch.float64)), TypeError, "probs"),
    (dict(probs=torch.zeros(4, 1, 70)), ValueError, "probs must have shape"),
    (dict(kv_heads=3), ValueError, "kv_heads"),
    (dict(token_scale=torch.ones(2, 69)), ValueError, "token_scale must have shape"),
    (dict(token_scale=torch.ones(2, 70, dtype=torch.float16)), TypeError, "token_scale"),
    (dict(probs=torch.zeros(1, 4, 1, 71)), ValueError, "K"),
])
def test_prob_matmul_refusals(change, exc, words):
    args = dict(probs=torch.zeros(1, 4, 1, 70), token_scale=torch.ones(2, 70), kv_heads=2)
    args.update(change)
    b = values("codes4", (1, 2, 64, 70))
    with pytest.raises(exc, match=words):
        prob_matmul(args["probs"], args["token_scale"], b, args["kv_heads"])


# ---------------------------------------------------------------------- channel_major_write
@pytest.mark.parametrize("name", ["absmax4", "absmax8", "minmax4"])
@pytest.mark.parametrize("start, T", [(0, 1), (5, 1), (31, 1), (32, 1), (0, 37), (7, 30),
                                      (30, 70), (63, 2)])
def test_channel_major_write(device, name, start, T):
    """channel_major_write against the reference bit for bit, into words already holding bits
    (earlier tokens kept, later ones in the words written cleared, other words untouched), with
    and without signs (a sign only where a plane bit is), K not a multiple of 32, 6 rows of
    tokens (G = 6), a row holding NaN (no bits)."""
    G, K, words = 6, 40, 4
    x = torch.randn(G, T, K, device=device) * 3
    x[1, 0] = float("nan")
    st = spikeops.encode(x, ENCODINGS[name])
    P = st.planes.shape[0] + (st.sign is not None)
    out = torch.randint(-2**31, 2**31 - 1, (P, G * K, words), dtype=torch.int32, device=device)
    want = reference.channel_major_write(st.planes, st.sign, out, K, start)
    spikeops.ops.channel_major_write(st.planes, st.sign, out, K, start)
    assert torch.equal(out, want)


@pytest.mark.parametrize("change, exc, words", [
    (dict(out=torch.zeros(4, 6 * 40, 2, dtype=torch.int64)), TypeError, "out"),
    (dict(out=torch.zeros(5, 6 * 40, 2, dtype=torch.int32)), ValueError, "out must have shape"),
    (dict(out=torch.zeros(4, 6 * 40, 4, dtype=torch.int32)[:, :, :2]), ValueError,
     "contiguous"),
    (dict(start=62), ValueError, "token bits"),
    (dict(start=-1), ValueError, "token bits"),
    (dict(K=41), ValueError, "K"),
])
def test_channel_major_write_refusals(change, exc, words):
    st = spikeops.encode(torch.randn(6, 3, 40), ENCODINGS["absmax4"])
    args = dict(out=torch.zeros(4, 6 * 40, 2, dtype=torch.int32), K=40, start=0)
    args.update(change)
    with pytest.raises(exc, match=words):
        spikeops.ops.channel_major_write(st.planes, st.sign, args["out"], args["K"],
                                         args["start"])
