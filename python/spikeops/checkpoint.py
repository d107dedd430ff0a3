"""GPTQ checkpoint folders (docs/checkpoints.md): the names of the quantized projections, the
quantization config, reading the safetensors (never pickle) and writing a checkpoint.

K = in_features, N = out_features, G groups, b bits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from . import _checks
from .gptq import BITS, FORMATS, GPTQWeight, check_bits_group_size, pack, v1_stored_zeros

# Only the seven projections of every decoder layer are quantized (docs/checkpoints.md):
# model.layers.{i}.self_attn.{q,k,v,o}_proj and model.layers.{i}.mlp.{gate,up,down}_proj.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
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
        if method != "gptq":
            raise ValueError(f"{fn}: {source}: quant_method must be 'gptq', got {method!r}")
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
    path: the folder (created); gets ``model.safetensors`` (qweight int32 ``[K*b/32, N]``,
        qzeros int32 ``[G, N*b/32]`` with v1 zeros, scales float16 ``[G, N]``, g_idx int32
        ``[K]``, bias float16 ``[N]`` when the module has one), ``config.json`` with
        ``quantization_config`` and ``quantize_config.json``.
    """
    fn = "save_gptq"
    from safetensors.torch import save_file
    if not weights:
        raise ValueError(f"{fn}: weights must name at least one quantized module, got none")
    first = next(iter(weights.values()))
    tensors = {}
    for name, w in weights.items():
        if not isinstance(w, GPTQWeight):
            raise TypeError(f"{fn}: weights[{name!r}] must be a GPTQWeight, got "
                            f"{type(w).__name__}")
        for field in ("bits", "group_size", "sym"):
            if getattr(w, field) != getattr(first, field):
                raise ValueError(f"{fn}: weights[{name!r}].{field} = {getattr(w, field)} must "
                                 f"equal that of the others ({getattr(first, field)})")
        q, z = w.codes()
        if bool((z < 1).any()):
            raise ValueError(f"{fn}: weights[{name!r}] has a true zero point 0, which v1 "
                             f"(stored zero - 1) cannot hold")
        tensors.update({f"{name}.qweight": pack(q, w.bits, dim=0),
                        f"{name}.qzeros": pack(v1_stored_zeros(z), w.bits, dim=1),
                        f"{name}.scales": w.scales, f"{name}.g_idx": w.g_idx})
    modules = dict(model.named_modules())
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
    missing = [n for n in weights if n not in modules]
    if missing:
        raise ValueError(f"{fn}: weights names modules absent from the model: {first(missing)}")
    desc_act = any(not torch.equal(w.g_idx.cpu(), trivial_g_idx(w)) for w in weights.values())
    qc = {"bits": first.bits, "group_size": first.group_size, "sym": first.sym,
          "desc_act": desc_act, "static_groups": False, "checkpoint_format": "gptq",
          "quant_method": "gptq", "pack_dtype": "int32"}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    # The tensors' dtype, which model.half() and friends do not write into the config; both
    # keys, for transformers 4 (torch_dtype) and 5 (dtype) readers.
    config["dtype"] = config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (folder / "quantize_config.json").write_text(json.dumps(qc, indent=2, sort_keys=True))


def read_json(fn: str, file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: {file} must be readable JSON: {e}") from e


def read_configs(fn: str, folder: Path):
    """The model config (without ``quantization_config``) and the QuantConfig."""
    from transformers import AutoConfig
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{fn}: {file} must exist (the model's config.json), not found")
    raw = read_json(fn, file)
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{fn}: {file} must be a JSON object with 'model_type'")
    for name in QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            qc = QuantConfig.parse(fn, read_json(fn, folder / name), name)
            break
    else:
        if "quantization_config" not in raw:
            raise ValueError(f"{fn}: a GPTQ config must be given by "
                             f"{' or '.join(QUANT_CONFIG_FILES)} or "
                             f"config.json['quantization_config'] in {folder}, found none")
        qc = QuantConfig.parse(fn, raw["quantization_config"], "config.json quantization_config")
    # transformers 5 refuses GPTQ configs without optimum; the spikeops modules replace it.
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **raw)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{fn}: {file}: model_type {model_type!r} is not a transformers "
                         f"architecture: {e}") from e
    return config, qc


def weight_files(fn: str, folder: Path) -> Dict[Path, Optional[set]]:
    """The safetensors files to read, each with the keys the index assigns it (None: no index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(fn, index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{fn}: {index} must hold a non-empty 'weight_map' object")
        files: Dict[Path, Optional[set]] = {}
        for key, name in weight_map.items():
            files.setdefault(folder / name, set()).add(key)
        for file in files:
            if not file.is_file():
                raise ValueError(f"{fn}: shard {file.name} listed in {index.name} (for "
                                 f"{first(sorted(files[file]))}) does not exist")
        return files
    if (folder / "model.safetensors").is_file():
        return {folder / "model.safetensors": None}
    found = sorted(folder.glob("*.safetensors"))
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


def decoder_layers(fn: str, model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{fn}: model must be a LLaMA-style causal LM with decoder layers at "
                         f"model.model.layers, got {type(model).__name__}")
    return layers


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
