"""CPU benchmark of spike_linear at decode (M = 1) on the LLaMA-2-7B gate/up shape 4096 -> 11008,
W4 g128, 4-bit minmax spikes, side by side with:

- torch fp32 ``F.linear`` on the dense twin (the dequantized weights, float32);
- a time-step simulation as the SpikeLLM / LAS code runs it: rate-coded spikes over
  T = 2^4 - 1 = 15 steps, one dense float matmul per step.

Run: ``pytest bench/test_cpu_linear.py --benchmark-json out.json`` then
``python bench/report.py out.json``. On CI: ``--benchmark-disable`` (one call each, a smoke test).
"""

import pytest
import torch
import torch.nn.functional as F

import spikeops
from spikeops import reference

K, N, GROUP, BITS = 4096, 11008, 128, 4
GROUP_NAME = f"spike_linear-cpu-M1-{K}x{N}-W4g128-minmax4"


@pytest.fixture(scope="module")
def layer():
    gen = torch.Generator().manual_seed(0)
    G = K // GROUP
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(1, 16, (G, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    w = spikeops.GPTQWeight(spikeops.pack(q, BITS, 0), spikeops.pack(z - 1, BITS, 1), scales,
                            None, BITS, GROUP, sym=False)
    x = torch.randn(1, K, generator=gen)
    enc = spikeops.Encoding("minmax", 4)
    st = spikeops.encode(x, enc)
    # The dense twin in float32: scale * (q - z) is exact in float32 (no fp16 rounding).
    g = torch.arange(K) // GROUP
    W = (scales.float()[g] * (q - z[g]).float()).t().contiguous()
    return w, x, enc, st, W


def run(benchmark, fn, name, extra=None):
    benchmark.group = GROUP_NAME
    benchmark.name = name
    benchmark.extra_info.update(extra or {})
    return benchmark.pedantic(fn, rounds=30, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("backend", ["auto", "spike", "int"])
def test_spikeops(benchmark, layer, backend):
    w, x, enc, st, W = layer
    y = run(benchmark, lambda: spikeops.spike_linear(st, w, out_dtype=torch.float32,
                                                     backend=backend),
            f"spikeops-{backend}", {"firing_rate": st.firing_rate()})
    torch.testing.assert_close(y, F.linear(st.decode(), W), rtol=1e-4, atol=1e-4)


def test_spikeops_module_with_encode(benchmark, layer):
    """SpikeLinear forward: encoding of x included."""
    w, x, enc, st, W = layer
    lin = spikeops.SpikeLinear(w, enc)
    run(benchmark, lambda: lin(x), "spikeops-SpikeLinear(encode+linear)")


def test_fp32_linear(benchmark, layer):
    w, x, enc, st, W = layer
    run(benchmark, lambda: F.linear(x, W), "torch-fp32-F.linear")


def test_timestep_simulation(benchmark, layer):
    """Rate code: a code Q fires on the first Q of T steps; each step is a dense float matmul
    of binary spikes with the dequantized weights, and the zero point is one more matmul."""
    w, x, enc, st, W = layer
    T = 2**4 - 1
    codes = torch.zeros(1, K, dtype=torch.int64)
    for p in range(st.num_planes):
        codes += reference.unpack_bits(st.planes[p], K).long() << p
    trains = [(codes > t).float() for t in range(T)]
    scale, zero = st.scale[:, :1], st.zero[:, :1].float()

    def simulate():
        acc = torch.zeros(1, N)
        for s in trains:
            acc += F.linear(s, W)
        return scale * (acc - zero * F.linear(torch.ones(1, K), W))

    y = run(benchmark, simulate, f"timestep-simulation-T{T}")
    torch.testing.assert_close(y, F.linear(st.decode(), W), rtol=1e-4, atol=1e-4)
