"""The tensor-core prefill kernel of spike_linear (csrc/cuda/linear_mma.cu), emulated on the host:
tests/cuda_mma_emulation.cpp is compiled with g++ against csrc/cuda/mma_layout.h, the header that holds
every index map of the kernel (cp.async sources and destinations, the code build and its swizzle,
the ldmatrix addresses, the weight registers, the accumulator -> (token, column) map, the fold),
and runs whole blocks through them, with ldmatrix and mma.sync m16n8k32 .s8 written there from
the PTX ISA's documented fragment layouts. Here: the maps are bijections and conflict-free, and on
ragged shapes, 2- and 4-bit weights, signed and unsigned codes (the offset of 8-plane codes too)
and groups of 32, 64 and 128, the emulated group sums equal an integer matmul and the outputs
equal the CPU op and spikeops.reference bit for bit. The kernel itself runs against the CPU in
tests/test_cuda.py on a GPU (scripts/gpu_check.sh)."""

import collections
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import spikeops
from spikeops import ops, pack, reference
from helpers import make_layer

ROOT = Path(__file__).resolve().parents[1]
BLOCK_M, BLOCK_N, STAGE_ROWS, ROW_STRIDE, CODE_BYTES = 64, 128, 4, 136, 64 * 32


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the emulation")
    exe = tmp_path_factory.mktemp("mma") / "cuda_mma_emulation"
    subprocess.run(["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror",
                    "-I", str(ROOT / "csrc"),
                    str(ROOT / "tests" / "cuda_mma_emulation.cpp"), "-o", str(exe)], check=True)
    return exe


@pytest.fixture(scope="module")
def maps(emulator):
    out = subprocess.run([str(emulator), "maps"], check=True, capture_output=True, text=True)
    table = collections.defaultdict(dict)
    for line in out.stdout.splitlines():
        name, *key, value = line.split()
        table[name][tuple(map(int, key))] = int(value)
    return table


def test_ldmatrix_rows_cover_the_codes_once_without_bank_conflicts(maps):
    offsets = maps["ldmatrix"]
    assert sorted(offsets.values()) == list(range(0, CODE_BYTES, 16))  # a bijection
    for (wm, i, lane), at in offsets.items():
        if lane % 8 == 0:  # one matrix: 8 rows of 16 bytes, read in one phase
            units = {offsets[(wm, i, lane + r)] // 16 % 8 for r in range(8)}
            assert len(units) == 8, (wm, i, lane)


def test_code_stores_cover_the_codes_once_without_bank_conflicts(maps):
    stores = maps["code_store"]  # (thread, half) -> byte offset of a 4-byte store
    assert sorted(stores.values()) == list(range(0, CODE_BYTES, 4))
    for warp in range(0, 256, 32):
        for half in (0, 1):  # one store instruction of a warp
            banks = {stores[(t, half)] // 4 % 32 for t in range(warp, warp + 32)}
            assert len(banks) == 32, (warp, half)


@pytest.mark.parametrize("bits", [2, 4])
def test_weight_loads_are_conflict_free(maps, bits):
    loads = maps[f"weight_load{bits}"]
    for wn in range(4):
        for j in range(4):
            for reg in range(2):
                words = {loads[(wn, j, reg * 32 + lane)] for lane in range(32)}
                assert len({w % 32 for w in words}) == len(words)  # one word per bank
                assert all(w // ROW_STRIDE < bits for w in words)


def test_copies_fill_every_destination_once(maps):
    spikes = collections.defaultdict(list)
    for (P, sign, u), dst in maps["spike_copy"].items():
        spikes[P, sign].append(dst)
    for (P, sign), dsts in spikes.items():
        assert sorted(dsts) == list(range((P + sign) * BLOCK_M))
    for bits in (2, 4):
        # (kind, qweight row, first column): qweight rows, then zero points, then scales
        got = sorted((v // 8000, v // 1000 % 8, v % 1000)
                     for k, v in maps["weight_copy"].items() if k[0] == bits)
        want = sorted([(0, r, c) for r in range(bits) for c in range(0, BLOCK_N, 4)]
                      + [(kind, 0, c) for kind in (1, 2) for c in range(0, BLOCK_N, 4)])
        assert got == want


def pack_planes(Q, P):
    """planes [P, M, W] of docs/ops.md from codes Q [M, K]."""
    M, K = Q.shape
    W = -(-K // 32)
    bits = np.zeros((M, 32 * W), dtype=np.uint64)
    bits[:, :K] = Q
    out = np.zeros((P, M, W), dtype=np.uint32)
    weights = (np.uint64(1) << np.arange(32, dtype=np.uint64))
    for p in range(P):
        b = (bits >> np.uint64(p)) & np.uint64(1)
        out[p] = (b.reshape(M, W, 32) * weights).sum(axis=2).astype(np.uint32)
    return out


def emulate(exe, tmp_path, st, w, zeros, bits, bias):
    """The emulated block on spikes ``st`` and weight ``w`` with true zero points ``zeros``
    int32 ``[G, N]`` (what the kernel's stage holds after unpacking them)."""
    planes, sign, scale, zero = st
    P, M, W = planes.shape
    qweight = w.gptq_tensors()["qweight"]
    K, N = w.in_features, w.out_features
    gs, G = w.kernel_group_size, zeros.shape[0]
    head = np.array([M, N, K, W, P, bits, gs, G, sign is not None, zero is not None,
                     bias is not None], dtype=np.int64)
    parts = [head, planes.numpy().astype(np.uint32)]
    parts += [sign.numpy().astype(np.uint32)] if sign is not None else []
    parts += [scale.numpy().astype(np.float32)]
    parts += [zero.numpy().astype(np.int32)] if zero is not None else []
    parts += [qweight.numpy().astype(np.int32), zeros.numpy().astype(np.int32),
              w.scales.float().numpy()]
    parts += [bias.numpy().astype(np.float32)] if bias is not None else []
    src, dst = tmp_path / "case.bin", tmp_path / "out.bin"
    src.write_bytes(b"".join(p.tobytes() for p in parts))
    subprocess.run([str(exe), "run", str(src), str(dst)], check=True)
    raw = dst.read_bytes()
    y = np.frombuffer(raw[:4 * M * N], dtype=np.float32).reshape(M, N)
    D = np.frombuffer(raw[4 * M * N:], dtype=np.int64).reshape(G, M, N)
    return torch.from_numpy(y.copy()), D


def spikes(M, K, P, signed, zero_range, gen):
    """A random one-range SpikeTensor's fields (planes, sign, scale [M, 1], zero [M, 1])."""
    Q = gen.integers(0, 1 << P, size=(M, K))
    Q[gen.random((M, K)) < 0.3] = 0
    sign = None
    if signed:
        neg = (gen.random((M, K)) < 0.5) & (Q > 0)
        sign = torch.from_numpy(pack_planes(neg.astype(np.int64), 1)[0].view(np.int32))
    zero = None
    if zero_range is not None:
        zero = torch.from_numpy(gen.integers(-zero_range, zero_range + 1, size=(M, 1))
                                .astype(np.int32))
    scale = torch.from_numpy((gen.random((M, 1)) * 0.1 + 1e-3).astype(np.float32))
    planes = torch.from_numpy(pack_planes(Q, P).view(np.int32))
    return planes, sign, scale, zero


def codes_of(planes, sign, zero, K):
    P, M, W = planes.shape
    words = planes.numpy().view(np.uint32).astype(np.uint64)
    bit = np.arange(32, dtype=np.uint64)
    Q = sum(((((words[p][:, :, None] >> bit) & np.uint64(1)).reshape(M, 32 * W)[:, :K])
             .astype(np.int64) << p) for p in range(P))
    if sign is not None:
        s = (sign.numpy().view(np.uint32).astype(np.uint64)[:, :, None] >> bit) & np.uint64(1)
        Q = np.where(s.reshape(M, 32 * W)[:, :K] == 1, -Q, Q)
    return Q - (zero.numpy().astype(np.int64) if zero is not None else 0)


CASES = [  # M, N, K, bits, group_size, P, signed, zero points (None: signed codes), bias
    (64, 128, 128, 4, 32, 4, False, 20, True),
    (130, 196, 320, 4, 64, 3, True, None, False),
    (70, 100, 256, 2, 128, 8, False, 10000, True),      # offset 128, large zero points
    (200, 260, 200, 4, 64, 7, True, None, True),        # ragged K inside the last group
    (65, 132, 384, 2, 32, 1, False, 1, False),
    (128, 256, 512, 4, 128, 8, False, 255, True),
    (96, 68, 96, 4, 32, 5, False, 10000, False),
    (100, 132, 232, 4, 64, 6, False, 300, True),        # ragged K with zero points
    (64, 68, 176, 2, 32, 8, False, 10000, False),
]


@pytest.mark.parametrize("M, N, K, bits, gs, P, signed, zero_range, with_bias", CASES)
def test_emulated_block_equals_integer_matmul_and_cpu(emulator, tmp_path, M, N, K, bits, gs, P,
                                                      signed, zero_range, with_bias):
    gen = np.random.default_rng(M * 1000 + N + K)
    st = spikes(M, K, P, signed, zero_range, gen)
    w, q, *_ = make_layer(K, N, bits, gs, sym=False, seed=K)
    G = w.scales.shape[0]
    # Zero points anywhere in the contract's [0, 2^bits]: a stored field of bits bits plus the
    # layer's offset, 0 or 1 (docs/checkpoints.md, "Zero points"), so both ends are reached.
    offset = int(gen.integers(0, 2))
    stored = torch.from_numpy(gen.integers(0, 1 << bits, size=(G, N)).astype(np.int32))
    zeros = stored + offset
    qzeros = pack(stored, bits, dim=1)
    bias = torch.randn(N) if with_bias else None
    y, D = emulate(emulator, tmp_path, st, w, zeros, bits, bias)

    c = codes_of(st[0], st[1], st[3], K)
    wd = q.numpy() - zeros.numpy().astype(np.int64)[np.arange(K) // gs]
    for g in range(G):
        ks = slice(g * gs, min(K, (g + 1) * gs))
        assert np.array_equal(D[g], c[:, ks] @ wd[ks]), g

    args = (st[0], st[1], None, st[2], st[3], w.gptq_tensors()["qweight"], qzeros, w.scales,
            w.g_idx, None, None, bias, bits, w.kernel_group_size, offset, torch.float32)
    assert torch.equal(y, ops.spike_linear(*args, "int"))
    assert torch.equal(y, reference.spike_linear(*args))


@pytest.mark.parametrize("enc", [spikeops.Encoding("minmax", 4), spikeops.Encoding("minmax", 8),
                                 spikeops.Encoding("absmax", 8, gamma=0.7)],
                         ids=["minmax4", "minmax8", "absmax8"])
def test_emulated_block_on_encoded_activations(emulator, tmp_path, enc):
    M, K, N = 100, 384, 132
    st = spikeops.encode(torch.randn(M, K) * 3, enc)
    w = make_layer(K, N, 4, 128, sym=False, seed=1)[0]
    bias = torch.randn(N)
    y, _ = emulate(emulator, tmp_path, (st.planes, st.sign, st.scale, st.zero), w,
                   w.codes()[1], 4, bias)
    assert torch.equal(y, spikeops.spike_linear(st, w, bias, torch.float32, backend="int"))


def test_zero_point_out_of_range_gives_a_nan_row(emulator, tmp_path):
    """A token whose zero point lies beyond 10^4 is NaN; the other tokens are unaffected."""
    M, K, N = 70, 128, 128
    planes, sign, scale, zero = spikes(M, K, 4, False, 15, np.random.default_rng(7))
    w = make_layer(K, N, 4, 64, seed=3)[0]
    bad = zero.clone()
    bad[5, 0] = 10001
    y, _ = emulate(emulator, tmp_path, (planes, sign, scale, bad), w, w.codes()[1], 4, None)
    want = ops.spike_linear(planes, sign, None, scale, zero, w.gptq_tensors()["qweight"],
                            w.qzeros, w.scales, w.g_idx, None, None, None, 4,
                            w.kernel_group_size, w.zero_offset, torch.float32, "int")
    assert y[5].isnan().all()
    rows = [m for m in range(M) if m != 5]
    assert torch.equal(y[rows], want[rows])
