"""GPTQ checkpoint folders (docs/checkpoints.md): the names of the quantized projections, the
quantization config, reading the safetensors (never pickle) and writing a checkpoint.

K = in_features, N = out_features, G groups, b bits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from . import _checks
from .architecture import PROJECTIONS, check_supported
from .files import has_file, input_file, write_file, write_folder
from .gptq import BITS, FORMATS, GPTQWeight, check_bits_group_size, pack, v1_stored_zeros

# The calibration spikeops saves beside a checkpoint (docs/checkpoints.md, "Calibration"): its
# settings and per-layer values, and the salient-channel masks.
CALIBRATION_FILE = "spikeops_calibration.json"
CALIBRATION_MASK_FILE = "spikeops_calibration.safetensors"

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config.json's quant_method of the checkpoints save_gptq writes (docs/integrations.md), and the
# spike encoding recorded there (the command line's default; from_pretrained runs on it).
SPIKEOPS_METHOD = "spikeops"
DEFAULT_ENCODING = "minmax4"
PathLike = Union[str, Path]


@dataclass(frozen=True)
class QuantConfig:
    """The fields of a GPTQ quantization config that decide how tensors are read."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str

    @classmethod
    def parse(cls, fn: str, raw, source: str) -> "QuantConfig":
        """Validate a config dict read from ``source``; defaults are transformers' GPTQConfig's
        (group_size 128, sym, no act-order, v1) and ``bits`` is required."""
        if not isinstance(raw, dict):
            raise ValueError(f"{fn}: {source} must be a JSON object, got {type(raw).__name__}")
        method = raw.get("quant_method", "gptq")
        if method not in ("gptq", SPIKEOPS_METHOD):
            raise ValueError(f"{fn}: {source}: quant_method must be 'gptq' or "
                             f"{SPIKEOPS_METHOD!r}, got {method!r}")
        if "bits" not in raw:
            raise ValueError(f"{fn}: {source}: 'bits' must be given (one of {BITS})")
        bits, group_size = raw["bits"], raw.get("group_size", 128)
        check_bits_group_size(fn, bits, group_size, f"{source}: ")
        sym, desc_act = raw.get("sym", True), raw.get("desc_act", False)
        for name, flag in (("sym", sym), ("desc_act", desc_act)):
            if not isinstance(flag, bool):
                raise TypeError(f"{fn}: {source}: {name} must be a bool, got {flag!r}")
        fmt = raw.get("checkpoint_format", raw.get("format", "gptq"))
        _checks.choice(fn, f"{source}: checkpoint_format", fmt, FORMATS)
        if raw.get("lm_head", False):
            raise ValueError(f"{fn}: {source}: a quantized lm_head (lm_head: true) is not "
                             f"supported; only decoder-layer projections are")
        return cls(bits, group_size, sym, desc_act, fmt)


def save_gptq(model: torch.nn.Module, weights: Mapping[str, GPTQWeight], path: PathLike) -> None:
    """Write a standard GPTQ checkpoint folder (docs/checkpoints.md, "Writing").

    model: the ``transformers`` model whose ``config`` and non-quantized tensors (embeddings,
        norms, lm_head) are written as they are; the ``weight`` of every module named in
        ``weights`` is replaced by its GPTQ tensors.
    weights: ``{module name: GPTQWeight}`` sharing one bits/group_size/sym.
    path: a new or empty folder, or a model folder (with ``config.json``) that is replaced
        whole; it holds exactly ``model.safetensors`` (qweight int32 ``[K*b/32, N]``, qzeros
        int32 ``[G, N*b/32]`` with v1 zeros, scales float16 ``[G, N]``, g_idx int32 ``[K]``,
        bias float16 ``[N]`` when the module has one), ``config.json`` with
        ``quantization_config`` and ``quantize_config.json`` afterwards, or is unchanged if
        writing fails (docs/checkpoints.md, "Files and links").
    """
    fn = "save_gptq"
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{fn}: weights must map module names to GPTQWeights, got "
                         f"{type(weights).__name__} of {len(weights) if weights else 0}")
    check_supported(fn, model)
    ref = next(iter(weights.values()))
    modules = dict(model.named_modules())
    _check_weights_fit(fn, model, modules, weights)
    tensors = {}
    for name, w in weights.items():
        for field in ("bits", "group_size", "sym"):
            if getattr(w, field) != getattr(ref, field):
                raise ValueError(f"{fn}: weights[{name!r}].{field} = {getattr(w, field)} must "
                                 f"equal that of the others ({getattr(ref, field)})")
        q, z = w.codes()
        if bool((z < 1).any()):
            raise ValueError(f"{fn}: weights[{name!r}] has a true zero point 0, which v1 "
                             f"(stored zero - 1) cannot hold")
        tensors.update({f"{name}.qweight": pack(q, w.bits, dim=0),
                        f"{name}.qzeros": pack(v1_stored_zeros(z), w.bits, dim=1),
                        f"{name}.scales": w.scales, f"{name}.g_idx": w.g_idx})
    seen = set()
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in weights:
            if leaf == "bias":
                tensors[key] = t.half()
            continue
        # Tied tensors share storage; safetensors refuses duplicates, readers re-tie them.
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        tensors[key] = t
    desc_act = any(not torch.equal(w.g_idx.cpu(), trivial_g_idx(w)) for w in weights.values())
    qc = {"bits": ref.bits, "group_size": ref.group_size, "sym": ref.sym,
          "desc_act": desc_act, "static_groups": False, "checkpoint_format": "gptq",
          "quant_method": "gptq", "pack_dtype": "int32"}
    write_checkpoint(fn, path, model, tensors, qc, DEFAULT_ENCODING)


def write_checkpoint(fn: str, path: PathLike, model: torch.nn.Module, tensors: Mapping,
                     qc: dict, encoding: str,
                     more: Optional[Callable[[Path], None]] = None) -> None:
    """The checkpoint folder of ``model`` at ``path`` (docs/checkpoints.md, "Writing"):
    ``model.safetensors`` holding ``tensors``, ``config.json`` (the model's config with its
    dtype and ``quantization_config``: the GPTQ fields ``qc`` under spikeops' quant_method,
    with ``encoding``), ``quantize_config.json`` (``qc``, for GPTQ readers), then what
    ``more(folder)`` writes. save_gptq and from_pretrained's save_pretrained write with it."""
    from safetensors.torch import save_file
    config = model.config.to_dict()
    # The tensors' dtype, which model.half() and friends do not write into the config; both
    # keys, for transformers 4 (torch_dtype) and 5 (dtype) readers.
    config["dtype"] = config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    # config.json names spikeops' quant_method, so that transformers' from_pretrained loads the
    # spiking model (docs/integrations.md); quantize_config.json stays GPTQ for GPTQ readers.
    config["quantization_config"] = {**qc, "quant_method": SPIKEOPS_METHOD, "encoding": encoding}

    def write(folder: Path) -> None:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        (folder / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True))
        if more is not None:
            more(folder)
    # The whole set is written beside the folder and swapped in: a failure leaves the folder
    # as it was, and a replaced checkpoint's other files (an old calibration, tokenizer or
    # shards) never end up beside the new weights.
    write_folder(fn, path, write)


def recorded_encoding(fn: str, folder: PathLike) -> Optional[str]:
    """The encoding a checkpoint's config.json records (``quantization_config.encoding`` under
    spikeops' quant_method; docs/checkpoints.md, "Writing"), or None when it records none."""
    qc = read_json(fn, Path(folder) / "config.json").get("quantization_config") or {}
    if qc.get("quant_method") != SPIKEOPS_METHOD or "encoding" not in qc:
        return None
    if not isinstance(qc["encoding"], str):
        raise ValueError(f"{fn}: {folder}/config.json: quantization_config.encoding must be a "
                         f"string in the command line's --encoding grammar, got "
                         f"{qc['encoding']!r}")
    return qc["encoding"]


def record_encoding(fn: str, folder: PathLike, spec: str) -> None:
    """Record ``spec`` (an encoding or per-layer-type policy in the command line's grammar,
    checked by the caller) as the checkpoint's encoding in its config.json, rewritten whole."""
    file = Path(folder) / "config.json"
    config = read_json(fn, file)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != SPIKEOPS_METHOD:
        raise ValueError(f"{fn}: {file} is not a spikeops checkpoint's config (no "
                         f"quantization_config with quant_method {SPIKEOPS_METHOD!r}); write the "
                         f"checkpoint with spikeops quantize or save_gptq")
    qc["encoding"] = spec
    write_file(fn, file, lambda tmp: tmp.write_text(json.dumps(config, indent=2,
                                                               sort_keys=True)))


def _check_weights_fit(fn: str, model, modules: dict, weights: Mapping) -> None:
    """Before anything is written: every entry is a GPTQWeight of the shape of the linear it
    replaces, no GPTQWeight serves two names, and every projection of a LLaMA-style model is
    quantized (load_gptq reads all seven per layer)."""
    by_object: Dict[int, str] = {}
    by_data: Dict[int, str] = {}
    for name, w in weights.items():
        if not isinstance(w, GPTQWeight):
            raise TypeError(f"{fn}: weights[{name!r}] must be a GPTQWeight, got "
                            f"{type(w).__name__}")
        lin = modules.get(name)
        if lin is None:
            raise ValueError(f"{fn}: weights names module {name!r}, absent from the model")
        shape = (getattr(lin, "out_features", None), getattr(lin, "in_features", None))
        if shape != (w.out_features, w.in_features):
            raise ValueError(f"{fn}: weights[{name!r}] is [N, K] = [{w.out_features}, "
                             f"{w.in_features}], the layer {name} is {list(shape)}")
        other = by_object.get(id(w), by_data.get(w.scales.data_ptr()))
        if other is not None:
            raise ValueError(f"{fn}: weights[{name!r}] is the same GPTQWeight as "
                             f"weights[{other!r}]; each layer needs its own")
        by_object[id(w)], by_data[w.scales.data_ptr()] = name, name
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        missing = [f"model.layers.{i}.{p}" for i in range(len(layers)) for p in PROJECTIONS
                   if f"model.layers.{i}.{p}" not in weights]
        if missing:
            raise ValueError(f"{fn}: weights must quantize every projection of every decoder "
                             f"layer (load_gptq reads all seven); missing {first(missing)}")


def read_json(fn: str, file: Path) -> dict:
    input_file(fn, file.parent, file.name)
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: {file} must be readable JSON: {e}") from e


def read_configs(fn: str, folder: Path):
    """The model config (without ``quantization_config``) and the QuantConfig."""
    from transformers import AutoConfig
    file = folder / "config.json"
    if not has_file(fn, folder, "config.json"):
        raise ValueError(f"{fn}: {file} must exist (the model's config.json), not found")
    raw = read_json(fn, file)
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{fn}: {file} must be a JSON object with 'model_type'")
    _check_config_fields(fn, raw)
    found = [(name, QuantConfig.parse(fn, read_json(fn, folder / name), name))
             for name in QUANT_CONFIG_FILES if has_file(fn, folder, name)]
    if "quantization_config" in raw:
        source = "config.json quantization_config"
        found.append((source, QuantConfig.parse(fn, raw["quantization_config"], source)))
    if not found:
        raise ValueError(f"{fn}: a GPTQ config must be given by "
                         f"{' or '.join(QUANT_CONFIG_FILES)} or "
                         f"config.json['quantization_config'] in {folder}, found none")
    # Configs that disagree cannot both describe the tensors: refused rather than one trusted.
    (source, qc), others = found[0], found[1:]
    for other_source, other in others:
        for field in ("bits", "group_size", "sym", "desc_act", "checkpoint_format"):
            if getattr(qc, field) != getattr(other, field):
                raise ValueError(f"{fn}: {source} and {other_source} disagree on {field}: "
                                 f"{getattr(qc, field)!r} against {getattr(other, field)!r}")
    # transformers 5 refuses GPTQ configs without optimum; the spikeops modules replace it.
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type")
    check_supported(fn, model_type)
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{fn}: {file}: model_type {model_type!r} is not a transformers "
                         f"architecture: {e}") from e
    return config, qc


SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim")
CONFIG_DTYPES = ("float16", "bfloat16", "float32")


def _check_config_fields(fn: str, raw: dict) -> None:
    for field in SIZE_FIELDS:
        value = raw.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{fn}: config.json {field} must be a positive integer, got "
                             f"{value!r}")
    for field in ("dtype", "torch_dtype"):
        value = raw.get(field)
        if value is not None and value not in CONFIG_DTYPES:
            raise ValueError(f"{fn}: config.json {field} must be one of {CONFIG_DTYPES}, got "
                             f"{value!r}")


def check_config_tensors(fn: str, config, tensors: Mapping[str, torch.Tensor]) -> None:
    """The config must describe the tensors present, checked before any model is built (a
    config claiming 40,000 layers would otherwise allocate them first)."""
    import re
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    want = getattr(config, "num_hidden_layers", None)
    if layers != set(range(want or 0)):
        raise ValueError(f"{fn}: config.json num_hidden_layers = {want}, the tensors hold "
                         f"decoder layers {sorted(layers)[:3]}{'...' if len(layers) > 3 else ''} "
                         f"({len(layers)} layers)")
    embed = tensors.get("model.embed_tokens.weight")
    shape = [getattr(config, "vocab_size", None), getattr(config, "hidden_size", None)]
    if embed is None or list(embed.shape) != shape:
        raise ValueError(f"{fn}: config.json gives model.embed_tokens.weight the shape "
                         f"[vocab_size, hidden_size] = {shape}, the tensor is "
                         f"{list(embed.shape) if embed is not None else 'absent'}")


def weight_files(fn: str, folder: Path) -> Dict[Path, Optional[set]]:
    """The safetensors files to read, each with the keys the index assigns it (None: no index)."""
    index = folder / "model.safetensors.index.json"
    if has_file(fn, folder, index.name):
        raw = read_json(fn, index)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{fn}: {index} must be a JSON object with a non-empty "
                             f"'weight_map' object")
        files: Dict[Path, Optional[set]] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or not (folder / name).exists():
                raise ValueError(f"{fn}: shard {name} listed in {index.name} (for {key}) does "
                                 f"not exist in {folder}")
            files.setdefault(input_file(fn, folder, name), set()).add(key)
        return files
    if has_file(fn, folder, "model.safetensors"):
        return {folder / "model.safetensors": None}
    # Only regular files (a FIFO would block the reader), and never spikeops' calibration.
    found = sorted(f for f in folder.glob("*.safetensors") if f.name != CALIBRATION_MASK_FILE
                   and has_file(fn, folder, f.name))
    if len(found) == 1:  # old AutoGPTQ names, e.g. gptq_model-4bit-128g.safetensors
        return {found[0]: None}
    if found:
        raise ValueError(f"{fn}: several .safetensors files in {folder} but no "
                         f"model.safetensors.index.json to say which to read: "
                         f"{[f.name for f in found]}")
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"{fn}: {folder} holds only pickle weights {pickles}; they are never "
                         f"loaded (unpickling runs arbitrary code): convert them to safetensors")
    raise ValueError(f"{fn}: {folder} must contain model.safetensors, shards with "
                     f"model.safetensors.index.json, or one *.safetensors file; found none")


def read_tensors(fn: str, folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors: Dict[str, torch.Tensor] = {}
    for file, listed in weight_files(fn, folder).items():
        try:
            part = load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{fn}: {file.name} must be a valid safetensors file: {e}") from e
        if listed is not None and set(part) != listed:
            extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
            raise ValueError(f"{fn}: shard {file.name} must hold the tensors the index lists for "
                             f"it; " + (f"unlisted: {first(extra)}" if extra else
                                        f"missing: {first(absent)}"))
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise ValueError(f"{fn}: tensor {dup[0]} appears in more than one file")
        tensors.update(part)
    return tensors


def quant_keys(linears: Mapping[str, torch.nn.Linear], tensors: Mapping) -> set:
    """Keys the quantized projections may take from the checkpoint."""
    fields = ("qweight", "qzeros", "scales", "g_idx", "bias")
    return {f"{name}.{f}" for name in linears for f in fields if f"{name}.{f}" in tensors}


def tensor(fn: str, tensors: Mapping, key: str, dtypes: Iterable[torch.dtype],
            shape: Tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{fn}: missing tensor {key} (expected shape {list(shape)})")
    t = _checks.tensor(fn, f"tensor {key}", tensors[key], dtypes)
    _checks.shape(fn, f"tensor {key}", t, shape)
    return t


def trivial_g_idx(w: GPTQWeight) -> torch.Tensor:
    gs = w.in_features if w.group_size == -1 else w.group_size
    return torch.arange(w.in_features, dtype=torch.int32) // gs


def first(names: List[str], count: int = 5) -> str:
    """At most ``count`` names, and how many more."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
