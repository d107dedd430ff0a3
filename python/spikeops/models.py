"""Whole GPTQ LLaMA-style models on spikes: ``load_gptq`` reads a checkpoint folder without
optimum or gptqmodel and builds the model with ``SpikeLinear`` projections, ``patch`` swaps the
GPTQ linears of a model already loaded by them. docs/checkpoints.md, "Loading"."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from . import _checks
from .architecture import PROJECTIONS, check_supported, decoder_layers
from .calibrate import Calibration, check_encoding, set_encoding, type_encoding
from .checkpoint import (CALIBRATION_FILE, PathLike, QuantConfig, check_config_tensors, first,
                         quant_keys, read_configs, read_tensors, tensor)
from .files import has_file
from .gptq import FORMATS, GPTQWeight, log
from .nn import BIAS_DTYPES, SpikeLinear, group_projections
from .transforms import CONFIG_KEY as TRANSFORM_KEY, restore_online

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SAVED = "saved"  # load_gptq's default calibration: the one saved in the checkpoint folder


def load_gptq(path: PathLike, enc, device="cpu",
              dtype: Optional[torch.dtype] = None,
              device_map: Optional[Mapping[str, object]] = None,
              calibration=SAVED) -> torch.nn.Module:
    """Load a GPTQ checkpoint folder as a spiking causal LM (docs/checkpoints.md, "Loading").

    path: folder with ``config.json``, the quantization config (``quantize_config.json``, then
        ``quant_config.json``, then ``config.json["quantization_config"]``) and the weights
        (``model.safetensors``; shards listed in ``model.safetensors.index.json``; or one
        old AutoGPTQ-named ``*.safetensors``). Pickle files are never read.
    enc: the Encoding of every projection's input spikes (not mode ``"static"``), None (float
        activations), or a map from layer type to Encoding or None with ``"*"`` for the other
        types, e.g. ``{"down_proj": Encoding("minmax", 8), "*": Encoding("absmax", 4)}``
        (``spikeops.calibrate.set_encoding``).
    device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device).
    device_map: optional ``{module name: device}``, e.g. ``{"model.layers.16": "cuda:1",
        "lm_head": "cuda:1"}``: each named module (with everything inside it) goes to its
        device, the rest to ``device``; tensors entering a placed module are moved to its device,
        so activations follow the layers across devices (pipeline placement, one device busy
        at a time).
    dtype: float16/bfloat16/float32 of the dense parts and activations; None = the fast one
        for ``device``: float32 on the CPU (whose float16 matrix products are about 10x
        slower), the checkpoint's ``torch_dtype``/``dtype`` on a GPU (float32 when absent).
    calibration: ``"saved"`` (the default): the calibration saved in the folder by ``spikeops
        calibrate`` (salient masks, gamma, theta per layer), none if there is none; a
        ``Calibration``; or None: no calibration. It fills per layer what ``enc`` leaves open
        (gamma, theta: None) and gives the salient masks; a value ``enc`` gives is never
        replaced (a warning names the calibrated values it keeps from use). The layers keep it
        for later ``set_encoding`` calls; ``spikeops.calibrate.encodings(model)`` lists the
        effective per-layer encodings.

    Returns the ``transformers`` model (e.g. LlamaForCausalLM) in eval mode whose seven
    projections per decoder layer are ``SpikeLinear``. Strict: a missing or unexpected tensor,
    a wrong dtype or shape, or an inconsistent config raises ValueError/TypeError naming the
    tensor's key and the expectation, and no model is returned.
    """
    fn = "load_gptq"
    check_encoding(fn, enc)
    if isinstance(calibration, str) and calibration != SAVED:
        raise ValueError(f"{fn}: calibration must be {SAVED!r}, a Calibration or None, got "
                         f"{calibration!r}")
    if not isinstance(calibration, (str, Calibration, type(None))):
        raise TypeError(f"{fn}: calibration must be {SAVED!r}, a spikeops Calibration or None, "
                        f"got {type(calibration).__name__}")
    device = _device(fn, device)
    if device_map is not None and not isinstance(device_map, Mapping):
        raise TypeError(f"{fn}: device_map must be a dict of module name -> device, got "
                        f"{type(device_map).__name__}")
    placement = {name: _device(fn, dev) for name, dev in (device_map or {}).items()}
    if dtype is not None:
        _checks.dtype(fn, "dtype", dtype, MODEL_DTYPES)
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{fn}: path must be a checkpoint folder, got {str(path)!r}")
    config, qc = read_configs(fn, folder)
    tensors = read_tensors(fn, folder)
    check_config_tensors(fn, config, tensors)

    from transformers import AutoModelForCausalLM
    if dtype is None:
        dtype = _default_dtype(fn, device, config)
    # Meta tensors cost no memory: the model exists only as shapes until the checkpoint's
    # tensors are assigned into it.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = {name: _projection(fn, model, name) for name in _projection_names(model)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    dense = _dense_state(fn, model, linears, tensors, tied, dtype)
    # Built on float activations: set_encoding gives every layer its encoding at the end.
    spiking = {name: _spike_linear(fn, name, lin, tensors, qc) for name, lin in linears.items()}
    # Old LLaMA exports saved the rotary frequencies, which are recomputed from the config.
    known = set(dense) | quant_keys(linears, tensors) | ({"lm_head.weight"} if tied else set())
    leftover = sorted(k for k in set(tensors) - known if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ValueError(f"{fn}: unexpected tensor(s) {first(leftover)} in {folder}: not part "
                         f"of a {type(model).__name__} with GPTQ projections")

    # Everything is validated; from here on nothing can fail on the checkpoint's account.
    for name, module in spiking.items():
        set_module(model, name, module)
    model.load_state_dict(dense, strict=False, assign=True)
    if tied:
        model.tie_weights()  # assign=True replaced the shared embedding Parameter
    _rebuild_rotary(model)
    restore_online(model, getattr(config, TRANSFORM_KEY, None), fn)
    group_projections(model)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"{fn}: no tensor in {folder} provides {first(sorted(left))}")
    for name in placement:
        if not isinstance(name, str) or _submodule(model, name) is None:
            raise ValueError(f"{fn}: device_map key {name!r} must name a module of the model, "
                             f"e.g. 'model.layers.0' or 'lm_head'")
    model = model.to(device).eval()
    # Parents before children, so that a child's own entry overrides its parent's.
    for name, dev in sorted(placement.items(), key=lambda item: item[0].count(".")):
        module = model if name == "" else model.get_submodule(name)
        module.to(dev)
        module.register_forward_pre_hook(_inputs_to(dev), with_kwargs=True)
    # The seed methods' per-layer settings; Calibration.load refuses a non-regular file.
    if isinstance(calibration, str):  # SAVED
        calibration = None
        if has_file(fn, folder, CALIBRATION_FILE):
            calibration = Calibration.load(folder)
            log.info("load_gptq: applying the calibration in %s", folder / CALIBRATION_FILE)
    return set_encoding(model, enc, calibration)


def _default_dtype(fn: str, device: torch.device, config) -> torch.dtype:
    """The dtype a model runs fastest in on ``device`` when none is asked for (docs/checkpoints.md,
    "Loading"): float32 on the CPU, else the checkpoint's own."""
    if device.type == "cpu":
        return torch.float32
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    _checks.dtype(fn, "config.json torch_dtype", dtype, MODEL_DTYPES)
    return dtype


def patch(model: torch.nn.Module, enc,
          checkpoint_format: Optional[str] = None) -> torch.nn.Module:
    """Replace, in place, every submodule carrying GPTQ tensors ``qweight``, ``qzeros``,
    ``scales`` (and ``g_idx``, optional) by a ``SpikeLinear`` sharing them; returns ``model``.

    enc: what ``load_gptq`` takes: an Encoding, None (float activations) or a map of layer
        types to them (``{"down_proj": ..., "*": ...}``); no calibration is applied
        (``calibrate.set_encoding`` with one afterwards).

    Such a submodule (an optimum/gptqmodel QuantLinear) must hold the checkpoint layout (not a
    kernel-specific repacking such as exllama's shuffled qweight) and int attributes ``bits``
    and ``group_size``; ``bias`` is kept when it is a tensor. ``sym`` comes from the module's
    ``sym`` attribute, else ``model.config.quantization_config``, else True.
    checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``; None = the config's
        ``checkpoint_format``/``format``, else ``"gptq"``. gptqmodel turns v1 zeros into v2 in
        memory: symmetric weights are detected from their zeros either way (GPTQWeight), for
        asymmetric ones pass ``checkpoint_format="gptq_v2"``.

    A transform record in ``model.config`` (``spikeops_transform``, written by ``spikeops
    quantize --transform rotate``) has its online rotation put back on every ``down_proj``, as
    ``load_gptq`` does. Every module is converted before any is swapped; the record is then
    checked against the swapped-in layers (a loader's own modules need not say their widths)
    and, if it does not fit, the swap is undone: on error the model is unchanged.
    """
    fn = "patch"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    check_supported(fn, model)
    check_encoding(fn, enc)
    qc = _config_dict(getattr(getattr(model, "config", None), "quantization_config", None))
    if checkpoint_format is None:
        checkpoint_format = qc.get("checkpoint_format", qc.get("format", "gptq"))
    _checks.choice(fn, "checkpoint_format", checkpoint_format, FORMATS)
    # A SpikeLinear of an earlier patch is patched again with its weights as they are.
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, SpikeLinear) or all(isinstance(getattr(m, a, None), torch.Tensor)
                                                    for a in ("qweight", "qzeros", "scales"))]
    if not targets:
        raise ValueError(f"{fn}: model must contain modules with qweight, qzeros and scales "
                         f"tensors (GPTQ QuantLinear), found none in {type(model).__name__}")
    if targets[0][0] == "":
        raise ValueError(f"{fn}: model itself is a GPTQ linear and cannot be replaced in place; "
                         f"wrap it in a parent module")
    spiking = {}
    for name, m in targets:
        try:
            w = m.gptq if isinstance(m, SpikeLinear) else GPTQWeight(
                m.qweight, m.qzeros, m.scales, getattr(m, "g_idx", None),
                bits=getattr(m, "bits", None), group_size=getattr(m, "group_size", None),
                sym=getattr(m, "sym", qc.get("sym", True)), checkpoint_format=checkpoint_format,
                in_features=getattr(m, "in_features", None))
            for attr, value in (("in_features", w.in_features), ("out_features", w.out_features)):
                if getattr(m, attr, value) != value:
                    raise ValueError(f"{attr} = {getattr(m, attr)} disagrees with the tensors' "
                                     f"{value}")
            bias = getattr(m, "bias", None)
            spiking[name] = SpikeLinear(w, type_encoding(fn, enc, name), bias=bias if isinstance(bias, torch.Tensor)
                                        else None)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{fn}: module {name!r} ({type(m).__name__}): {e}") from e
    originals = {name: model.get_submodule(name) for name in spiking}
    for name, module in spiking.items():
        set_module(model, name, module)
    try:
        restore_online(model, getattr(model.config, TRANSFORM_KEY, None), fn)
    except ValueError:  # the record does not fit: the model goes back to what it was
        for name, module in originals.items():
            set_module(model, name, module)
        raise
    return model


def _device(fn: str, device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{fn}: device must be a torch device such as 'cpu' or 'cuda:0', got "
                         f"{device!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{fn}: device {str(device)!r} needs CUDA, which is not available")
    return device


def _submodule(model: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _inputs_to(device: torch.device):
    """A forward pre-hook moving every tensor among a module's inputs (inside tuples, lists and
    dicts too, e.g. the rotary position embeddings) to ``device``."""
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, (tuple, list)):
            return type(value)(move(v) for v in value)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    def hook(_module, args, kwargs):
        return move(args), move(kwargs)
    return hook


def _projection_names(model) -> List[str]:
    layers = decoder_layers("load_gptq", model)
    return [f"model.layers.{i}.{p}" for i in range(len(layers)) for p in PROJECTIONS]


def _projection(fn: str, model, name: str) -> torch.nn.Linear:
    try:
        lin = model.get_submodule(name)
    except AttributeError:
        lin = None
    if not isinstance(lin, torch.nn.Linear):
        raise ValueError(f"{fn}: {type(model).__name__} must have a torch.nn.Linear at {name} "
                         f"(LLaMA-style projections), got {type(lin).__name__}")
    return lin


def _spike_linear(fn: str, name: str, lin: torch.nn.Linear, tensors: Mapping,
                  qc: QuantConfig) -> SpikeLinear:
    """The SpikeLinear replacing ``lin`` (meta ``[N, K]``), from the tensors under ``name``."""
    K, N, b = lin.in_features, lin.out_features, qc.bits
    G = 1 if qc.group_size == -1 else -(-K // qc.group_size)
    qweight = tensor(fn, tensors, f"{name}.qweight", (torch.int32,), ((K * b + 31) // 32, N))
    qzeros = tensor(fn, tensors, f"{name}.qzeros", (torch.int32,), (G, (N * b + 31) // 32))
    scales = tensor(fn, tensors, f"{name}.scales", (torch.float16,), (G, N))
    g_idx = None
    if f"{name}.g_idx" in tensors:
        g_idx = tensor(fn, tensors, f"{name}.g_idx", (torch.int32, torch.int64), (K,))
    bias = None
    if lin.bias is not None or f"{name}.bias" in tensors:
        bias = tensor(fn, tensors, f"{name}.bias", BIAS_DTYPES, (N,))
        # Old AutoGPTQ files carry all-zero biases on bias-free architectures: harmless, kept.
        if lin.bias is None and bool(bias.any()):
            raise ValueError(f"{fn}: unexpected non-zero tensor {name}.bias: the architecture "
                             f"has no bias there (only all-zero biases are accepted)")
    try:
        w = GPTQWeight(qweight, qzeros, scales, g_idx, bits=b, group_size=qc.group_size,
                       sym=qc.sym, checkpoint_format=qc.checkpoint_format, in_features=K)
        return SpikeLinear(w, None, bias=bias)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: tensors {name}.{{qweight,qzeros,scales,g_idx}}: {e}") from e


def _dense_state(fn: str, model, linears: Mapping, tensors: Mapping, tied: bool,
                 dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """The checkpoint's non-quantized tensors, checked against the model and cast to dtype."""
    quantized = {f"{name}.{leaf}" for name in linears for leaf in ("weight", "bias")}
    dense = {}
    for key, want in model.state_dict().items():
        if key in quantized:
            continue
        if tied and key == "lm_head.weight":
            # Tied to the embedding: may be absent; when present it must be the same matrix.
            if key in tensors and "model.embed_tokens.weight" in tensors and not torch.equal(
                    tensors[key], tensors["model.embed_tokens.weight"]):
                raise ValueError(f"{fn}: tensor {key} must equal model.embed_tokens.weight "
                                 f"(tie_word_embeddings is true)")
            continue
        t = tensor(fn, tensors, key, (torch.float16, torch.bfloat16, torch.float32),
                    tuple(want.shape))
        dense[key] = t.to(dtype)
    return dense


def _rebuild_rotary(model) -> None:
    """Rotary embeddings keep their frequencies in non-persistent buffers, which no checkpoint
    holds: recompute them from the config instead of leaving them on the meta device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and \
                hasattr(module, "inv_freq"):
            set_module(model, name, type(module)(config=model.config))


def _config_dict(qc) -> dict:
    if qc is None:
        return {}
    return qc if isinstance(qc, dict) else qc.to_dict()


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
