"""GPTQ weights (docs/checkpoints.md): packing, v1/v2 zero points, 3-bit repacking,
``GPTQWeight`` and its kernel form."""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from . import _checks, ops

log = logging.getLogger("spikeops")

BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")
# v1 ("gptq") files store every zero point minus one (docs/checkpoints.md, "Zero points").
V1_ZERO_OFFSET = 1


def v1_stored_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """The fields a v1 file stores for true zero points ``zeros``."""
    return zeros - V1_ZERO_OFFSET


def check_bits_group_size(fn: str, bits, group_size, where: str = "") -> None:
    """GPTQ's bits (2, 3, 4, 8) and group size (-1 = one group, or positive); ``where`` prefixes
    the argument names in messages (e.g. the config file they came from)."""
    _checks.integer(fn, f"{where}bits", bits, 2, 8)
    _checks.choice(fn, f"{where}bits", bits, BITS)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{fn}: {where}group_size must be an int, got "
                        f"{type(group_size).__name__}")
    if group_size != -1 and group_size < 1:
        raise ValueError(f"{fn}: {where}group_size must be -1 or positive, got {group_size}")


def pack(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` along ``dim`` (0: rows, as qweight; 1: columns, as
    qzeros) into int32 words: code i sits at bit ``bits * i`` of a little-endian bit stream, so a
    3-bit code may straddle two words (docs/checkpoints.md). A partial last word is padded with
    zero bits."""
    _check_packing("pack", codes, "codes", bits, dim)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack: codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"pack: codes must be in [0, 2^bits) = [0, {1 << bits}), got values in "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    c = codes.to(torch.int64).movedim(dim, 0)
    count = c.shape[0]
    words = (count * bits + 31) // 32
    pos = torch.arange(count, device=c.device) * bits
    word, shift = pos // 32, pos % 32
    view = (-1,) + (1,) * (c.dim() - 1)
    out = torch.zeros((words + 1,) + tuple(c.shape[1:]), dtype=torch.int64, device=c.device)
    # Bits of different codes never overlap, so adding the pieces is the bitwise OR.
    out.index_add_(0, word, (c << shift.view(view)) & 0xFFFFFFFF)
    out.index_add_(0, word + 1, c >> (32 - shift).view(view))
    out = out[:words]
    out = torch.where(out >= 2**31, out - 2**32, out)
    return out.to(torch.int32).movedim(0, dim).contiguous()


def unpack(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack``: ``count`` int32 codes along ``dim``."""
    _check_packing("unpack", packed, "packed", bits, dim)
    _checks.tensor("unpack", "packed", packed, (torch.int32,))
    words = packed.shape[dim]
    if isinstance(count, bool) or not isinstance(count, int) or \
            not 0 <= count <= words * 32 // bits:
        raise ValueError(f"unpack: count must be an int in [0, {words * 32 // bits}] "
                         f"({words} words of {bits}-bit codes), got {count!r}")
    p = packed.to(torch.int64).movedim(dim, 0) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros_like(p[:1])])
    pos = torch.arange(count, device=p.device) * bits
    word, shift = pos // 32, pos % 32
    view = (-1,) + (1,) * (p.dim() - 1)
    both = p[word] | (p[word + 1] << 32)
    codes = (both >> shift.view(view)) & ((1 << bits) - 1)
    return codes.to(torch.int32).movedim(0, dim).contiguous()


def _check_packing(fn: str, t, name: str, bits: int, dim: int) -> None:
    _checks.tensor(fn, name, t, dim=2)
    _checks.choice(fn, "bits", bits, BITS)
    _checks.choice(fn, "dim", dim, (0, 1))


# The tensors of a GPTQ layer in a checkpoint and in a SpikeLinear's state dict.
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


class GPTQWeight:
    """The GPTQ tensors of one linear layer (K = in_features, N = out_features, G groups), held
    once, in the form the kernels read (docs/ops.md, spike_linear, "Weights").

    qweight: int32 ``[K*bits/32, N]``; qzeros: int32 ``[G, N*bits/32]``; scales: float16
    ``[G, N]``; g_idx: int32/int64 ``[K]`` or None (= ``k // group_size``).
    checkpoint_format: ``"gptq"`` (v1: stored zero = true zero - 1) or ``"gptq_v2"`` (true zero).
    For ``sym=True`` the stored zeros decide (all ``2^(bits-1) - 1`` means v1, all
    ``2^(bits-1)`` means v2) and the label only breaks ties; the decision is logged.
    3-bit weights are repacked to 4-bit codes, exactly. Every tensor is validated here, once.
    in_features: K when it is not ``qweight.shape[0] * 32 / bits`` (a ragged K whose last packed
    word is partly padding); real GPTQ files never need it.

    Held: ``qzeros``, ``scales`` and ``g_idx`` as given (``g_idx`` as int32), ``zero_offset``
    (true zero = stored field + zero_offset), and the codes either as ``qweight`` or, on a CPU,
    for 4-bit codes in uniform groups of a multiple of 8 channels (at most 4096) and K a multiple
    of 8, as the CPU layout ``packed`` with its ``code_sums`` instead (``qweight`` is then None;
    ``gptq_tensors()`` packs it again, bit for bit).
    """

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: Optional[torch.Tensor] = None, bits: int = 4, group_size: int = 128,
                 sym: bool = True, checkpoint_format: str = "gptq",
                 in_features: Optional[int] = None):
        fn = "GPTQWeight"
        check_bits_group_size(fn, bits, group_size)
        _checks.choice(fn, "checkpoint_format", checkpoint_format, FORMATS)
        if not isinstance(sym, bool):
            raise TypeError(f"{fn}: sym must be a bool, got {sym!r}")
        if in_features is not None:
            _checks.integer(fn, "in_features", in_features, 1, 1 << 23)
        _checks.tensor(fn, "qweight", qweight, (torch.int32,), dim=2)
        _checks.tensor(fn, "qzeros", qzeros, (torch.int32,), dim=2)
        _checks.tensor(fn, "scales", scales, (torch.float16,), dim=2)
        if g_idx is not None:
            _checks.tensor(fn, "g_idx", g_idx, (torch.int32, torch.int64), dim=1)
        _checks.same_device(fn, {"qweight": qweight, "qzeros": qzeros, "scales": scales,
                                 "g_idx": g_idx})

        # K is what the packed rows hold (real GPTQ files always have K = rows * 32 / bits); a
        # ragged K, whose last word is partly padding, must be asked for with in_features.
        N, rows = qweight.shape[1], qweight.shape[0]
        if in_features is not None:
            K = in_features
        elif (rows * 32) % bits == 0:
            K = rows * 32 // bits
        else:
            raise ValueError(f"{fn}: qweight's {rows} rows of {bits}-bit codes do not hold a "
                             f"whole number of channels; pass in_features for a ragged K")
        if g_idx is not None and g_idx.shape[0] != K:
            source = "in_features" if in_features is not None else "qweight rows * 32 / bits"
            raise ValueError(f"{fn}: g_idx must have one entry per input channel, K = {K} "
                             f"({source}), got {g_idx.shape[0]}; pass in_features for a ragged K")
        if K < 1 or N < 1:
            raise ValueError(f"{fn}: K and N must be >= 1, got K = {K}, N = {N}")
        G = 1 if group_size == -1 else -(-K // group_size)
        _checks.shape(fn, "qweight", qweight, ((K * bits + 31) // 32, N))
        _checks.shape(fn, "scales", scales, (G, N))
        _checks.shape(fn, "qzeros", qzeros, (G, (N * bits + 31) // 32))
        if g_idx is None:
            gs = K if group_size == -1 else group_size
            g_idx = torch.arange(K, dtype=torch.int32, device=qweight.device) // gs
        elif g_idx.numel():
            lo, hi = int(g_idx.min()), int(g_idx.max())
            if lo < 0 or hi >= G:
                bad = int(torch.nonzero((g_idx < 0) | (g_idx >= G))[0])
                raise ValueError(f"{fn}: g_idx values must be in [0, G) = [0, {G}), got "
                                 f"g_idx[{bad}] = {int(g_idx[bad])}")
        stored = unpack(qzeros, bits, N, dim=1)
        self.zero_offset = _zero_offset(stored, bits, sym, checkpoint_format)
        if bits == 3:  # the kernels read 2/4/8-bit fields; 3-bit codes fit 4 bits exactly
            qweight = pack(unpack(qweight, 3, K, dim=0), 4, dim=0)
            qzeros = pack(stored, 4, dim=1)
        self.bits = bits
        self.kernel_bits = 4 if bits == 3 else bits
        self.group_size = group_size
        self.sym = sym
        self.checkpoint_format = checkpoint_format
        self.in_features = K
        self.out_features = N
        self._hold(qweight, qzeros, scales, g_idx.to(torch.int32))

    def _hold(self, qweight, qzeros, scales, g_idx) -> None:
        """Takes the kernel form of these (checked) tensors: ``kernel_group_size`` (channels per
        group when ``g_idx[k] == k // group_size``, -1 counting as K; else 0: ``g_idx`` is read)
        and the codes as ``qweight`` or as the CPU layout (``packed``, ``code_sums``)."""
        K = self.in_features
        self.qzeros, self.scales, self.g_idx = (t.contiguous() for t in (qzeros, scales, g_idx))
        gs = K if self.group_size == -1 else self.group_size
        uniform = torch.equal(g_idx, torch.arange(K, dtype=torch.int32, device=g_idx.device) // gs)
        self.kernel_group_size = gs if uniform else 0
        self._hold_codes(qweight)

    def _hold_codes(self, qweight: torch.Tensor) -> None:
        # The layout where the dot-product kernels can read it (docs/ops.md, spike_linear): the
        # C++ rule says which layers it holds (ops.layout_group); K a multiple of 8, so that
        # qweight has no padding fields the layout would drop.
        K, gs, bits = self.in_features, self.kernel_group_size, self.kernel_bits
        if qweight.device.type == "cpu" and K % 8 == 0 and ops.layout_group(bits, gs, K):
            self.qweight = None
            self.packed, self.code_sums = ops.cpu_layout(qweight, bits, gs, K)
        else:
            self.qweight, self.packed, self.code_sums = qweight.contiguous(), None, None

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def gptq_tensors(self) -> dict:
        """The GPTQ form, ``GPTQ_TENSORS`` by name, as held (3-bit weights in their 4-bit
        repacking), ``qweight`` packed again from the CPU layout where that holds the codes."""
        qweight = self.qweight
        if qweight is None:
            qweight = ops.cpu_layout_qweight(self.packed, self.in_features, self.out_features)
        return dict(zip(GPTQ_TENSORS, (qweight, self.qzeros, self.scales, self.g_idx)))

    def with_tensors(self, fn: str, tensors: dict) -> "GPTQWeight":
        """This weight with other GPTQ tensors (``GPTQ_TENSORS`` by name, of this weight's
        dtypes and shapes: a state dict's), on this weight's device, its kernel form rebuilt."""
        K, N = self.in_features, self.out_features
        want = {"qweight": (torch.int32, ((K * self.kernel_bits + 31) // 32, N)),
                "qzeros": (torch.int32, tuple(self.qzeros.shape)),
                "scales": (torch.float16, tuple(self.scales.shape)),
                "g_idx": (torch.int32, (K,))}
        for name, (dtype, shape) in want.items():
            _checks.tensor(fn, name, tensors[name], (dtype,), dim=len(shape))
            _checks.shape(fn, name, tensors[name], shape)
        new = copy.copy(self)
        new._hold(*(tensors[name].to(self.device) for name in GPTQ_TENSORS))
        return new

    def moved(self, fn) -> "GPTQWeight":
        """This weight after ``fn`` (what ``nn.Module._apply`` applies to every tensor), as a
        device move only: the integer tensors go through ``fn``, the scales follow them to
        their device and are never cast (bfloat16 would round them). Itself when ``fn`` leaves
        the tensors where they are (a dtype cast)."""
        g_idx = fn(self.g_idx)
        if g_idx is self.g_idx:
            return self
        new = copy.copy(self)
        new.qzeros, new.g_idx = fn(self.qzeros), g_idx
        new.scales = uncast(self.scales, g_idx.device)
        new._hold_codes(fn(self.gptq_tensors()["qweight"]))
        return new

    def kernel_args(self) -> tuple:
        """The tensors ``ops.spike_linear`` takes of this weight, in its order: ``(qweight,
        qzeros, scales, g_idx, packed, code_sums)``."""
        return self.qweight, self.qzeros, self.scales, self.g_idx, self.packed, self.code_sums

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` float16 ``[N, K]`` (the nn.Linear convention), bit exact."""
        return ops.gptq_dequantize(self.qweight, self.qzeros, self.scales, self.g_idx,
                                   self.packed, self.kernel_bits, self.kernel_group_size,
                                   self.zero_offset)

    def codes(self) -> tuple:
        """Unpacked ``(q int32 [K, N], z int32 [G, N])`` with true zero points."""
        q = unpack(self.gptq_tensors()["qweight"], self.kernel_bits, self.in_features, dim=0)
        z = unpack(self.qzeros, self.kernel_bits, self.out_features, dim=1) + self.zero_offset
        return q, z


def uncast(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` in its dtype (a module's dtype cast must not round float16 scales or a
    float32 kernel bias); from the meta device, which holds no values, uninitialized as
    ``Module.to_empty`` makes every tensor."""
    return torch.empty_like(t, device=device) if t.is_meta else t.to(device)


def _zero_offset(zeros: torch.Tensor, bits: int, sym: bool, label: str) -> int:
    """1 if the stored zeros are v1 (true zero - 1), 0 for v2 (docs/checkpoints.md, "Zero points").

    A v1 zero is read as ``(field & maxq) + 1``, as AutoGPTQ's dequantizing forward passes
    (qlinear_cuda_old, triton) read it. An asymmetric v1 file whose true zero was 0 stored -1,
    whose bits also spilled into the following fields: those read as ``2^bits`` here, as there.
    (AutoGPTQ's format converters compute ``(field + 1) & maxq`` instead, giving 0 for such a
    field; the two agree on every field that did not overflow.)"""
    labelled = V1_ZERO_OFFSET if label == "gptq" else 0
    if not sym:
        return labelled
    v1 = bool((zeros == 2 ** (bits - 1) - 1).all())
    v2 = bool((zeros == 2 ** (bits - 1)).all())
    if v1 == v2:  # neither pattern (or no zeros at all): trust the label
        log.info("GPTQWeight: sym zeros match neither v1 nor v2; using the label %r", label)
        return labelled
    offset = V1_ZERO_OFFSET if v1 else 0
    if offset != labelled:
        log.warning("GPTQWeight: labelled %r but the sym zeros are %s; reading them as %s",
                    label, "v1" if v1 else "v2", "v1" if v1 else "v2")
    return offset
