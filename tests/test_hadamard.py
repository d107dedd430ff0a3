"""The hadamard op (docs/ops.md, hadamard): bit for bit the float64 butterfly sum rounded once,
equal to an independent float64 product with H_n for realistic inputs, the reference on any
input, its scale as torch's ``y * scale``, its edge cases and refusals, and its gradient."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.library import opcheck

from spikeops import reference
from spikeops.ops import hadamard

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ORDERS = [2**k for k in range(11)]  # 1 .. 1024


def sylvester(n: int) -> torch.Tensor:
    """The +-1 H_n from its entries, (-1)^popcount(i & j), float64."""
    i = torch.arange(n)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).double()


def exact_round(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 -> dtype rounded once, by means other than the op's and the reference's: numpy's
    direct float64 -> float16 conversion, torch's float64 -> float32 one, and for bfloat16 the
    nearest of the two bfloat16 neighbours compared as exact fractions (finite values)."""
    if dtype == torch.float32:
        return v.float()
    if dtype == torch.float16:
        return torch.from_numpy(v.numpy().astype(np.float16))
    out = []
    for d in v.flatten().tolist():
        # truncation toward zero commutes, so float32 then bfloat16 truncation is exact
        t = torch.tensor([d]).float().view(torch.int32) & ~0xFFFF
        lo = t.view(torch.float32).item()
        if lo == d:
            out.append(lo)
            continue
        step = torch.tensor([1 << 16], dtype=torch.int32)
        hi = (t + step).view(torch.float32).item()  # the next bfloat16 away from zero
        dl, dh = abs(Fraction(d) - Fraction(lo)), abs(Fraction(hi) - Fraction(d))
        even_lo = (int(t.item()) >> 16) % 2 == 0
        out.append(lo if dl < dh or (dl == dh and even_lo) else hi)
    return torch.tensor(out, dtype=torch.float32).reshape(v.shape).bfloat16()


def product(x: torch.Tensor, n: int) -> torch.Tensor:
    """x @ H_n per block of n, float64: exact for these inputs (few significant bits apart)."""
    blocks = x.double().reshape(*x.shape[:-1], -1, n)
    return (blocks @ sylvester(n)).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ORDERS)
def test_equals_the_rounded_float64_product(device, dtype, n):
    x = (torch.randn(3, 2, 3 * n) * 3).to(dtype)
    want = exact_round(product(x, n), dtype)
    got = hadamard(x.to(device), n).cpu()
    assert torch.equal(got, want)
    assert torch.equal(got, reference.hadamard(x, n))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("n", [1, 4, 64, 512])
def test_any_input_equals_the_reference(device, dtype, n):
    """Values over 60 binades, zeros of both signs, infinities and NaN: the float64 sums are
    inexact or overflow the dtype here, and the op still gives the reference's bits."""
    x = torch.randn(4, 2 * n, dtype=torch.float64) * 2.0 ** torch.randint(-30, 30, (4, 2 * n))
    x[0, :3] = torch.tensor([0.0, -0.0, 1e5])[: min(3, 2 * n)]
    if n >= 4:
        x[1, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    x = x.to(dtype)
    for scale in (1.0, 1 / math.sqrt(n), 0.3):
        got = hadamard(x.to(device), n, scale).cpu()
        assert torch.equal(got.isnan(), reference.hadamard(x, n, scale).isnan())
        assert torch.equal(got.nan_to_num(0.0), reference.hadamard(x, n, scale).nan_to_num(0.0))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_scale_is_torchs_multiply(device, dtype):
    """hadamard(x, n, s) == hadamard(x, n) * s, the torch op, bit for bit (the rotation's
    1/sqrt(n) at n = 512, which is not a power of two, and other scales)."""
    x = torch.randn(7, 1536, device=device).to(dtype)
    for scale in (1 / math.sqrt(512), 0.1, 3.0, -2.5e-3):
        assert torch.equal(hadamard(x, 512, scale), hadamard(x, 512) * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rounds_once(device, dtype):
    """A sum just past a midpoint of the 16-bit grid: float64 -> float32 -> 16 bits lands on the
    midpoint and rounds to even (down); one rounding goes up."""
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    tiny = 2.0**-24 if dtype == torch.float16 else 2.0**-30
    x = torch.tensor([[1.0, ulp / 2, tiny, 0.0]], dtype=dtype)
    y = hadamard(x.to(device), 4).cpu()
    assert y[0, 0].item() == 1.0 + ulp  # 1 + ulp/2 + tiny
    assert (torch.tensor(1.0 + ulp / 2 + tiny, dtype=torch.float64).to(dtype).item() == 1.0)
    # and around overflow: exactly halfway past the largest value rounds to infinity (even)
    big = torch.finfo(dtype).max
    past = 2.0 ** (math.floor(math.log2(big)) + 1)
    v = torch.tensor([big, (big + past) / 2, (big + past) / 2 - 2.0**-30 * big, -past],
                     dtype=torch.float64)
    assert reference.round_once(v, dtype).tolist() == [big, math.inf, big, -math.inf]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_rounding_is_exact(dtype):
    """reference.round_once against exact rounding, on values near the midpoints."""
    base = torch.randn(2000, dtype=torch.float64) * 100
    grid = base.to(dtype).double()
    up = torch.nextafter(base.to(dtype), torch.tensor(math.inf, dtype=dtype)).double()
    mid = (grid + up) / 2
    jitter = torch.randint(-2, 3, mid.shape).double() * mid.abs() * 2.0**-40
    v = torch.cat([mid, mid + jitter, base])
    assert torch.equal(reference.round_once(v, dtype), exact_round(v, dtype))


@pytest.mark.parametrize("shape,n", [((0, 512), 512), ((4, 0), 8), ((2, 0, 16), 16)])
def test_empty(device, shape, n):
    x = torch.empty(shape, device=device)
    y = hadamard(x, n)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_non_contiguous(device):
    x = torch.randn(64, 40, device=device)
    for view in (x.t(), x[:, ::2], x.t()[1::3]):
        assert not view.is_contiguous()
        assert torch.equal(hadamard(view, 4, 0.5), hadamard(view.contiguous(), 4, 0.5))


def test_threads_give_the_same_bits():
    """A prefill-sized call splits over threads; the bits do not depend on it."""
    x = torch.randn(300, 1536)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hadamard(x, 512, 1 / math.sqrt(512))
        torch.set_num_threads(max(2, threads))
        assert torch.equal(hadamard(x, 512, 1 / math.sqrt(512)), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, reference.hadamard(x, 512, 1 / math.sqrt(512)))


def test_refuses(device):
    x = torch.randn(2, 12, device=device)
    for n in (0, -4, 3, 6):
        with pytest.raises(ValueError, match=f"n must be a power of two >= 1, got {n}"):
            hadamard(x, n)
    with pytest.raises(ValueError, match="last dimension must be a multiple of n = 8"):
        hadamard(x, 8)
    with pytest.raises(ValueError, match="last dimension"):
        hadamard(torch.tensor(1.0, device=device), 1)
    with pytest.raises(TypeError, match="x must be a float32, float16, bfloat16 or float64 "
                                        "tensor, got torch.int32"):
        hadamard(x.int(), 4)
    with pytest.raises(ValueError, match="scale must be finite"):
        hadamard(x, 4, math.inf)
    with pytest.raises(ValueError, match="scale must be finite"):
        hadamard(x, 4, 1e39)  # beyond float32


def test_gradient(device):
    """H_n is symmetric: x's gradient is the op on the output's gradient, which is the float64
    product within rounding."""
    x = torch.randn(3, 1536, device=device, requires_grad=True)
    g = torch.randn(3, 1536, device=device)
    s = 1 / math.sqrt(512)
    hadamard(x, 512, s).backward(g)
    assert torch.equal(x.grad, hadamard(g, 512, s))
    torch.testing.assert_close(x.grad.cpu().double(), product(g.cpu(), 512) * s)
    with torch.no_grad():
        assert not hadamard(x, 512).requires_grad


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("shape,n,scale", [((5, 48), 16, 1.0), ((2, 3, 1536), 512, 0.044),
                                           ((0, 8), 8, 1.0), ((6,), 1, 2.0)])
def test_opcheck(device, dtype, shape, n, scale):
    opcheck(torch.ops.spikeops.hadamard, (torch.randn(shape, device=device).to(dtype), n, scale))
