"""Test helpers: whether CUDA cases can run, builders of GPTQ layers written from
docs/checkpoints.md alone (a packer independent of ``spikeops.pack``), the tolerance check of
docs/ops.md and the text of the tiny model."""

from __future__ import annotations

import torch

import spikeops
from spikeops import reference

CUDA_REASON = "no CUDA device (or spikeops built without CUDA): CUDA case not run"


def cuda_ready() -> bool:
    """A GPU is visible and spikeops was built with its CUDA kernels."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "spikeops::spike_linear", "CUDA")


def pack_loops(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [count, C]`` along dim 0 the slow way: code i occupies bits
    ``[bits*i, bits*i + bits)`` of the word stream, lowest bits first (docs/checkpoints.md)."""
    count, C = codes.shape
    words = (count * bits + 31) // 32
    out = [[0] * C for _ in range(words)]
    for i in range(count):
        for c in range(C):
            v = int(codes[i, c]) & ((1 << bits) - 1)
            for b in range(bits):
                pos = bits * i + b
                if (v >> b) & 1:
                    out[pos // 32][c] |= 1 << (pos % 32)
    flat = [[w - (1 << 32) if w >= 1 << 31 else w for w in row] for row in out]
    return torch.tensor(flat, dtype=torch.int32).reshape(words, C)


def make_layer(K: int, N: int, bits: int, group_size: int, act_order: bool = False,
               sym: bool = True, fmt: str = "gptq", seed: int = 0, device="cpu"):
    """A random GPTQ layer: (GPTQWeight, q int64 [K, N], z int64 [G, N], scales fp16 [G, N],
    g_idx int64 [K]). v1 files store z - 1; sym layers use z = 2^(bits-1)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    q = torch.randint(0, maxq + 1, (K, N), generator=gen)
    if sym:
        z = torch.full((G, N), 1 << (bits - 1))
    else:
        z = torch.randint(1, maxq + 1, (G, N), generator=gen)  # 1..maxq: v1 stores z - 1 >= 0
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(K) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    stored = z - 1 if fmt == "gptq" else z
    w = spikeops.GPTQWeight(pack_loops(q, bits).to(device), pack_loops(stored.t(), bits).t()
                            .contiguous().to(device), scales.to(device),
                            g_idx.to(torch.int32).to(device) if act_order else None, bits=bits,
                            group_size=group_size, sym=sym, checkpoint_format=fmt, in_features=K)
    return w, q, z, scales, g_idx


def kernel_args(w: spikeops.GPTQWeight) -> dict:
    """The weight arguments of ops.spike_linear and reference.spike_linear for ``w``."""
    names = ("qweight", "qzeros", "scales", "g_idx", "packed", "code_sums")
    return dict(zip(names, w.kernel_args()), bits=w.kernel_bits,
                group_size=w.kernel_group_size, zero_offset=w.zero_offset)


def exact_weight(q, z, scales, g_idx) -> torch.Tensor:
    """W_hat [K, N] in float64 with no rounding: scale * (q - z)."""
    return scales.double()[g_idx] * (q - z[g_idx]).double()


def assert_within_spec(y: torch.Tensor, x_hat: torch.Tensor, W: torch.Tensor, bias=None):
    """Within reference.tolerance (docs/ops.md) of the float64 result of x_hat and W [K, N]."""
    x64 = x_hat.double().reshape(-1, W.shape[0]).cpu()
    ref = x64 @ W
    if bias is not None:
        ref = ref + bias.double().cpu()
    bound = reference.tolerance(x64, W, ref, y.dtype)
    err = (y.double().reshape(ref.shape).cpu() - ref).abs()
    finite = torch.isfinite(ref)
    worst = (err - bound)[finite].max() if finite.any() else torch.tensor(0.0)
    assert bool((err[finite] <= bound[finite]).all()), (
        f"max error {err[finite].max():.3e}, worst excess over the bound {worst:.3e}")


# Python source, the text of the tiny model of conftest.py.
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(120))


def tiny_batches():
    """Two one-sequence batches of 128 token ids of TEXT (byte-level)."""
    from spikeops.evaluate import encode_text
    return encode_text(TEXT)[:256].reshape(2, 128).split(1)
