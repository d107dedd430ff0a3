"""Gradients of the spiking path (docs/ops.md, "Gradients").

The forward is always the exact spike path (``encode`` + ``spike_linear``, bit for bit); the
backward is the straight-through estimator (STE) of docs/ops.md's float formula
``x_hat = scale * (sign * Q - zero)``: autograd of it with ``round`` (``floor`` for oat) passed
straight through and ``torch.clamp`` for the clamps. With s an element's scale, z its zero
point and qmax its range's top code:

- ``d x_hat / d x = 1`` where the element's rounded code before the clamp lies in the code
  range (``round(|x| / s) <= qmax`` for signed codes, ``0 <= round(x / s) + z <= qmax`` for
  unsigned ones, ``|x| <= theta_out`` and ``floor(a / theta_r * 2^P) <= 2^P - 1`` for oat),
  else 0 (clipped). The per-token statistics (min, max, max|x|, mean|x|) are constants: no
  gradient flows through them into x.
- ``d x_hat / d s = (x_hat - x * inside) / s`` (LSQ: the rounding residual ``Q - x / s``
  inside, the code bound outside), chained to the float parameter s is made of: the clipping
  ratio ``gamma`` of absmax / absmean (``s = clamp(gamma * max|x| / qmax, 1e-5, 1e4)``,
  ``clamp(gamma * mean|x|, 1e-5, 1e4)``), the thresholds ``theta`` of oat
  (``s_r = theta_r / 2^P``) or a static scale.

Public pieces: ``fake_quantize`` (differentiable ``encode(x).decode()``), the differentiable
``SpikeLinear`` forward (``layer_forward``, which ``SpikeLinear.forward`` calls when a gradient
may be wanted), ``make_trainable`` / ``freeze`` (a clipping ratio or thresholds, and the bias,
as ``nn.Parameter`` of a layer) and ``learn_clipping``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from . import _checks, ops
from .nn import OUT_DTYPES, kept_encodings, spike_layers
from .reference import unpack_bits
from .spikes import Encoding, SpikeTensor, clip_gamma, encode, encode_rows

_F32 = torch.float32
SCALE_MIN, SCALE_MAX = 1e-5, 1e4  # the clamp of absmax / absmean / minmax scales (docs/ops.md)
CLIP_MODES = ("absmax", "absmean", "oat")  # encodings with a trainable clipping parameter


# ----------------------------------------------------------------------------- the STE
def _qmax(enc: Encoding, signed: bool, R: int) -> List[float]:
    """The top code of each range (oat: not used)."""
    widths = [enc.bits] + ([enc.salient_bits] if R == 2 and enc.mode != "oat" else [])
    return [float((1 << (b - 1)) - 1 if signed else (1 << b) - 1) for b in widths]


def encoding_grads(g: torch.Tensor, x: torch.Tensor, fields, enc: Encoding,
                   need_x: bool = True, need_scale: bool = True):
    """The STE backward of one encoding.

    g: float32 ``[M, K]``, the gradient with respect to ``x_hat``; x: the encoded rows
    ``[M, K]``; fields: the exact spikes ``(planes, sign, hi, scale, zero)`` of x (absent ones
    None). Returns ``(grad_x float32 [M, K] or None, grad_s float32 [M, R] or None)``:
    ``grad_x = g * inside``, ``grad_s[m, r] = sum over k in scale column r (range, or
    activation group of enc.group channels) of g * (x_hat - x * inside) / s``, where inside =
    the element's rounded code before the clamp lies in its code range. Rows that were not
    finite (scale NaN) pass no gradient.
    """
    M, K = x.shape
    if M == 0:
        return (g.new_zeros(M, K) if need_x else None,
                g.new_zeros(M, fields[3].shape[1]) if need_scale else None)
    planes, sign, hi, scale, zero = fields
    two_p = float(1 << planes.shape[0])  # oat: 2^P
    R = scale.shape[1]
    xf = x.to(_F32)
    r = unpack_bits(hi, K) if hi is not None else None
    # The scale column of each channel with activation groups (one quantizer per column).
    col = torch.arange(K, device=x.device) // enc.group if enc.group else None
    if col is not None:
        s = scale[:, col]
    else:
        s = scale if R == 1 else torch.where(r, scale[:, 1:2], scale[:, 0:1])
    signed = ops.is_signed(enc.mode, zero)
    # inside: the autograd of docs/ops.md's formula with round (floor for oat) passed straight
    # through and torch.clamp's inclusive bounds: the element's rounded, not yet clamped code
    # lies in the code range. Same float32 operations as the op, so the same rounded codes.
    if enc.mode == "oat":
        theta_out = torch.tensor(enc.theta[1], dtype=_F32)
        theta = s * two_p  # theta_r, exact (scale = theta_r / 2^P)
        a = torch.clamp(xf, -theta_out, theta_out).abs()
        codes = torch.floor(a / theta * two_p)
        inside = (xf.abs() <= theta_out) & (codes <= two_p - 1)
    else:
        q = _qmax(enc, signed, 1 if col is not None else R)
        qmax = q[0] if len(q) == 1 else torch.where(r, q[1], q[0])
        if signed:
            inside = torch.round(xf.abs() / s) <= qmax
        else:
            z = zero.to(_F32)
            if col is not None:
                z = z[:, col]
            elif R == 2:
                z = torch.where(r, z[:, 1:2], z[:, 0:1])
            codes = torch.round(xf / s) + z
            inside = (codes >= 0) & (codes <= qmax)
    grad_x = torch.where(inside, g, 0.0) if need_x else None
    grad_s = None
    if need_scale:
        x_hat = ops.spike_decode(planes, sign, hi, scale, zero, K, _F32, enc.group)
        contrib = g * (x_hat - torch.where(inside, xf, 0.0)) / s
        if col is not None:
            grad_s = contrib.new_zeros(M, R).index_add_(1, col, contrib)
        elif R == 1:
            grad_s = contrib.sum(1, keepdim=True)
        else:
            grad_s = torch.stack([torch.where(r, 0.0, contrib).sum(1),
                                  torch.where(r, contrib, 0.0).sum(1)], dim=1)
        grad_s = torch.where(torch.isnan(scale), 0.0, grad_s)
    return grad_x, grad_s


def gamma_grad(grad_s: torch.Tensor, x: torch.Tensor, enc: Encoding) -> torch.Tensor:
    """``d loss / d gamma`` (float32 scalar) from ``grad_s [M, R]`` of an absmax / absmean
    encoding of the rows ``x [M, K]``: ``s_r = clamp(gamma * stat / div_r, 1e-5, 1e4)`` with
    stat = max|x| and div_r = qmax_r (absmax), or stat = mean|x| and div_r = 1 (absmean), over
    the row or, with activation groups, over column r's channels; the clamp passes the
    gradient inside its bounds (inclusive, as torch.clamp)."""
    xf = x.to(_F32).abs()
    spans = xf.split(enc.group, dim=1) if enc.group else [xf] * grad_s.shape[1]
    if enc.mode == "absmax":
        stats = [v.amax(1) for v in spans]
        divs = _qmax(enc, True, 1 if enc.group else grad_s.shape[1])
    else:
        stats = [v.double().mean(1).to(_F32) for v in spans]
        divs = [1.0]
    gamma = torch.tensor(clip_gamma(enc), dtype=_F32)
    total = grad_s.new_zeros(())
    for ri, stat in enumerate(stats):
        div = divs[ri] if len(divs) > 1 else divs[0]
        raw = gamma * stat / div
        passes = (raw >= SCALE_MIN) & (raw <= SCALE_MAX)
        total = total + torch.where(passes, grad_s[:, ri] * stat / div, 0.0).sum()
    return total


def theta_grad(grad_s: torch.Tensor, planes: int) -> torch.Tensor:
    """``d loss / d (theta_nor, theta_out)`` (float32 ``[2]``) of an oat encoding with
    ``planes`` planes from ``grad_s [M, 2]``: ``s_r = theta_r / 2^P``."""
    return grad_s.sum(0) / float(1 << planes)


# ----------------------------------------------------------------------------- fake_quantize
def _param(fn: str, name: str, value, numel: int) -> Optional[torch.Tensor]:
    if value is None:
        return None
    _checks.tensor(fn, name, value, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if value.numel() != numel:
        raise ValueError(f"{fn}: {name} must hold {numel} value(s), got shape "
                         f"{tuple(value.shape)}")
    return value


def _with_gamma(fn: str, enc: Encoding, gamma: torch.Tensor) -> Encoding:
    if enc.mode not in ("absmax", "absmean"):
        raise ValueError(f"{fn}: a trainable gamma needs mode 'absmax' or 'absmean', got mode "
                         f"{enc.mode!r} (oat trains theta, static has no clipping ratio; minmax's "
                         f"gamma is calibrated, not trained: spikeops calibrate)")
    value = float(gamma.detach())
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{fn}: gamma must be in (0, 1] (the encoding's clipping ratio), got "
                         f"{value}; clamp it after each optimizer step")
    return dataclasses.replace(enc, gamma=value)


def _with_theta(fn: str, enc: Encoding, theta: torch.Tensor) -> Encoding:
    if enc.mode != "oat":
        raise ValueError(f"{fn}: trainable theta needs mode 'oat', got mode {enc.mode!r}")
    t = tuple(float(v) for v in theta.detach().reshape(-1))
    if not (math.isfinite(t[0]) and math.isfinite(t[1]) and 0 < t[0] < t[1]):
        raise ValueError(f"{fn}: theta must satisfy 0 < theta_nor < theta_out, got {t}; project "
                         f"it after each optimizer step")
    return dataclasses.replace(enc, theta=t)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, theta, scale, enc, salient_mask, scale_value, zero):
        st = encode(x, enc, salient_mask, scale=scale.detach() if scale is not None
                    else scale_value, zero=zero)
        ctx.enc = enc
        ctx.like = {name: (t.shape, t.dtype) for name, t in
                    (("gamma", gamma), ("theta", theta), ("scale", scale)) if t is not None}
        ctx.save_for_backward(x, *st[:5])
        return st.decode(x.dtype)

    @staticmethod
    def backward(ctx, g):
        x, *fields = ctx.saved_tensors
        enc, like = ctx.enc, ctx.like
        need_x, need_gamma, need_theta, need_scale = ctx.needs_input_grad[:4]
        K = x.shape[-1]
        rows = x.reshape(-1, K)
        grad_x, grad_s = encoding_grads(g.reshape(-1, K).to(_F32), rows, fields, enc, need_x,
                                        need_gamma or need_theta or need_scale)
        gx = grad_x.reshape(x.shape).to(x.dtype) if need_x else None
        gg = gt = gs = None
        if need_gamma:
            gg = gamma_grad(grad_s, rows, enc).reshape(like["gamma"][0]).to(like["gamma"][1])
        if need_theta:
            shape, dtype = like["theta"]
            gt = theta_grad(grad_s, fields[0].shape[0]).reshape(shape).to(dtype)
        if need_scale:
            shape, dtype = like["scale"]
            gs = grad_s[:, 0]
            gs = (gs.sum() if math.prod(shape) == 1 else gs).reshape(shape).to(dtype)
        return gx, gg, gt, gs, None, None, None, None


def fake_quantize(x: torch.Tensor, enc: Encoding, salient_mask: Optional[torch.Tensor] = None,
                  scale=None, zero=None, *, gamma: Optional[torch.Tensor] = None,
                  theta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable ``encode(x, enc, salient_mask, scale, zero).decode(x.dtype)``: the same
    bits in the forward (float64 gets the float32 result widened, as ``decode`` does), the
    straight-through estimator of docs/ops.md ("Gradients") in the backward.

    Gradients flow to x and to the float parameters given as tensors: ``gamma`` (one element,
    replacing ``enc.gamma`` of absmax / absmean; in (0, 1]), ``theta`` (two elements
    ``(theta_nor, theta_out)``, replacing ``enc.theta`` of oat) and, for mode ``"static"``,
    ``scale`` (one element or one per token). ``zero`` (integer) and ``salient_mask`` (bool)
    have none.
    """
    fn = "fake_quantize"
    _checks.tensor(fn, "x", x)
    if not isinstance(enc, Encoding):
        raise TypeError(f"{fn}: enc must be a spikeops.Encoding, got {type(enc).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a float tensor, got {x.dtype}")
    gamma = _param(fn, "gamma", gamma, 1)
    theta = _param(fn, "theta", theta, 2)
    if gamma is not None:
        enc = _with_gamma(fn, enc, gamma)
    if theta is not None:
        enc = _with_theta(fn, enc, theta)
    scale_t = scale if isinstance(scale, torch.Tensor) and scale.dtype.is_floating_point \
        else None
    if enc.group and scale_t is not None and scale_t.requires_grad:
        raise ValueError(f"{fn}: a static scale with activation groups (enc.group = "
                         f"{enc.group}) has no gradient here; give it without requires_grad")
    wants = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, gamma, theta, scale_t))
    if not wants:
        return encode(x.detach(), enc, salient_mask,
                      scale=scale.detach() if scale_t is not None else scale,
                      zero=zero).decode(x.dtype)
    return _FakeQuantize.apply(x, gamma, theta, scale_t, enc, salient_mask,
                               None if scale_t is not None else scale, zero)


# ----------------------------------------------------------------------------- SpikeLinear
def _refuse_weight_grads(layer) -> None:
    held = dict(zip(("qweight", "qzeros", "scales", "g_idx", "packed", "code_sums"),
                    layer.gptq.kernel_args()))
    held.update((name, layer._buffers.get(name)) for name in ("bias", "kernel_bias"))
    for name, t in held.items():
        if t is not None and t.requires_grad:
            what = ("the bias is a buffer: make it trainable with "
                    "spikeops.autograd.make_trainable(layer, bias=True)"
                    if "bias" in name else
                    "the GPTQ weights (codes, zero points and group scales) have no gradient "
                    "in spikeops; train float weights and quantize them again")
            raise ValueError(f"SpikeLinear: {name!r} requires grad, but {what} "
                             f"(docs/ops.md, Gradients)")


class _SpikeLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, clip, bias, layer, enc, out_dtype, shape):
        spikes = encode_rows(x, enc, layer.salient_mask)
        if layer.observer is not None:
            layer.observer(layer, SpikeTensor.wrap(spikes, shape, enc.group))
        kernel_bias = bias.detach().float() if bias is not None else layer.kernel_bias
        y = layer._linear(spikes, enc.group, kernel_bias, out_dtype)
        ctx.layer, ctx.enc = layer, enc
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, *spikes)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, *fields = ctx.saved_tensors
        need_x, need_clip, need_bias = ctx.needs_input_grad[:3]
        layer, enc = ctx.layer, ctx.enc
        gx = gclip = gb = None
        gy = gy.to(_F32)
        if need_x or need_clip:
            w_hat = layer.dequantize().to(_F32)        # exact: float16 values widened
            g_hat = gy @ w_hat                         # d loss / d x_hat, [M, K]
            grad_x, grad_s = encoding_grads(g_hat, x, fields, enc, need_x, need_clip)
            if need_x:
                gx = grad_x.to(x.dtype)
            if need_clip:
                gclip = theta_grad(grad_s, fields[0].shape[0]) if enc.mode == "oat" else \
                    gamma_grad(grad_s, x, enc)
        if need_bias:
            gb = gy.sum(0).to(ctx.bias_dtype)
        return gx, gclip, gb, None, None, None, None


def layer_forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``SpikeLinear.forward`` when a gradient may be wanted (grad mode on and x requiring
    grad) or when the layer holds trainable parameters (``make_trainable``): the exact spike
    path with the parameters' current values, differentiable (``_SpikeLinearFn``). A
    ProjectionGroup never shares its spikes with such a call (nn.ProjectionGroup)."""
    fn = "SpikeLinear"
    params = layer._parameters
    clip, bias = params.get("clip"), params.get("bias")
    enc = layer.enc
    if enc is None:  # float activations: x @ W_hat^T (+ the live bias), plain autograd
        if x.device != layer.device:
            raise ValueError(f"SpikeLinear: x is on {x.device}, the layer on "
                             f"{layer.device}; move one of them")
        _refuse_weight_grads(layer)
        if layer.dense_weight is None or layer.dense_weight.dtype != x.dtype:
            layer.dense_weight = layer.dequantize().to(x.dtype)
        b = bias if bias is not None else layer.kernel_bias
        return torch.nn.functional.linear(x, layer.dense_weight,
                                          None if b is None else b.to(x.dtype))
    if clip is not None:
        enc = _with_theta(fn, enc, clip) if enc.mode == "oat" else _with_gamma(fn, enc, clip)
    out_dtype = x.dtype if x.dtype in OUT_DTYPES else _F32
    rows = x.reshape(-1, layer.in_features)
    wants = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, clip, bias))
    if wants:
        _refuse_weight_grads(layer)
        y = _SpikeLinearFn.apply(rows, clip, bias, layer, enc, out_dtype, tuple(x.shape))
    else:
        spikes = encode_rows(rows.detach(), enc, layer.salient_mask)
        if layer.observer is not None:
            layer.observer(layer, SpikeTensor.wrap(spikes, tuple(x.shape), enc.group))
        kernel_bias = bias.detach().float() if bias is not None else layer.kernel_bias
        y = layer._linear(spikes, enc.group, kernel_bias, out_dtype)
    return y.reshape(*x.shape[:-1], layer.out_features).to(x.dtype)


# ----------------------------------------------------------------------------- training
def make_trainable(module: torch.nn.Module, clip: bool = True,
                   bias: bool = False) -> List[torch.nn.Parameter]:
    """Give the SpikeLinear layers of ``module`` (or the layer itself) trainable float
    parameters and return them (for an optimizer):

    - clip: ``layer.clip``, the clipping ratio gamma (float32 scalar, from ``enc.gamma``) of
      absmax / absmean layers, or ``(theta_nor, theta_out)`` (float32 ``[2]``) of oat layers;
      layers of other encodings (minmax, float activations) are left out (given alone, such a
      layer raises ValueError).
    - bias: the layer's bias buffer becomes the parameter ``layer.bias`` (layers without a bias
      are left out).

    A layer holding parameters runs its exact forward with their current values on every call
    (one ``float()`` per call; not for ``torch.compile(fullgraph=True)``) and does not share
    its input's spikes with its q/k/v or gate/up siblings; ``freeze`` ends both. The
    parameters appear in ``state_dict`` as ``clip`` / ``bias``."""
    fn = "make_trainable"
    layers = spike_layers(module)
    made: List[torch.nn.Parameter] = []
    for name, layer in layers.items():
        if clip and "clip" not in layer._parameters:
            if layer.enc is not None and layer.enc.mode in CLIP_MODES:
                if layer.enc.mode == "oat" and layer.enc.theta is None:
                    raise ValueError(f"{fn}: layer {name!r} has an oat encoding without theta "
                                     f"(set a calibration first)")
                value = layer.enc.theta if layer.enc.mode == "oat" else clip_gamma(layer.enc)
                p = torch.nn.Parameter(torch.tensor(value, dtype=_F32,
                                                    device=layer.device))
                layer.register_parameter("clip", p)
                made.append(p)
            elif len(layers) == 1:
                raise ValueError(f"{fn}: the layer's encoding {layer.enc} has no clipping "
                                 f"parameter (modes {CLIP_MODES} have one)")
        if bias and "bias" in layer._buffers and layer._buffers["bias"] is not None:
            b = layer._buffers.pop("bias")
            p = torch.nn.Parameter(b.detach().clone())
            layer.register_parameter("bias", p)
            made.append(p)
    if not made and any(not layer._parameters for layer in layers.values()):
        raise ValueError(f"{fn}: nothing to train: no layer has an absmax, absmean or oat "
                         f"encoding (clip) or a bias (bias)")
    return made


def freeze(module: torch.nn.Module) -> Dict[str, Union[float, Tuple[float, float]]]:
    """End ``make_trainable``: every ``clip`` parameter is written into the layer's Encoding
    (gamma, or theta for oat), a bias parameter becomes the bias buffer again (its float32
    kernel copy rebuilt). Returns the written clipping values by
    layer name. Outputs are unchanged: the forward used these values already."""
    from .nn import SpikeLinear
    result: Dict[str, Union[float, Tuple[float, float]]] = {}
    layers = spike_layers(module)
    # Every value is checked before any layer changes, so a refusal leaves all of them trainable.
    encodings = {}
    for name, layer in layers.items():
        clip = layer._parameters.get("clip")
        if clip is not None:
            if layer.enc.mode == "oat":
                encodings[name] = _with_theta("freeze", layer.enc, clip)
                result[name] = encodings[name].theta
            else:
                encodings[name] = _with_gamma("freeze", layer.enc, clip)
                result[name] = encodings[name].gamma
    for name, layer in layers.items():
        if layer._parameters.pop("clip", None) is not None:
            SpikeLinear.set_encoding(layer, encodings[name], layer.salient_mask)
        b = layer._parameters.pop("bias", None)
        if b is not None:
            layer.register_buffer("bias", b.detach().clone())
            layer.kernel_bias = layer.bias.float()
    return result


def learn_clipping(model: torch.nn.Module, batches: Iterable[torch.Tensor], steps: int = 40,
                   lr: Optional[float] = None, objective: str = "distill",
                   min_gamma: float = 0.05, max_tokens: int = 512,
                   progress=True) -> Dict[str, float]:
    """Learn the clipping ratio gamma of every absmax / absmean SpikeLinear of ``model`` with
    Adam on the straight-through gradient, starting from the layers' current gamma, then
    ``freeze`` it into their Encodings; returns gamma by layer name.

    batches: int64 ``[B, T]`` token ids, cycled over the steps. objective:

    - ``"distill"``: KL divergence from the same model on float activations (every SpikeLinear
      with ``enc=None``: the GPTQ weights' own float model, run under no_grad each step) to the
      spiking model, over all next-token distributions; all layers jointly.
    - ``"loss"``: the spiking model's next-token cross-entropy on the batches; all layers
      jointly.
    - ``"layer"``: each layer alone, its output error ``||y_spikes - x W_hat^T||^2`` on its
      float-activation inputs (the first ``max_tokens`` rows of the batches, as ``calibrate``'s
      SDLLM grid search); ``steps`` steps per layer.

    lr: Adam's learning rate on gamma (default 0.02 for ``"layer"``, 0.005 for the model
    objectives). gamma is clamped to ``[min_gamma, 1]`` after every step. The model's other
    parameters are not changed (their requires_grad is restored)."""
    fn = "learn_clipping"
    _checks.choice(fn, "objective", objective, ("distill", "loss", "layer"))
    _checks.integer(fn, "steps", steps, 1, 1 << 20)
    if lr is None:
        lr = 0.02 if objective == "layer" else 0.005
    if not (isinstance(lr, float) and lr > 0):
        raise ValueError(f"{fn}: lr must be a positive float, got {lr!r}")
    if not (isinstance(min_gamma, float) and 0 < min_gamma <= 1):
        raise ValueError(f"{fn}: min_gamma must be a float in (0, 1], got {min_gamma!r}")
    _checks.integer(fn, "max_tokens", max_tokens, 1, 1 << 24)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = _checks.token_batches(fn, "batches", batches, vocab if vocab else 1 << 62)
    every = spike_layers(model)
    layers = {n: m for n, m in every.items()
              if m.enc is not None and m.enc.mode in ("absmax", "absmean")}
    if not layers:
        raise ValueError(f"{fn}: model has no SpikeLinear with an absmax or absmean encoding")
    from tqdm.auto import tqdm
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in flags:
        p.requires_grad_(False)
    try:
        if objective == "layer":
            _learn_layers(model, layers, batches, steps, lr, min_gamma, max_tokens, progress,
                          tqdm)
        else:
            _learn_model(model, every, layers, batches, steps, lr, min_gamma, objective,
                         progress, tqdm)
    finally:
        result = freeze(model)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {n: result[n] for n in layers if n in result}


def _float_logprobs(model, every, ids) -> torch.Tensor:
    """log-softmax of the model's logits with every SpikeLinear on float activations."""
    with kept_encodings(every, enc=None), torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    return torch.log_softmax(logits, -1)


def _learn_model(model, every, layers, batches, steps, lr, min_gamma, objective, progress,
                 tqdm) -> None:
    params = []
    for layer in layers.values():
        params += make_trainable(layer)
    opt = torch.optim.Adam(params, lr=lr)
    device = next(iter(layers.values())).device
    bar = tqdm(range(steps), desc=f"learn_clipping ({objective})", unit="step",
               disable=not progress)
    for step in bar:
        ids = batches[step % len(batches)].to(device)
        teacher = _float_logprobs(model, every, ids) if objective == "distill" else None
        logits = model(input_ids=ids, use_cache=False).logits.float()
        if teacher is not None:
            loss = torch.nn.functional.kl_div(torch.log_softmax(logits, -1).flatten(0, 1),
                                              teacher.flatten(0, 1), log_target=True,
                                              reduction="batchmean")
        else:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                     ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.clamp_(min_gamma, 1.0)
        bar.set_postfix(loss=f"{loss.item():.4f}")


def _learn_layers(model, layers, batches, steps, lr, min_gamma, max_tokens, progress,
                  tqdm) -> None:
    from .calibrate import collect_inputs
    inputs = collect_inputs(model, batches, max_tokens)
    for name, layer in tqdm(layers.items(), desc="learn_clipping", unit="layer",
                            disable=not progress):
        x = inputs[name].to(layer.device)
        target = torch.nn.functional.linear(x, layer.dequantize().to(x), layer.kernel_bias)
        (p,) = make_trainable(layer)
        opt = torch.optim.Adam([p], lr=lr)
        for _ in range(steps):
            # forward, not the module call: x was recorded after any online rotation of the
            # layer's input (a rotated down_proj), which the call would apply again.
            y = layer.forward(x)
            loss = (y - target).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                p.clamp_(min_gamma, 1.0)
