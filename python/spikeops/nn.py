"""Consumers of spikes (docs/ops.md): ``spike_linear``, ``spike_accumulate`` and the
``SpikeLinear`` module."""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Sequence

import torch

from . import _checks, ops
from .architecture import INPUTS, decoder_layers
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

    Integer sums of spikes times weight codes per weight group and scale column (range or
    activation group), one float32 multiply per group and column (docs/ops.md). backend:
    ``"spike"`` (event driven), ``"int"`` (integer codes) or ``"auto"``; all give identical
    bits. Spikes with activation groups need weight groups that hold them whole.
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
                         w.kernel_group_size, w.zero_offset, out_dtype, backend, st.group)
    return y.reshape(*st.shape[:-1], w.out_features)


def spike_accumulate(st: SpikeTensor, w: torch.Tensor, per_plane: bool = False) -> torch.Tensor:
    """Exact bidirectional accumulation with int8 weights ``w [K, N]`` (docs/ops.md):
    ``acc[r, m, n] = sum over k in scale column r (range, or activation group) of s * Q[m, k] *
    w[k, n]``, int64 ``[R, M, N]`` (M = flattened tokens), or the per-plane currents
    ``[P, R, M, N]``."""
    fn = "spike_accumulate"
    _check_spikes(fn, st)
    _checks.tensor(fn, "w", w, (torch.int8,), dim=2)
    if w.shape[0] != st.shape[-1]:
        raise ValueError(f"{fn}: w must have shape [K, N] with K = {st.shape[-1]} (the spikes' "
                         f"K), got {list(w.shape)}")
    _checks.same_device(fn, {"st.planes": st.planes, "w": w})
    if not isinstance(per_plane, bool):
        raise TypeError(f"{fn}: per_plane must be a bool, got {type(per_plane).__name__}")
    return ops.spike_accumulate(st.planes, st.sign, st.hi, w, per_plane, st.group)


class ProjectionGroup(torch.nn.Module):
    """The SpikeLinear projections that read one activation of a decoder layer (q/k/v of
    ``self_attn``, gate/up of ``mlp``: architecture.INPUTS), encoding it once.

    ``group(x)`` encodes ``x`` once and returns each projection's output, in order (what the
    Runner calls). Where the parent module's own forward calls the projections one by one
    (transformers' attention and MLP), the group encodes the parent's input when its call
    starts (a forward pre-hook) and drops the spikes when it ends: a projection that receives
    that very input takes them, any other input is encoded by the projection itself. The spikes
    are shared only when every member would encode alike (the same Encoding and salient mask,
    on spikes, nothing to train or differentiate); otherwise each member encodes, as alone.
    Outputs are those of each projection alone, bit for bit; statistics stay per projection.
    The group holds no tensors between calls and no state dict entries."""

    def __init__(self, members: Sequence["SpikeLinear"]):
        super().__init__()
        # Not submodules: the projections stay where the model has them (and its state dict).
        self.__dict__["members"] = tuple(members)
        self.__dict__["input"] = self.__dict__["spikes"] = None
        for m in members:
            m.__dict__["group"] = self

    def forward(self, x: torch.Tensor) -> tuple:
        self.start(x)
        try:
            return tuple(m(x) for m in self.members)
        finally:
            self.end()

    def start(self, x) -> None:
        """Encode ``x`` for the members if they would all encode it alike."""
        first = self.members[0]
        # Once per group and decode step: buffers read from _buffers and the Encodings compared
        # by identity first, as SpikeLinear.forward does (2.5 us of 8 for q/k/v).
        enc, mask = first.enc, first._buffers["salient_mask"]
        if not isinstance(x, torch.Tensor) or enc is None or x.dim() < 1 or \
                x.shape[-1] != first.in_features or \
                (x.requires_grad and torch.is_grad_enabled()) or \
                any((m.enc is not enc and m.enc != enc) or m._buffers["salient_mask"] is not mask
                    or m._parameters for m in self.members):
            return
        rows = x if x.dim() == 2 else x.reshape(-1, first.in_features)
        self.__dict__["spikes"] = encode_rows(rows, enc, mask)
        self.__dict__["input"] = x

    def end(self) -> None:
        self.__dict__["input"] = self.__dict__["spikes"] = None

    def spikes_for(self, x: torch.Tensor):
        """The spikes of ``x`` if the group encoded that very tensor in this call, else None."""
        return self.spikes if self.input is x else None

    def extra_repr(self) -> str:
        return f"members={len(self.members)}"


# The attribute of a decoder layer's module (self_attn, mlp) that holds its ProjectionGroup.
GROUP_ATTR = "input_group"


def group_projections(model: torch.nn.Module) -> int:
    """Give every input of every decoder layer that several SpikeLinear projections read (q/k/v;
    gate/up) a ``ProjectionGroup`` at ``<parent>.input_group``; returns the number of groups
    made. ``load_gptq`` calls it; a module that has a group keeps it."""
    made = 0
    for layer in decoder_layers("group_projections", model):
        for inputs in INPUTS.values():
            parent = layer.get_submodule(inputs.parent)
            members = [getattr(parent, name) for name in inputs.projections]
            if len(members) < 2 or hasattr(parent, GROUP_ATTR) or \
                    not all(isinstance(m, SpikeLinear) for m in members):
                continue
            group = ProjectionGroup(members)
            setattr(parent, GROUP_ATTR, group)
            parent.register_forward_pre_hook(_start_group, with_kwargs=True)
            parent.register_forward_hook(_end_group, always_call=True)
            made += 1
    return made


def _start_group(parent, args, kwargs) -> None:
    # transformers' decoder layers call self_attn(hidden_states=...) and mlp(x).
    getattr(parent, GROUP_ATTR).start(args[0] if args else kwargs.get("hidden_states"))


def _end_group(parent, _args, _output) -> None:
    getattr(parent, GROUP_ATTR).end()


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
        # The ProjectionGroup of the layers that read the same activation, or None.
        self.__dict__["group"] = None
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
            w = self.gptq
            if not ops._C.activation_groups_fit(enc.group, w.kernel_group_size, w.in_features):
                raise ValueError(
                    f"{fn}: activation groups of enc.group = {enc.group} channels must lie "
                    f"inside this layer's weight groups (group_size a multiple of group, or one "
                    f"group; not act order), got weight group_size {w.group_size}"
                    + (" with act order" if w.kernel_group_size == 0 else ""))
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
        # The rest runs at every decode step, where each Python step costs: buffers are read
        # from _buffers (Module.__getattr__ took 0.5 us a buffer), and the token rows [M, K]
        # are reshaped, and the output cast, only where they are not so already
        # (docs/performance.md, "Whole model on the CPU").
        buffers = self._buffers
        spikes = self.group.spikes_for(x) if self.group is not None else None
        if spikes is None:
            rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            spikes = encode_rows(rows, self.enc, buffers["salient_mask"])
        if self.observer is not None:
            self.observer(self, SpikeTensor.wrap(spikes, tuple(x.shape), self.enc.group))
        out_dtype = x.dtype if x.dtype in OUT_DTYPES else torch.float32
        y = self._linear(spikes, self.enc.group, buffers["kernel_bias"], out_dtype)
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], self.out_features)
        return y if out_dtype == x.dtype else y.to(x.dtype)

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
        y = self._linear(st[:5], st.group, self.kernel_bias if bias else None, op_dtype)
        return y.reshape(*st.shape[:-1], self.out_features).to(out_dtype)

    def _linear(self, spikes, group: int, bias, out_dtype: torch.dtype) -> torch.Tensor:
        """The op on this layer's weights; ``spikes`` are (planes, sign, hi, scale, zero),
        with activation groups of ``group`` channels."""
        w = self.gptq
        return ops.spike_linear(*spikes, *w.kernel_args(), bias, w.kernel_bits,
                                w.kernel_group_size, w.zero_offset, out_dtype, self.backend,
                                group)

    def extra_repr(self) -> str:
        from .transforms import online_rotation
        enc = self.enc if self.enc is not None else "float activations"
        # A rotated model's down_proj rotates its input in a forward pre-hook: calling the
        # module on inputs captured after it would rotate them twice (docs/transforms.md).
        rotation = online_rotation(self)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, enc={enc}, backend={self.backend!r}"
                + (f", online_rotation={rotation}" if rotation is not None else ""))


def spike_layers(module: torch.nn.Module) -> Dict[str, SpikeLinear]:
    """The SpikeLinear layers of ``module`` by name (``{"": module}`` for a SpikeLinear itself);
    a module without any is refused."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"spikeops: model must be a torch.nn.Module with SpikeLinear layers "
                        f"(load_gptq / patch), got {type(module).__name__}")
    if isinstance(module, SpikeLinear):
        return {"": module}
    layers = {name: m for name, m in module.named_modules() if isinstance(m, SpikeLinear)}
    if not layers:
        raise ValueError(f"spikeops: model must be a SpikeLinear or contain some (load_gptq / "
                         f"patch), found none in {type(module).__name__}")
    return layers


@contextlib.contextmanager
def kept_encodings(layers: Dict[str, SpikeLinear], enc=...) -> Iterator[None]:
    """Within the block the ``layers`` may change encodings (``enc=None``: they start on float
    activations); at its end, also on an exception, each has its Encoding, salient mask and
    calibration back."""
    saved = {name: (m.enc, m.salient_mask, m.calibration) for name, m in layers.items()}
    try:
        if enc is None:
            for m in layers.values():
                m.set_encoding(None)
        yield
    finally:
        for name, m in layers.items():
            enc_before, mask, calibration = saved[name]
            m.set_encoding(enc_before, mask)
            m.calibration = calibration
