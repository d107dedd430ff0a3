"""The activation-group walks of the CUDA kernels, emulated on the host:

- gif_encode_grouped_kernel (csrc/cuda/encode.cu): per step of 256 channels each lane's unit of 8
  channels belongs to group (256s + 8j) // group; the lanes of a group reduce among themselves
  (__match_any_sync, __reduce_*_sync on order-preserving keys), lane 31's open group carries into
  the next step, and the last lane of a group writes its statistics in the step where it ends.
  Every group must be written exactly once, with the min, max and max|x| of its own channels.
- The order-preserving key of ordered_key / from_key.
- The pieces of linear_kernel.cuh and the chunks of linear_decode.cu with activation groups:
  every channel k < K in exactly one piece / chunk, of activation group k // group.
Each function mirrors the kernel code of the same name; nothing here needs a GPU."""

import math
import random
import struct

import pytest

UNIT, STEP, LANES = 8, 256, 32


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


def float_bits(v):
    return struct.unpack("<i", struct.pack("<f", v))[0]


def int_float(b):
    return struct.unpack("<f", struct.pack("<i", b))[0]


def ordered_key(v):
    b = float_bits(v)
    return b if b >= 0 else b ^ 0x7FFFFFFF


def from_key(k):
    return int_float(k if k >= 0 else k ^ 0x7FFFFFFF)


def encode_group_stats(x, group):
    """The statistics pass of gif_encode_grouped_kernel: {group: (mn, mx, amax)} as written."""
    K = len(x)
    steps = (K + STEP - 1) // STEP
    group = min(group, steps * STEP)
    written = {}
    open_gid, carry = -1, (math.inf, -math.inf, 0.0)
    for s in range(steps):
        lane_gid, lane_stats = [], []
        for lane in range(LANES):
            c = s * STEP + UNIT * lane
            gid = c // group if c < K else -1
            mn, mx, amax = math.inf, -math.inf, 0.0
            for i in range(UNIT):
                if i >= K - c:
                    break
                v = x[c + i]
                mn, mx, amax = min(mn, v), max(mx, v), max(amax, abs(v))
            lane_gid.append(gid)
            lane_stats.append((mn, mx, amax))
        reduced = []
        for lane in range(LANES):
            same = [j for j in range(LANES) if lane_gid[j] == lane_gid[lane]]
            mn = from_key(min(ordered_key(lane_stats[j][0]) for j in same))
            mx = from_key(max(ordered_key(lane_stats[j][1]) for j in same))
            amax = max(lane_stats[j][2] for j in same)  # non-negative: unsigned bits order
            gid = lane_gid[lane]
            if gid >= 0 and gid == open_gid:
                mn, mx, amax = min(mn, carry[0]), max(mx, carry[1]), max(amax, carry[2])
            end = min((gid + 1) * group, K)
            closes = gid >= 0 and end <= (s + 1) * STEP
            if closes and lane == max(same):
                assert gid not in written, "a group written twice"
                written[gid] = (mn, mx, amax)
            reduced.append((gid, closes, (mn, mx, amax)))
        gid, closes, stats = reduced[LANES - 1]
        open_gid = gid if gid >= 0 and not closes else -1
        carry = stats
    return written


@pytest.mark.parametrize("K", [1, 31, 32, 33, 200, 256, 257, 300, 512, 777, 1024, 2100])
@pytest.mark.parametrize("group", [32, 64, 96, 128, 160, 256, 288, 512, 4096])
def test_encode_group_statistics(K, group):
    rng = random.Random(K * 7919 + group)
    x = [f32(rng.uniform(-4, 4)) for _ in range(K)]
    written = encode_group_stats(x, group)
    R = (K + group - 1) // group
    assert sorted(written) == list(range(R))
    for u in range(R):
        part = x[u * group:min((u + 1) * group, K)]
        assert written[u] == (min(part), max(part), max(abs(v) for v in part)), u


def test_ordered_key():
    values = [f32(v) for v in (-1e30, -3.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, 1e30)]
    values += [math.inf, -math.inf]
    keys = [ordered_key(v) for v in values]
    for a, ka in zip(values, keys):
        assert float_bits(from_key(ka)) == float_bits(a)
        for b, kb in zip(values, keys):
            if a < b:
                assert ka < kb
    assert ordered_key(-0.0) < ordered_key(0.0)


K_PIECE_CHUNKS = 4


def linear_kernel_pieces(K, group):
    """piece_at of linear_kernel.cuh with activation groups: (g, lo, hi, chunk0, chunks)."""
    W = (K + 31) // 32
    R = (W + group // 32 - 1) // (group // 32)
    per_group = (group // 32 + K_PIECE_CHUNKS - 1) // K_PIECE_CHUNKS
    for index in range(R * per_group):
        g = index // per_group
        first = (index % per_group) * K_PIECE_CHUNKS
        lo = g * group
        hi = min(lo + group, K)
        chunk0 = lo // 32 + first
        end = (hi + 31) // 32
        chunks = max(0, min(K_PIECE_CHUNKS, end - chunk0))
        yield g, lo, hi, chunk0, chunks


def range_bits(w, lo, hi):
    base = 32 * w
    a = lo - base if lo > base else 0
    b = hi - base if hi - base < 32 else 32
    return 0 if a >= b else ((1 << b) - 1) & ~((1 << a) - 1)


@pytest.mark.parametrize("K", [32, 33, 100, 256, 300, 1000, 4096])
@pytest.mark.parametrize("group", [32, 64, 96, 128, 160, 512])
def test_linear_kernel_pieces(K, group):
    seen = {}
    last_g = -1
    for g, lo, hi, chunk0, chunks in linear_kernel_pieces(K, group):
        assert g >= last_g  # the fold sees the columns in ascending order
        last_g = g
        for c in range(chunks):
            w = chunk0 + c
            bits = range_bits(w, lo, hi)
            for j in range(32):
                if bits >> j & 1:
                    k = 32 * w + j
                    assert k not in seen
                    seen[k] = g
    assert sorted(seen) == list(range(K))
    assert all(seen[k] == k // group for k in seen)


def decode_chunks(K, group, chunk):
    """chunk_of of linear_decode.cu with activation groups: (g, lo, hi) per (step, slot)."""
    W = (K + 31) // 32
    units = (W + group // 32 - 1) // (group // 32)
    workers = 16
    chunks = (min(group, K) + chunk - 1) // chunk
    rounds = (units + workers - 1) // workers
    for step in range(rounds * chunks):
        for slot in range(workers):
            g = (step // chunks) * workers + slot
            g_lo = g * group
            lo = g_lo + (step % chunks) * chunk
            hi = min(min(lo + chunk, g_lo + group), K) if g < units else lo
            yield step, slot, g, lo, hi, chunks


@pytest.mark.parametrize("K", [32, 100, 256, 1000, 4096, 5000])
@pytest.mark.parametrize("group", [32, 64, 96, 128, 256, 4096])
@pytest.mark.parametrize("chunk", [64, 128])
def test_decode_chunks(K, group, chunk):
    seen = {}
    for step, slot, g, lo, hi, chunks in decode_chunks(K, group, chunk):
        for k in range(lo, hi):
            assert k not in seen
            seen[k] = g
            # the chunk's spike words, those the build units read, stay inside the chunk
            assert lo % 32 == 0
    assert sorted(seen) == list(range(K))
    assert all(seen[k] == k // group for k in seen)
