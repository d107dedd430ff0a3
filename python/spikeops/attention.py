"""Attention on spikes: ``spike_matmul``, the exact spike x spike product of two SpikeTensors
per head (docs/ops.md, spike_matmul)."""

from __future__ import annotations

from typing import Optional

import torch

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
