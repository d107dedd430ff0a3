"""spike_linear against its baselines, one pytest-benchmark group per (shape, M, weight bits).

Every group holds, on the same layer (random symmetric GPTQ, group size 128):

- ``spikeops-{auto,spike}-{minmax4,absmax4,minmax8}``: ``spike_linear`` on a prepared
  SpikeTensor, both backends, three encodings;
- ``spikeops-SpikeLinear-minmax4``: the module, x -> encode -> spike_linear;
- ``spikeops-SpikeLinear-sparse``: the module with absmax4 on activations with a few massive
  channels per token, whose spikes are sparse (the firing rate is recorded);
- the reference, ``cublas-fp16`` (``F.linear`` fp16 on GPU) or ``torch-fp32-F.linear`` (CPU), on
  the dequantized weights (not timed: ``gptq_dequantize``);
- ``dequant+matmul``: ``gptq_dequantize`` then the dense matmul, per call;
- ``torch-int4-tinygemm`` (4-bit groups): ``aten._weight_int4pack_mm`` (``_for_cpu`` on CPU) on
  the same codes, scales and zeros, bf16 activations;
- ``torch-int8-_int_mm``: ``torch._int_mm`` on the int8 problem of the same shape;
- ``timestep-sim-T15``: the SpikeLLM / LAS way, rate-coded minmax-4 spikes over T = 15 steps,
  one dense matmul per step plus one for the zero point.

``test_pdl`` (group ``spike_linear PDL ...``, sm_90 and later): encode and decode kernels back to
back with programmatic dependent launch and without (``SPIKEOPS_PDL=0``), M = 1 and 16.

``test_density`` (group ``spike_linear density``): the two backends and ``auto`` on absmax4 spikes
of inputs whose channels are zero but for a share of them (scattered, so few blocks of eight
channels are silent in every token), at M = 1 and 16: the crossover auto is set by (docs/
performance.md, "The CPU engine").

Matrix: on GPU every shape of harness.SHAPES at M in {1, 4, 16, 64, 256, 2048} with W4, plus W2,
W3 and W8 at M = 1. On CPU (2 cores) the LLaMA-2-7B gate/up shape 4096 -> 11008 at M = 1, 16 and
256 with W4, and W2/W3/W8 at M = 1: the CPU core targets, beside float32, bfloat16 and float16
F.linear; the GPU shapes would take hours there.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import spikeops
from spikeops import reference

from harness import (DENSE_DTYPE, DEVICE, ENCODINGS, GROUP_SIZE, ON_GPU, SHAPES, TOKENS,
                     activations, gptq_layer, int_mm_rows, measure, nbytes)

REFERENCE = "cublas-fp16" if ON_GPU else "torch-fp32-F.linear"
T = 15  # rate-code steps of a 4-bit code: 2^4 - 1
# On the CPU the fastest dense dtype depends on the machine (AMX runs bf16 far faster than
# fp32): every dense dtype is an entry, and the report takes the fastest.
DENSE = [REFERENCE] + ([] if ON_GPU else ["torch-bf16-F.linear", "torch-fp16-F.linear"])
ENTRIES = (DENSE + [f"spikeops-{b}-{e}" for e in ENCODINGS for b in ("auto", "spike")] +
           ["spikeops-SpikeLinear-minmax4", "spikeops-SpikeLinear-sparse", "dequant+matmul",
            "torch-int4-tinygemm", "torch-int8-_int_mm", f"timestep-sim-T{T}"])


def _problems():
    shapes = list(SHAPES) if ON_GPU else ["7B-gate_up"]
    tokens = TOKENS if ON_GPU else (1, 16, 256)
    out = [(s, M, 4) for s in shapes for M in tokens]
    return out + [(s, 1, bits) for s in shapes for bits in (2, 3, 8)]


CASES = [pytest.param(s, M, bits, e, id=f"{s}-M{M}-W{bits}-{e}")
         for s, M, bits in _problems() for e in ENTRIES
         if not (e == "torch-int4-tinygemm" and bits != 4)]
_reference = {"__name__": REFERENCE}


@functools.lru_cache(maxsize=1)
def layer(shape: str, bits: int):
    """The GPTQ layer of a group and its dense twin (kept while a shape's groups run)."""
    K, N = SHAPES[shape]
    w = gptq_layer(K, N, bits)
    return w, w.dequantize().to(DENSE_DTYPE)


@functools.lru_cache(maxsize=1)
def int4_weights(shape: str):
    """tinygemm's packing of the same 4-bit codes; its zero is additive: w = (q - 8) * s + zero,
    so zero = (8 - z) * s reproduces GPTQ's (q - z) * s."""
    w, _ = layer(shape, 4)
    q, z = w.codes()                                                         # [K, N], [G, N]
    q = q.t().contiguous()                                                   # [N, K] codes
    s = w.scales.float()
    scale_zero = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
    if ON_GPU:
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 8)
    return packed, scale_zero


@pytest.mark.parametrize("shape, M, bits, entry", CASES)
def test_linear(benchmark, shape, M, bits, entry):
    K, N = SHAPES[shape]
    w, W = layer(shape, bits)
    x = activations(M, K)
    group = f"spike_linear {shape} {K}x{N} M={M} W{bits}g{GROUP_SIZE}"
    mac = 2.0 * M * K * N
    dense_io = (M * K + M * N) * x.element_size()
    info = dict(M=M, K=K, N=N, bits=bits, entry=entry)
    run = functools.partial(measure, benchmark, group=group, name=entry, ops=mac,
                            reference=_reference)

    if entry == REFERENCE:
        run(lambda: F.linear(x, W), bytes_moved=W.numel() * W.element_size() + dense_io,
            extra=info)
    elif entry in DENSE:
        dtype = torch.bfloat16 if "bf16" in entry else torch.float16
        xd, Wd = x.to(dtype), W.to(dtype)
        run(lambda: F.linear(xd, Wd), bytes_moved=Wd.numel() * 2 + (M * K + M * N) * 2,
            extra=info)
    elif entry == "spikeops-SpikeLinear-sparse":
        # LLM-like activations: a few massive channels per token; absmax4 spikes of them are
        # sparse (firing rate well below 5%), so most weight rows need not be read.
        xs = x.clone()
        xs[:, : K // 256] *= 400
        lin = spikeops.SpikeLinear(w, ENCODINGS["absmax4"])
        info.update(firing_rate=spikeops.encode(xs, ENCODINGS["absmax4"]).firing_rate())
        run(lambda: lin(xs), bytes_moved=nbytes(*w.kernel_args()) + dense_io,
            extra=info)
    elif entry.startswith("spikeops-SpikeLinear"):
        lin = spikeops.SpikeLinear(w, ENCODINGS["minmax4"])
        run(lambda: lin(x), bytes_moved=nbytes(*w.kernel_args()) + dense_io, extra=info)
    elif entry.startswith("spikeops-"):
        _, backend, enc = entry.split("-")
        st = spikeops.encode(x, ENCODINGS[enc])
        info.update(firing_rate=st.firing_rate(), planes=st.num_planes)
        run(lambda: spikeops.spike_linear(st, w, out_dtype=torch.float16, backend=backend),
            bytes_moved=nbytes(*w.kernel_args()) + nbytes(*st[:5]) + M * N * 2, extra=info)
    elif entry == "dequant+matmul":
        run(lambda: F.linear(x, w.dequantize().to(DENSE_DTYPE)),
            bytes_moved=nbytes(*w.kernel_args()) + 2 * W.numel() * 2 + W.numel() * W.element_size()
            + dense_io, extra=info)
    elif entry == "torch-int4-tinygemm":
        packed, scale_zero = int4_weights(shape)
        xb = x.to(torch.bfloat16)
        mm = (torch.ops.aten._weight_int4pack_mm if ON_GPU
              else torch.ops.aten._weight_int4pack_mm_for_cpu)
        y = mm(xb, packed, GROUP_SIZE, scale_zero)
        # Same problem as the other entries: close to the dense layer (bf16 rounding).
        torch.testing.assert_close(y.float(), F.linear(xb.float(), W.float()), rtol=0.05,
                                   atol=0.05 * float(y.float().abs().max()))
        run(lambda: mm(xb, packed, GROUP_SIZE, scale_zero),
            bytes_moved=K * N // 2 + scale_zero.numel() * 2 + M * K * 2 + M * N * 2, extra=info)
    elif entry == "torch-int8-_int_mm":
        a8 = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=DEVICE)
        b8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEVICE).t()
        a8 = int_mm_rows(a8, b8, info)
        run(lambda: torch._int_mm(a8, b8), bytes_moved=K * N + a8.numel() + a8.shape[0] * N * 4,
            extra=info)
    elif entry.startswith("timestep-sim"):
        st = spikeops.encode(x, ENCODINGS["minmax4"])
        codes = sum(reference.unpack_bits(st.planes[p], K).to(torch.int32) << p
                    for p in range(st.num_planes))
        trains = torch.stack([(codes > t).to(DENSE_DTYPE) for t in range(T)])  # [T, M, K]
        scale, zero = st.scale[:, :1], st.zero[:, :1].to(DENSE_DTYPE)
        ones = torch.ones(1, K, dtype=DENSE_DTYPE, device=DEVICE)

        def simulate():
            acc = torch.zeros(M, N, dtype=torch.float32, device=DEVICE)
            for t in range(T):
                acc += F.linear(trains[t], W)
            return scale * (acc - zero * F.linear(ones, W))

        y = simulate()
        torch.testing.assert_close(y, F.linear(st.decode(torch.float32), W.float()),
                                   rtol=2e-2, atol=2e-2 * float(y.abs().max()))
        run(simulate, bytes_moved=T * (W.numel() * W.element_size() + dense_io), ops=T * mac,
            extra=dict(info, T=T))
    else:
        raise AssertionError(entry)


DENSITIES = (0.1, 0.03, 0.01, 0.003, 0.001)  # share of channels not zero


@pytest.mark.parametrize("backend", ["int", "spike", "auto"])
@pytest.mark.parametrize("share", DENSITIES)
@pytest.mark.parametrize("M", [1, 16])
def test_density(benchmark, M, share, backend):
    K, N = SHAPES["7B-gate_up"]
    w, _ = layer("7B-gate_up", 4)
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    x = activations(M, K) * (torch.rand(M, K, device=DEVICE, generator=gen) < share)
    x[:, 0] = 3.0  # every token spikes
    st = spikeops.encode(x, ENCODINGS["absmax4"])
    measure(benchmark, lambda: spikeops.spike_linear(st, w, out_dtype=torch.float16,
                                                     backend=backend),
            f"spike_linear density 7B-gate_up M={M} channels={share}", backend,
            extra=dict(M=M, K=K, N=N, share=share, firing_rate=st.firing_rate(),
                       spikes=int(st.counts().sum())))


def _pdl_capable() -> bool:
    return ON_GPU and torch.cuda.get_device_capability(DEVICE)[0] >= 9


@pytest.mark.skipif(not _pdl_capable(), reason="programmatic dependent launch needs a CUDA "
                    "device of compute capability 9.0 or later (and spikeops built with CUDA)")
@pytest.mark.parametrize("pdl", ["1", "0"], ids=["pdl", "nopdl"])
@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("what", ["SpikeLinear-7B-gate_up", "ProjectionGroup-7B-qkv"])
def test_pdl(benchmark, what, M, pdl, monkeypatch):
    """Group ``spike_linear PDL {what} M={M}``: the decode path of a layer, encode and linear
    back to back (SpikeLinear on 4096 -> 11008; a ProjectionGroup of three 4096 -> 4096
    projections: one encode, then three decode kernels in a row), launched with programmatic
    dependent launch (``spikeops-pdl``) and without it (``SPIKEOPS_PDL=0``, the baseline), in
    one CUDA graph per call as every GPU entry (measure). docs/performance.md, "GPU status"."""
    monkeypatch.setenv("SPIKEOPS_PDL", pdl)  # read when the graph is captured
    shape = "7B-gate_up" if what.startswith("SpikeLinear") else "7B-qkvo"
    K, N = SHAPES[shape]
    x = activations(M, K)
    if what.startswith("SpikeLinear"):
        w, _ = layer(shape, 4)
        fn = functools.partial(spikeops.SpikeLinear(w, ENCODINGS["minmax4"]), x)
        weights = nbytes(*w.kernel_args())
    else:
        from spikeops.nn import ProjectionGroup
        # Three layers, not one thrice: the second and third would find it in L2.
        members = [gptq_layer(K, N, 4, seed=s) for s in range(3)]
        group = ProjectionGroup([spikeops.SpikeLinear(m, ENCODINGS["minmax4"])
                                 for m in members])
        fn = functools.partial(group, x)
        weights = sum(nbytes(*m.kernel_args()) for m in members)
    measure(benchmark, fn, f"spike_linear PDL {what} M={M}",
            "spikeops-pdl" if pdl == "1" else "SPIKEOPS_PDL=0",
            bytes_moved=weights + (M * K + M * N) * x.element_size(),
            extra=dict(M=M, K=K, N=N, pdl=pdl == "1"))
