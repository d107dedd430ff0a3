"""``AutoModelForCausalLM.from_pretrained`` of spikeops checkpoints: a transformers quantization
method named ``"spikeops"`` (docs/integrations.md, "transformers").

A checkpoint whose ``config.json`` holds ``quantization_config`` with ``quant_method:
"spikeops"`` (what ``save_gptq`` and ``spikeops quantize`` write; docs/checkpoints.md,
"Writing") loads through transformers into the model ``load_gptq`` returns: the same modules,
the same logits. transformers builds its model skeleton on the meta device and calls the
quantizer around its weight loading; here the skeleton's loader reads nothing, and afterwards
``load_gptq`` (strict: every tensor checked before any is used) builds the spiking model,
whose modules replace the skeleton's. What transformers' arguments cannot mean for such a
model is refused with an error naming the argument (docs/integrations.md, "Refused").

Such a model's ``save_pretrained(folder)`` is spikeops' ``save_pretrained``: it writes a spikeops
checkpoint folder whole (the GPTQ tensors, the encoding, the calibration and the transform
record), which ``from_pretrained`` and ``load_gptq`` load into the same model, bit for bit
(docs/integrations.md, "save_pretrained").

``register_with_transformers()`` makes the method known to transformers; ``import spikeops``
calls it.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Optional

import torch
from transformers.quantizers import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import _checks
from .architecture import check_supported, decoder_layers
from .calibrate import ANY_CALIBRATION, parse_encoding
from .checkpoint import (DEFAULT_ENCODING, SPIKEOPS_METHOD, QuantConfig, read_configs,
                         write_checkpoint)
from .models import MODEL_DTYPES, load_gptq
from .nn import spike_layers
from .transforms import CONFIG_KEY, online_rotation, recorded_rotation

log = logging.getLogger("spikeops")
FN = "from_pretrained"
GPTQ_FIELDS = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
CALIBRATIONS = ("saved", "none")
# The tensors of a SpikeLinear's state dict that a checkpoint holds (docs/checkpoints.md,
# "Tensors of one quantized linear"); its salient_mask is the calibration's.
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias")
SALIENT_MASK = "salient_mask"
# transformers' device_map strings that ask accelerate to split a model by memory.
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
# Config keys that from_pretrained itself sets or that describe the file, not the model (and
# every private "_..." key: name_or_path, the attention implementation).
OWN_KEYS = ("dtype", "torch_dtype", "quantization_config", "transformers_version",
            "architectures")


def encoding_of(fn: str, spec, calibration, where: str):
    """``parse_encoding`` (the command line's ``--encoding`` grammar) of ``spec``, with the
    function and the place it came from in the error."""
    if not isinstance(spec, str):
        raise TypeError(f"{fn}: {where} encoding must be a str in the command line's --encoding "
                        f"grammar (e.g. 'absmax4', 'down_proj=minmax8;*=absmax4', 'none'), got "
                        f"{type(spec).__name__} {spec!r}")
    try:
        return parse_encoding(spec, calibration)
    except ValueError as e:
        raise ValueError(f"{fn}: {where} encoding: {e}") from e


class SpikeopsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a spikeops checkpoint, and the override a user passes to
    ``from_pretrained(..., quantization_config=SpikeopsConfig(encoding="absmax4"))``.

    bits, group_size, sym, desc_act, checkpoint_format: the GPTQ fields of docs/checkpoints.md
        ("Files"), which describe the tensors; None = not given (an override gives none, or
        only the checkpoint's own values: others are refused at loading).
    encoding: the spike encoding in the command line's ``--encoding`` grammar (``"absmax4"``,
        ``"minmax4+s6"``, ``"down_proj=minmax8;*=absmax4"``, ``"none"`` for float
        activations); None = not given (a checkpoint must give one).
    calibration: ``"saved"`` (the calibration saved in the folder by ``spikeops calibrate``,
        none if absent) or ``"none"``.
    """

    def __init__(self, bits: Optional[int] = None, group_size: Optional[int] = None,
                 sym: Optional[bool] = None, desc_act: Optional[bool] = None,
                 checkpoint_format: Optional[str] = None, encoding: Optional[str] = None,
                 calibration: str = "saved", **kwargs):
        fn = "SpikeopsConfig"
        self.quant_method = SPIKEOPS_METHOD
        given = {k: v for k, v in zip(GPTQ_FIELDS, (bits, group_size, sym, desc_act,
                                                    checkpoint_format)) if v is not None}
        if given:
            # The checkpoint readers' own validation; bits stands in when an override omits it.
            QuantConfig.parse(fn, {"bits": 4, **given}, "quantization_config")
        if encoding is not None:
            encoding_of(fn, encoding, ANY_CALIBRATION, "quantization_config")
        _checks.choice(fn, "calibration", calibration, CALIBRATIONS)
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.desc_act, self.checkpoint_format = desc_act, checkpoint_format
        self.encoding, self.calibration = encoding, calibration
        # Other GPTQ writers' fields (static_groups, pack_dtype, ...) are kept as they are.
        method = kwargs.pop("quant_method", SPIKEOPS_METHOD)
        if method != SPIKEOPS_METHOD:
            raise ValueError(f"{fn}: quant_method must be {SPIKEOPS_METHOD!r}, got {method!r}")
        for key, value in kwargs.items():
            setattr(self, key, value)

    def get_loading_attributes(self) -> dict:
        """What an override passed to ``from_pretrained`` sets on the checkpoint's config
        (transformers' ``merge_quantization_configs``): every field it gives."""
        return {k: v for k, v in self.__dict__.items()
                if k != "quant_method" and v is not None}


class SpikeopsHfQuantizer(HfQuantizer):
    """transformers' quantizer of the ``"spikeops"`` method: the model from_pretrained returns is
    ``load_gptq``'s (docs/integrations.md). pre_quantized is False only when the folder's
    config.json has no quantization_config and the user passed a SpikeopsConfig: the folder's
    GPTQ config (``quantize_config.json``) then describes the tensors, as for ``load_gptq``."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        if not isinstance(quantization_config, SpikeopsConfig):
            raise TypeError(f"{FN}: quantization_config must be a spikeops SpikeopsConfig, got "
                            f"{type(quantization_config).__name__}")
        super().__init__(quantization_config, **kwargs)
        self.device = torch.device("cpu")
        self.placement: dict = {}
        self.folder: Optional[Path] = None
        self.dtype: Optional[torch.dtype] = None
        self.hidden = None
        # What save_pretrained writes besides the model's tensors: the GPTQ config of the
        # folder's tensors and the calibration the model was loaded with.
        self.checkpoint: Optional[QuantConfig] = None
        self.calibration = None

    def update_device_map(self, device_map):
        """transformers' device_map (after its normalisation: None, a string or a
        ``{module name: device}`` dict) as ``load_gptq``'s device and placement; transformers
        itself then places nothing (None is returned)."""
        if device_map is None:
            return None
        if isinstance(device_map, str):
            raise ValueError(f"{FN}: device_map={device_map!r} is refused: spikeops does not "
                             f"split a model by memory ({', '.join(AUTO_MAPS)}); give a device "
                             f"('cpu', 'cuda:0') or a dict of module name -> device, e.g. "
                             f"{{'': 'cuda:0', 'model.layers.16': 'cuda:1', 'lm_head': 'cuda:1'}}")
        if not isinstance(device_map, dict):
            raise TypeError(f"{FN}: device_map must be a device or a dict of module name -> "
                            f"device, got {type(device_map).__name__}")
        devices = {}
        for name, dev in device_map.items():
            if isinstance(dev, int) and not isinstance(dev, bool):
                dev = f"cuda:{dev}"
            if str(dev) in ("disk", "meta"):
                raise ValueError(f"{FN}: device_map[{name!r}] = {dev!r} is refused: spikeops "
                                 f"runs modules where they are placed, with no offloading")
            devices[name] = dev
        if "" not in devices:
            raise ValueError(f"{FN}: device_map must give '' (the device of every module it does "
                             f"not name), got keys {sorted(devices)}")
        self.device = torch.device(devices.pop(""))
        self.placement = devices
        return None

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        _checks.dtype(FN, "dtype", dtype, MODEL_DTYPES)
        if self.device.type == "cpu" and dtype != torch.float32:
            log.warning("from_pretrained: the spiking model runs in %s on the CPU, as asked (the "
                        "checkpoint's dtype when dtype is not given); float32 is about 10x "
                        "faster there and is what load_gptq picks: pass dtype=torch.float32 "
                        "(docs/checkpoints.md, 'Loading')", str(dtype).removeprefix("torch."))
        self.dtype = dtype
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Refuse what cannot load before anything is read, and let transformers' loader read
        nothing: the skeleton's state dict is empty while it runs, so no tensor is matched,
        none is missing and none is initialised; every checkpoint key is unexpected, which the
        skeleton ignores (its ``_keys_to_ignore_on_load_unexpected``)."""
        check_supported(FN, model)
        if not checkpoint_files:
            raise ValueError(f"{FN}: a spikeops model is loaded from a checkpoint folder, got no "
                             f"checkpoint files (a state_dict or a distributed checkpoint)")
        folder = Path(checkpoint_files[0]).parent
        _, qc = read_configs(FN, folder)
        for field in GPTQ_FIELDS:
            given = getattr(self.quantization_config, field)
            if given is not None and given != getattr(qc, field):
                raise ValueError(f"{FN}: quantization_config.{field} = {given!r} disagrees with "
                                 f"the checkpoint's {getattr(qc, field)!r}: the GPTQ fields "
                                 f"describe the stored tensors and cannot be overridden")
        if self.quantization_config.encoding is None:
            raise ValueError(f"{FN}: {folder / 'config.json'} quantization_config must give "
                             f"'encoding' (e.g. {DEFAULT_ENCODING!r}), or pass "
                             f"quantization_config=SpikeopsConfig(encoding=...)")
        self.folder, self.checkpoint = folder, qc
        handle = model.register_state_dict_post_hook(
            lambda module, state, prefix, meta: state.clear())
        self.hidden = (handle, model.__dict__.get("_keys_to_ignore_on_load_unexpected"))
        model._keys_to_ignore_on_load_unexpected = {".*"}
        # transformers then offers the skeleton to the hub kernels, which refuse its meta
        # device: they are told the device the model will run on. The modules that replace the
        # skeleton's run as load_gptq builds them, without hub kernels.
        model._kernels_device = self.device.type

    def _process_model_after_weight_loading(self, model, **kwargs):
        """``load_gptq`` of the folder, its modules moved into transformers' model (which keeps
        its config, generation config and class)."""
        handle, ignored = self.hidden
        handle.remove()
        if ignored is None:
            del model._keys_to_ignore_on_load_unexpected
        else:
            model._keys_to_ignore_on_load_unexpected = ignored
        model.__dict__.pop("_kernels_device", None)
        from .commands import load_calibration
        cfg = self.quantization_config
        calibration = load_calibration(self.folder) if cfg.calibration == "saved" else None
        enc = encoding_of(FN, cfg.encoding, calibration, "quantization_config")
        built = load_gptq(self.folder, enc, self.device, self.dtype, self.placement, calibration)
        if type(built) is not type(model):
            raise ValueError(f"{FN}: {type(model).__name__}.from_pretrained cannot hold a "
                             f"spikeops model; use AutoModelForCausalLM (it gives "
                             f"{type(built).__name__})")
        _check_same_config(model.config, built.config, self.folder)
        for name, child in built.named_children():
            model._modules[name] = child
        # One config: transformers' (attention implementation and generation settings
        # included), which holds the same architecture (checked above).
        for module in model.modules():
            if getattr(module, "config", None) is built.config:
                module.config = model.config
        self.calibration = calibration
        # transformers' save_pretrained writes the state dict and config.json file by file into
        # the target and has no hook for the calibration: this model's save_pretrained is
        # spikeops' writer, which makes the whole checkpoint folder and swaps it in.
        model.save_pretrained = types.MethodType(save_pretrained, model)
        log.info("from_pretrained: %s on encoding %s, calibration %s", self.folder,
                 cfg.encoding, "saved" if calibration is not None else "none")
        return model

    def is_serializable(self, **kwargs) -> bool:
        """False: transformers' own writer (``PreTrainedModel.save_pretrained(model, ...)``)
        would lose the calibration; the model's ``save_pretrained`` is spikeops'."""
        log.warning("save_pretrained: transformers' writer does not save a spikeops model (its "
                    "calibration would be lost); model.save_pretrained(folder) is spikeops' "
                    "(docs/integrations.md, 'save_pretrained')")
        return False

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def save_pretrained(model, save_directory, is_main_process: bool = True,
                    encoding: Optional[str] = None, **kwargs) -> Path:
    """``model.save_pretrained`` of a model ``from_pretrained`` loaded as spikeops: a spikeops
    checkpoint folder that ``from_pretrained`` and ``load_gptq`` load into the same model, bit
    for bit (docs/integrations.md, "save_pretrained"); returns the folder.

    save_directory: a new or empty folder, or a model folder (with config.json), replaced whole
        (files.write_folder: a failure leaves it as it was); not the folder the model was
        loaded from, not inside the spikeops package. It gets ``model.safetensors`` (the GPTQ
        tensors of every SpikeLinear's state dict as they are, the other tensors in the
        model's dtype), ``config.json`` (``quantization_config`` with quant_method
        ``"spikeops"``, the checkpoint's GPTQ fields and the encoding; the transform record),
        ``quantize_config.json`` (GPTQ), ``generation_config.json`` and the calibration the
        layers hold (``spikeops_calibration.*``). The tokenizer is saved by its own
        ``save_pretrained`` afterwards, as for any transformers model.
    is_main_process: False writes nothing (transformers' meaning: one process of several
        writes).
    encoding: the encoding to record, in the command line's ``--encoding`` grammar; None:
        the one the model was loaded with. It must give every layer the encoding it runs.

    Refused, before anything is written: transformers' other arguments (push_to_hub,
    state_dict, variant, max_shard_size, ...: the folder is written whole, locally, as one
    file), a model whose layers run other encodings than ``encoding`` with the calibration
    gives (``set_encoding`` since loading: pass the matching ``encoding``), or hold another
    calibration than the loaded one, and online rotations that the transform record in the
    config does not give.
    """
    fn = "save_pretrained"
    if kwargs:
        raise TypeError(f"{fn}: {', '.join(sorted(kwargs))} not supported: spikeops writes the "
                        f"checkpoint folder whole, locally, as one model.safetensors "
                        f"(docs/integrations.md, 'save_pretrained')")
    if not isinstance(is_main_process, bool):
        raise TypeError(f"{fn}: is_main_process must be a bool, got {is_main_process!r}")
    quantizer = getattr(model, "hf_quantizer", None)
    if not isinstance(quantizer, SpikeopsHfQuantizer):
        raise ValueError(f"{fn}: the model must come from from_pretrained of a spikeops "
                         f"checkpoint, got hf_quantizer {type(quantizer).__name__}")
    if not isinstance(save_directory, (str, Path)):
        raise TypeError(f"{fn}: save_directory must be a folder path, got "
                        f"{type(save_directory).__name__}")
    out = Path(save_directory)
    if out.resolve() == quantizer.folder.resolve():
        raise ValueError(f"{fn}: {out} is the folder the model was loaded from, which already "
                         f"is its checkpoint (its tokenizer and other files would be replaced); "
                         f"give another folder")
    spec = quantizer.quantization_config.encoding if encoding is None else encoding
    calibration = _held_calibration(fn, model, quantizer.calibration)
    _check_encodings(fn, model, spec, calibration)
    _check_rotations(fn, model)
    tensors = _checkpoint_tensors(fn, model)
    qc = quantizer.checkpoint
    gptq = {"bits": qc.bits, "group_size": qc.group_size, "sym": qc.sym,
            "desc_act": qc.desc_act, "checkpoint_format": qc.checkpoint_format,
            "quant_method": "gptq", "pack_dtype": "int32"}
    if not is_main_process:
        return out

    def more(folder: Path) -> None:
        if model.can_generate():
            model.generation_config.save_pretrained(folder)
        if calibration is not None:
            calibration.save(folder)
    write_checkpoint(fn, out, model, tensors, gptq, spec, more)
    log.info("save_pretrained: wrote %s (encoding %s, calibration %s)", out, spec,
             "saved" if calibration is not None else "none")
    return out


def _held_calibration(fn: str, model, loaded):
    """The calibration the model's layers hold: None, or the one from_pretrained loaded (whose
    settings are known); another one (``set_encoding(..., calibration=...)``) is refused."""
    layers = spike_layers(model)
    held = {name: layer.calibration for name, layer in layers.items()}
    if all(c is None for c in held.values()):
        return None
    if loaded is not None and all(c is loaded.layers.get(name) for name, c in held.items()):
        return loaded
    raise ValueError(f"{fn}: the model's layers hold another calibration than the one "
                     f"from_pretrained loaded (set_encoding(..., calibration=...) since); write "
                     f"that Calibration with Calibration.save, or set the loaded one back")


def _check_encodings(fn: str, model, spec, calibration) -> None:
    """Every layer runs what loading the folder with ``spec`` and ``calibration`` gives it."""
    from .calibrate import layer_encoding, type_encoding
    enc = encoding_of(fn, spec, calibration, "the recorded")
    for name, layer in spike_layers(model).items():
        cal = calibration.layers.get(name) if calibration is not None else None
        want, mask = layer_encoding(type_encoding(fn, enc, name), cal)
        same_mask = (mask is None) == (layer.salient_mask is None) and (
            mask is None or torch.equal(mask.cpu(), layer.salient_mask.cpu()))
        if want != layer.enc or not same_mask:
            raise ValueError(f"{fn}: layer {name!r} runs {layer.enc} "
                             f"(salient mask {'set' if layer.salient_mask is not None else 'none'})"
                             f", encoding {spec!r} with {'the' if cal else 'no'} calibration "
                             f"gives {want} (salient mask {'set' if mask is not None else 'none'}):"
                             f" the folder would load with other arithmetic; pass "
                             f"encoding='...' naming what the model runs")


def _check_rotations(fn: str, model) -> None:
    """Every down_proj rotates its input online exactly as the config's transform record says
    (load_gptq puts back only that rotation)."""
    record = getattr(model.config, CONFIG_KEY, None)
    rotation = recorded_rotation(fn, model, record)  # checks the record and present rotations
    for i, layer in enumerate(decoder_layers(fn, model)):
        if (online_rotation(layer.mlp.down_proj) is None) != (rotation is None):
            raise ValueError(f"{fn}: layer {i}'s down_proj "
                             f"{'has no' if rotation is not None else 'has an'} online rotation, "
                             f"the config's {CONFIG_KEY} {record!r} "
                             f"{'gives one' if rotation is not None else 'none'}")


def _checkpoint_tensors(fn: str, model) -> dict:
    """The checkpoint's tensors, on the CPU: every SpikeLinear's GPTQ tensors from its state
    dict (exactly those; its salient mask is saved with the calibration), and the model's
    other tensors, a tied one once (safetensors refuses shared tensors; load_gptq re-ties)."""
    layers = spike_layers(model)
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            if leaf == SALIENT_MASK:
                continue
            if leaf not in GPTQ_TENSORS:
                raise ValueError(f"{fn}: {key} is in the state dict of a SpikeLinear but is none "
                                 f"of the GPTQ tensors {GPTQ_TENSORS} a checkpoint holds")
        elif t.data_ptr() in seen:
            continue
        if t.is_meta:
            raise ValueError(f"{fn}: {key} is on the meta device: the model holds no value to "
                             f"save")
        seen.add(t.data_ptr())
        tensors[key] = t.detach().cpu().contiguous()
    return tensors


def _check_same_config(config, built, folder: Path) -> None:
    """transformers' config (the folder's, with from_pretrained's overrides) must describe the
    model load_gptq built from the folder's config.json: an override would otherwise be lost."""
    ours, theirs = built.to_dict(), config.to_dict()
    for key in sorted(set(ours) | set(theirs)):
        if key in OWN_KEYS or key.startswith("_"):
            continue
        if ours.get(key) != theirs.get(key):
            raise ValueError(f"{FN}: config {key} = {theirs.get(key)!r} differs from "
                             f"{folder / 'config.json'}'s {ours.get(key)!r}: spikeops loads the "
                             f"folder's config; change it there instead of overriding it")


def register_with_transformers() -> None:
    """Make ``quant_method: "spikeops"`` known to transformers (``import spikeops`` calls this;
    calling it again does nothing): its config class, its quantizer, and its loading attributes
    (encoding, calibration), which an override passed to from_pretrained sets on the
    checkpoint's config."""
    from transformers.quantizers import auto, register_quantization_config, register_quantizer
    for mapping, register, cls in (
            (auto.AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, SpikeopsConfig),
            (auto.AUTO_QUANTIZER_MAPPING, register_quantizer, SpikeopsHfQuantizer)):
        known = mapping.get(SPIKEOPS_METHOD)
        if known is None:
            register(SPIKEOPS_METHOD)(cls)
        elif known is not cls:
            raise ValueError(f"register_with_transformers: quant_method {SPIKEOPS_METHOD!r} is "
                             f"already registered by {known.__module__}.{known.__name__}")
    if SpikeopsConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES,
                                                SpikeopsConfig)
