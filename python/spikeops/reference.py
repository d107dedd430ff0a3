"""Plain-PyTorch specification of every op of ``torch.ops.spikeops``: slow, readable, and written
from docs/ops.md, not from the kernels. Each function takes the arguments of the wrapper of the same
name in ``spikeops.ops`` (absent tensors as None) and returns what the op returns, bit for bit.

Shapes: M tokens, K inputs, N outputs, P planes, W = ceil(K / 32) words, R scale columns (ranges,
or activation groups of ``group`` channels), G weight groups.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .gptq import pack, unpack

Tensor = torch.Tensor
_F32 = torch.float32


# ----------------------------------------------------------------------------- bit planes
def pack_bits(bits: Tensor) -> Tensor:
    """bool ``[M, K]`` -> int32 ``[M, W]``: element k is bit ``k % 32`` of word ``k // 32``."""
    M, K = bits.shape
    W = (K + 31) // 32
    padded = torch.zeros(M, W * 32, dtype=torch.int64, device=bits.device)
    padded[:, :K] = bits.to(torch.int64)
    words = (padded.view(M, W, 32) << torch.arange(32, device=bits.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bits(words: Tensor, K: int) -> Tensor:
    """int32 ``[..., W]`` -> bool ``[..., K]``."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    bits = (w.unsqueeze(-1) >> torch.arange(32, device=words.device)) & 1
    return bits.flatten(-2)[..., :K].bool()


def _codes(planes: Tensor, sign: Optional[Tensor], K: int, only_plane: Optional[int] = None):
    """Signed codes ``s * Q`` (int64 ``[M, K]``), or ``s * bit_p(Q)`` for one plane."""
    P = planes.shape[0]
    q = torch.zeros(planes.shape[1], K, dtype=torch.int64, device=planes.device)
    for p in range(P):
        if only_plane is None or p == only_plane:
            q += unpack_bits(planes[p], K).to(torch.int64) << (p if only_plane is None else 0)
    if sign is not None:
        q = torch.where(unpack_bits(sign, K), -q, q)
    return q


def _columns(hi: Optional[Tensor], group: int, M: int, K: int, device) -> Tensor:
    """Scale column of every element, int64 ``[M, K]``: its activation group ``k // group``
    (``group > 0``), its range bit (``hi``), or 0."""
    if group > 0:
        return (torch.arange(K, device=device) // group).expand(M, K)
    if hi is None:
        return torch.zeros(M, K, dtype=torch.int64, device=device)
    return unpack_bits(hi, K).to(torch.int64)


# ----------------------------------------------------------------------------- encoding
def _f32(v: float, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), v, dtype=_F32, device=like.device)


def _exact_mean_abs(x: Tensor) -> Tensor:
    """mean|x| per row: the exact sum (math.fsum) rounded to float64, / K, rounded to float32."""
    rows = x.abs().double().cpu().tolist()
    return torch.tensor([math.fsum(r) / len(r) for r in rows], dtype=torch.float64,
                        device=x.device).to(_F32)


def _quantizer(mode, bits, x, mn, mx, amax, gamma, scale, zero):
    """(s [M], z [M] as float32, qmax) of one range (docs/ops.md)."""
    signed = mode in ("absmax", "absmean") or (mode == "static" and zero is None)
    qmax = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    q = _f32(float(qmax), x)
    g = _f32(gamma, x)
    if mode == "minmax":
        s = torch.clamp(g * (mx - mn) / q, 1e-5, 1e4)
        z = torch.round(torch.clamp(-(g * mn) / s, -1e4, 1e4))
    elif mode == "absmax":
        s = torch.clamp(g * amax / q, 1e-5, 1e4)
        z = torch.zeros_like(s)
    elif mode == "absmean":
        s = torch.clamp(g * _exact_mean_abs(x), 1e-5, 1e4)
        z = torch.zeros_like(s)
    else:  # static
        s = scale.to(_F32)
        z = zero.to(_F32) if zero is not None else torch.zeros_like(s)
    return s, z, qmax, signed


def _code(xf, s, z, qmax, signed):
    """Q of every element (float32 ``[M, K']``) under per-row quantizers s, z ``[M]``."""
    if signed:
        return torch.minimum(torch.round(xf.abs() / s[:, None]), xf.new_full(xf.shape, qmax))
    return torch.clamp(torch.round(xf / s[:, None]) + z[:, None], 0, qmax)


def gif_encode(x: Tensor, mode: str, bits: int, gamma: float = 1.0,
               salient_mask: Optional[Tensor] = None, salient_bits: int = 0,
               scale: Optional[Tensor] = None, zero: Optional[Tensor] = None,
               theta_nor: float = 0.0, theta_out: float = 0.0, group: int = 0):
    x = x.to(_F32)
    M, K = x.shape
    finite = torch.isfinite(x).all(dim=1)
    xf = torch.where(finite[:, None], x, torch.zeros_like(x))  # statistics of finite rows only
    mn, mx = xf.min(dim=1).values, xf.max(dim=1).values
    amax = xf.abs().max(dim=1).values

    if mode == "oat":
        P, signed = bits, True
        xc = torch.clamp(xf, -theta_out, theta_out)
        a = xc.abs()
        r = a >= torch.tensor(theta_nor, dtype=_F32)
        th = torch.where(r, torch.tensor(theta_out, dtype=_F32), torch.tensor(theta_nor, dtype=_F32))
        two_p = float(2**P)
        Q = torch.minimum(torch.floor(a / th * two_p), a.new_full(a.shape, two_p - 1))
        neg = xf < 0
        steps = [torch.tensor(theta_nor, dtype=_F32) / two_p, torch.tensor(theta_out, dtype=_F32) / two_p]
        scale_out = torch.stack([s.expand(M) for s in steps], dim=1).to(x.device)
        zero_out = None
    elif group > 0:
        # Activation groups: every statistic and quantizer per (row, group of channels).
        Qs, scales, zeros = [], [], []
        for u, k0 in enumerate(range(0, K, group)):
            xs = xf[:, k0:k0 + group]
            s, z, qmax, signed = _quantizer(
                mode, bits, xs, xs.min(dim=1).values, xs.max(dim=1).values,
                xs.abs().max(dim=1).values, gamma, None if scale is None else scale[:, u],
                None if zero is None else zero[:, u])
            Qs.append(_code(xs, s, z, qmax, signed))
            scales.append(s)
            zeros.append(z)
        P = bits - 1 if signed else bits
        Q = torch.cat(Qs, dim=1)
        r = torch.zeros(M, K, dtype=torch.bool, device=x.device)
        neg = xf < 0
        scale_out = torch.stack(scales, dim=1)
        zero_out = None if signed else torch.stack(zeros, dim=1).to(torch.int32)
    else:
        ranges = [bits] + ([salient_bits] if salient_mask is not None else [])
        Qs, scales, zeros = [], [], []
        for b in ranges:
            s, z, qmax, signed = _quantizer(mode, b, xf, mn, mx, amax, gamma, scale, zero)
            Qs.append(_code(xf, s, z, qmax, signed))
            scales.append(s)
            zeros.append(z)
        P = (max(ranges) - 1) if signed else max(ranges)
        if salient_mask is not None:
            r = salient_mask[None, :].expand(M, K)
            Q = torch.where(r, Qs[1], Qs[0])
        else:
            r = torch.zeros(M, K, dtype=torch.bool, device=x.device)
            Q = Qs[0]
        neg = xf < 0
        scale_out = torch.stack(scales, dim=1)
        zero_out = None if signed else torch.stack(zeros, dim=1).to(torch.int32)

    Q = torch.where(finite[:, None], Q.to(torch.int64), 0)
    neg = neg & (Q > 0)
    nan = torch.tensor(float("nan"), dtype=_F32, device=x.device)
    scale_out = torch.where(finite[:, None], scale_out, nan)
    if zero_out is not None:
        zero_out = torch.where(finite[:, None], zero_out, 0)
    if mode == "oat":
        r = r & finite[:, None]
    planes = torch.stack([pack_bits(((Q >> p) & 1).bool()) for p in range(P)])
    sign = pack_bits(neg) if signed else None
    R = 2 if (salient_mask is not None or mode == "oat") else 1
    hi = pack_bits(r) if R == 2 else None
    zero_t = zero_out
    return planes, sign, hi, scale_out, zero_t


def feedback_encode(x: Tensor, feedback: Tensor, bits: int, gamma: float = 1.0):
    """docs/ops.md, feedback_encode: gif_encode's minmax statistics per row, then the channels
    in order, every row at once, each error carried into the later channels."""
    G, N, K = x.shape
    rows = x.reshape(G * N, K).to(_F32)
    _, _, _, scale, zero = gif_encode(rows, "minmax", bits, gamma)
    s, z = scale[:, 0], zero[:, 0].to(_F32)
    finite = torch.isfinite(rows).all(dim=1)
    r = torch.where(finite[:, None], rows, torch.zeros_like(rows))
    F = feedback.to(_F32).repeat_interleave(N, dim=0)  # [G * N, K, K]: row (g, n) reads g
    Q = torch.zeros(G * N, K, dtype=torch.int64, device=x.device)
    qmax = (1 << bits) - 1
    for j in range(K):
        q = torch.clamp(torch.round(r[:, j] / s) + z, 0, qmax)
        error = r[:, j] - s * (q - z)
        Q[:, j] = q.to(torch.int64)
        r[:, j + 1:] = r[:, j + 1:] - error[:, None] * F[:, j, j + 1:]
    Q = torch.where(finite[:, None], Q, 0)
    planes = torch.stack([pack_bits(((Q >> p) & 1).bool()) for p in range(bits)])
    return planes, scale, zero


# ----------------------------------------------------------------------------- consumers
def spike_decode(planes, sign, hi, scale, zero, K, dtype=torch.float32, group=0):
    M = planes.shape[1]
    c = _codes(planes, sign, K)
    r = _columns(hi, group, M, K, planes.device)
    z = zero.gather(1, r).to(torch.int64) if zero is not None else 0
    return (scale.gather(1, r) * (c - z).to(_F32)).to(dtype)


def spike_counts(planes, sign=None, negative=False):
    P, M, W = planes.shape
    bits = unpack_bits(planes, 32 * W)
    if negative:
        bits = bits & unpack_bits(sign, 32 * W)[None]
    return bits.sum(-1).to(torch.int64)


def spike_stats(planes, sign=None):
    P, M, W = planes.shape
    bits = unpack_bits(planes, 32 * W)                  # [P, M, 32W]
    neg = bits & unpack_bits(sign, 32 * W)[None] if sign is not None else torch.zeros_like(bits)
    fired = bits.amax(0)                                # [M, 32W]: any plane fired
    zero_words = (fired.reshape(M, W, 32).amax(-1) == 0).sum()
    return torch.cat([bits.sum((1, 2)), neg.sum((1, 2)), fired.sum().reshape(1),
                      zero_words.reshape(1)]).to(torch.int64)


def _exact_matmul(a, b):
    """``a @ b`` of int64 matrices, exact; on the CPU, which has the int64 matmul that CUDA lacks
    (the result returns to a's device)."""
    return (a.cpu() @ b.cpu()).to(a.device)


def spike_accumulate(planes, sign, hi, w, per_plane=False, group=0):
    K = w.shape[0]
    M = planes.shape[1]
    r = _columns(hi, group, M, K, planes.device)
    R = 2 if hi is not None else -(-K // group) if group > 0 else 1
    w64 = w.to(torch.int64)

    def per_range(c):
        return torch.stack([_exact_matmul(c * (r == i), w64) for i in range(R)])

    if per_plane:
        return torch.stack([per_range(_codes(planes, sign, K, only_plane=p))
                            for p in range(planes.shape[0])])
    return per_range(_codes(planes, sign, K))


def _groups(g_idx, group_size):
    """Group of every channel, int64 ``[K]``: ``k // group_size``, or ``g_idx`` when it is 0."""
    K = g_idx.shape[0]
    if group_size > 0:
        return torch.arange(K, device=g_idx.device) // group_size
    return g_idx.to(torch.int64)


def _weights(qweight, qzeros, scales, packed, bits, K, zero_offset):
    """Codes q int64 ``[K, N]`` (from qweight, else from the CPU layout ``packed``), true zero
    points z int64 ``[G, N]`` and float32 scales ``[G, N]`` of the kernel form (docs/ops.md,
    spike_linear)."""
    N = scales.shape[1]
    q = unpack(qweight, bits, K, dim=0) if qweight is not None else _layout_codes(packed, K, N)
    z = unpack(qzeros, bits, N, dim=1).to(torch.int64) + zero_offset
    return q.to(torch.int64), z, scales.to(_F32)


def spike_linear(planes, sign, hi, scale, zero, qweight, qzeros, scales, g_idx, packed,
                 code_sums, bias, bits, group_size, zero_offset, out_dtype=torch.float16,
                 backend="auto", group=0):
    """docs/ops.md, spike_linear: D[g, r] = sum over k in weight group g and scale column r of
    (s*Q - zero[r]) * (q - z), exact integers; S_r = sum over g ascending of
    float64(scales[g] * float32(D[g, r])); y = float32(sum over r of scale[m, r] * S_r + bias)
    (products and sums in float64), then cast to out_dtype. With activation groups column r
    lies in weight group ``r * group // group_size`` only. ``backend`` and where the codes are
    held (``qweight`` or the CPU layout ``packed``) do not change the result."""
    K, M = g_idx.shape[0], planes.shape[1]
    G, N = scales.shape
    q, z, scales = _weights(qweight, qzeros, scales, packed, bits, K, zero_offset)
    g_of_k = _groups(g_idx, group_size)
    wd = q - z[g_of_k]  # q - z of every weight, [K, N]
    r = _columns(hi, group, M, K, planes.device)
    R = scale.shape[1]
    c = _codes(planes, sign, K) - (zero.gather(1, r).to(torch.int64) if zero is not None else 0)
    y = None
    for ri in range(R):
        S = torch.zeros(M, N, dtype=torch.float64, device=planes.device)
        for g in ([ri * group // group_size] if group > 0 else range(G)):
            mask = (r == ri) & (g_of_k == g)[None, :]
            D = _exact_matmul(c * mask, wd)
            S = S + (scales[g][None, :] * D.to(_F32)).double()
        term = scale[:, ri].double()[:, None] * S
        y = term if y is None else y + term
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(_F32).to(out_dtype)


def tolerance(x_hat: Tensor, W: Tensor, y_ref: Tensor, out_dtype: torch.dtype) -> Tensor:
    """docs/ops.md, spike_linear's float error: ``|y - y_ref| <= 1e-5 * (|x_hat| @ |W|) +
    eps(out_dtype) * |y_ref|`` elementwise, where ``y_ref = x_hat @ W (+ bias)`` in float64 with
    ``x_hat [M, K]`` the decoded spikes and ``W [K, N]`` the exact weights. Returns the bound."""
    return 1e-5 * (x_hat.abs() @ W.abs()) + torch.finfo(out_dtype).eps * y_ref.abs()


def gptq_dequantize(qweight, qzeros, scales, g_idx, packed, bits, group_size, zero_offset):
    K = g_idx.shape[0]
    q, z, scales = _weights(qweight, qzeros, scales, packed, bits, K, zero_offset)
    g = _groups(g_idx, group_size)
    return (scales[g] * (q - z[g]).to(_F32)).to(torch.float16).t().contiguous()


def spike_matmul(a_planes, a_sign, a_hi, a_scale, a_zero, b_planes, b_sign, b_hi, b_scale,
                 b_zero, K, batch, heads, kv_heads, keys, causal=False, out_dtype=_F32):
    """docs/ops.md, spike_matmul: codes c = s*Q - zero[r] of every element (int64), D[ra, rb] =
    sum over channels in range ra of A and rb of B of c_a * c_b (exact integers); out =
    float32(sum over (ra, rb) in order of float64(scale_a[ra]) * float64(scale_b[rb]) *
    float64(D)), cast to out_dtype; causal: -inf where j > keys - Ma + i."""
    Ma = a_planes.shape[1] // (batch * heads)
    Lb = b_planes.shape[1] // (batch * kv_heads)

    def codes(planes, sign, hi, zero):
        M = planes.shape[1]
        r = _columns(hi, 0, M, K, planes.device)
        c = _codes(planes, sign, K) - (zero.gather(1, r).to(torch.int64) if zero is not None
                                       else 0)
        return c, r

    ca, ra = codes(a_planes, a_sign, a_hi, a_zero)
    cb, rb = codes(b_planes, b_sign, b_hi, b_zero)
    ca, ra = ca.view(batch, heads, Ma, K), ra.view(batch, heads, Ma, K)
    group = heads // kv_heads
    cb = cb.view(batch, kv_heads, Lb, K)[:, :, :keys].repeat_interleave(group, dim=1)
    rb = rb.view(batch, kv_heads, Lb, K)[:, :, :keys].repeat_interleave(group, dim=1)
    sa = a_scale.double().view(batch, heads, Ma, -1)
    sb = b_scale.double().view(batch, kv_heads, Lb, -1)[:, :, :keys]
    sb = sb.repeat_interleave(group, dim=1)
    out = torch.zeros(batch, heads, Ma, keys, dtype=torch.float64, device=a_planes.device)
    for i in range(sa.shape[-1]):
        for j in range(sb.shape[-1]):
            D = _exact_matmul((ca * (ra == i)).reshape(-1, Ma, K),
                              (cb * (rb == j)).reshape(-1, keys, K).transpose(1, 2))
            s = sa[..., i, None] * sb[..., j].unsqueeze(2)
            out = out + s * D.view(batch, heads, Ma, keys).double()
    out = out.to(_F32)
    if causal:
        i = torch.arange(Ma, device=out.device)[:, None]
        j = torch.arange(keys, device=out.device)[None, :]
        out = out.masked_fill(j > keys - Ma + i, float("-inf"))
    return out.to(out_dtype)


def prob_matmul(probs, token_scale, b_planes, b_sign, b_hi, b_scale, b_zero, kv_heads):
    """docs/ops.md, prob_matmul: weights w = float32(probs * token scale of the row's kv head
    and token), per row s = max(w) / 255 (1 where that max is not positive or NaN), A = the
    static unsigned 8-bit codes of w under s (gif_encode, zero 0), then spike_matmul(A, B)."""
    batch, heads, Ma, K = probs.shape
    rows = batch * heads * Ma
    w = (probs.reshape(batch, kv_heads, heads // kv_heads, Ma, K) *
         token_scale[:, :K].reshape(batch, kv_heads, 1, 1, K)).reshape(rows, K)
    top = w.amax(-1)
    s = torch.where(top > 0, top / 255, torch.ones_like(top))
    planes, sign, hi, scale, zero = gif_encode(w, "static", 8, scale=s,
                                               zero=torch.zeros(rows, dtype=torch.int32))
    return spike_matmul(planes, sign, hi, scale, zero, b_planes, b_sign, b_hi, b_scale, b_zero,
                        K, batch, heads, kv_heads, b_planes.shape[1] // (batch * kv_heads))


def channel_major_write(planes, sign, out, K, start):
    """docs/ops.md, channel_major_write, as a function: the new ``out`` (a copy)."""
    G = out.shape[1] // K
    T = planes.shape[1] // G
    words = planes if sign is None else torch.cat((planes, sign.unsqueeze(0)))
    tokens = unpack_bits(words, K).view(-1, G, T, K)
    if sign is not None:
        tokens[-1] &= tokens[:-1].any(0)  # a code 0 has no sign
    bits = unpack_bits(out, 32 * out.shape[2]).view(-1, G, K, 32 * out.shape[2])
    bits[..., start:32 * (-(-(start + T) // 32))] = False
    bits[..., start:start + T] = tokens.transpose(-1, -2)
    return pack_bits(bits.reshape(-1, bits.shape[-1])).view(out.shape)


# ----------------------------------------------------------------------------- the CPU layout
def cpu_layout(qweight, bits, group_size, K):
    """docs/ops.md, "CPU layout": row ``[t, b]`` of ``packed`` holds 64 bytes, byte ``4n + j``
    the code of channel ``8b + j`` of column ``16t + n`` in its low nibble and that of channel
    ``8b + 4 + j`` in its high nibble (zeros past K and N); ``code_sums[g, n]`` is the sum of the
    codes of group g (channels ``k // group_size == g``) in column n."""
    q = unpack(qweight, bits, K, dim=0)
    N = q.shape[1]
    KB, NT = -(-K // 8), -(-N // 16)
    padded = torch.zeros(KB * 8, NT * 16, dtype=torch.uint8)
    padded[:K, :N] = q.to(torch.uint8)
    t = padded.view(KB, 2, 4, NT, 16)                     # k = 8b + 4h + j, n = 16t + c
    packed = (t[:, 0] | (t[:, 1] << 4)).permute(2, 0, 3, 1).contiguous()  # [NT, KB, 16, 4]
    groups = torch.arange(K) // group_size
    sums = torch.zeros(-(-K // group_size), N, dtype=torch.int64)
    sums.index_add_(0, groups, q.to(torch.int64))
    return packed.view(NT, KB, 64), sums.to(torch.int32).to(torch.uint16)


def _layout_codes(packed, K, N):
    """The codes int32 ``[K, N]`` that the CPU layout ``packed`` holds."""
    NT, KB = packed.shape[0], packed.shape[1]
    p = packed.view(NT, KB, 16, 4).permute(1, 3, 0, 2)  # [b, j, t, c]
    q = torch.stack([p & 15, p >> 4], dim=1).reshape(KB * 8, NT * 16)[:K, :N]
    return q.to(torch.int32)


def cpu_layout_qweight(packed, K, N):
    """GPTQ's ``qweight`` of the codes of channels below K that the CPU layout holds."""
    return pack(_layout_codes(packed, K, N), 4, dim=0)



# ----------------------------------------------------------------------------- hadamard
def round_once(v: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 ``v`` rounded once to ``dtype`` (float64, float32, float16 or bfloat16), to nearest with
    ties to even. torch's own float64 -> float16 / bfloat16 conversion goes through float32 and
    can round twice, so this takes that result c or its neighbour toward v, whichever is nearer
    to v, the even one on a tie (infinity counting as the grid point after the largest value)."""
    c = v.to(dtype)
    if dtype in (torch.float32, torch.float64):
        return c
    past_max = 2.0 ** (math.floor(math.log2(torch.finfo(dtype).max)) + 1)

    def value(t):  # the float64 value of a grid point
        d = t.double()
        return torch.where(d.isinf(), torch.sign(d) * past_max, d)

    other = torch.nextafter(c, torch.where(c.double() < v, math.inf, -math.inf).to(dtype))
    d_c, d_other = (v - value(c)).abs(), (v - value(other)).abs()
    even = (other.view(torch.int16) & 1) == 0
    take = v.isfinite() & ((d_other < d_c) | ((d_other == d_c) & even))
    return torch.where(take, other, c)


def hadamard(x: Tensor, n: int, scale: float = 1.0) -> Tensor:
    """``x`` times the +-1 Sylvester Hadamard matrix H_n (``H_1 = [1]``, ``H_2m = [[H_m, H_m],
    [H_m, -H_m]]``) per block of n channels of the last dimension: the butterfly stages
    h = 1, 2, ..., n / 2 in float64 (elements j, j + h of each group of 2h become their sum and
    difference), each output rounded once to x's dtype, then, unless ``scale`` is 1, times
    ``scale`` as torch multiplies a tensor by a Python float (in float32 by float32(scale) for
    the 16- and 32-bit dtypes, in float64 for float64) and rounded to x's dtype again."""
    v = x.double().reshape(-1, n)
    h = 1
    while h < n:
        pairs = v.reshape(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((a + b, a - b), 2).reshape(-1, n)
        h *= 2
    y = round_once(v, x.dtype).reshape(x.shape)
    return y if scale == 1.0 else y * scale
