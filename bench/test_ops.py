"""The other ops against their baselines, one pytest-benchmark group per (op, size, M):

- ``gif_encode`` (minmax4, absmax4, minmax8) beside ``copy`` (``x.clone()``: the bandwidth a
  one-pass encoder can approach) and the PyTorch implementation ``spikeops.reference``
  (``torch-reference``, the encoder written with tensor ops);
- ``spike_decode``, ``spike_stats`` and ``spike_counts`` beside ``torch-reference``;
- ``spike_accumulate`` (int8 weights, absmax4 spikes) beside ``torch-int8-_int_mm`` on the int8
  codes of the same problem;
- ``gptq_dequantize`` beside ``torch-reference`` (unpack with shifts, then scale);
- ``spike_matmul`` (absmax4 queries x absmax4 keys, head_dim 64, 2,048 keys, SmolLM2's 9 query
  and 3 kv heads, one query per head as in decode) beside ``torch-float-matmul``, float32
  ``q @ k^T`` on the decoded tensors (the attention scores of a float cache);
- ``copy-roofline``: a 1 GiB device-to-device copy (64 MiB on CPU), the memory roofline.

On GPU: the input widths of the LLaMA shapes (harness.SHAPES) and M in {1, 4, 16, 64, 256,
2048} (accumulate on the LLaMA-2-7B shapes); on CPU a 4096-wide slice at M = 1 and 16.
"""

from __future__ import annotations

import functools

import pytest
import torch

import spikeops
from spikeops import ops, reference

from harness import (DEVICE, ENCODINGS, ON_GPU, SHAPES, TOKENS, activations, gptq_layer,
                     int_mm_rows, measure, nbytes)

WIDTHS = sorted({k for k, _ in SHAPES.values()}) if ON_GPU else [4096]
SMALL_TOKENS = TOKENS if ON_GPU else (1, 16)
ACC_SHAPES = ["7B-qkvo", "7B-gate_up"] if ON_GPU else ["7B-qkvo"]
DEQ_SHAPES = list(SHAPES) if ON_GPU else ["7B-qkvo"]
_reference = {"__name__": "copy"}  # encode groups: ratio to a plain copy of x


def test_copy_roofline(benchmark):
    size = (1 << 30) if ON_GPU else (64 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    measure(benchmark, lambda: dst.copy_(src), "copy-roofline", "copy", bytes_moved=2 * size)


@pytest.mark.parametrize("entry", ["copy", "spikeops-minmax4", "spikeops-absmax4",
                                   "spikeops-minmax8", "torch-reference"])
@pytest.mark.parametrize("M", SMALL_TOKENS)
@pytest.mark.parametrize("K", WIDTHS)
def test_gif_encode(benchmark, K, M, entry):
    x = activations(M, K)
    group = f"gif_encode K={K} M={M}"
    info = dict(M=M, K=K)
    if entry == "copy":
        measure(benchmark, lambda: x.clone(), group, entry, bytes_moved=2 * nbytes(x),
                extra=info, reference=_reference)
    elif entry == "torch-reference":
        measure(benchmark, lambda: reference.gif_encode(x, "minmax", 4), group, entry,
                extra=info, reference=_reference)
    else:
        enc = ENCODINGS[entry.split("-")[1]]
        st = spikeops.encode(x, enc)
        measure(benchmark, lambda: spikeops.encode(x, enc), group, entry,
                bytes_moved=nbytes(x) + nbytes(*st[:5]), extra=dict(info, planes=st.num_planes),
                reference=_reference)


@functools.lru_cache(maxsize=4)
def spikes(M: int, K: int, enc: str):
    return spikeops.encode(activations(M, K), ENCODINGS[enc])


@pytest.mark.parametrize("entry", ["spikeops-decode", "torch-reference-decode",
                                   "spikeops-stats", "spikeops-counts", "torch-reference-stats"])
@pytest.mark.parametrize("M", SMALL_TOKENS)
@pytest.mark.parametrize("K", WIDTHS)
def test_decode_and_stats(benchmark, K, M, entry):
    st = spikes(M, K, "absmax4")
    fields = st[:5]
    op = entry.rsplit("-", 1)[1]
    group = f"spike_{'decode' if op == 'decode' else 'stats'} K={K} M={M} absmax4"
    info = dict(M=M, K=K, planes=st.num_planes)
    if entry == "spikeops-decode":
        fn, moved = lambda: st.decode(torch.float16), nbytes(*fields) + M * K * 2
    elif entry == "torch-reference-decode":
        fn, moved = lambda: reference.spike_decode(*fields, K, torch.float16), 0
    elif entry == "spikeops-stats":
        fn, moved = st.stats, nbytes(st.planes, st.sign)
    elif entry == "spikeops-counts":
        fn, moved = st.counts, nbytes(st.planes)
    else:
        fn, moved = lambda: reference.spike_stats(st.planes, st.sign), 0
    measure(benchmark, fn, group, entry, bytes_moved=moved, extra=info)


@pytest.mark.parametrize("entry", ["spikeops-accumulate", "torch-int8-_int_mm"])
@pytest.mark.parametrize("M", SMALL_TOKENS)
@pytest.mark.parametrize("shape", ACC_SHAPES)
def test_spike_accumulate(benchmark, shape, M, entry):
    K, N = SHAPES[shape]
    st = spikes(M, K, "absmax4")
    w8 = torch.randint(-128, 128, (K, N), dtype=torch.int8, device=DEVICE)
    group = f"spike_accumulate {shape} {K}x{N} M={M} absmax4"
    info = dict(M=M, K=K, N=N)
    if entry == "spikeops-accumulate":
        measure(benchmark, lambda: spikeops.spike_accumulate(st, w8), group, entry,
                bytes_moved=nbytes(w8, *st[:3]) + M * N * 8, ops=2.0 * M * K * N, extra=info)
    else:
        # The same integers: signed codes (|Q| <= 7 fit int8) times the int8 weights.
        codes = ops.spike_decode(st.planes, st.sign, None, torch.ones_like(st.scale), None, K,
                                 torch.float32).to(torch.int8)
        w8t = w8.t().contiguous().t()  # column-major [K, N], the layout cuBLASLt int8 wants
        codes = int_mm_rows(codes, w8t, info)
        measure(benchmark, lambda: torch._int_mm(codes, w8t), group, entry,
                bytes_moved=nbytes(w8t, codes) + codes.shape[0] * N * 4, ops=2.0 * M * K * N,
                extra=info)


@pytest.mark.parametrize("entry", ["spikeops-dequantize", "torch-reference"])
@pytest.mark.parametrize("shape", DEQ_SHAPES)
def test_gptq_dequantize(benchmark, shape, entry):
    K, N = SHAPES[shape]
    w = gptq_layer(K, N, 4)
    args = (w.qweight, w.qzeros, w.scales, w.g_idx, w.packed, w.kernel_bits,
            w.kernel_group_size, w.zero_offset)
    fn = ops.gptq_dequantize if entry == "spikeops-dequantize" else reference.gptq_dequantize
    measure(benchmark, lambda: fn(*args), f"gptq_dequantize {shape} {K}x{N} W4g128", entry,
            bytes_moved=nbytes(*w.kernel_args()) + K * N * 2,
            extra=dict(K=K, N=N))


@pytest.mark.parametrize("entry", ["spikeops-matmul", "torch-float-matmul"])
@pytest.mark.parametrize("Ma", [1, 16])
def test_spike_matmul(benchmark, Ma, entry):
    heads, kv_heads, keys, D = 9, 3, 2048, 64
    q = spikeops.encode(torch.randn(1, heads, Ma, D, device=DEVICE), ENCODINGS["absmax4"])
    k = spikeops.encode(torch.randn(1, kv_heads, keys, D, device=DEVICE), ENCODINGS["absmax4"])
    group = f"spike_matmul heads={heads}/{kv_heads} D={D} keys={keys} Ma={Ma} absmax4"
    info = dict(M=Ma, K=D, N=keys)
    macs = heads * Ma * keys * D
    if entry == "spikeops-matmul":
        measure(benchmark, lambda: spikeops.spike_matmul(q, k), group, entry,
                bytes_moved=nbytes(*q[:5], *k[:5]) + heads * Ma * keys * 4, ops=2.0 * macs,
                extra=info)
    else:
        qf = q.decode().expand(1, heads, Ma, D)
        kf = k.decode().repeat_interleave(heads // kv_heads, 1)
        measure(benchmark, lambda: qf @ kf.transpose(-1, -2), group, entry,
                bytes_moved=nbytes(qf, kf) + heads * Ma * keys * 4, ops=2.0 * macs, extra=info)
