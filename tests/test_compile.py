"""``torch.compile(fullgraph=True)`` traces the ops through their fake kernels and the Python
layer without graph breaks, and the compiled code gives the eager bits exactly."""

import pytest
import torch

import spikeops
from spikeops import Encoding, GPTQWeight, SpikeLinear

K, N, GS = 72, 40, 32   # W = 3 words (the last one partial), G = 3 groups, N not a multiple of 8

ENCODINGS = {
    "minmax4": (Encoding("minmax", 4), False),
    "absmax4-gamma": (Encoding("absmax", 4, gamma=0.6), False),
    "salient-minmax": (Encoding("minmax", 4, salient_bits=8), True),
    "oat": (Encoding("oat", 8, theta=(0.5, 2.5)), False),
}
SHAPES = [(1, K), (3, 5, K)]
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gptq_weight(device, bits=4):
    """A v1 GPTQ layer: codes packed along K (qweight) and N (qzeros); the stored zeros are the
    true zeros minus 1."""
    G = -(-K // GS)
    q = torch.randint(0, 2**bits, (K, N), device=device)
    true_zero = torch.randint(1, 2**bits, (G, N), device=device)
    scales = (torch.rand(G, N, device=device) / 16 + 0.01).half()
    return GPTQWeight(spikeops.pack(q, bits, 0), spikeops.pack(true_zero - 1, bits, 1), scales,
                      bits=bits, group_size=GS, sym=False, checkpoint_format="gptq")


def layer(name, device, bias=True):
    enc, salient = ENCODINGS[name]
    mask = (torch.arange(K, device=device) % 9 == 4) if salient else None
    b = torch.randn(N, device=device).half() if bias else None
    return SpikeLinear(gptq_weight(device), enc, bias=b, salient_mask=mask).to(device)


def dtype_id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(ENCODINGS))
def test_spike_linear_module(device, name, shape, dtype):
    lin = layer(name, device)
    x = (torch.randn(shape, device=device) * 3).to(dtype)
    eager = lin(x)
    compiled = torch.compile(lin, fullgraph=True)(x)
    assert compiled.dtype == dtype and compiled.shape == (*shape[:-1], N)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("dynamic", [None, True], ids=["default", "dynamic"])
@pytest.mark.parametrize("name", ["absmax4-gamma", "salient-minmax"])
def test_spike_linear_module_new_shapes(device, name, dynamic):
    """One compiled module called on several token counts (recompiles, or symbolic shapes in the
    fake kernels) stays exact for every call."""
    lin = layer(name, device, bias=False)
    compiled = torch.compile(lin, fullgraph=True, dynamic=dynamic)
    for shape in [(2, K), (7, K), (2, 3, K), (1, K)]:
        x = torch.randn(shape, device=device)
        assert torch.equal(compiled(x), lin(x))


@pytest.mark.parametrize("backend", ["spike", "int"])
@pytest.mark.parametrize("name", ["minmax4", "oat"])
def test_encode_linear_decode_function(device, name, backend):
    enc, _ = ENCODINGS[name]
    w = gptq_weight(device)
    bias = torch.randn(N, device=device)

    def f(x):
        st = spikeops.encode(x, enc)
        y = spikeops.spike_linear(st, w, bias=bias, out_dtype=torch.float32, backend=backend)
        return y, st.decode(torch.float16), st.counts(), st.stats()

    x = torch.randn(3, 5, K, device=device)
    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)(x)
    assert compiled[0].shape == (3, 5, N) and compiled[1].shape == (3, 5, K)
    for c, e in zip(compiled, eager):
        assert c.dtype == e.dtype and torch.equal(c, e)


def test_loaded_model_runs_every_way_users_run_it(model):
    """A loaded model (q/k/v and gate/up sharing their spikes) gives the same logits plainly,
    under no_grad, under inference_mode (whose tensors have no version counter) and compiled."""
    ids = torch.randint(0, 256, (2, 9))
    plain = model(input_ids=ids).logits
    # A shorter input against its own plain run: torch's float attention need not give a
    # prefix the same last bits at another length (it does not on AVX2-only CPUs).
    short = model(input_ids=ids[:, :4]).logits
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain)
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, plain)
        assert torch.equal(model(input_ids=ids[:, :4]).logits, short)
    with torch.no_grad():
        compiled = torch.compile(model)(input_ids=ids).logits
    torch.testing.assert_close(compiled, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_spike_matmul(device, causal):
    from spikeops.attention import spike_matmul

    def attention_scores(q, k):
        a = spikeops.encode(q, Encoding("absmax", 4))
        b = spikeops.encode(k, Encoding("absmax", 8))
        return spike_matmul(a, b, keys=k.shape[2] - 1, causal=causal)

    q = torch.randn(1, 4, 3, 64, device=device)
    k = torch.randn(1, 2, 8, 64, device=device)
    eager = attention_scores(q, k)
    compiled = torch.compile(attention_scores, fullgraph=True)(q, k)
    assert torch.equal(compiled, eager)
