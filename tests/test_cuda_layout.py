"""The bit layout of the CUDA gif_encode kernel (csrc/cuda/encode.cu), emulated on the host: the
codes of each lane's 8 channels through transpose_bits, code_bytes and masking, transpose_lanes
across the warp, and the stores of lane 4g + t. Every (plane, row, word) of planes, sign and hi
must be written exactly once, with the words of docs/ops.md, for ragged K and several P. Each
function mirrors the kernel's of the same name; test_cuda.py checks the kernel itself on a GPU."""

import random

import pytest

UNIT, STEP = 8, 256  # channels per lane and step, per warp and step


def byte_perm(x, y, s):
    """__byte_perm: byte n of the result is byte (s >> 4n) & 7 of y:x."""
    b = x | y << 32
    return sum(((b >> 8 * ((s >> 4 * n) & 7)) & 0xFF) << 8 * n for n in range(4))


def transpose_bits(lo, hi):
    t = (lo ^ (lo >> 7)) & 0x00AA00AA
    lo ^= t ^ (t << 7)
    t = (hi ^ (hi >> 7)) & 0x00AA00AA
    hi ^= t ^ (t << 7)
    t = (lo ^ (lo >> 14)) & 0x0000CCCC
    lo ^= t ^ (t << 14)
    t = (hi ^ (hi >> 14)) & 0x0000CCCC
    hi ^= t ^ (t << 14)
    t = (lo ^ (hi << 4)) & 0xF0F0F0F0
    return (lo ^ t) & 0xFFFFFFFF, (hi ^ (t >> 4)) & 0xFFFFFFFF


def code_bytes(q, b):
    sel = 0x0040 + 0x11 * b
    return byte_perm(byte_perm(q[0], q[1], sel), byte_perm(q[2], q[3], sel), 0x5410)


def transpose_lanes(v):
    """v: the 32 lanes' values; __shfl_xor_sync(v, 2), then (v, 1)."""
    v = [byte_perm(v[l], v[l ^ 2], 0x5410 if l & 3 < 2 else 0x3276) for l in range(32)]
    return [byte_perm(v[l], v[l ^ 1], 0x3715 if l & 1 else 0x6240) for l in range(32)]


def nonzero_bytes(x):
    x |= x >> 4
    x |= x >> 2
    x |= x >> 1
    return (((x & 0x01010101) * 0x10204080) & 0xFFFFFFFF) >> 28


def encode_row(q, sign, hi, K, P, W, rng):
    """The stores of one row's warp: {(array, plane, word): value}, asserting no repeat. Codes
    past K are garbage, as the kernel's pad channels give."""
    out = {}

    def store(key, value):
        assert key not in out, f"{key} written twice"
        out[key] = value

    for s in range((K + STEP - 1) // STEP):
        regs, flags = [[0] * 32 for _ in range(4)], [0] * 32
        for lane in range(32):
            c = s * STEP + UNIT * lane
            left = K - c
            valid = 0xFF if left >= UNIT else 0 if left <= 0 else (1 << left) - 1
            codes = [q[k] if k < K else rng.getrandbits(16) for k in range(c, c + UNIT)]
            bits = [sum(f[k] << (k - c) for k in range(c, min(c + UNIT, K))) for f in (sign, hi)]
            regs[0][lane], regs[1][lane] = transpose_bits(code_bytes(codes, 0),
                                                          code_bytes(codes[4:], 0))
            if P > 8:
                regs[2][lane], regs[3][lane] = transpose_bits(code_bytes(codes, 1),
                                                              code_bytes(codes[4:], 1))
            for k in range(4):
                regs[k][lane] &= valid * 0x01010101
            flags[lane] = (bits[0] & valid) | (bits[1] & valid) << 8
        regs = [transpose_lanes(regs[k]) if 4 * k < P else regs[k] for k in range(4)]
        flags = transpose_lanes(flags)
        for lane in range(32):
            t, word = lane & 3, 8 * s + lane // 4
            if word >= W:
                continue
            for k in range(4):
                if 4 * k + t < P:
                    store(("planes", 4 * k + t, word), regs[k][lane])
            if t < 2:
                store(("sign" if t == 0 else "hi", 0, word), flags[lane])
    return out


@pytest.mark.parametrize("K", [1, 7, 33, 100, 255, 256, 257, 1000, 4096 + 32])
@pytest.mark.parametrize("P", [1, 3, 4, 5, 8, 9, 13, 16])
def test_every_word_once_with_the_format_bits(K, P):
    rng = random.Random(K * 100 + P)
    q = [rng.getrandbits(P) for _ in range(K)]
    sign, hi = ([rng.getrandbits(1) for _ in range(K)] for _ in range(2))
    W = (K + 31) // 32
    out = encode_row(q, sign, hi, K, P, W, rng)

    def word(bits_of, w):
        return sum(bits_of(k) << (k - 32 * w) for k in range(32 * w, min(32 * w + 32, K)))

    expected = {("planes", p, w): word(lambda k: (q[k] >> p) & 1, w)
                for p in range(P) for w in range(W)}
    expected.update({(name, 0, w): word(flag.__getitem__, w)
                     for name, flag in (("sign", sign), ("hi", hi)) for w in range(W)})
    assert out == expected


def test_nonzero_bytes():
    rng = random.Random(0)
    for _ in range(2000):
        b = [rng.choice([0, 0, 1, 2, 0x80, rng.getrandbits(8)]) for _ in range(4)]
        x = sum(v << 8 * i for i, v in enumerate(b))
        assert nonzero_bytes(x) == sum((v != 0) << i for i, v in enumerate(b))
