"""Attention on spikes: ``spike_matmul``, the exact spike x spike product of two SpikeTensors
per head (docs/ops.md, spike_matmul), and the bit-plane key-value cache of ``Runner(kv=...)``
(``SpikeCache`` per tensor, ``SpikeKV`` per decoder layer; README, "Attention on spikes")."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _C, _checks, ops
from .spikes import Encoding, SpikeTensor, clip_gamma, encode, encode_rows

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
        # The fields this encoding has (sign: signed codes; zero: unsigned ones), from encode
        # itself: the rule of which fields exist has one definition.
        probe = encode(torch.zeros(1, head_dim, device=device), enc)
        P, W, rows = probe.planes.shape[0], (head_dim + 31) // 32, batch * kv_heads * max_len
        i32 = dict(dtype=torch.int32, device=device)
        self.planes = torch.zeros(P, rows, W, **i32)
        self.sign = None if probe.sign is None else torch.zeros(rows, W, **i32)
        self.scale = torch.ones(rows, 1, dtype=torch.float32, device=device)
        self.zero = None if probe.zero is None else torch.zeros(rows, 1, **i32)
        # The fields with the token as a dimension, [planes,] batch, kv_heads, max_len, words:
        # (planes, sign, scale, zero), None where the encoding has none.
        self._by_token = (self.planes.view(P, batch, kv_heads, max_len, W),) + tuple(
            None if t is None else t.view(batch, kv_heads, max_len, t.shape[-1])
            for t in (self.sign, self.scale, self.zero))

    def write(self, x: torch.Tensor, start: int,
              feedback: Optional[torch.Tensor] = None) -> None:
        """Encode ``x [batch, kv_heads, T, head_dim]`` as tokens ``start .. start + T``;
        ``feedback`` (float32 ``[batch * kv_heads, head_dim, head_dim]``, a minmax cache):
        the codes of row (b, h) are ``ops.feedback_encode``'s with matrix ``b * kv_heads + h``
        (SpikeKV.key_feedback), None: gif_encode's."""
        B, H, _, D = self.shape
        T = x.shape[2]
        # The op's fields of the rows (batch, kv head, token), straight into their slots: the
        # cache's encoding was checked when the Runner was made (a decode step's write is a few
        # small copies, docs/performance.md, "Attention on spikes on the CPU").
        if feedback is None:
            planes, sign, _, scale, zero = encode_rows(x.reshape(-1, D), self.enc)
        else:
            planes, scale, zero = ops.feedback_encode(x.reshape(B * H, T, D).float(), feedback,
                                                      self.enc.bits, clip_gamma(self.enc))
            sign = None
        for mine, new in zip(self._by_token, (planes, sign, scale, zero)):
            if mine is not None:
                mine.narrow(-2, start, T).copy_(new.view(mine.shape[:-2] + (T, -1)))

    def spikes(self) -> SpikeTensor:
        return SpikeTensor(self.planes, self.sign, None, self.scale, self.zero, self.shape)

    def fields(self, length: int):
        """(planes, sign, hi, scale, zero) of the first ``length`` tokens of every row,
        contiguous (sign or zero None where the encoding has none)."""
        B, H, L, _ = self.shape
        W = self.planes.shape[-1]
        rows = B * H * length

        def first(t):
            return None if t is None else \
                t.view(B, H, L, t.shape[-1])[:, :, :length].reshape(rows, t.shape[-1])
        return (self.planes.view(-1, B, H, L, W)[:, :, :, :length].reshape(-1, rows, W),
                first(self.sign), None, first(self.scale), first(self.zero))

    def decode(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``length`` tokens decoded, ``[batch, kv_heads, length, head_dim]``."""
        B, H, _, D = self.shape
        return SpikeTensor(*self.fields(length), (B, H, length, D)).decode(dtype)

    def bytes_per_token(self) -> int:
        """Bytes one token takes in this cache (all heads of all rows of the batch)."""
        B, H, _, _ = self.shape
        W = self.planes.shape[-1]
        words = self.planes.shape[0] + (self.sign is not None)
        return B * H * (words * W * 4 + 4 + 4 * (self.zero is not None))


class ValueCache:
    """A bit-plane cache of one layer's values, channel-major: the rows are ``(batch, kv head,
    channel d)`` and bit j of a row's words is token j, so that PV is ``spike_matmul`` of the
    probabilities (channels = tokens) and these rows, read in place, with no re-layout per step
    (docs/ops.md, spike_matmul). Each token and head is encoded once, when written, under ``enc``
    (absmax: one scale per token and head, kept beside the codes, preallocated); the codes ``s*Q``
    are stored as a static signed encoding with scale 1, exact for integers.

    The words are one tensor ``bits [planes + 1, rows, words]``, the sign last, as wide as the
    written tokens need (``planes``, ``sign``: views of it), so that ``spikes(length)`` of the
    written length is the tensor itself, not a copy of its first words: it is widened (copied)
    once every 32 tokens."""

    def __init__(self, enc, batch: int, kv_heads: int, max_len: int, head_dim: int, device):
        self.enc, self.shape = enc, (batch, kv_heads, max_len, head_dim)
        self.bits = torch.zeros(enc.bits, batch * kv_heads * head_dim, 0, dtype=torch.int32,
                                device=device)
        self.scale = torch.ones(batch * kv_heads, max_len, dtype=torch.float32, device=device)
        self.ones = torch.ones(batch * kv_heads * head_dim, 1, device=device)

    @property
    def planes(self) -> torch.Tensor:
        """int32 ``[bits - 1, rows, words]``: the magnitude planes."""
        return self.bits[:-1]

    @property
    def sign(self) -> torch.Tensor:
        """int32 ``[rows, words]``: the sign bits."""
        return self.bits[-1]

    def widen(self, tokens: int, start: int) -> None:
        """Make ``bits`` as wide as ``tokens`` tokens need, keeping the words of tokens before
        ``start``."""
        words = (tokens + 31) // 32
        if self.bits.shape[-1] != words:
            new = self.bits.new_zeros(*self.bits.shape[:2], words)
            keep = min(self.bits.shape[-1], words, (start + 31) // 32)
            new[:, :, :keep] = self.bits[:, :, :keep]
            self.bits = new

    def write(self, x: torch.Tensor, start: int) -> None:
        """Encode ``x [batch, kv_heads, T, head_dim]`` as tokens ``start .. start + T``: the
        words holding them are rewritten (``ops.channel_major_write``), the bits of earlier
        tokens kept, later ones cleared (so a word is clean once its first token is written:
        reads end at the written words)."""
        D = self.shape[3]
        T = x.shape[2]
        planes, sign, _, scale, _ = encode_rows(x.reshape(-1, D), self.enc)
        self.scale.narrow(1, start, T).copy_(scale.view(-1, T))
        self.widen(start + T, start)
        ops.channel_major_write(planes, sign, self.bits, D, start)

    def spikes(self, length: int) -> SpikeTensor:
        """The codes of the first ``length`` tokens, ``[batch, kv_heads, head_dim, length]``
        (scale 1; the per-token scales are ``token_scales``): the cache's own words when they
        are those of ``length`` tokens (the written length), else a copy of the first ones."""
        B, H, _, D = self.shape
        W = (length + 31) // 32
        bits = self.bits if self.bits.shape[-1] == W else self.bits[:, :, :W].contiguous()
        return SpikeTensor(bits[:-1], bits[-1], None, self.ones, None, (B, H, D, length))

    def token_scales(self, length: int) -> torch.Tensor:
        """float32 ``[batch, kv_heads, length]``: each token's and head's scale."""
        B, H, _, _ = self.shape
        return self.scale[:, :length].view(B, H, length)

    def decode(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``length`` tokens decoded, ``[batch, kv_heads, length, head_dim]``."""
        codes = self.spikes(length).decode(torch.float32).transpose(2, 3)
        return (codes * self.token_scales(length).unsqueeze(-1)).to(dtype)

    def bytes_per_token(self) -> int:
        """Bytes one token takes (all heads of all rows of the batch): a bit per plane, sign
        included, per channel, and a float32 scale per head."""
        B, H, _, D = self.shape
        return B * H * self.bits.shape[0] * D // 8 + B * H * 4


# Runner's key-value caches: float, or absmax spikes of 4 or 8 bits (the sign included), and
# the product of the attention probabilities with the spiking values (SpikeKV.attend).
KV_MODES = ("float", "spike4", "spike8")
PV_MODES = ("float", "spike")
# The key cache's encoding per cache width: minmax (asymmetric; SpikeKV), at 4 bits with the
# range clipped to 0.95 of each token's (the codes span [0.95 min, 0.95 max]; beyond it they
# saturate). Chosen by the mean KL divergence of the next-token distributions from kv=float's
# on three development texts (GPL-2, LGPL-2.1, GFDL-1.2: neither the calibration text nor the
# evaluation texts), float activations, which separates codings that perplexity ratios, one
# noisy draw each, cannot: with the keys' error feedback 0.85 / 0.9 / 0.95 / 0.97 / 1.0 gave
# 71.7 / 56.8 / 52.5 / 50.6 / 51.1 millinats per token, rounded alone 0.9 / 0.95 / 1.0 gave
# 96.0 / 87.8 / 93.4 (bench/results/kv-smollm2-amd-epyc-zen3.md, "The keys' error feedback";
# 0.9 was chosen before by perplexity on GPL-3). At 8 bits the range stays whole: spike8 was
# within 1.005x already, and no clip was measured there.
KEY_ENCODINGS = {4: Encoding("minmax", 4, gamma=0.95), 8: Encoding("minmax", 8)}
# Queries are encoded per token and head at 8 bits whatever the cache holds: they are not
# stored, and on SmolLM2 4-bit queries over a 4-bit cache cost 1.12x perplexity against 1.07x
# with 8-bit ones (README, "Attention on spikes").
QUERY_ENCODING = Encoding("absmax", 8)
# spikeops.track's counters of spiking QK^T, (model, fn(sops, macs)) pairs, both weakly held:
# every spiking QK^T of a Runner over the model reports its synaptic operations and the dense
# multiply-accumulates it replaced (SpikeKV.attend; docs/energy.md). Held per model and weakly,
# so that a tracker counts only its own model's attention, and one never exited (SpikeopsLM
# keeps its tracker for its life) goes with its model instead of counting, and slowing, every
# later Runner of the process.
_OBSERVERS: list = []


def observe(model: torch.nn.Module, fn) -> None:
    """Report every spiking QK^T of the Runners over ``model`` to the bound method ``fn(sops,
    macs)`` until ``unobserve(fn)`` or until ``fn``'s object or the model is collected."""
    _OBSERVERS.append((weakref.ref(model), weakref.WeakMethod(fn)))


def unobserve(fn) -> None:
    """Stop observe's reports to ``fn``."""
    _OBSERVERS[:] = [(m, f) for m, f in _OBSERVERS if f() is not None and f() != fn]


def observers(model: Optional[torch.nn.Module]) -> list:
    """The callbacks observing ``model``'s Runners (entries of collected objects dropped)."""
    if not _OBSERVERS or model is None:
        return []
    _OBSERVERS[:] = [(m, f) for m, f in _OBSERVERS if m() is not None and f() is not None]
    return [f() for m, f in _OBSERVERS if m() is model]


class SpikeKV:
    """One decoder layer's bit-plane key-value cache (``Runner(kv="spike4" | "spike8")``):
    keys after the rotary embedding and values, each token and kv head encoded once, when
    written (keys, less the key offset and divided by the key channel scale that the prompt
    sets, minmax under ``KEY_ENCODINGS``; values absmax; one scale per token and head).
    ``rotate``: keys, values and queries are multiplied by the orthonormal Hadamard matrix H of
    order head_dim first (``(qH)(kH)^T = qk^T``, and the attention output is multiplied by
    ``H^T``), which spreads a head's outlier channels over all of them before the 4-bit code
    (README, "Attention on spikes", has the measurement)."""

    def __init__(self, fn: str, kv: str, rotate: bool, pv: str, batch: int, kv_heads: int,
                 max_len: int, head_dim: int, dtype: torch.dtype, device,
                 model: Optional[torch.nn.Module] = None,
                 query_moment: Optional[torch.Tensor] = None):
        from .transforms import hadamard
        if rotate and head_dim & (head_dim - 1):
            raise ValueError(f"{fn}: kv_rotate needs a power-of-two head_dim (a Hadamard "
                             f"matrix), got head_dim = {head_dim}; pass kv_rotate=False")
        bits = int(kv[len("spike"):])
        self.pv = pv
        # The model whose trackers observe this cache's QK^T (observers), weakly: the Runner's.
        self._model = None if model is None else weakref.ref(model)
        self.rotation = hadamard(head_dim).to(device=device, dtype=dtype) if rotate else None
        # Keys asymmetric (minmax: a zero point per token and head; KEY_ENCODINGS), values
        # symmetric (absmax): on SmolLM2 minmax keys cost 1.008x perplexity against absmax's
        # 1.029x (both with the key offset), while minmax values were no better than absmax
        # (README, "Attention on spikes"); the zero point is 4 bytes per token and head, 0.297x
        # of float16 at 4 bits.
        self.keys = SpikeCache(KEY_ENCODINGS[bits], batch, kv_heads, max_len, head_dim, device)
        self.values = ValueCache(Encoding("absmax", bits), batch, kv_heads, max_len, head_dim,
                                 device)
        # The layer's query moment (float64 [kv_heads, head_dim, head_dim], the calibration's:
        # runner.query_moments), or None: the keys are then coded by gif_encode alone.
        if query_moment is not None and tuple(query_moment.shape) != \
                (kv_heads, head_dim, head_dim):
            raise ValueError(f"{fn}: a query moment must have shape [kv_heads, head_dim, "
                             f"head_dim] = [{kv_heads}, {head_dim}, {head_dim}], got "
                             f"{list(query_moment.shape)} (a calibration of another model?)")
        self.query_moment = None if query_moment is None else \
            query_moment.to(device=device, dtype=torch.float64)
        # Per row, kv head and channel, set by each sequence's prompt (_write): the key offset
        # and the key channel scale, the latter also per query head (query_scale, made by the
        # first attend after the prompt: the queries' heads are known there), and the keys'
        # error feedback (key_feedback, from the query moment and the key channel scale).
        self.key_offset = self.key_scale = self.query_scale = self.key_feedback = None

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rotation is None else x @ self.rotation

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, end: int,
             mask: Optional[torch.Tensor], scaling: float,
             pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``write(k, v, start, pad)``, then ``attend(q, end, mask, scaling)`` (the Runner's
        step). On the CPU the three rotations are one product (a row of the CPU's product is
        the same whatever rows share it; tests/test_runner.py checks the bits; on other
        devices, where that is not checked, the three products stay apart), and after the
        prompt the whole step is one C++ call (_direct_step): a decode step's operations are a
        few microseconds of work each, which Python's per-operation cost would double
        (docs/performance.md, "Attention on spikes on the CPU")."""
        if q.device.type != "cpu":
            self.write(k, v, start, pad)
            return self.attend(q, end, mask, scaling)
        a = self._direct_step(q, k, v, start, end, mask, scaling)
        if a is not None:
            return a
        if self.rotation is not None:
            heads, kv_heads = q.shape[1], k.shape[1]
            q, k, v = (torch.cat((q, k, v), 1) @ self.rotation).split(
                (heads, kv_heads, kv_heads), 1)
        self._write(k, v, start, pad)
        return self._attend(q, end, mask, scaling)

    def _direct_step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     end: int, mask: Optional[torch.Tensor],
                     scaling: float) -> Optional[torch.Tensor]:
        """step on the CPU as one call of the C++ step (``_C.direct_spike_kv_step``: the same
        operations, so the same bits; tests/test_runner.py compares them), or None where it
        does not apply: a prompt (start 0 sets the key offset and scale here), PV in float,
        statistics observing QK^T, a torch.compile trace, or what a direct call leaves to the
        dispatcher (csrc/direct.h)."""
        if start == 0 or self.pv != "spike" or self._observers() or \
                torch.compiler.is_compiling():
            return None
        keys, values = self.keys, self.values
        values.widen(start + k.shape[2], start)
        return _C.direct_spike_kv_step(
            q, k, v, self.rotation, start, end, scaling, mask, self.key_offset, self.key_scale,
            self._query_scale(q.shape[1]), keys.planes, keys.sign, keys.scale, keys.zero,
            keys.enc.mode, keys.enc.bits, clip_gamma(keys.enc), values.bits, values.scale,
            values.ones, values.enc.mode, values.enc.bits, clip_gamma(values.enc),
            QUERY_ENCODING.mode, QUERY_ENCODING.bits, clip_gamma(QUERY_ENCODING),
            self.key_feedback)

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int,
              pad: Optional[torch.Tensor] = None) -> None:
        """Encode keys and values ``[batch, kv_heads, T, head_dim]`` at ``start``; ``pad``
        (int64 ``[batch]`` or None): the left padding of each row, which the key offset
        leaves out."""
        self._write(self._rotate(k), self._rotate(v), start, pad)

    def _write(self, k: torch.Tensor, v: torch.Tensor, start: int,
               pad: Optional[torch.Tensor]) -> None:
        """write of keys and values rotated already."""
        # The key offset mu (per row, kv head and channel: the mean of the prompt's keys, set
        # when a sequence starts) is subtracted before the code: q.(k - mu) = q.k - q.mu, and
        # q.mu is the same for every key of a query, which the softmax cancels; the keys' own
        # range is what the 4-bit code then spans (1.10x -> 1.03x perplexity with absmax keys
        # on SmolLM2; README, "Attention on spikes").
        # Only the row's real tokens count, so that a row's codes do not depend on the padding
        # its batch needs.
        # The key channel scale lambda (per row, kv head and channel, from the same prompt
        # tokens): each channel of k - mu is divided by its largest magnitude over the prompt
        # and the queries' channels are multiplied by it, (q * lambda).((k - mu) / lambda) =
        # q.(k - mu), so the 4-bit code of a token spans channels of equal range instead of
        # the widest few (the queries' 8-bit code takes the spread; README, "Attention on
        # spikes", has the measurement). A channel's scale is at least 1/16 of the row's
        # widest, so that a channel nearly constant over a short prompt does not swamp later
        # tokens' codes; a prompt of one token (no range) gives 1.
        if start == 0:
            if pad is None:
                self.key_offset = k.mean(dim=2, keepdim=True)
                span = (k - self.key_offset).abs().amax(2, keepdim=True)
            else:
                real = (torch.arange(k.shape[2], device=k.device) >= pad.view(-1, 1))
                real = real.to(k.dtype).view(k.shape[0], 1, -1, 1)
                self.key_offset = (k * real).sum(2, keepdim=True) / real.sum(2, keepdim=True)
                span = ((k - self.key_offset) * real).abs().amax(2, keepdim=True)
            widest = span.amax(3, keepdim=True)
            self.key_scale = torch.where(widest > 0, torch.maximum(span, widest / 16),
                                         torch.ones_like(span))
            self.query_scale = None  # the next attend's, per query head
            self.key_feedback = None if self.query_moment is None else \
                key_feedback(self.query_moment, self.key_scale, self.rotation)
        self.keys.write((k - self.key_offset) / self.key_scale, start, self.key_feedback)
        self.values.write(v, start)

    def attend(self, q: torch.Tensor, end: int, mask: Optional[torch.Tensor],
               scaling: float) -> torch.Tensor:
        """Attention of ``q [batch, heads, T, head_dim]`` over the first ``end`` cached tokens
        (``mask``: Runner's boolean mask ``[batch or 1, 1, T, end]``, or None: every key).

        QK^T is ``spike_matmul`` of the queries, times the key channel scale and encoded per
        token and head (QUERY_ENCODING), and the key cache: exact integer sums, one float32
        rounding. The softmax is float32. PV (``self.pv``): "float" multiplies the
        probabilities by the decoded value cache in q's dtype; "spike" is spike x spike as well
        (``spike_pv``)."""
        return self._attend(self._rotate(q), end, mask, scaling)

    def _attend(self, q: torch.Tensor, end: int, mask: Optional[torch.Tensor],
                scaling: float) -> torch.Tensor:
        """attend of queries rotated already."""
        group = q.shape[1] // self.keys.shape[1]
        queries = encode(q * self._query_scale(q.shape[1]), QUERY_ENCODING)
        # spike_matmul's op without its argument checks: the shapes are the cache's own.
        B, H, _, D = queries.shape
        planes, sign, hi, scale, zero = self.keys.spikes()[:5]
        scores = ops.spike_matmul(queries.planes, queries.sign, queries.hi, queries.scale,
                                  queries.zero, planes, sign, hi, scale, zero, D, B, H,
                                  self.keys.shape[1], end, False, torch.float32) * scaling
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        fns = self._observers()
        if fns:
            sops, macs = self._qk_events(queries, end, mask)
            for fn in fns:
                fn(sops, macs)
        probs = torch.softmax(scores, dim=-1)
        if self.pv == "spike":
            a = self.spike_pv(probs, end)
        else:
            values = self.values.decode(end, q.dtype).repeat_interleave(group, dim=1)
            a = probs.to(q.dtype) @ values
        return a if self.rotation is None else a @ self.rotation.T

    def _observers(self) -> list:
        return observers(None if self._model is None else self._model())

    def _query_scale(self, heads: int) -> torch.Tensor:
        """The key channel scale per query head (made once after each prompt)."""
        if self.query_scale is None:
            group = heads // self.keys.shape[1]
            self.query_scale = self.key_scale.repeat_interleave(group, dim=1)
        return self.query_scale

    def _qk_events(self, queries: SpikeTensor, end: int, mask: Optional[torch.Tensor]):
        """(synaptic operations, dense MACs) of QK^T on spikes over the attended pairs: an
        operation is one coincidence of a query spike and a key spike in one channel (one bit
        of a popcount of an AND of plane words: one addition of +-2^(p+p')), so a pair (i, j)
        costs sum_k spikes_q[i, k] * spikes_k[j, k]; the MACs are head_dim per pair."""
        B, H, T, D = queries.shape
        planes, _, _, scale, _ = self.keys.fields(end)
        fired_q = _spikes_per_element(queries.planes, queries.scale, queries.shape)
        fired_k = _spikes_per_element(planes, scale, (B, self.keys.shape[1], end, D))
        fired_k = fired_k.repeat_interleave(H // self.keys.shape[1], dim=1)
        visible = torch.ones(B, H, T, end, dtype=torch.bool, device=queries.planes.device)
        if mask is not None:
            visible = visible & mask
        pairs = (fired_q @ fired_k.transpose(-1, -2)) * visible
        return int(pairs.sum()), int(visible.sum()) * D

    def spike_pv(self, probs: torch.Tensor, end: int) -> torch.Tensor:
        """PV on spikes: ``sum_j P[i, j] * scale_v[j] * c_v[j, d]``, ``ops.prob_matmul``: A =
        the probabilities times the values' per-token scales, as unsigned 8-bit spikes per
        query row (static, scale = row max / 255, zero 0: no scale floor), and B = the
        channel-major value codes ``c_v`` (rows d, channels j), read in place; on the CPU the
        codes of A are made inside the matmul kernel (docs/ops.md, prob_matmul)."""
        v = self.values.spikes(end)
        return ops.prob_matmul(probs.float(), self.values.scale, v.planes, v.sign, v.hi, v.scale,
                               v.zero, self.values.shape[1])

    def bytes_per_token(self) -> int:
        return self.keys.bytes_per_token() + self.values.bytes_per_token()


# key_feedback's damping: KEY_FEEDBACK_DAMP times the mean of H's diagonal is added to it
# (GPTQ's percdamp, which it takes for the same reason: H may be singular). On SmolLM2 0.01 was
# better than 0.1 (README, "Attention on spikes").
KEY_FEEDBACK_DAMP = 0.01


def key_feedback(query_moment: torch.Tensor, key_scale: torch.Tensor,
                 rotation: Optional[torch.Tensor]) -> torch.Tensor:
    """The error feedback of the key cache's codes, float32 ``[batch * kv_heads, D, D]``
    (``ops.feedback_encode``'s matrix of each row and kv head): QK^T's error from a key code is
    ``q' . (x_hat - x)`` with ``q'`` the query as coded (rotated, times the key channel scale
    lambda), so the codes that keep ``E[(q' . (x_hat - x))^2]`` small are GPTQ's with the
    Hessian ``H = diag(lambda) R^T M R diag(lambda)`` (M the layer's query moment of the kv
    head, R the rotation, both per channel): with ``U`` the upper Cholesky factor of ``H^-1``,
    channel j's error is carried to channel l > j times ``U[j, l] / U[j, j]``.
    ``key_scale``: SpikeKV's ``[batch, kv_heads, 1, D]``. In float64, rounded once."""
    M = query_moment.double()
    if rotation is not None:
        R = rotation.double()
        M = R.T @ M @ R
    lam = key_scale.double()[:, :, 0, :]                       # [batch, kv_heads, D]
    H = lam.unsqueeze(-1) * M * lam.unsqueeze(-2)
    D = H.shape[-1]
    # Damped: a moment that is zero (or a channel no query reads) still has an inverse.
    damp = KEY_FEEDBACK_DAMP * H.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-30
    H = H + damp[..., None, None] * torch.eye(D, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    F = U / U.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
    return F.reshape(-1, D, D).float().contiguous()


def _spikes_per_element(planes: torch.Tensor, scale: torch.Tensor, shape) -> torch.Tensor:
    """Spikes (set plane bits) of every element, float64 ``shape``: each plane decoded with
    scale 1 and no sign is 0 or 1 per element."""
    ones = torch.ones_like(scale)
    count = sum(ops.spike_decode(planes[p:p + 1], None, None, ones, None, shape[-1])
                for p in range(planes.shape[0]))
    return count.double().reshape(shape)
