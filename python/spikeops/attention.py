"""Attention on spikes: ``spike_matmul``, the exact spike x spike product of two SpikeTensors
per head (docs/ops.md, spike_matmul)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks, ops
from .spikes import SpikeTensor

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_heads(fn: str, name: str, st) -> None:
    if not isinstance(st, SpikeTensor):
        raise TypeError(f"{fn}: {name} must be a spikeops.SpikeTensor, got {type(st).__name__}")
    if len(st.shape) != 4:
        raise ValueError(f"{fn}: {name} must be spikes of a [batch, heads, tokens, K] tensor, "
                         f"got shape {list(st.shape)}")


def spike_matmul(a: SpikeTensor, b: SpikeTensor, keys: Optional[int] = None,
                 causal: bool = False, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``A_hat @ B_hat^T`` per head, float ``[batch, heads, Ma, keys]``.

    a: spikes of ``[batch, heads, Ma, K]`` (queries); b: spikes of ``[batch, kv_heads, Lb, K]``
    (keys), ``heads`` a multiple of ``kv_heads`` (grouped-query: head h reads kv head
    ``h // (heads // kv_heads)``). Any encodings: signed or unsigned, one or two ranges.
    keys: the first ``keys`` rows of every kv head are read (a preallocated cache); None: all.
    causal: key j of query i is ``-inf`` where ``j > keys - Ma + i`` (the queries are the
    last Ma positions), so that a softmax can follow.
    The integer sums are exact; the one rounding is docs/ops.md's epilogue.
    """
    fn = "spike_matmul"
    _check_heads(fn, "a", a)
    _check_heads(fn, "b", b)
    batch, heads, _, K = a.shape
    if b.shape[0] != batch or b.shape[3] != K:
        raise ValueError(f"{fn}: b must have shape [batch, kv_heads, Lb, K] = [{batch}, "
                         f"kv_heads, Lb, {K}] (a's batch and K), got {list(b.shape)}")
    kv_heads, Lb = b.shape[1], b.shape[2]
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"{fn}: a's heads ({heads}) must be a multiple of b's kv_heads "
                         f"({kv_heads})")
    keys = Lb if keys is None else _checks.integer(fn, "keys", keys, 0, Lb)
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be a bool, got {type(causal).__name__}")
    _checks.dtype(fn, "out_dtype", out_dtype, OUT_DTYPES)
    return ops.spike_matmul(a.planes, a.sign, a.hi, a.scale, a.zero, b.planes, b.sign, b.hi,
                            b.scale, b.zero, K, batch, heads, kv_heads, keys, causal, out_dtype)


class SpikeCache:
    """A preallocated bit-plane cache of one layer's keys or values: ``batch x kv_heads`` rows
    of ``max_len`` tokens of ``head_dim`` channels, each token and head encoded once, when
    written, under ``enc`` (a signed encoding: absmax). ``spikes()`` is the SpikeTensor of
    ``[batch, kv_heads, max_len, head_dim]`` (rows past the written length hold silent
    tokens), which ``spike_matmul(..., keys=length)`` reads in place."""

    def __init__(self, enc, batch: int, kv_heads: int, max_len: int, head_dim: int, device):
        self.enc, self.shape = enc, (batch, kv_heads, max_len, head_dim)
        P, W, rows = enc.bits - 1, (head_dim + 31) // 32, batch * kv_heads * max_len
        i32 = dict(dtype=torch.int32, device=device)
        self.planes = torch.zeros(P, rows, W, **i32)
        self.sign = torch.zeros(rows, W, **i32)
        self.scale = torch.ones(rows, 1, dtype=torch.float32, device=device)

    def write(self, x: torch.Tensor, start: int) -> None:
        """Encode ``x [batch, kv_heads, T, head_dim]`` as tokens ``start .. start + T``."""
        from .spikes import encode
        B, H, L, D = self.shape
        T = x.shape[2]
        st = encode(x, self.enc)
        self.planes.view(-1, B, H, L, self.planes.shape[-1])[:, :, :, start:start + T] = \
            st.planes.view(-1, B, H, T, self.planes.shape[-1])
        self.sign.view(B, H, L, -1)[:, :, start:start + T] = st.sign.view(B, H, T, -1)
        self.scale.view(B, H, L)[:, :, start:start + T] = st.scale.view(B, H, T)

    def spikes(self) -> SpikeTensor:
        return SpikeTensor(self.planes, self.sign, None, self.scale, None, self.shape)

    def decode(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``length`` tokens decoded, ``[batch, kv_heads, length, head_dim]``."""
        B, H, L, D = self.shape
        W = self.planes.shape[-1]
        rows = B * H * length
        st = SpikeTensor(self.planes.view(-1, B, H, L, W)[:, :, :, :length].reshape(-1, rows, W),
                         self.sign.view(B, H, L, W)[:, :, :length].reshape(rows, W), None,
                         self.scale.view(B, H, L)[:, :, :length].reshape(rows, 1), None,
                         (B, H, length, D))
        return st.decode(dtype)

    def bytes_per_token(self) -> int:
        """Bytes one token takes in this cache (all heads of all rows of the batch)."""
        B, H, _, _ = self.shape
        W = self.planes.shape[-1]
        return B * H * ((self.planes.shape[0] + 1) * W * 4 + 4)


# Runner's key-value caches: float, or absmax spikes of 4 or 8 bits (the sign included).
KV_MODES = ("float", "spike4", "spike8")


class SpikeKV:
    """One decoder layer's bit-plane key-value cache (``Runner(kv="spike4" | "spike8")``):
    keys after the rotary embedding and values, each token and kv head encoded once, when
    written (absmax, one scale per token and head). ``rotate``: keys, values and queries are
    multiplied by the orthonormal Hadamard matrix H of order head_dim first (``(qH)(kH)^T =
    qk^T``, and the attention output is multiplied by ``H^T``), which spreads a head's outlier
    channels over all of them before the 4-bit code (README, "Attention on spikes", has the
    measurement)."""

    def __init__(self, fn: str, kv: str, rotate: bool, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device):
        from .spikes import Encoding
        from .transforms import hadamard
        if rotate and head_dim & (head_dim - 1):
            raise ValueError(f"{fn}: kv_rotate needs a power-of-two head_dim (a Hadamard "
                             f"matrix), got head_dim = {head_dim}; pass kv_rotate=False")
        enc = Encoding("absmax", int(kv[len("spike"):]))
        self.rotation = hadamard(head_dim).to(device=device, dtype=dtype) if rotate else None
        self.keys, self.values = (SpikeCache(enc, batch, kv_heads, max_len, head_dim, device)
                                  for _ in range(2))

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else x @ self.rotation

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Encode keys and values ``[batch, kv_heads, T, head_dim]`` at ``start``."""
        self.keys.write(self._rotate(k), start)
        self.values.write(self._rotate(v), start)

    def attend(self, q: torch.Tensor, end: int, mask: Optional[torch.Tensor],
               scaling: float) -> torch.Tensor:
        """Attention of ``q [batch, heads, T, head_dim]`` over the first ``end`` cached tokens
        (``mask``: Runner's boolean mask ``[batch or 1, 1, T, end]``, or None: every key)."""
        heads, kv_heads = q.shape[1], self.keys.shape[1]
        keys = self.keys.decode(end, q.dtype)
        values = self.values.decode(end, q.dtype)
        a = F.scaled_dot_product_attention(self._rotate(q), keys, values, attn_mask=mask,
                                           scale=scaling, enable_gqa=heads != kv_heads)
        return a if self.rotation is None else a @ self.rotation.T

    def bytes_per_token(self) -> int:
        return self.keys.bytes_per_token() + self.values.bytes_per_token()
