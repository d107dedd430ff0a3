"""Consumers of spikes (docs/ops.md): ``spike_linear``, ``spike_accumulate`` and the
``SpikeLinear`` module."""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks, ops
from .gptq import GPTQ_TENSORS, GPTQWeight, uncast
from .spikes import Encoding, SpikeTensor, check_usable, encode_rows

OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BIAS_DTYPES = OUT_DTYPES


def _check_spikes(fn: str, st) -> None:
    if not isinstance(st, SpikeTensor):
        raise TypeError(f"{fn}: st must be a spikeops.SpikeTensor, got {type(st).__name__}")


def spike_linear(st: SpikeTensor, w: GPTQWeight, bias: Optional[torch.Tensor] = None,
                 out_dtype: torch.dtype = torch.float16, backend: str = "auto") -> torch.Tensor:
    """``y [..., N] = x_hat @ W_hat^T + bias`` from spikes of ``x [..., K]`` and GPTQ weights.

    Integer sums of spikes times weight codes per group and range, one float32 multiply per
    group and range (docs/ops.md). backend: ``"spike"`` (event driven), ``"int"`` (integer
    codes) or ``"auto"``; all give identical bits.
    """
    fn = "spike_linear"
    _check_spikes(fn, st)
    if not isinstance(w, GPTQWeight):
        raise TypeError(f"{fn}: w must be a spikeops.GPTQWeight, got {type(w).__name__}")
    if st.shape[-1] != w.in_features:
        raise ValueError(f"{fn}: the spikes' K = {st.shape[-1]} must equal w.in_features = "
                         f"{w.in_features}")
    # The bias is widened to the float32 the kernels read: its dtype is checked before that;
    # everything else (out_dtype, backend, shapes, devices) is checked by the op.
    if bias is not None:
        _checks.tensor(fn, "bias", bias, BIAS_DTYPES)
    y = ops.spike_linear(st.planes, st.sign, st.hi, st.scale, st.zero, *w.kernel_args(),
                         None if bias is None else bias.float(), w.kernel_bits,
                         w.kernel_group_size, w.zero_offset, out_dtype, backend)
    return y.reshape(*st.shape[:-1], w.out_features)


def spike_accumulate(st: SpikeTensor, w: torch.Tensor, per_plane: bool = False) -> torch.Tensor:
    """Exact bidirectional accumulation with int8 weights ``w [K, N]`` (docs/ops.md):
    ``acc[r, m, n] = sum over k in range r of s * Q[m, k] * w[k, n]``, int64 ``[R, M, N]``
    (M = flattened tokens), or the per-plane currents ``[P, R, M, N]``."""
    fn = "spike_accumulate"
    _check_spikes(fn, st)
    _checks.tensor(fn, "w", w, (torch.int8,), dim=2)
    if w.shape[0] != st.shape[-1]:
        raise ValueError(f"{fn}: w must have shape [K, N] with K = {st.shape[-1]} (the spikes' "
                         f"K), got {list(w.shape)}")
    _checks.same_device(fn, {"st.planes": st.planes, "w": w})
    if not isinstance(per_plane, bool):
        raise TypeError(f"{fn}: per_plane must be a bool, got {type(per_plane).__name__}")
    return ops.spike_accumulate(st.planes, st.sign, st.hi, w, per_plane)


def _version(x: torch.Tensor) -> Optional[int]:
    """x's in-place modification counter; None for an inference tensor (made under
    ``torch.inference_mode()``), which has none."""
    return None if x.is_inference() else x._version


class SharedInput:
    """One encoding for the layers of a group that read the same activation (q/k/v, gate/up):
    the first layer to run encodes it, the others of the group with the same Encoding and
    salient mask reuse the spikes if they get the very same tensor, unchanged (its version
    counter; an inference tensor has none, so there the tensor's identity decides: the decoder
    layers spikeops supports never change the input between the projections). The spikes are
    dropped once every member has run, so no activation outlives its forward pass."""

    def __init__(self, members: int):
        self.members = members
        self._clear()

    def _clear(self) -> None:
        self.x, self.version, self.key, self.spikes, self.served = None, None, None, None, 0

    def get(self, layer, x: torch.Tensor):
        """The spikes for ``layer`` if the group holds them for ``x``, else None (the layer
        encodes, then calls ``put``)."""
        if self.x is not x or self.version != _version(x):
            return None
        spikes = self.spikes if self.key == (layer.enc, id(layer.salient_mask)) else None
        self._served()
        return spikes

    def put(self, layer, x: torch.Tensor, spikes) -> None:
        if self.x is x and self.version == _version(x):
            return  # a member with another encoding: the first member's spikes stay
        self.x, self.version, self.key = x, _version(x), (layer.enc, id(layer.salient_mask))
        self.spikes, self.served = spikes, 0
        self._served()

    def _served(self) -> None:
        self.served += 1
        if self.served >= self.members:
            self._clear()


def share_inputs(model: torch.nn.Module) -> int:
    """Let the SpikeLinear projections of every decoder layer that read one activation (q/k/v;
    gate/up) encode it once (``SharedInput``); outputs are unchanged, statistics stay per
    projection. Returns the number of groups; ``load_gptq`` calls it."""
    groups = 0
    for module in model.modules():
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            members = [getattr(module, n, None) for n in names]
            if all(isinstance(m, SpikeLinear) for m in members):
                shared = SharedInput(len(members))
                for m in members:
                    m.shared = shared
                groups += 1
    return groups


class SpikeLinear(torch.nn.Module):
    """A GPTQ linear layer that runs on spikes: ``x -> encode(x) -> spike_linear``, output in x's
    dtype. Holds its weights once, as the GPTQWeight ``gptq`` (the kernel form: packed codes,
    never dequantized; docs/ops.md, spike_linear), whose GPTQ tensors are its state dict
    (``qweight``, ``qzeros``, ``scales``, ``g_idx``), the bias, the Encoding and an optional
    salient-channel mask (bool ``[K]``). Device moves move ``gptq`` (building the CPU layout on
    a CPU); dtype casts never touch it.

    ``enc=None`` runs the layer on float activations instead (``x @ W_hat^T``, the weights
    dequantized once and kept in x's dtype until the layer goes back to spikes): the "GPTQ
    weights, float activations" baseline of evaluations and the way calibration sees a layer's
    inputs. ``set_encoding`` changes both at once."""

    def __init__(self, weight: GPTQWeight, enc: Optional[Encoding],
                 bias: Optional[torch.Tensor] = None,
                 salient_mask: Optional[torch.Tensor] = None, backend: str = "auto"):
        super().__init__()
        fn = "SpikeLinear"
        if not isinstance(weight, GPTQWeight):
            raise TypeError(f"{fn}: weight must be a spikeops.GPTQWeight, got "
                            f"{type(weight).__name__}")
        _checks.choice(fn, "backend", backend, ops.BACKENDS)
        if bias is not None:
            _checks.tensor(fn, "bias", bias, BIAS_DTYPES, dim=1)
            _checks.shape(fn, "bias", bias, (weight.out_features,))
        _checks.same_device(fn, {"weight.scales": weight.scales, "bias": bias})
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.backend = backend
        self.gptq = weight
        self.register_buffer("bias", bias)
        self.register_buffer("kernel_bias", None if bias is None else bias.float(),
                             persistent=False)
        self.register_buffer("dense_weight", None, persistent=False)  # float activations only
        self.register_buffer("salient_mask", None)
        # Called as observer(layer, spikes) on every spiking forward (statistics); None = off.
        self.observer = None
        # The SharedInput of the layers that read the same activation (share_inputs), or None.
        self.shared = None
        # The calibration.LayerCalibration calibrate.set_encoding refined ``enc`` with, or None:
        # kept so that later encodings of the model use it too until it is dropped.
        self.calibration = None
        self.set_encoding(enc, salient_mask)

    @property
    def device(self) -> torch.device:
        return self.gptq.device

    @property
    def bits(self) -> int:
        """The checkpoint's bits (3-bit layers are held as 4-bit codes)."""
        return self.gptq.bits

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.gptq.gptq_tensors().items():
            destination[prefix + name] = t
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A state dict brings new GPTQ tensors: the kernel form is built from them.
        names = tuple(prefix + name for name in GPTQ_TENSORS)
        given = {key[len(prefix):]: state_dict[key] for key in names if key in state_dict}
        missing_keys.extend(key for key in names if key not in state_dict)
        rest = {key: t for key, t in state_dict.items() if key not in names}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(given) == len(names):
            try:
                self.gptq = self.gptq.with_tensors("SpikeLinear.load_state_dict", given)
            except (TypeError, ValueError) as e:
                error_msgs.append(str(e))
        self.kernel_bias = None if self.bias is None else self.bias.float()
        self.dense_weight = None

    def set_encoding(self, enc: Optional[Encoding],
                     salient_mask: Optional[torch.Tensor] = None) -> None:
        """Switch the layer to another Encoding (and salient mask), or to float activations
        (``enc=None``). Everything is checked before anything changes."""
        fn = "SpikeLinear.set_encoding"
        if enc is not None and not isinstance(enc, Encoding):
            raise TypeError(f"{fn}: enc must be a spikeops.Encoding or None, got "
                            f"{type(enc).__name__}")
        if enc is not None and enc.mode == "static":
            raise ValueError(f"{fn}: enc.mode 'static' needs per-call scales; use encode() and "
                             f"spike_linear() directly")
        if salient_mask is not None:
            _checks.tensor(fn, "salient_mask", salient_mask, (torch.bool,), dim=1)
            _checks.shape(fn, "salient_mask", salient_mask, (self.in_features,))
            if enc is None or enc.salient_bits is None:
                raise ValueError(f"{fn}: salient_mask needs an Encoding with salient_bits, got "
                                 f"enc={enc}")
            _checks.same_device(fn, {"weights": self.gptq.scales, "salient_mask": salient_mask})
        if enc is not None:
            check_usable(fn, enc, salient_mask)
        self.enc = enc
        self.salient_mask = salient_mask
        if enc is not None:
            self.dense_weight = None

    def dequantize(self) -> torch.Tensor:
        """``W_hat`` float16 ``[N, K]``, bit exact (``GPTQWeight.dequantize``)."""
        return self.gptq.dequantize()

    def _apply(self, fn, recurse=True):
        """``module.to(dtype)`` / ``.half()`` / ``.float()`` would cast the float32 kernel bias,
        which the kernels read in that dtype: it follows the module's device moves only, as
        ``gptq`` does (GPTQWeight.moved)."""
        kernel_bias = self.kernel_bias
        super()._apply(fn, recurse)
        self.gptq = self.gptq.moved(fn)
        if kernel_bias is not None:
            self.kernel_bias = uncast(kernel_bias, self.gptq.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"SpikeLinear: x must have shape [..., in_features] = "
                             f"[..., {self.in_features}], got {tuple(x.shape)}")
        if self._parameters or (x.requires_grad and self.enc is not None
                                and torch.is_grad_enabled()):
            # A gradient may be wanted, or the layer holds trainable parameters
            # (spikeops.autograd.make_trainable): the same exact forward, differentiable
            # (straight-through estimator, docs/ops.md "Gradients"). Inference never gets here.
            from .autograd import layer_forward
            return layer_forward(self, x)
        if self.enc is None:
            # F.linear would run a meta or other-device weight against x without a word (the
            # spiking path's op checks devices itself).
            if x.device != self.device:
                raise ValueError(f"SpikeLinear: x is on {x.device}, the layer on "
                                 f"{self.device}; move one of them")
            if self.dense_weight is None or self.dense_weight.dtype != x.dtype:
                self.dense_weight = self.dequantize().to(x.dtype)
            bias = self.kernel_bias.to(x.dtype) if self.kernel_bias is not None else None
            return torch.nn.functional.linear(x, self.dense_weight, bias)
        spikes = self.shared.get(self, x) if self.shared is not None else None
        if spikes is None:
            spikes = encode_rows(x.reshape(-1, self.in_features), self.enc, self.salient_mask)
            if self.shared is not None:
                self.shared.put(self, x, spikes)
        if self.observer is not None:
            self.observer(self, SpikeTensor.wrap(spikes, tuple(x.shape)))
        out_dtype = x.dtype if x.dtype in OUT_DTYPES else torch.float32
        y = self._linear(spikes, self.kernel_bias, out_dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def from_spikes(self, st: SpikeTensor, out_dtype: torch.dtype,
                    bias: bool = True) -> torch.Tensor:
        """The layer on spikes already encoded, ``[..., N]`` in ``out_dtype``: what ``forward``
        runs after ``encode``, for callers that encode once and reuse the spikes. The dtype rule
        is forward's: ``forward(x)`` returns x's dtype and equals ``from_spikes(encode(x, enc,
        mask), x.dtype)`` bit for bit; spikes do not record the dtype they were encoded from,
        so it is asked for. float64 is computed in float32 and widened, as forward does.
        ``bias=False`` leaves the bias out. The spikes' K and device are checked by the op."""
        _checks.dtype("SpikeLinear.from_spikes", "out_dtype", out_dtype,
                      OUT_DTYPES + (torch.float64,))
        op_dtype = out_dtype if out_dtype in OUT_DTYPES else torch.float32
        y = self._linear(st[:5], self.kernel_bias if bias else None, op_dtype)
        return y.reshape(*st.shape[:-1], self.out_features).to(out_dtype)

    def _linear(self, spikes, bias, out_dtype: torch.dtype) -> torch.Tensor:
        """The op on this layer's weights; ``spikes`` are (planes, sign, hi, scale, zero)."""
        w = self.gptq
        return ops.spike_linear(*spikes, *w.kernel_args(), bias, w.kernel_bits,
                                w.kernel_group_size, w.zero_offset, out_dtype, self.backend)

    def extra_repr(self) -> str:
        from .transforms import online_rotation
        enc = self.enc if self.enc is not None else "float activations"
        # A rotated model's down_proj rotates its input in a forward pre-hook: calling the
        # module on inputs captured after it would rotate them twice (docs/transforms.md).
        rotation = online_rotation(self)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, enc={enc}, backend={self.backend!r}"
                + (f", online_rotation={rotation}" if rotation is not None else ""))
