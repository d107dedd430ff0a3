"""One typed wrapper per op of ``torch.ops.spikeops`` and, right below it, its fake (meta) kernel
so that ``torch.compile`` can trace the ops without running them.

The wrappers take and return tensors, an absent optional tensor being ``None`` (``Tensor?`` in
the op schemas); gif_encode's outputs that an encoding does not produce come back from the op
with shape ``[0]`` and from its wrapper as ``None`` (docs/ops.md). Shapes: M tokens, K inputs,
N outputs, P planes, W = ceil(K / 32) words, R scale columns (2 when ``hi`` is present,
ceil(K / group) with activation groups of ``group`` channels, else 1), G weight groups.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # loads the library, which registers the ops

# Ops are called through their one overload (.default): that skips the overload resolution of
# torch.ops' packets, a few microseconds per call that decode steps feel.
_ops = torch.ops.spikeops
# gif_encode and spike_linear, the ops of every layer call, first try their CPU entry directly
# (spikeops._C.direct_*, csrc/direct.h): about 3 us less a call than torch.ops' argument
# handling; None where the call needs the dispatcher (a mode, a profiler, a gradient, a tensor
# subclass, another device), which then runs it. torch.compile traces the op itself.
_is_compiling = torch.compiler.is_compiling

Tensor = torch.Tensor
_INT32 = torch.int32

MODES = ("minmax", "absmax", "absmean", "static", "oat")
SIGNED_MODES = ("absmax", "absmean", "oat")  # static is signed when no zero is given


def is_signed(mode: str, zero) -> bool:
    """Whether ``mode`` codes with a sign (docs/ops.md): ``zero`` is static mode's zero point
    (None: signed)."""
    return mode in SIGNED_MODES or (mode == "static" and zero is None)
MAX_PLANES = _C.MAX_PLANES  # kMaxPlanes of csrc/spike_math.h
BACKENDS = ("auto", "spike", "int")


def scale_columns(has_hi: bool, group: int, W: int) -> int:
    """R, the scale columns of spikes with W words per token (scale_columns of
    csrc/kernel_args.h): 2 with ``hi``, ``ceil(K / group)`` with activation groups, else 1."""
    return 2 if has_hi else -(-W // (group // 32)) if group > 0 else 1


# ----------------------------------------------------------------------------- no gradients
# The ops have no autograd kernels (an autograd formula registered with
# torch.library.register_autograd is a Python kernel that every call under torch.no_grad()
# would enter: +15 us per layer at decode). Their outputs are made to refuse a backward
# instead, here, only where grad mode is on and a float input requires grad (docs/ops.md,
# Gradients): the differentiable paths are spikeops.fake_quantize and SpikeLinear's forward.
_USE_INSTEAD = ("use spikeops.fake_quantize(x, enc) for a differentiable x_hat, or call the "
                "SpikeLinear module on x (both: straight-through estimator; docs/ops.md, "
                "Gradients)")
NO_GRADIENT = {
    "gif_encode": "spikeops.encode (op gif_encode) has no gradient: spikes are integer codes; "
                  + _USE_INSTEAD,
    "spike_decode": "SpikeTensor.decode (op spike_decode) has no gradient with respect to the "
                    "spikes' scale; " + _USE_INSTEAD,
    "spike_linear": "spikeops.spike_linear / SpikeLinear.from_spikes (op spike_linear) have no "
                    "gradient with respect to the spikes' scale, the bias or the GPTQ scales; "
                    + _USE_INSTEAD,
    "gptq_dequantize": "op gptq_dequantize has no gradient with respect to the GPTQ group "
                       "scales: spikeops does not train GPTQ weights (train float weights and "
                       "quantize them again)",
}


class _NoGradient(torch.autograd.Function):
    """Returns the op's outputs unchanged; their backward raises RuntimeError(message)."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        outs = tensors[:n]
        ctx.mark_non_differentiable(*(t for t in outs if not t.is_floating_point()))
        return outs

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _no_gradient(op: str, outputs, *inputs):
    """``outputs`` (a tuple or one tensor) of ``op``, attached to ``inputs`` through a node whose
    backward raises the op's NO_GRADIENT message."""
    single = isinstance(outputs, Tensor)
    outs = (outputs,) if single else tuple(outputs)
    wrapped = _NoGradient.apply(NO_GRADIENT[op], len(outs), *(t.detach() for t in outs),
                                *(t for t in inputs if t is not None and t.requires_grad))
    return wrapped[0] if single else tuple(wrapped)


def _requires_grad(t: Optional[Tensor]) -> bool:
    return t is not None and t.requires_grad


def _same_device(op: str, ref_name: str, ref: Tensor, **tensors: Tensor) -> None:
    """Fakes run whenever one argument is a meta tensor, also among real ones: they compare the
    devices of present tensors as the C++ entries do, so no such call returns a tensor of
    uninitialized memory."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on the device of {ref_name} ({ref.device}), "
                             f"got {t.device}")


def gif_encode(x: Tensor, mode: str, bits: int, gamma: float = 1.0,
               salient_mask: Optional[Tensor] = None, salient_bits: int = 0,
               scale: Optional[Tensor] = None, zero: Optional[Tensor] = None,
               theta_nor: float = 0.0, theta_out: float = 0.0, group: int = 0):
    """Encode ``x [M, K]`` into ``(planes [P, M, W], sign [M, W], hi [M, W], scale [M, R],
    zero [M, R])``; outputs the encoding does not produce are None; ``group > 0``: one scale
    column per activation group of ``group`` channels. See docs/ops.md for every mode."""
    args = (x, mode, bits, gamma, salient_mask, salient_bits, scale, zero, theta_nor, theta_out,
            group)
    out = None if _is_compiling() else _C.direct_gif_encode(*args)
    if out is None:
        out = _ops.gif_encode.default(*args)
    if torch.is_grad_enabled() and (x.requires_grad or _requires_grad(scale)):
        out = _no_gradient("gif_encode", out, x, scale)
    # planes and scale are always produced; spelt out, not a generator (0.7 us a call at decode).
    planes, sign, hi, scale_out, zero_out = out
    return planes, _produced(sign), _produced(hi), scale_out, _produced(zero_out)


def _produced(t: Tensor) -> Optional[Tensor]:
    """An output of gif_encode, or None where the op returned shape [0]: not produced."""
    return None if t.dim() == 1 else t


@torch.library.register_fake("spikeops::gif_encode")
def _(x, mode, bits, gamma, salient_mask, salient_bits, scale, zero, theta_nor, theta_out,
      group=0):
    torch._check_value(x.dim() == 2,
                       lambda: f"gif_encode: x must have shape [M, K], got {tuple(x.shape)}")
    _same_device("gif_encode", "x", x, salient_mask=salient_mask, scale=scale, zero=zero)
    M, K = x.shape
    salient = salient_mask is not None
    signed = is_signed(mode, zero)
    _C.check_bits("gif_encode", mode, signed, bits, salient_bits)
    top = salient_bits if salient else bits
    P = top - 1 if signed and mode != "oat" else top
    W = (K + 31) // 32
    R = 2 if salient or mode == "oat" else scale_columns(False, group, W)

    def absent_unless(present: bool, shape):
        return x.new_empty(shape if present else (0,), dtype=_INT32)

    return (x.new_empty((P, M, W), dtype=_INT32), absent_unless(signed, (M, W)),
            absent_unless(R == 2, (M, W)), x.new_empty((M, R), dtype=torch.float32),
            absent_unless(not signed, (M, R)))


def feedback_encode(x: Tensor, feedback: Tensor, bits: int, gamma: float = 1.0):
    """minmax spikes ``(planes [bits, G * N, W], scale [G * N, 1], zero [G * N, 1])`` of the
    float32 rows ``x [G, N, K]`` (row ``(g, n)`` at ``g * N + n``), each row's codes chosen in
    channel order with its rounding errors carried into the later channels through
    ``feedback [G, K, K]`` (docs/ops.md, feedback_encode). No gradient: the codes are for the
    key cache of attention."""
    return _ops.feedback_encode.default(x, feedback, bits, gamma)


@torch.library.register_fake("spikeops::feedback_encode")
def _(x, feedback, bits, gamma):
    torch._check_value(x.dim() == 3, lambda: f"feedback_encode: x must have shape [G, N, K], "
                                             f"got {tuple(x.shape)}")
    _same_device("feedback_encode", "x", x, feedback=feedback)
    _C.check_bits("feedback_encode", "minmax", False, bits, 0)
    G, N, K = x.shape
    rows = G * N
    return (x.new_empty((bits, rows, (K + 31) // 32), dtype=_INT32),
            x.new_empty((rows, 1), dtype=torch.float32), x.new_empty((rows, 1), dtype=_INT32))


def spike_decode(planes: Tensor, sign: Optional[Tensor], hi: Optional[Tensor], scale: Tensor,
                 zero: Optional[Tensor], K: int, dtype: torch.dtype = torch.float32,
                 group: int = 0) -> Tensor:
    """``x_hat [M, K] = scale[m, r] * (s * Q - zero[m, r])`` in float32 (r: the element's
    scale column), cast to ``dtype``."""
    out = _ops.spike_decode.default(planes, sign, hi, scale, zero, K, dtype, group)
    if torch.is_grad_enabled() and scale.requires_grad:
        return _no_gradient("spike_decode", out, scale)
    return out


@torch.library.register_fake("spikeops::spike_decode")
def _(planes, sign, hi, scale, zero, K, dtype, group=0):
    _same_device("spike_decode", "planes", planes, sign=sign, hi=hi, scale=scale, zero=zero)
    return planes.new_empty((planes.shape[1], K), dtype=dtype)


def spike_counts(planes: Tensor, sign: Optional[Tensor] = None, negative: bool = False) -> Tensor:
    """Set bits per plane and token, int64 ``[P, M]``; ``negative`` counts only negative spikes."""
    return _ops.spike_counts.default(planes, sign, negative)


@torch.library.register_fake("spikeops::spike_counts")
def _(planes, sign, negative):
    _same_device("spike_counts", "planes", planes, sign=sign)
    return planes.new_empty((planes.shape[0], planes.shape[1]), dtype=torch.int64)


def spike_stats(planes: Tensor, sign: Optional[Tensor] = None) -> Tensor:
    """One-pass statistics summed over tokens, int64 ``[2P + 2]``: spikes per plane, negative
    spikes per plane (zeros without ``sign``), fired channels (set bits of the OR over planes)
    and all-zero words (OR over planes == 0). ``spikeops.track`` calls this once per layer."""
    return _ops.spike_stats.default(planes, sign)


@torch.library.register_fake("spikeops::spike_stats")
def _(planes, sign):
    _same_device("spike_stats", "planes", planes, sign=sign)
    return planes.new_empty((2 * planes.shape[0] + 2,), dtype=torch.int64)


def spike_accumulate(planes: Tensor, sign: Optional[Tensor], hi: Optional[Tensor], w: Tensor,
                     per_plane: bool = False, group: int = 0) -> Tensor:
    """Exact ``sum_k s * Q * w[k, n]`` per scale column (range, or activation group of
    ``group`` channels) with int8 ``w [K, N]``: int64 ``[R, M, N]``, or ``[P, R, M, N]`` per
    plane."""
    return _ops.spike_accumulate.default(planes, sign, hi, w, per_plane, group)


@torch.library.register_fake("spikeops::spike_accumulate")
def _(planes, sign, hi, w, per_plane, group=0):
    _same_device("spike_accumulate", "planes", planes, sign=sign, hi=hi, w=w)
    P, M = planes.shape[0], planes.shape[1]
    R = scale_columns(hi is not None, group, planes.shape[2])
    shape = (P, R, M, w.shape[1]) if per_plane else (R, M, w.shape[1])
    return planes.new_empty(shape, dtype=torch.int64)


def spike_linear(planes: Tensor, sign: Optional[Tensor], hi: Optional[Tensor], scale: Tensor,
                 zero: Optional[Tensor], qweight: Optional[Tensor], qzeros: Tensor,
                 scales: Tensor, g_idx: Tensor, packed: Optional[Tensor],
                 code_sums: Optional[Tensor], bias: Optional[Tensor], bits: int,
                 group_size: int, zero_offset: int, out_dtype: torch.dtype = torch.float16,
                 backend: str = "auto", group: int = 0) -> Tensor:
    """``y [M, N] = x_hat @ W_hat^T + bias`` on the kernel form of a GPTQ layer
    (``GPTQWeight``, docs/ops.md): the codes as packed ``qweight`` or, on the CPU, as the CPU
    layout ``packed`` (uint8) with ``code_sums`` (uint16 ``[G, N]``); stored zero points
    ``qzeros`` int32 ``[G, N*bits/32]`` (true zero = field + ``zero_offset``), float16
    ``scales [G, N]``, ``g_idx`` int32 ``[K]`` (read only when ``group_size`` is 0), float32
    ``bias [N]``; ``group``: the spikes' activation group (0: none), which the weight groups
    must hold whole."""
    args = (planes, sign, hi, scale, zero, qweight, qzeros, scales, g_idx, packed, code_sums, bias,
            bits, group_size, zero_offset, out_dtype, backend, group)
    out = None if _is_compiling() else _C.direct_spike_linear(*args)
    if out is None:
        out = _ops.spike_linear.default(*args)
    if torch.is_grad_enabled() and (scale.requires_grad or scales.requires_grad
                                    or _requires_grad(bias)):
        return _no_gradient("spike_linear", out, scale, bias, scales)
    return out


@torch.library.register_fake("spikeops::spike_linear")
def _(planes, sign, hi, scale, zero, qweight, qzeros, scales, g_idx, packed, code_sums, bias,
      bits, group_size, zero_offset, out_dtype, backend, group=0):
    torch._check_value(backend in BACKENDS,
                       lambda: f"spike_linear: backend must be one of {BACKENDS}, got {backend!r}")
    _same_device("spike_linear", "planes", planes, sign=sign, hi=hi, scale=scale, zero=zero,
                 qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx, packed=packed,
                 code_sums=code_sums, bias=bias)
    return planes.new_empty((planes.shape[1], scales.shape[1]), dtype=out_dtype)


def gptq_dequantize(qweight: Optional[Tensor], qzeros: Tensor, scales: Tensor, g_idx: Tensor,
                    packed: Optional[Tensor], bits: int, group_size: int,
                    zero_offset: int) -> Tensor:
    """``W_hat`` float16 ``[N, K]``, bit exact: ``fp16(float32(scales[g, n]) * float32(q - z))``
    on the kernel form of a GPTQ layer, as ``spike_linear`` takes it."""
    out = _ops.gptq_dequantize.default(qweight, qzeros, scales, g_idx, packed, bits, group_size,
                                       zero_offset)
    if torch.is_grad_enabled() and scales.requires_grad:
        return _no_gradient("gptq_dequantize", out, scales)
    return out


@torch.library.register_fake("spikeops::gptq_dequantize")
def _(qweight, qzeros, scales, g_idx, packed, bits, group_size, zero_offset):
    _same_device("gptq_dequantize", "scales", scales, qweight=qweight, qzeros=qzeros,
                 g_idx=g_idx, packed=packed)
    return scales.new_empty((scales.shape[1], g_idx.shape[0]), dtype=torch.float16)


def spike_matmul(a_planes: Tensor, a_sign: Optional[Tensor], a_hi: Optional[Tensor],
                 a_scale: Tensor, a_zero: Optional[Tensor], b_planes: Tensor,
                 b_sign: Optional[Tensor], b_hi: Optional[Tensor], b_scale: Tensor,
                 b_zero: Optional[Tensor], K: int, batch: int, heads: int, kv_heads: int,
                 keys: int, causal: bool = False,
                 out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``out [batch, heads, Ma, keys] = A_hat @ B_hat^T`` per head, exact integer plane-pair
    sums and one float64 epilogue (docs/ops.md, spike_matmul): A rows ``(batch, head, i)``, B
    rows ``(batch, kv head, j)`` of which the first ``keys`` of each head are read; query head
    h reads kv head ``h // (heads // kv_heads)``; ``causal`` writes -inf where
    ``j > keys - Ma + i``."""
    return _ops.spike_matmul.default(a_planes, a_sign, a_hi, a_scale, a_zero, b_planes, b_sign,
                                     b_hi, b_scale, b_zero, K, batch, heads, kv_heads, keys,
                                     causal, out_dtype)


@torch.library.register_fake("spikeops::spike_matmul")
def _(a_planes, a_sign, a_hi, a_scale, a_zero, b_planes, b_sign, b_hi, b_scale, b_zero, K, batch,
      heads, kv_heads, keys, causal, out_dtype):
    _same_device("spike_matmul", "a_planes", a_planes, a_sign=a_sign, a_hi=a_hi,
                 a_scale=a_scale, a_zero=a_zero, b_planes=b_planes, b_sign=b_sign, b_hi=b_hi,
                 b_scale=b_scale, b_zero=b_zero)
    torch._check_value(batch >= 1 and heads >= 1 and kv_heads >= 1 and heads % kv_heads == 0,
                       lambda: f"spike_matmul: batch, heads and kv_heads must be >= 1 with heads "
                               f"a multiple of kv_heads, got {batch}, {heads}, {kv_heads}")
    Ma = a_planes.shape[1] // (batch * heads)
    return a_planes.new_empty((batch, heads, Ma, keys), dtype=out_dtype)


def prob_matmul(probs: Tensor, token_scale: Tensor, b_planes: Tensor, b_sign: Optional[Tensor],
                b_hi: Optional[Tensor], b_scale: Tensor, b_zero: Optional[Tensor],
                kv_heads: int) -> Tensor:
    """PV of attention from float probabilities (docs/ops.md, prob_matmul): ``spike_matmul`` of
    A = ``probs [batch, heads, Ma, K]`` times B's token scales (row ``(batch, kv head)`` of
    ``token_scale [batch * kv_heads, S >= K]``), encoded per row as static unsigned 8-bit codes
    of scale ``max / 255`` (1 where the max is not positive), and every row of B; float32
    ``[batch, heads, Ma, Lb]``. On the CPU the codes are made inside the matmul kernel."""
    return _ops.prob_matmul.default(probs, token_scale, b_planes, b_sign, b_hi, b_scale, b_zero,
                                    kv_heads)


@torch.library.register_fake("spikeops::prob_matmul")
def _(probs, token_scale, b_planes, b_sign, b_hi, b_scale, b_zero, kv_heads):
    _same_device("prob_matmul", "probs", probs, token_scale=token_scale, b_planes=b_planes,
                 b_sign=b_sign, b_hi=b_hi, b_scale=b_scale, b_zero=b_zero)
    torch._check_value(probs.dim() == 4 and kv_heads >= 1 and probs.shape[1] % kv_heads == 0,
                       lambda: f"prob_matmul: probs must be [batch, heads, Ma, K] with heads a "
                               f"multiple of kv_heads, got {list(probs.shape)}, {kv_heads}")
    batch, heads, Ma, _ = probs.shape
    return probs.new_empty((batch, heads, Ma, b_planes.shape[1] // (batch * kv_heads)),
                           dtype=torch.float32)


def channel_major_write(planes: Tensor, sign: Optional[Tensor], out: Tensor, K: int,
                        start: int) -> None:
    """Write T tokens' spike words (``planes [P, G * T, ceil(K / 32)]``, ``sign`` or None: rows
    ``(g, t)``, channel k at bit k, one range) into the channel-major words ``out`` int32
    ``[P + (sign given), G * K, words]`` (rows ``(g, k)``, token j at bit j), in place, at tokens
    ``start .. start + T``: earlier tokens' bits kept, later tokens' bits of the words written
    cleared, a sign bit only where a plane bit is (docs/ops.md, channel_major_write)."""
    _ops.channel_major_write.default(planes, sign, out, K, start)


@torch.library.register_fake("spikeops::channel_major_write")
def _(planes, sign, out, K, start):
    _same_device("channel_major_write", "planes", planes, sign=sign, out=out)


# ----------------------------------------------------------------------------- the CPU layout
# layout_group(bits, group_size, K) of csrc/kernel_args.h: the channels per group of the CPU
# layout of such a layer (group_size 0: act order), 0 where the layout cannot hold it. Its one
# definition is there; spikeops.GPTQWeight and the fake below ask it.
layout_group = _C.layout_group


def cpu_layout(qweight: Tensor, bits: int, group_size: int, K: int) -> tuple:
    """The CPU layout ``(packed uint8 [ceil(N/16), ceil(K/8), 64], code_sums uint16 [G, N])``
    of the 4-bit codes in ``qweight`` int32 ``[ceil(K/8), N]`` (GPTQ packing), in groups of
    ``group_size`` channels (docs/ops.md, spike_linear, "CPU layout"); CPU tensors of a layer
    that ``layout_group`` admits. Fields of channels past K are dropped."""
    return _ops.cpu_layout.default(qweight, bits, group_size, K)


@torch.library.register_fake("spikeops::cpu_layout")
def _(qweight, bits, group_size, K):
    torch._check_value(layout_group(bits, group_size, K) > 0,
                       lambda: f"cpu_layout: the CPU layout holds only 4-bit codes in groups it "
                               f"admits (docs/ops.md), got bits = {bits}, group_size = "
                               f"{group_size}, K = {K}")
    N = qweight.shape[1]
    return (qweight.new_empty(((N + 15) // 16, (K + 7) // 8, 64), dtype=torch.uint8),
            qweight.new_empty((-(-K // group_size), N), dtype=torch.uint16))


def cpu_layout_qweight(packed: Tensor, K: int, N: int) -> Tensor:
    """``qweight`` int32 ``[ceil(K/8), N]`` (GPTQ packing of 4-bit codes) of the CPU layout
    ``packed`` of a layer of K inputs and N outputs: ``cpu_layout``'s inverse, bit for bit
    where K is a multiple of 8 (else the padding fields are 0)."""
    return _ops.cpu_layout_qweight.default(packed, K, N)


@torch.library.register_fake("spikeops::cpu_layout_qweight")
def _(packed, K, N):
    return packed.new_empty(((K + 7) // 8, N), dtype=_INT32)


# ----------------------------------------------------------------------------- hadamard
def hadamard(x: Tensor, n: int, scale: float = 1.0) -> Tensor:
    """``x`` (float32, float16, bfloat16 or float64; last dimension a multiple of n, a power of
    two) times the +-1 Sylvester Hadamard matrix H_n per block of n channels: each output the
    float64 butterfly sum rounded once to x's dtype, then, unless ``scale`` is 1, times
    ``scale`` as ``y * scale`` would (docs/ops.md, hadamard). Differentiable: H_n is symmetric,
    so x's gradient is ``hadamard(grad, n, scale)``."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Hadamard.apply(x, n, scale)
    return _ops.hadamard.default(x, n, scale)


class _Hadamard(torch.autograd.Function):
    """hadamard with its gradient, entered only when x requires one (no autograd kernel on the
    op: see "no gradients" above for the cost that avoids)."""

    @staticmethod
    def forward(ctx, x, n, scale):
        ctx.n, ctx.scale = n, scale
        return _ops.hadamard.default(x, n, scale)

    @staticmethod
    def backward(ctx, grad):
        return hadamard(grad, ctx.n, ctx.scale), None, None


@torch.library.register_fake("spikeops::hadamard")
def _(x, n, scale=1.0):
    torch._check_value(n >= 1 and n & (n - 1) == 0 and x.dim() >= 1 and x.shape[-1] % n == 0,
                       lambda: f"hadamard: n must be a power of two dividing x's last dimension, "
                               f"got n = {n} and x of shape {tuple(x.shape)}")
    return x.new_empty(x.shape)
