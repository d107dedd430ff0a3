"""CUDA against CPU: every op gives the same bits on both devices (the CPU kernels are checked
against reference.py elsewhere), CUDA-graph capture of a SpikeLinear forward, a second GPU, and
the kernels' guards for values the CUDA host does not read. Skipped, with the reason, where no
GPU (or no CUDA build) is present; scripts/gpu_check.sh runs them on a GPU machine."""

import functools

import pytest
import torch

import spikeops
from spikeops import ops
from spikeops.nn import ProjectionGroup
from helpers import CUDA_REASON, cuda_ready, make_layer

pytestmark = pytest.mark.skipif(not cuda_ready(), reason=CUDA_REASON)

ENCODE_CASES = [
    ("minmax", 4, {}), ("minmax", 1, {}), ("minmax", 16, {}), ("absmax", 5, dict(gamma=0.6)),
    ("absmean", 3, {}), ("absmean", 16, dict(gamma=0.3)),
    ("oat", 8, dict(theta_nor=0.7, theta_out=2.5)),
    ("minmax", 4, dict(salient_bits=7)), ("absmax", 3, dict(salient_bits=5)),
]


def on_both(fn, *tensors):
    """fn on CPU copies and on CUDA copies of the same inputs; outputs come back on the CPU."""
    cpu = fn(*[t.cpu() if torch.is_tensor(t) else t for t in tensors])
    gpu = fn(*[t.cuda() if torch.is_tensor(t) else t for t in tensors])
    as_tuple = (lambda o: o if isinstance(o, (tuple, list)) else (o,))
    return as_tuple(cpu), tuple(g.cpu() for g in as_tuple(gpu))


def assert_bits_equal(a, b):
    for u, v in zip(a, b):
        assert u.shape == v.shape and u.dtype == v.dtype
        if u.is_floating_point():
            assert torch.equal(u.isnan(), v.isnan())
            assert torch.equal(torch.nan_to_num(u), torch.nan_to_num(v))
        else:
            assert torch.equal(u, v)


@pytest.mark.parametrize("mode, bits, kw", ENCODE_CASES)
@pytest.mark.parametrize("K", [1, 33, 100, 4096 + 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_encode_cpu_equals_cuda(mode, bits, kw, K, dtype):
    x = (torch.randn(7, K) * 4).to(dtype)
    x[2, 0] = float("nan")
    x[4, -1] = float("inf")
    mask = torch.rand(K) < 0.2 if "salient_bits" in kw else None
    cpu, gpu = on_both(lambda x, m: ops.gif_encode(x, mode, bits, salient_mask=m, **kw), x, mask)
    assert_bits_equal(cpu, gpu)


def test_static_encode_cpu_equals_cuda():
    x = torch.randn(5, 70)
    scale, zero = torch.rand(5) + 0.05, torch.randint(-50, 50, (5,), dtype=torch.int32)
    for z in (zero, None):
        cpu, gpu = on_both(lambda x, s, z: ops.gif_encode(x, "static", 5, scale=s, zero=z),
                           x, scale, z)
        assert_bits_equal(cpu, gpu)


@pytest.mark.parametrize("mode, bits, kw", ENCODE_CASES)
def test_decode_counts_accumulate_cpu_equals_cuda(mode, bits, kw):
    K, N = 200, 45
    x = torch.randn(2, 5, K)
    enc = spikeops.Encoding(mode, bits, gamma=kw.get("gamma"),
                            salient_bits=kw.get("salient_bits"),
                            theta=(kw["theta_nor"], kw["theta_out"]) if mode == "oat" else None)
    mask = torch.rand(K) < 0.2 if "salient_bits" in kw else None
    w = torch.randint(-128, 128, (K, N), dtype=torch.int8)

    def consumers(x, m, w):
        st = spikeops.encode(x, enc, salient_mask=m)
        out = [st.decode(dt) for dt in (torch.float32, torch.float16, torch.bfloat16)]
        out += [st.counts(), st.stats()] + ([st.counts(negative=True)] if st.sign is not None else [])
        return out + [spikeops.spike_accumulate(st, w, pp) for pp in (False, True)]

    cpu, gpu = on_both(consumers, x, mask, w)
    assert_bits_equal(cpu, gpu)


@pytest.mark.parametrize("bits, group_size, act, sym, fmt, K", [
    (4, 128, False, True, "gptq", 4096), (4, 128, True, False, "gptq", 264),
    (2, 64, False, False, "gptq_v2", 200), (3, 32, True, True, "gptq", 128),
    (8, 48, False, False, "gptq_v2", 100), (8, -1, True, True, "gptq", 4096 + 32)])
@pytest.mark.parametrize("M", [1, 3, 16, 70])
@pytest.mark.parametrize("enc", [spikeops.Encoding("minmax", 4),
                                 spikeops.Encoding("absmax", 4, gamma=0.5),
                                 spikeops.Encoding("oat", 8, theta=(0.8, 2.5)),
                                 spikeops.Encoding("minmax", 16)],
                         ids=["minmax4", "absmax4", "oat8", "minmax16"])
def test_spike_linear_and_dequantize_cpu_equals_cuda(bits, group_size, act, sym, fmt, K, M, enc):
    """Same integers and the same epilogue order on both devices: identical bits, for both
    backends and every out dtype."""
    w_cpu = make_layer(K, 130, bits, group_size, act, sym, fmt)[0]
    w_gpu = make_layer(K, 130, bits, group_size, act, sym, fmt, device="cuda")[0]
    assert torch.equal(w_cpu.dequantize(), w_gpu.dequantize().cpu())
    x = torch.randn(M, K)
    bias = torch.randn(130)
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        y_cpu = spikeops.spike_linear(spikeops.encode(x, enc), w_cpu, bias.to(out_dtype),
                                      out_dtype)
        st = spikeops.encode(x.cuda(), enc)
        ys = [spikeops.spike_linear(st, w_gpu, bias.to(out_dtype).cuda(), out_dtype, backend=b)
              for b in ("int", "spike", "auto")]
        for y in ys:
            assert torch.equal(y.cpu(), y_cpu)


@pytest.mark.parametrize("bits, group_size, K, N", [
    (4, 128, 4096, 11008 // 8), (4, 64, 200, 196), (2, 32, 320, 100), (2, 128, 384 + 64, 260)])
@pytest.mark.parametrize("M", [64, 130])
@pytest.mark.parametrize("enc", [spikeops.Encoding("minmax", 4), spikeops.Encoding("minmax", 8),
                                 spikeops.Encoding("absmax", 8, gamma=0.7),
                                 spikeops.Encoding("absmean", 3),
                                 spikeops.Encoding("minmax", 4, salient_bits=8),
                                 spikeops.Encoding("oat", 4, theta=(0.8, 2.5)),
                                 spikeops.Encoding("minmax", 12)],
                         ids=["minmax4", "minmax8", "absmax8", "absmean3", "minmax4+s8", "oat4",
                              "minmax12"])
def test_spike_linear_prefill_cpu_equals_cuda(bits, group_size, K, N, M, enc):
    """Prefill shapes (M >= 64, N % 4 == 0, several groups, ragged M, N and K): one range with
    codes that fit int8 takes the tensor-core kernel (csrc/cuda/linear_mma.cu), two ranges
    (salient, oat) and wide codes (minmax12) the CUDA-core kernel; every one equals the CPU."""
    mask = torch.rand(K) < 0.1 if enc.salient_bits else None
    w_cpu = make_layer(K, N, bits, group_size, sym=False, seed=K)[0]
    w_gpu = make_layer(K, N, bits, group_size, sym=False, seed=K, device="cuda")[0]
    x = torch.randn(M, K) * 2
    bias = torch.randn(N)
    st_cpu = spikeops.encode(x, enc, salient_mask=mask)
    st = spikeops.encode(x.cuda(), enc, salient_mask=None if mask is None else mask.cuda())
    for out_dtype in (torch.float16, torch.bfloat16, torch.float32):
        y_cpu = spikeops.spike_linear(st_cpu, w_cpu, bias.to(out_dtype), out_dtype)
        for backend in ("int", "auto"):
            y = spikeops.spike_linear(st, w_gpu, bias.to(out_dtype).cuda(), out_dtype,
                                      backend=backend)
            assert torch.equal(y.cpu(), y_cpu), (out_dtype, backend)


def test_spike_linear_prefill_zero_point_guard():
    """The tensor-core kernel turns a token whose zero point lies beyond 10^4 into NaN and
    leaves the others equal to the CPU's (csrc/cuda/launchers.h)."""
    w_cpu = make_layer(256, 128, 4, 64)[0]
    w_gpu = make_layer(256, 128, 4, 64, device="cuda")[0]
    st = spikeops.encode(torch.randn(70, 256), spikeops.Encoding("minmax", 4))
    bad_zero = st.zero.clone()
    bad_zero[1, 0] = 10001
    tail = [None, 4, w_cpu.kernel_group_size, w_cpu.zero_offset, torch.float32, "int"]
    y_cpu = ops.spike_linear(st.planes, st.sign, st.hi, st.scale, st.zero, *w_cpu.kernel_args(),
                             *tail)
    y = ops.spike_linear(st.planes.cuda(), None, None, st.scale.cuda(), bad_zero.cuda(),
                         *w_gpu.kernel_args(), *tail).cpu()
    assert y[1].isnan().all()
    rows = [m for m in range(70) if m != 1]
    assert torch.equal(y[rows], y_cpu[rows])


# Programmatic dependent launch (docs/performance.md, "GPU status"): on sm_90 and later the decode
# kernel (M <= 16, 4-bit uniform groups) may start while the kernel before it in the stream
# runs, and waits for it before it reads anything; SPIKEOPS_PDL=0 launches it as before. The
# cases below run both ways with that kernel right behind the encoder (SpikeLinear), behind
# another decode launch (ProjectionGroup) and behind kernels that are not encoders and write
# its inputs.
PDL_SWITCH = pytest.mark.parametrize("pdl", ["", "0"], ids=["pdl", "nopdl"])


@functools.lru_cache(maxsize=None)
def decode_layer(K, N, seed, device):
    """A 4-bit layer with groups of 128 and zero points, made once per test session (packing
    in Python takes seconds)."""
    return make_layer(K, N, 4, 128, sym=False, seed=seed, device=device)[0]


BACK_TO_BACK_ENCODINGS = {
    "minmax4": spikeops.Encoding("minmax", 4), "absmax4": spikeops.Encoding("absmax", 4, gamma=0.6),
    "oat8": spikeops.Encoding("oat", 8, theta=(0.8, 2.5)), "minmax8": spikeops.Encoding("minmax", 8),
    "minmax4g64": spikeops.Encoding("minmax", 4, group=64)}


@PDL_SWITCH
@pytest.mark.parametrize("enc_name", list(BACK_TO_BACK_ENCODINGS))
@pytest.mark.parametrize("M", range(1, 17))
def test_encode_then_decode_linear_back_to_back(M, enc_name, pdl, monkeypatch):
    """SpikeLinear.forward on CUDA (gif_encode, then spike_linear's decode kernel in the same
    stream) equals the CPU for every token count of the decode kernel, every token tile, signed,
    unsigned, 8-plane, two-range and grouped codes."""
    monkeypatch.setenv("SPIKEOPS_PDL", pdl)
    enc = BACK_TO_BACK_ENCODINGS[enc_name]
    K, N = 2112, 200  # 16.5 weight groups of 128, 33 activation groups of 64
    w_cpu, w_gpu = decode_layer(K, N, 0, "cpu"), decode_layer(K, N, 0, "cuda")
    x = (torch.randn(M, K) * 2).half()
    y_cpu = spikeops.SpikeLinear(w_cpu, enc)(x)
    y = spikeops.SpikeLinear(w_gpu, enc).cuda()(x.cuda())
    assert torch.equal(y.cpu(), y_cpu)


@PDL_SWITCH
@pytest.mark.parametrize("M", [1, 5, 16])
def test_projection_group_decode_launches_in_a_row(M, pdl, monkeypatch):
    """A ProjectionGroup encodes once and runs its members' decode kernels one behind the other:
    each equals its CPU projection."""
    monkeypatch.setenv("SPIKEOPS_PDL", pdl)
    enc, K = spikeops.Encoding("absmax", 4, gamma=0.6), 1024
    shapes = [(K, 256), (K, 64), (K, 64)]  # q, k, v of a small GQA layer

    def group_on(device):
        return ProjectionGroup([
            spikeops.SpikeLinear(decode_layer(k, n, i, device), enc)
            for i, (k, n) in enumerate(shapes)])

    x = torch.randn(M, K).half()
    for y, y_cpu in zip(group_on("cuda")(x.cuda()), group_on("cpu")(x)):
        assert torch.equal(y.cpu(), y_cpu)


@PDL_SWITCH
@pytest.mark.parametrize("written", ["planes", "zero", "qweight", "scales"])
def test_decode_linear_behind_a_kernel_that_writes_its_inputs(written, pdl, monkeypatch):
    """The kernel just before the decode kernel is not an encoder: an elementwise torch kernel
    that writes one of its inputs (activations or weights). The decode kernel reads nothing
    before that kernel has completed, so the outputs equal the CPU's."""
    monkeypatch.setenv("SPIKEOPS_PDL", pdl)
    K, N = 1024, 520
    w_cpu, w_gpu = decode_layer(K, N, 1, "cpu"), decode_layer(K, N, 1, "cuda")
    enc = spikeops.Encoding("minmax", 4)
    x = torch.randn(3, K)
    y_cpu = spikeops.spike_linear(spikeops.encode(x, enc), w_cpu, None, torch.float32)
    st = spikeops.encode(x.cuda(), enc)
    spikes = dict(planes=st.planes, zero=st.zero)
    weights = dict(zip(["qweight", "qzeros", "scales", "g_idx", "packed", "code_sums"],
                       w_gpu.kernel_args()))
    inputs = spikes if written in spikes else weights
    target = torch.full_like(inputs[written], 7)  # wrong values until the kernel below runs
    torch.add(inputs[written], 0, out=target)     # the kernel right before spike_linear
    inputs[written] = target
    y = ops.spike_linear(spikes["planes"], None, None, st.scale, spikes["zero"],
                         *weights.values(), None, 4, w_gpu.kernel_group_size, w_gpu.zero_offset,
                         torch.float32, "auto")
    assert torch.equal(y.cpu(), y_cpu)


def test_cuda_graph_capture_of_spike_linear():
    w = make_layer(512, 256, 4, 128, device="cuda")[0]
    lin = spikeops.SpikeLinear(w, spikeops.Encoding("absmax", 4, gamma=0.7)).cuda()
    static_x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as capture requires
        lin(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = lin(static_x)
    for _ in range(3):
        x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, lin(x))


def test_compile_on_cuda_matches_eager():
    w = make_layer(256, 96, 4, 64, device="cuda")[0]
    lin = spikeops.SpikeLinear(w, spikeops.Encoding("minmax", 4))
    x = torch.randn(3, 256, device="cuda")
    assert torch.equal(torch.compile(lin, fullgraph=True)(x), lin(x))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 run on cuda:1 while cuda:0 is current."""
    w_cpu = make_layer(128, 40, 4, 32)[0]
    w1 = make_layer(128, 40, 4, 32, device="cuda:1")[0]
    x = torch.randn(2, 128)
    st = spikeops.encode(x.to("cuda:1"), spikeops.Encoding("minmax", 4))
    assert st.planes.device == torch.device("cuda:1")
    y = spikeops.spike_linear(st, w1)
    assert y.device == torch.device("cuda:1")
    assert torch.equal(y.cpu(), spikeops.spike_linear(spikeops.encode(x, spikeops.Encoding(
        "minmax", 4)), w_cpu))


def test_guards_for_device_values():
    """The CUDA host does not read tensor values; the kernels turn invalid ones into NaN
    instead of reading out of bounds (csrc/cuda/launchers.h)."""
    w = make_layer(64, 32, 4, 32, device="cuda")[0]
    st = spikeops.encode(torch.randn(2, 64, device="cuda"), spikeops.Encoding("minmax", 4))
    bad_g_idx = w.g_idx.clone()
    bad_g_idx[5] = 1000
    # group_size 0: an act-order layout, whose g_idx the kernels read.
    y = ops.spike_linear(st.planes, st.sign, st.hi, st.scale, st.zero, w.qweight, w.qzeros,
                         w.scales, bad_g_idx, None, None, None, 4, 0, w.zero_offset,
                         torch.float32, "auto")
    assert y.isnan().all()
    W = ops.gptq_dequantize(w.qweight, w.qzeros, w.scales, bad_g_idx, None, 4, 0, w.zero_offset)
    assert W[:, 5].isnan().all() and not W[:, :5].isnan().any()
    bad_zero = st.zero.clone()
    bad_zero[1, 0] = 1 << 20
    y = ops.spike_linear(st.planes, st.sign, st.hi, st.scale, bad_zero, *w.kernel_args(), None,
                         4, w.kernel_group_size, w.zero_offset, torch.float32, "auto")
    assert y[1].isnan().all() and not y[0].isnan().any()
    x = torch.randn(3, 40, device="cuda")
    planes, sign, *_ , scale, zero = ops.gif_encode(
        x, "static", 4, scale=torch.tensor([0.1, -1.0, float("inf")], device="cuda"),
        zero=torch.zeros(3, dtype=torch.int32, device="cuda"))
    assert scale[1:].isnan().all() and not scale[0].isnan().any()
    torch.cuda.synchronize()
