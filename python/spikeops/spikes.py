"""Bit-plane GIF spike encoding (docs/ops.md): ``Encoding``, ``encode`` and
``SpikeTensor``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from . import _checks, ops

MAX_PLANES = ops.MAX_PLANES
ZERO_LIMIT = ops._C.ZERO_LIMIT  # |zero| of unsigned encodings: kZeroLimit of csrc/spike_math.h
SALIENT_MODES = ("minmax", "absmax", "absmean")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT32_TINY = torch.finfo(torch.float32).tiny
FLOAT32_MAX = torch.finfo(torch.float32).max


DEFAULT_GAMMA = 1.0  # clipping ratio when neither the Encoding nor a calibration gives one
GAMMA_MODES = ("minmax", "absmax", "absmean")  # the modes with a clipping ratio gamma
GROUP_MODES = ("minmax", "absmax", "absmean", "static")  # the modes with activation groups


@dataclass(frozen=True)
class Encoding:
    """How activations become spikes (docs/ops.md, "The Python API").

    mode: ``"minmax"`` (unsigned, per-token min/max), ``"absmax"`` / ``"absmean"`` (signed,
        symmetric: bidirectional spikes), ``"static"`` (caller-given scale, and zero for unsigned
        codes), ``"oat"`` (LAS outlier-aware two-range neuron).
    bits: code bits; for absmax/absmean one of them is the sign, so P = bits - 1 planes; for oat
        bits is the plane count P (the sign is a field of its own there).
    gamma: clipping ratio in (0, 1] of minmax (the codes span [gamma*min, gamma*max]) and of
        absmax/absmean (SDLLM's membrane clipping; refused for other modes). None:
        the layer's calibrated gamma where a calibration gives one, else 1.0.
    salient_bits: bits of salient channels (Optimal Brain Spiking); must exceed ``bits``, and
        every use needs a ``salient_mask`` (from a calibration): without one it is refused.
    theta: ``(theta_nor, theta_out)`` thresholds of ``"oat"``. None: the layer's calibrated
        thresholds; encoding without them is refused.
    group: channels per activation group, a positive multiple of 32, or 0: one threshold
        (scale, and zero point) per token and group of ``group`` channels instead of one per
        token (modes minmax, absmax, absmean, static; not with salient channels). A linear layer
        takes such spikes when its weight groups hold whole activation groups.
    """

    mode: str = "minmax"
    bits: int = 4
    gamma: Optional[float] = None
    salient_bits: Optional[int] = None
    theta: Optional[Tuple[float, float]] = None
    group: int = 0

    def __post_init__(self):
        fn = "Encoding"
        _checks.choice(fn, "mode", self.mode, ops.MODES)
        _checks.integer(fn, "bits", self.bits)
        _checks.integer(fn, "group", self.group)
        if self.group < 0 or self.group % 32:
            raise ValueError(f"{fn}: group (channels per activation group) must be 0 or a "
                             f"positive multiple of 32, got {self.group}")
        if self.group and (self.mode not in GROUP_MODES or self.salient_bits is not None):
            raise ValueError(f"{fn}: group combines with modes {GROUP_MODES} without "
                             f"salient_bits, got group={self.group} with mode {self.mode!r}"
                             + (f" and salient_bits={self.salient_bits}"
                                if self.salient_bits is not None else ""))
        if self.salient_bits is not None:
            _checks.integer(fn, "salient_bits", self.salient_bits)
            if self.mode not in SALIENT_MODES:
                raise ValueError(f"{fn}: salient_bits combines with modes {SALIENT_MODES}, "
                                 f"got mode {self.mode!r}")
            if self.salient_bits == 0:  # the op reads 0 as "no salient channels"
                raise ValueError(f"{fn}: salient_bits must be in (bits, {MAX_PLANES}] or None, "
                                 f"got 0")
        # gif_encode's rule for both widths, from its one definition (csrc/checks.h); a static
        # encoding's sign is known only when it encodes (zero given or not), where the op checks.
        # torch.compile cannot trace this C function: in a compiled function the op's fake kernel
        # applies the same rule when the Encoding encodes.
        if not torch.compiler.is_compiling():
            ops._C.check_bits(fn, self.mode, self.mode in ops.SIGNED_MODES, self.bits,
                              self.salient_bits or 0)
        if self.gamma is not None:
            if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
                raise TypeError(f"{fn}: gamma must be a float or None, got "
                                f"{type(self.gamma).__name__}")
            if not (math.isfinite(self.gamma) and 0.0 < self.gamma <= 1.0):
                raise ValueError(f"{fn}: gamma must be in (0, 1], got {self.gamma}")
            if self.mode not in GAMMA_MODES:
                raise ValueError(f"{fn}: gamma is only used by modes {GAMMA_MODES}, got "
                                 f"gamma={self.gamma} with mode {self.mode!r}")
        if self.mode == "oat" and self.theta is not None:
            theta = self.theta
            if (not isinstance(theta, (tuple, list)) or len(theta) != 2
                    or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                               for t in theta)):
                raise TypeError(f"{fn}: theta must be None or (theta_nor, theta_out), two "
                                f"floats, got {theta!r}")
            if not (math.isfinite(theta[0]) and math.isfinite(theta[1])
                    and 0 < theta[0] < theta[1]):
                raise ValueError(f"{fn}: theta must satisfy 0 < theta_nor < theta_out, got "
                                 f"{tuple(theta)}")
            # The stored scale theta_r / 2^P must be a normal float32, or codes decode to 0.
            if theta[0] / 2 ** self.bits < FLOAT32_TINY or theta[1] > FLOAT32_MAX:
                raise ValueError(f"{fn}: theta / 2^bits must be a normal float32 (theta_nor >= "
                                 f"{FLOAT32_TINY * 2 ** self.bits:.3g} for {self.bits} planes, "
                                 f"theta_out <= {FLOAT32_MAX:.3g}), got {tuple(theta)}")
        elif self.theta is not None:
            raise ValueError(f"{fn}: theta is only used by mode 'oat', got theta={self.theta!r} "
                             f"with mode {self.mode!r}")

    @property
    def label(self) -> str:
        """The command line's name of the encoding: ``minmax4``, ``absmax4g64``, ``absmax4+s6``,
        ``oat8`` (gamma and theta, often calibrated per layer, are not part of it)."""
        return (f"{self.mode}{self.bits}" + (f"g{self.group}" if self.group else "")
                + (f"+s{self.salient_bits}" if self.salient_bits else ""))


def check_usable(fn: str, enc: Encoding, salient_mask) -> None:
    """What an Encoding needs to encode, beyond itself: oat's thresholds and, for salient_bits,
    a mask (a calibration supplies both; without them the encoding is refused, not changed)."""
    if enc.mode == "oat" and enc.theta is None:
        raise ValueError(f"{fn}: mode 'oat' needs theta = (theta_nor, theta_out): give it, or "
                         f"set the encoding with a calibration (spikeops calibrate), got "
                         f"theta=None")
    if enc.salient_bits is not None and salient_mask is None:
        raise ValueError(f"{fn}: salient_bits={enc.salient_bits} needs a salient_mask (from a "
                         f"calibration's OBS masks), got none; without one the salient "
                         f"channels would silently use {enc.bits} bits")


def spike_slots(enc: Optional[Encoding], planes: int, elements: int,
                salient_elements: int) -> int:
    """Spike slots of ``elements`` encoded elements: each contributes its own plane count.
    ``planes`` is the largest (the SpikeTensor's P); salient encodings give the
    ``elements - salient_elements`` ordinary ones ``salient_bits - bits`` planes fewer."""
    fewer = enc.salient_bits - enc.bits if enc is not None and enc.salient_bits else 0
    return elements * planes - (elements - salient_elements) * fewer


class SpikeTensor(NamedTuple):
    """Packed bit-plane spikes of an activation tensor of ``shape`` ``[..., K]``, flattened to M
    token rows (docs/ops.md). ``sign``, ``hi`` and ``zero`` are None when absent; ``group`` is
    the channels per activation group (0: none), which says what the scale columns are."""

    planes: torch.Tensor            # int32 [P, M, W]
    sign: Optional[torch.Tensor]    # int32 [M, W]: bit set = negative element (signed encodings)
    hi: Optional[torch.Tensor]      # int32 [M, W]: bit set = range 1 (salient / LAS outlier)
    scale: torch.Tensor             # float32 [M, R]
    zero: Optional[torch.Tensor]    # int32 [M, R] (unsigned encodings)
    shape: Tuple[int, ...]          # shape of the encoded activations
    group: int = 0                  # channels per activation group; 0: none

    @classmethod
    def wrap(cls, fields, shape: Tuple[int, ...], group: int = 0) -> "SpikeTensor":
        """A SpikeTensor of the five tensors of ``ops.gif_encode`` (absent ones None), encoded
        with activation groups of ``group`` channels (0: none)."""
        return cls(*fields, shape, group)

    @property
    def num_planes(self) -> int:
        return self.planes.shape[0]

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x_hat = scale[m, r] * (s * Q - zero[m, r])`` with the shape of the encoded tensor.
        float64 is the float32 result widened, exactly (docs/ops.md, spike_decode)."""
        _checks.dtype("SpikeTensor.decode", "dtype", dtype, _FLOATS)
        op_dtype = torch.float32 if dtype == torch.float64 else dtype
        K = self.shape[-1]
        x_hat = ops.spike_decode(self.planes, self.sign, self.hi, self.scale, self.zero, K,
                                 op_dtype, self.group)
        return x_hat.reshape(self.shape).to(dtype)

    def counts(self, negative: bool = False) -> torch.Tensor:
        """Spikes per plane and token, int64 ``[P, M]``; only negative ones with ``negative``."""
        if negative and self.sign is None:
            raise ValueError("SpikeTensor.counts: negative=True needs a signed encoding "
                             "(sign is None)")
        return ops.spike_counts(self.planes, self.sign, negative)

    def stats(self) -> torch.Tensor:
        """One-pass statistics summed over tokens, int64 ``[2P + 2]``: spikes per plane,
        negative spikes per plane (zeros if unsigned), fired channels (tokens x channels with a
        spike in any plane) and all-zero 32-channel words (``ops.spike_stats``)."""
        return ops.spike_stats(self.planes, self.sign)

    def firing_rate(self, enc: Optional[Encoding] = None) -> float:
        """Spikes / spike slots, the fraction of possible events that fired (docs/energy.md):
        each element counts its own planes, so salient channels count ``salient_bits``. Spikes
        with a range bit (``hi``) need the ``enc`` they were encoded with to tell salient
        channels (more planes) from the ranges of oat (the same planes)."""
        fn = "SpikeTensor.firing_rate"
        if enc is not None and not isinstance(enc, Encoding):
            raise TypeError(f"{fn}: enc must be a spikeops.Encoding or None, got "
                            f"{type(enc).__name__}")
        if self.hi is not None and enc is None:
            raise ValueError(f"{fn}: spikes with a range bit (hi) need enc, the Encoding they "
                             f"were made with, got None")
        M, K = self.planes.shape[1], self.shape[-1]
        salient = 0
        if enc is not None and enc.salient_bits and self.hi is not None:
            salient = int(ops.spike_counts(self.hi.unsqueeze(0), None, False).sum())
        total = spike_slots(enc, self.num_planes, M * K, salient)
        return float(self.counts().sum()) / total if total else 0.0


def encode(x: torch.Tensor, enc: Encoding, salient_mask: Optional[torch.Tensor] = None,
           scale=None, zero=None) -> SpikeTensor:
    """Encode ``x [..., K]`` into a SpikeTensor.

    salient_mask: bool ``[K]``, channels coded with ``enc.salient_bits`` in range 1; needed
        exactly when ``enc.salient_bits`` is set.
    scale, zero: mode ``"static"`` only: a scale (float or tensor, one per token or a scalar) and,
        for unsigned codes, a zero point (int or int tensor, likewise); no zero = signed codes.
        With activation groups (``enc.group``): a tensor ``[R]`` (one per group, for every
        token) or ``[..., R]`` (per token and group), R = ceil(K / group).
    """
    fn = "encode"
    # Python-level facts only; dtypes, shapes, devices and values are checked once, by the op.
    _checks.tensor(fn, "x", x)
    if not isinstance(enc, Encoding):
        raise TypeError(f"{fn}: enc must be a spikeops.Encoding, got {type(enc).__name__}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{fn}: x must have shape [..., K] with K >= 1, got {tuple(x.shape)}")
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    M = rows.shape[0]
    if salient_mask is not None:
        _checks.tensor(fn, "salient_mask", salient_mask)
        if enc.salient_bits is None:
            raise ValueError(f"{fn}: salient_mask needs an Encoding with salient_bits, got "
                             f"salient_bits=None (mode {enc.mode!r})")
    check_usable(fn, enc, salient_mask)
    if enc.mode == "static":
        R = -(-K // enc.group) if enc.group else 0  # scale columns per token; 0: [M]
        if scale is None:
            raise ValueError(f"{fn}: mode 'static' needs scale (a float, or a tensor of shape "
                             + (f"[R] or [M, R] = [{M}, {R}]" if R else f"[] or [M] = [{M}]")
                             + "), got None")
        scale = _per_token(fn, "scale", scale, M, R, x.device, torch.float32)
        if zero is not None:
            zero = _per_token(fn, "zero", zero, M, R, x.device, torch.int32)
    elif scale is not None or zero is not None:
        raise ValueError(f"{fn}: scale and zero are only taken by mode 'static', got mode "
                         f"{enc.mode!r}")
    fields = encode_rows(rows, enc, salient_mask, scale, zero)
    return SpikeTensor.wrap(fields, tuple(x.shape), enc.group)


def clip_gamma(enc: Encoding) -> float:
    """The clipping ratio gif_encode takes for ``enc``: its own, else DEFAULT_GAMMA."""
    return DEFAULT_GAMMA if enc.gamma is None else float(enc.gamma)


def encode_rows(rows: torch.Tensor, enc: Encoding, salient_mask: Optional[torch.Tensor] = None,
                scale: Optional[torch.Tensor] = None, zero: Optional[torch.Tensor] = None):
    """``ops.gif_encode`` of ``rows [M, K]`` under ``enc``: the op's five tensors, absent ones
    None, unchecked beyond what the op checks. ``encode`` and ``SpikeLinear`` call it."""
    theta = enc.theta or (0.0, 0.0)
    return ops.gif_encode(rows, enc.mode, enc.bits, clip_gamma(enc), salient_mask,
                          enc.salient_bits if salient_mask is not None else 0, scale, zero,
                          theta[0], theta[1], enc.group)


def _per_token(fn: str, name: str, value, M: int, R: int, device, dtype) -> torch.Tensor:
    """A static scale or zero as a ``[M]`` tensor (a scalar is broadcast to every token), or,
    with R > 0 activation groups, as ``[M, R]`` (one value per group is broadcast to every
    token). Values are checked here, before any cast could overflow or wrap them."""
    want_float = dtype.is_floating_point
    kind = "float" if want_float else "integer"
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point != want_float:
            raise TypeError(f"{fn}: {name} must be a {kind} tensor, got {value.dtype}")
        if R and tuple(value.shape[-1:]) != (R,) or not R and value.numel() not in (1, M):
            want = (f"[R] or [..., R] with R = {R} activation groups" if R
                    else f"one value or one per token (M = {M})")
            raise ValueError(f"{fn}: {name} must hold {want}, got shape {tuple(value.shape)}")
        if R and value.numel() not in (R, M * R):
            raise ValueError(f"{fn}: {name} must hold R = {R} values or M * R = {M * R}, got "
                             f"shape {tuple(value.shape)}")
        if value.device != torch.device(device):
            raise ValueError(f"{fn}: {name} must be on the device of x ({device}), "
                             f"got {value.device}")
        values = value.reshape(-1)
    else:
        if R:
            raise TypeError(f"{fn}: {name} of an encoding with activation groups must be a "
                            f"tensor [R] or [..., R] (R = {R}), got {type(value).__name__}")
        ok = isinstance(value, (int, float)) if want_float else isinstance(value, int)
        if isinstance(value, bool) or not ok:
            raise TypeError(f"{fn}: {name} must be a {kind} or a {kind} tensor, "
                            f"got {type(value).__name__}")
        values = torch.tensor([value], dtype=torch.float64 if want_float else torch.int64)
    if values.numel():
        if want_float:
            v = values.double()
            bad = ~(torch.isfinite(v) & (v > 0) & (v <= torch.finfo(torch.float32).max))
            what = "positive and finite in float32"
        else:
            bad = values.abs() > ZERO_LIMIT
            what = f"in [-{ZERO_LIMIT}, {ZERO_LIMIT}]"
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"{fn}: {name} must be {what}, got {values[i].item()} at index {i}")
    if R:
        return values.to(device=device, dtype=dtype).reshape(-1, R).expand(M, R).contiguous()
    return values.to(device=device, dtype=dtype).expand(M).contiguous()
