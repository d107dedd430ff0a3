"""The CUDA decode kernel of spike_linear (csrc/cuda/linear_decode.cu), emulated on the host: which
block, worker and lane reads which qweight words, zero points and scales; which build unit writes
which code words of shared memory and which worker reads them; the bit-sliced codes; the dp4a
sums with their zero-point terms; and the fold. Every function mirrors the kernel's of the same
name. On ragged shapes the emulation checks that every weight word is read exactly once per
token tile and every spike word turned into codes once per block, that every shared-memory word
read was written in that step and none twice, that the int32 sums never leave int32, that every
output folds the groups in ascending order, and that its outputs equal the CPU op's bit for bit.
The cases at the end run the kernel itself against the CPU where a GPU is present
(scripts/gpu_check.sh)."""

import functools

import numpy as np
import pytest
import torch

import spikeops
from spikeops import ops
from helpers import CUDA_REASON, cuda_ready, make_layer

COLS, LANES, WORKERS, MAX_TOKENS, MAX_GROUP = 32, 8, 16, 16, 8192
INT32 = (-(1 << 31), (1 << 31) - 1)


class Tile:
    """Tile<kMT, kR>: the constants of one kernel instantiation."""

    def __init__(self, MT, R):
        self.MT, self.R = MT, R
        self.workers = WORKERS
        self.threads = LANES * self.workers
        self.rows = 16 if MT * R <= 4 else 8
        self.words = self.rows // 4
        self.chunk = 8 * self.rows
        self.vec = 4 * R - 2
        self.row_words = MT * self.vec
        self.slot = self.rows * self.row_words + 2
        self.fold = -(-MT * COLS // self.threads)
        self.units = self.workers * MT * self.words


def applies(M, P, signed, group_size):
    """spike_linear_decode_applies, for 4-bit weights and backend int or auto."""
    return (M <= MAX_TOKENS and group_size > 0 and group_size % 32 == 0
            and group_size <= MAX_GROUP and P <= (7 if signed else 8))


def token_tile(M, R):
    """launch_spike_linear_decode's kMT."""
    if R == 1:
        return 1 if M == 1 else 2 if M == 2 else 4 if M <= 4 else 8 if M <= 8 else 16
    return 1 if M == 1 else 2 if M == 2 else 4


def chunk_of(L, t, step, slot):
    g = step // L["chunks"] * t.workers + slot
    g_lo = g * L["gs"]
    lo = g_lo + step % L["chunks"] * t.chunk
    hi = min(lo + t.chunk, g_lo + L["gs"], L["K"]) if g < L["G"] else lo
    return g, lo, hi


def channel_bits(w, K):
    left = K - 32 * w
    return 0xFFFFFFFF if left >= 32 else 0 if left <= 0 else (1 << left) - 1


def byte_perm(x, y, s):
    """__byte_perm: byte n of the result is byte (s >> 4n) & 7 of y:x."""
    b = x | y << 32
    return sum(((b >> 8 * ((s >> 4 * n) & 7)) & 0xFF) << 8 * n for n in range(4))


def swap_bits(x, lo, hi, s, mask):
    t = ((x[lo] >> s) ^ x[hi]) & mask
    x[hi] ^= t
    x[lo] = (x[lo] ^ (t << s)) & 0xFFFFFFFF


def transpose_bits(x):
    for p in range(4):
        swap_bits(x, p, p + 4, 4, 0x0F0F0F0F)
    for i in range(4):
        p = (i & 1) + 4 * (i >> 1)
        swap_bits(x, p, p + 2, 2, 0x33333333)
    for p in range(0, 8, 2):
        swap_bits(x, p, p + 1, 1, 0x55555555)


def store_rows(x, store, v):
    """store(row b, word v + h, value) for the 4 rows of a spike word."""
    for h in range(2):
        t0 = byte_perm(x[h], x[2 + h], 0x5140)
        t1 = byte_perm(x[h], x[2 + h], 0x7362)
        t2 = byte_perm(x[4 + h], x[6 + h], 0x5140)
        t3 = byte_perm(x[4 + h], x[6 + h], 0x7362)
        store(0, v + h, byte_perm(t0, t2, 0x5410))
        store(1, v + h, byte_perm(t0, t2, 0x7632))
        store(2, v + h, byte_perm(t1, t3, 0x5410))
        store(3, v + h, byte_perm(t1, t3, 0x7632))


def build_word(S, R, off, tm, w, keep, store):
    """One build unit: stores the code words of its 4 rows, returns (sums per range, count)."""
    if not keep:  # what the bit slices give for no channel, without the work
        for b in range(4):
            for v in range(4 * R - 2):
                store(b, v, 0)
        return [0] * R, 0
    y = [int(S["planes"][p, tm, w]) & keep if p < S["P"] else 0 for p in range(8)]
    sign = int(S["sign"][tm, w]) & keep if S["sign"] is not None else 0
    hi = int(S["hi"][tm, w]) & keep if S["hi"] is not None else 0
    if sign:
        carry = sign
        for p in range(8):
            t = y[p] ^ sign
            y[p] = t ^ carry
            carry &= t
    y[7] ^= keep if off else 0
    sums = []
    for r in range(R):
        in_range = 0xFFFFFFFF if R == 1 else hi if r else ~hi & 0xFFFFFFFF
        x = [v & in_range for v in y]
        sums.append(sum(bin(x[p]).count("1") << p for p in range(7)) - (bin(x[7]).count("1") << 7))
        transpose_bits(x)
        store_rows(x, store, 2 * r)
    count = 0
    if R == 2:
        store_rows([(hi >> c) & 0x01010101 for c in range(8)], store, 4)
        count = bin(hi).count("1")
    return sums, count


def s8(b):
    return b - 256 if b >= 128 else b


def dp4a(weights, code, c):
    """dp4a.u32.s32 on a vector of weight words against one code word, int64 (no wrap)."""
    out = c.copy()
    for j in range(4):
        out += ((weights >> (8 * j)) & 0xFF).astype(np.int64) * s8((code >> (8 * j)) & 0xFF)
    return out


def in_int32(v):
    v = np.asarray(v)
    assert v.min(initial=0) >= INT32[0] and v.max(initial=0) <= INT32[1], "int32 overflow"


class Smem:
    """One shared array: words written once per step, reads only of words written."""

    def __init__(self, size):
        self.data = [0] * size
        self.written = set()

    def write(self, i, v):
        assert 0 <= i < len(self.data) and i not in self.written, f"word {i} written twice"
        self.written.add(i)
        self.data[i] = v

    def read(self, i):
        assert i in self.written, f"word {i} read before written"
        return self.data[i]


def emulate(S, L, bias, trace):
    """The kernel's outputs float32 [M, N] (NaN rows for tokens whose zero point is out of range),
    with trace counting weight and spike words used per token tile and the groups each output
    folded."""
    M, N, K, R, P = S["M"], L["N"], L["K"], S["R"], S["P"]
    t = Tile(token_tile(M, R), R)
    L = dict(L, chunks=-(-min(L["gs"], K) // t.chunk))
    off = 128 if S["sign"] is None and P == 8 else 0
    with_zero = S["zero"] is not None or off != 0
    m_tiles = -(-M // t.MT)
    rounds = -(-L["G"] // t.workers)
    steps = rounds * L["chunks"]
    y = np.full((M, N), np.nan, dtype=np.float32)
    for block in range(-(-N // COLS) * m_tiles):
        m0, n0 = block % m_tiles * t.MT, block // m_tiles * COLS
        ok, zero = [], []
        for m in range(t.MT):
            tm = m0 + m
            z = [0, 0]
            if tm < M and S["zero"] is not None:
                z = [int(S["zero"][tm, r]) if r < R else 0 for r in range(2)]
            ok.append(tm < M and all(abs(v) <= 10000 for v in z))
            zero.append([v - off if ok[-1] else 0 for v in z])
        acc = [np.zeros((t.MT, R, COLS), dtype=np.int64) for _ in range(t.workers)]
        # A group's zero points and scales, loaded with its first chunk, kept for the others.
        zq = [np.zeros(COLS, dtype=np.int64) for _ in range(t.workers)]
        sc = [np.zeros(COLS, dtype=np.float32) for _ in range(t.workers)]
        S_fold = {}
        for step in range(steps):
            code = Smem(t.workers * t.slot)
            code_sum = Smem(t.workers * t.MT * R * t.words)
            hi_count = Smem(t.workers * t.MT * t.words)
            for u in range(t.units):  # build units, any thread order
                s, m, i = u // (t.MT * t.words), u // t.words % t.MT, u % t.words
                g, lo, hi = chunk_of(L, t, step, s)
                w = lo // 32 + i
                keep = channel_bits(w, K) if ok[m] and 32 * w < hi else 0
                if keep:
                    trace["spikes"][m0 + m, w] += 1
                base = s * t.slot + (4 * i * t.MT + m) * t.vec

                def store(b, v, value, base=base):
                    code.write(base + b * t.row_words + v, value)

                sums, count = build_word(S, R, off, m0 + m, w, keep, store)
                for r in range(R):
                    code_sum.write(((s * t.MT + m) * R + r) * t.words + i, sums[r])
                if R == 2:
                    hi_count.write((s * t.MT + m) * t.words + i, count)
            prod = {}
            for slot in range(t.workers):
                g, lo, hi = chunk_of(L, t, step, slot)
                row0, rows = lo // 8, (hi + 7) // 8 - lo // 8 if hi > lo else 0
                # Each lane's load4 of 4 columns (fewer at the end of a row): the worker's 32.
                wd = np.zeros((t.rows, COLS), dtype=np.int64)
                for lane in range(LANES):
                    n = n0 + 4 * lane
                    cols = min(4, N - n)
                    if cols <= 0:
                        continue
                    sl = slice(4 * lane, 4 * lane + cols)
                    for i in range(t.rows):
                        if i < rows:
                            wd[i, sl] = L["qweight"][row0 + i, n:n + cols]
                            trace["weights"][m0 // t.MT, row0 + i, n:n + cols] += 1
                    if step % L["chunks"] == 0 and g < L["G"]:
                        trace["groups"][m0 // t.MT, g, n:n + cols] += 1
                        zq[slot][sl] = L["zeros"][g, n:n + cols]
                        sc[slot][sl] = L["scales"][g, n:n + cols]
                q_sum = np.zeros(COLS, dtype=np.int64)
                q_hi = np.zeros((t.MT, COLS), dtype=np.int64)
                a = acc[slot]
                for i in range(min(rows, t.rows)):
                    left = K - 8 * (row0 + i)
                    in_k = 0xFFFFFFFF if left >= 8 else (1 << (4 * left)) - 1
                    even = wd[i] & in_k & 0x0F0F0F0F
                    odd = ((wd[i] & in_k) >> 4) & 0x0F0F0F0F
                    if with_zero:
                        q_sum = dp4a(odd, 0x01010101, dp4a(even, 0x01010101, q_sum))
                    row = slot * t.slot + i * t.row_words
                    for m in range(t.MT):
                        for r in range(R):
                            cx, cy = (code.read(row + m * t.vec + 2 * r + h) for h in range(2))
                            a[m, r] = dp4a(odd, cy, dp4a(even, cx, a[m, r]))
                            in_int32(a[m, r])
                        if R == 2 and with_zero:
                            ox, oy = (code.read(row + m * t.vec + 4 + h) for h in range(2))
                            q_hi[m] = dp4a(odd, oy, dp4a(even, ox, q_hi[m]))
                count = max(0, hi - lo)
                for m in range(t.MT):
                    count_hi = sum(hi_count.read((slot * t.MT + m) * t.words + i)
                                   for i in range(t.words)) if R == 2 else 0
                    for r in range(R):
                        cs = sum(code_sum.read(((slot * t.MT + m) * R + r) * t.words + i)
                                 for i in range(t.words))
                        in_range = count if R == 1 else count_hi if r else count - count_hi
                        q = q_sum if R == 1 else q_hi[m] if r else q_sum - q_hi[m]
                        terms = (zq[slot] * cs, q - zq[slot] * in_range)
                        terms += (zero[m][r] * terms[1], terms[0] + zero[m][r] * terms[1])
                        for v in terms:
                            in_int32(v)
                        a[m, r] -= terms[3]
                        in_int32(a[m, r])
                if step % L["chunks"] == L["chunks"] - 1 and g < L["G"]:
                    prod[slot] = sc[slot] * a.astype(np.float32)  # one float32 rounding
                    a[:] = 0
            if step % L["chunks"] == L["chunks"] - 1:
                g0 = step // L["chunks"] * t.workers
                for k in range(t.fold):
                    for tid in range(t.threads):
                        o = tid + k * t.threads
                        if o >= t.MT * COLS:
                            break
                        m, n = o // COLS, o % COLS
                        for s in range(min(t.workers, L["G"] - g0)):
                            for r in range(R):
                                S_fold[m, n, r] = S_fold.get((m, n, r), 0.0) + float(
                                    prod[s][m, r, n])
                            trace["fold"].setdefault((m0 + m, n0 + n), []).append(g0 + s)
        for m in range(t.MT):
            tm = m0 + m
            for n in range(COLS):
                col = n0 + n
                if tm >= M or col >= N or not ok[m]:
                    continue
                v = float(S["scale"][tm, 0]) * S_fold.get((m, n, 0), 0.0)
                if R == 2:
                    v += float(S["scale"][tm, 1]) * S_fold.get((m, n, 1), 0.0)
                if bias is not None:
                    v += float(bias[col])
                y[tm, col] = np.float32(v)
    return y


def as_numpy(st, qweight, zeros, scales, gs, K):
    none = (lambda v: None if v is None else v.numpy())
    S = dict(planes=st.planes.numpy().view(np.uint32), sign=none(st.sign), hi=none(st.hi),
             zero=none(st.zero), scale=st.scale.numpy(), P=st.planes.shape[0],
             M=st.planes.shape[1], R=st.scale.shape[1])
    for key in ("sign", "hi"):
        if S[key] is not None:
            S[key] = S[key].view(np.uint32)
    L = dict(qweight=qweight.numpy().view(np.uint32).astype(np.int64),
             zeros=zeros.numpy().astype(np.int64), scales=scales.numpy(), gs=gs, K=K,
             N=qweight.shape[1], G=zeros.shape[0])
    return S, L


def check(st, w, bias):
    """Emulation == CPU op, and the coverage and order checks, for one call."""
    S, L = as_numpy(st, w.gptq_tensors()["qweight"], w.codes()[1], w.scales.float(),
                    w.kernel_group_size, w.in_features)
    K, N, M, G = L["K"], L["N"], S["M"], L["G"]
    assert applies(M, S["P"], S["sign"] is not None, L["gs"])
    t = Tile(token_tile(M, S["R"]), S["R"])
    m_tiles = -(-M // t.MT)
    trace = dict(weights=np.zeros((m_tiles, -(-K // 8), N), dtype=int),
                 groups=np.zeros((m_tiles, G, N), dtype=int),
                 spikes=np.zeros((M + t.MT, -(-K // 32)), dtype=int), fold={})
    y = emulate(S, L, None if bias is None else bias.numpy(), trace)
    assert (trace["weights"] == 1).all(), "a qweight word read twice or never"
    assert (trace["groups"] == 1).all(), "a group's zeros and scales read twice or never"
    # Every block builds the codes of its tokens: once per column tile.
    assert (trace["spikes"][:M] == -(-N // COLS)).all() and not trace["spikes"][M:].any()
    for m in range(M):
        for n in range(N):
            assert trace["fold"][m, n] == list(range(G)), "fold out of order"
    ref = spikeops.spike_linear(st, w, bias, torch.float32, backend="int")
    assert torch.equal(torch.from_numpy(y), ref), "emulation differs from the CPU op"


ENCODINGS = {  # (encoding, salient): P and signedness of every path of build_word
    "minmax4": (spikeops.Encoding("minmax", 4), False),
    "minmax8": (spikeops.Encoding("minmax", 8), False),    # unsigned P = 8: Q - 128
    "absmax4": (spikeops.Encoding("absmax", 4, gamma=0.7), False),
    "absmax8": (spikeops.Encoding("absmax", 8, gamma=0.9), False),  # signed P = 7
    "minmax4s8": (spikeops.Encoding("minmax", 4, salient_bits=8), True),  # R = 2, Q - 128
    "absmax3s6": (spikeops.Encoding("absmax", 3, salient_bits=6), True),
    "oat7": (spikeops.Encoding("oat", 7, theta=(0.8, 2.0)), False),  # R = 2 signed, per token
}


def spikes(M, K, name, seed):
    enc, salient = ENCODINGS[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * (1 + 3 * torch.rand(M, 1, generator=gen))
    x[:, torch.randperm(K, generator=gen)[:K // 4]] = 0  # silent channels and words
    mask = torch.rand(K, generator=gen) < 0.1 if salient else None
    return spikeops.encode(x, enc, salient_mask=mask)


@pytest.mark.parametrize("K, N, gs, M, name", [
    (100, 36, 32, 1, "minmax4"),        # K % 32, one ragged spike word, N % 32
    (262, 70, 64, 3, "absmax4"),        # N % 4 != 0: scalar loads
    (1280, 40, 32, 16, "minmax8"),      # G = 40: three rounds of 16 workers
    (1000, 64, 256, 2, "absmax8"),      # groups of two chunks, the last one cut by K
    (200, 33, 96, 5, "minmax4s8"),      # a 3-word group, 8-row chunks, R = 2 unsigned
    (608, 12, 96, 4, "absmax3s6"),      # R = 2 signed, one token tile of 4
    (357, 20, 64, 9, "oat7"),           # R = 2, three token tiles of 4
    (75, 8, 128, 12, "minmax4"),        # G = 1, group larger than K
    (416, 100, 416, 7, "absmax4"),      # one group = K, 8 tokens
])
def test_decode_emulation(K, N, gs, M, name):
    w = make_layer(K, N, 4, gs, sym=False, seed=K)[0]
    if K % 8:  # the last qweight row's fields past K hold anything; every consumer ignores them
        w.qweight[-1] |= -1 << 4 * (K % 8)
    bias = torch.randn(N) if M % 2 else None
    check(spikes(M, K, name, seed=M), w, bias)


def test_decode_emulation_extremes():
    """The int32 bounds at their limit: one group of 8192 channels, zero points +-10^4, weight
    zero points 0 and 15 (v2) or 1 and 16 (v1), codes at +-127 / 0..255: the emulation stays in
    int32 and exact."""
    K, N, gs = 8192, 4, 8192
    W = K // 32
    qweight = torch.full((K // 8, N), -1, dtype=torch.int32)     # q = 15 everywhere
    qweight[:, 1] = 0                                            # q = 0
    fields = torch.tensor([[0, 15, 15, 0]], dtype=torch.int32)
    qzeros = spikeops.pack(fields, 4, dim=1)
    scales = torch.tensor([[0.5, 0.25, 1e-3, 3.0]]).half()
    for P, signed, zero in ((8, False, 10000), (8, False, -10000), (7, True, None)):
        planes = torch.full((P, 2, W), -1, dtype=torch.int32)   # Q = 2^P - 1
        planes[:, 1] = 0                                         # token 1: Q = 0
        sign = torch.full((2, W), -1, dtype=torch.int32) if signed else None
        zt = None if zero is None else torch.full((2, 1), zero, dtype=torch.int32)
        st = spikeops.SpikeTensor(planes, sign, None, torch.tensor([[1e-3], [2.0]]), zt, (2, K))
        for offset in (0, 1):
            S, L = as_numpy(st, qweight, fields + offset, scales.float(), gs, K)
            trace = dict(weights=np.zeros((1, K // 8, N), dtype=int),
                         groups=np.zeros((1, 1, N), dtype=int),
                         spikes=np.zeros((4, W), dtype=int), fold={})
            y = emulate(S, L, None, trace)
            ref = ops.spike_linear(planes, sign, None, st.scale, zt, qweight, qzeros, scales,
                                   torch.zeros(K, dtype=torch.int32), None, None, None, 4, gs,
                                   offset, torch.float32, "int")
            assert torch.equal(torch.from_numpy(y), ref)


def test_bit_slices():
    """build_word's codes against plane_code / signed_value, for every path."""
    gen = np.random.default_rng(1)
    for P, signed, off in ((3, True, 0), (7, True, 0), (4, False, 0), (8, False, 128)):
        for R in (1, 2):
            planes = gen.integers(0, 1 << 32, size=(P, 1, 1), dtype=np.uint64).astype(np.uint32)
            sign = gen.integers(0, 1 << 32, size=(1, 1), dtype=np.uint64).astype(np.uint32)
            hi = gen.integers(0, 1 << 32, size=(1, 1), dtype=np.uint64).astype(np.uint32)
            S = dict(planes=planes, sign=sign if signed else None, hi=hi if R == 2 else None, P=P)
            keep = 0x7FFFFFFF  # channel 31 past K
            rows = {}
            sums, count = build_word(S, R, off, 0, 0, keep,
                                     lambda b, v, value: rows.__setitem__((b, v), value))
            for k in range(32):
                q = sum(((int(planes[p, 0, 0]) >> k) & 1) << p for p in range(P))
                if signed and (int(sign[0, 0]) >> k) & 1:
                    q = -q
                r = (int(hi[0, 0]) >> k) & 1 if R == 2 else 0
                want = q - off if k < 31 else 0
                b, j, h = k // 8, (k % 8) // 2, k % 2
                for rr in range(R):
                    got = s8((rows[b, 2 * rr + h] >> (8 * j)) & 0xFF)
                    assert got == (want if rr == r else 0)
                if R == 2:
                    assert (rows[b, 4 + h] >> (8 * j)) & 0xFF == (r if k < 31 else 0)
            codes = [s8((rows[k // 8, 2 * rr + k % 2] >> (8 * ((k % 8) // 2))) & 0xFF)
                     for rr in range(R) for k in range(32)]
            assert sums == [sum(codes[32 * rr:32 * rr + 32]) for rr in range(R)]
            assert count == (bin(int(hi[0, 0]) & keep).count("1") if R == 2 else 0)


needs_cuda = pytest.mark.skipif(not cuda_ready(), reason=CUDA_REASON)


@functools.lru_cache(maxsize=None)
def layer(K, N, gs, device):
    return make_layer(K, N, 4, gs, sym=False, seed=3, device=device)[0]


@needs_cuda
@pytest.mark.parametrize("K, N, gs", [(4096, 128, 128), (1000, 132, 64), (262, 130, 32),
                                      (4096 + 32, 64, 4096 + 32)])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 13, 16])
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_decode_kernel_equals_cpu(K, N, gs, M, name):
    """The kernel itself against the CPU (16-byte loads where N % 4 == 0, one load per word
    for N = 130; a layer of one group), every out dtype, with and without bias."""
    st = spikes(M, K, name, seed=M)
    st_gpu = spikeops.SpikeTensor(*[v.cuda() if torch.is_tensor(v) else v for v in st])
    bias = torch.randn(N)
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        for b in (None, bias.to(out_dtype)):
            y_cpu = spikeops.spike_linear(st, layer(K, N, gs, "cpu"), b, out_dtype)
            y_gpu = spikeops.spike_linear(st_gpu, layer(K, N, gs, "cuda"),
                                          None if b is None else b.cuda(), out_dtype)
            assert torch.equal(y_gpu.cpu(), y_cpu)


@needs_cuda
def test_decode_kernel_zero_out_of_range():
    """A zero point past 10^4 makes that token's row NaN, on the decode path too."""
    w = make_layer(256, 64, 4, 128, device="cuda")[0]
    st = spikeops.encode(torch.randn(3, 256, device="cuda"), spikeops.Encoding("minmax", 4))
    bad = st.zero.clone()
    bad[1, 0] = 1 << 20
    y = ops.spike_linear(st.planes, st.sign, st.hi, st.scale, bad, *w.kernel_args(), None, 4,
                         w.kernel_group_size, w.zero_offset, torch.float32, "auto")
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
