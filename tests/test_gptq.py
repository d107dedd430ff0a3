"""GPTQ packing, 3-bit straddling, v1/v2 zero points and GPTQWeight validation
(docs/checkpoints.md); the CPU layout GPTQWeight holds in place of qweight (docs/ops.md)."""

import logging

import pytest
import torch

import spikeops
from helpers import make_layer, pack_loops
from spikeops import reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 31, 32, 33, 96, 100])
def test_pack_matches_independent_packer(bits, count):
    codes = torch.randint(0, 1 << bits, (count, 5))
    packed = spikeops.pack(codes, bits, dim=0)
    assert torch.equal(packed, pack_loops(codes, bits))
    assert torch.equal(spikeops.unpack(packed, bits, count, dim=0), codes.int())
    cols = spikeops.pack(codes.t(), bits, dim=1)
    assert torch.equal(cols, packed.t())
    assert torch.equal(spikeops.unpack(cols, bits, count, dim=1), codes.t().int())


def test_three_bit_straddles_words():
    """docs/checkpoints.md: value 10 spans words 0/1 (bits 30-31 of word 0, bit 0 of word 1);
    value 21 spans words 1/2 (bit 31 of word 1, bits 0-1 of word 2)."""
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10] = 0b101
    codes[21] = 0b011
    words = spikeops.pack(codes, 3, dim=0)[:, 0].tolist()
    u = [w & 0xFFFFFFFF for w in words]
    assert u[0] == 0b01 << 30 and u[1] == (0b1 | (0b1 << 31)) and u[2] == 0b01
    codes = torch.arange(32).remainder(8).reshape(32, 1)
    words = [w & 0xFFFFFFFF for w in spikeops.pack(codes, 3, dim=0)[:, 0].tolist()]
    for j in range(10):
        assert (words[0] >> (3 * j)) & 7 == j % 8
    for j in range(11, 21):
        assert (words[1] >> (3 * (j - 11) + 1)) & 7 == j % 8
    for j in range(22, 32):
        assert (words[2] >> (3 * (j - 22) + 2)) & 7 == j % 8


@pytest.mark.parametrize("bits, word", [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_sym_v1_zero_words(bits, word):
    w, *_ = make_layer(64, 32, bits, 32, sym=True, fmt="gptq")
    assert all((v & 0xFFFFFFFF) == word for v in w.qzeros.flatten().tolist())
    assert w.zero_offset == 1


def test_sym_zeros_decide_the_format(caplog):
    """Files labelled "gptq" may hold v2 zeros: for sym=True the data decides and is logged."""
    v2, q, z, scales, g_idx = make_layer(64, 32, 4, 32, sym=True, fmt="gptq_v2")
    with caplog.at_level(logging.WARNING, logger="spikeops"):
        mislabelled = spikeops.GPTQWeight(*list(v2.gptq_tensors().values())[:3], None, 4, 32,
                                          sym=True, checkpoint_format="gptq")
    assert mislabelled.zero_offset == 0 and "v2" in caplog.text
    assert torch.equal(mislabelled.dequantize(), v2.dequantize())
    v1, *_ = make_layer(64, 32, 4, 32, sym=True, fmt="gptq")
    relabelled = spikeops.GPTQWeight(*list(v1.gptq_tensors().values())[:3], None, 4, 32,
                                     sym=True, checkpoint_format="gptq_v2")
    assert relabelled.zero_offset == 1
    assert torch.equal(relabelled.dequantize(), v1.dequantize())


def test_asym_label_decides():
    w, q, z, *_ = make_layer(64, 32, 4, 32, sym=False, fmt="gptq")
    assert w.zero_offset == 1
    assert torch.equal(w.codes()[1].long(), z)
    w2, q2, z2, *_ = make_layer(64, 32, 4, 32, sym=False, fmt="gptq_v2")
    assert w2.zero_offset == 0 and torch.equal(w2.codes()[1].long(), z2)


def test_asym_v1_true_zero_zero_reads_like_autogptq():
    """A v1 file whose true zero is 0 stores -1, whose bits spill over the following fields.
    spikeops reads every field as ((word >> shift) & mask) + 1, as the AutoGPTQ reader does."""
    bits, N = 4, 16
    stored = torch.full((1, N), 3)
    stored[0, 5] = -1
    words = torch.zeros(1, 2, dtype=torch.int64)
    for n in range(N):  # the AutoGPTQ packer: zeros |= (z - 1) << shift, in 32-bit words
        words[0, n // 8] |= (int(stored[0, n]) & 0xFFFFFFFF) << (4 * (n % 8))
    words = (words & 0xFFFFFFFF)
    qzeros = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    qweight = torch.zeros(2, N, dtype=torch.int32)
    w = spikeops.GPTQWeight(qweight, qzeros, torch.ones(1, N).half(), None, bits, -1, sym=False)
    autogptq = [((int(qzeros[0, n // 8]) & 0xFFFFFFFF) >> (4 * (n % 8)) & 15) + 1 for n in range(N)]
    assert w.codes()[1][0].tolist() == autogptq
    assert autogptq[5] == 16 and autogptq[6] == 16 and autogptq[4] == 4


def test_three_bit_repacks_exactly():
    w3, q, z, scales, g_idx = make_layer(96, 64, 3, 32, act_order=True, sym=False)
    assert w3.bits == 3 and w3.kernel_bits == 4
    q4, z4 = w3.codes()
    assert torch.equal(q4.long(), q) and torch.equal(z4.long(), z)
    expect = (scales.float()[g_idx] * (q - z[g_idx]).float()).half().t()
    assert torch.equal(w3.dequantize(), expect)


def test_default_g_idx_and_group_all():
    """Without g_idx, K = qweight rows * 32 / bits and g_idx = k // group_size."""
    w, *_ = make_layer(96, 8, 4, -1, sym=False)
    assert w.in_features == 96 and torch.equal(w.g_idx, torch.zeros(96, dtype=torch.int32))
    w, *_ = make_layer(104, 8, 4, 32, sym=False)
    assert torch.equal(w.g_idx.long(), torch.arange(104) // 32)


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda: spikeops.pack(torch.tensor([[16]]), 4, 0), ValueError, "codes"),
    (lambda: spikeops.pack(torch.tensor([[-1]]), 4, 0), ValueError, "codes"),
    (lambda: spikeops.pack(torch.tensor([[1.0]]), 4, 0), TypeError, "codes"),
    (lambda: spikeops.pack(torch.tensor([1]), 4, 0), ValueError, "codes"),
    (lambda: spikeops.pack(torch.tensor([[1]]), 5, 0), ValueError, "bits"),
    (lambda: spikeops.pack(torch.tensor([[1]]), 4, 2), ValueError, "dim"),
    (lambda: spikeops.unpack(torch.zeros(1, 1, dtype=torch.int64), 4, 8, 0), TypeError, "packed"),
    (lambda: spikeops.unpack(torch.zeros(1, 1, dtype=torch.int32), 4, 9, 0), ValueError, "count"),
], ids=["pack-range-hi", "pack-range-neg", "pack-float", "pack-1d", "pack-bits", "pack-dim",
        "unpack-dtype", "unpack-count"])
def test_pack_rejects(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_gptq_weight_arguments():
    t = make_layer(128, 16, 4, 32)[0].gptq_tensors()
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    for sym in ("no", None):
        with pytest.raises(TypeError, match="sym"):
            spikeops.GPTQWeight(qweight, qzeros, scales, sym=sym, group_size=32)
    short = torch.arange(127, dtype=torch.int32) // 32
    with pytest.raises(ValueError, match="g_idx.*in_features"):
        spikeops.GPTQWeight(qweight, qzeros, scales, short, group_size=32)
    ragged = spikeops.GPTQWeight(qweight, qzeros, scales, short, group_size=32,
                                 in_features=127)
    assert ragged.in_features == 127


# ----------------------------------------------------------------------------- the CPU layout
# (K, N, group_size): ragged K (padding fields in qweight's last row) and N (a partial last tile
# of 16 columns), one group (group_size >= K) up to 4,096 channels.
LAYOUT_SHAPES = [(40, 24, 16), (37, 17, 8), (1, 16, 8), (200, 130, 200), (264, 40, 8),
                 (520, 100, 40), (4096, 33, 4096), (4100, 5, 4096)]


@pytest.mark.parametrize("K, N, gs", LAYOUT_SHAPES)
def test_cpu_layout_matches_the_python_layout(K, N, gs):
    """The C++ layout (ops.cpu_layout) equals the Python builder GPTQWeight used before
    (reference.cpu_layout) bit for bit, on random words: padding fields past K included, which
    both drop. cpu_layout_qweight gives qweight back, those fields as 0, as the reference does."""
    words = torch.randint(-2**31, 2**31, (-(-K // 8), N), dtype=torch.int32)
    packed, sums = spikeops.ops.cpu_layout(words, 4, gs, K)
    want_packed, want_sums = reference.cpu_layout(words, 4, gs, K)
    assert packed.dtype == torch.uint8 and sums.dtype == torch.uint16
    assert torch.equal(packed, want_packed) and torch.equal(sums, want_sums)
    back = spikeops.ops.cpu_layout_qweight(packed, K, N)
    assert torch.equal(back, reference.cpu_layout_qweight(packed, K, N))
    assert torch.equal(spikeops.unpack(back, 4, K, 0), spikeops.unpack(words, 4, K, 0))
    if K % 8 == 0:
        assert torch.equal(back, words)


# (bits, group_size, K, channels per layout group or 0): the rule of docs/ops.md, "CPU layout".
LAYOUT_RULE = [
    (4, 128, 4096, 128), (4, 8, 40, 8), (4, 4096, 8192, 4096), (4, 4096, 4100, 4096),
    (4, 40, 40, 40), (4, 50, 44, 48), (4, 4096, 4096, 4096),  # one group: K in blocks of 8
    (4, 4104, 8200, 0), (4, 4100, 4100, 0), (4, 12, 40, 0), (4, 0, 40, 0), (4, -1, 40, 0),
    (2, 16, 40, 0), (3, 16, 40, 0), (8, 16, 40, 0),
]


@pytest.mark.parametrize("bits, gs, K, group", LAYOUT_RULE)
def test_layout_rule_is_asked_of_cpp(bits, gs, K, group):
    """ops.layout_group is the C++ rule: the layout's group, or 0 where cpu_layout (its entry and
    its fake) refuses the layer, naming bits, group_size and K."""
    assert spikeops.ops.layout_group(bits, gs, K) == group
    qweight = torch.zeros(-(-K // 8), 3, dtype=torch.int32)
    for device in ("cpu", "meta"):
        if group:
            packed, sums = spikeops.ops.cpu_layout(qweight.to(device), bits, gs, K)
            assert packed.shape == (1, -(-K // 8), 64) and sums.shape == (-(-K // gs), 3)
        else:
            with pytest.raises(ValueError, match=f"cpu_layout: the CPU layout holds only 4-bit "
                                                 f".*bits = {bits}, group_size = {gs}, K = {K}"):
                spikeops.ops.cpu_layout(qweight.to(device), bits, gs, K)


# (K, bits, group_size, act_order, held): 3-bit codes are held as 4-bit ones; a K that is not a
# multiple of 8 keeps qweight (its padding fields would not come back).
HOLDS = [(64, 4, 32, False, True), (64, 3, 32, False, True), (64, 4, -1, False, True),
         (4096, 4, -1, False, True), (4104, 4, -1, False, False), (48, 4, 12, False, False),
         (44, 4, 8, False, False), (44, 4, -1, False, False), (64, 4, 32, True, False), (64, 2, 32, False, False),
         (64, 8, 32, False, False)]


@pytest.mark.parametrize("K, bits, gs, act, held", HOLDS)
def test_gptq_weight_holds_the_layout_where_the_rule_admits_it(K, bits, gs, act, held):
    """GPTQWeight holds the CPU layout in place of qweight exactly where layout_group admits the
    layer and K is a multiple of 8; the layout is the reference's, and the GPTQ form comes back
    bit for bit."""
    w, q, *_ = make_layer(K, 16, bits, gs, act_order=act, sym=False)
    assert (w.packed is not None) == held and (w.qweight is None) == held
    kernel_bits = 4 if bits == 3 else bits
    qweight = spikeops.pack(q, kernel_bits, 0)
    assert torch.equal(w.gptq_tensors()["qweight"], qweight)
    if held:
        packed, sums = reference.cpu_layout(qweight, 4, w.kernel_group_size, K)
        assert torch.equal(w.packed, packed) and torch.equal(w.code_sums, sums)
