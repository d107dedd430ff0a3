"""Whole GPTQ LLaMA-style models on spikes (GPTQ.md): ``load_gptq`` reads a checkpoint folder
without optimum or gptqmodel, ``patch`` swaps the GPTQ linears of a model already loaded by
them, ``quantize`` runs GPTQ on a float model and ``save_gptq`` writes the standard format.

Only the seven projections of every decoder layer are quantized (GPTQ.md "Files"):
``model.layers.{i}.self_attn.{q,k,v,o}_proj`` and ``model.layers.{i}.mlp.{gate,up,down}_proj``.
K = in_features, N = out_features, G groups, b bits, as in GPTQ.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from tqdm.auto import tqdm

from . import _checks
from .calibrate import JSON_FILE as CALIBRATION_FILE, Calibration, set_encoding
from .gptq import BITS, FORMATS, GPTQWeight, log, pack
from .nn import BIAS_DTYPES, SpikeLinear
from .spikes import Encoding

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK = 128  # GPTQ's lazy-batch width: columns whose error feedback is applied together
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
        bits = _checks.integer(fn, f"{source}: bits", raw["bits"], 2, 8)
        _checks.choice(fn, f"{source}: bits", bits, BITS)
        group_size = raw.get("group_size", 128)
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"{fn}: {source}: group_size must be an int, got {group_size!r}")
        if group_size != -1 and group_size < 1:
            raise ValueError(f"{fn}: {source}: group_size must be -1 or positive, got "
                             f"{group_size}")
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


def load_gptq(path: PathLike, enc: Encoding, device="cpu",
              dtype: Optional[torch.dtype] = None,
              device_map: Optional[Mapping[str, object]] = None) -> torch.nn.Module:
    """Load a GPTQ checkpoint folder as a spiking causal LM (GPTQ.md, "Loading without optimum
    or gptqmodel").

    path: folder with ``config.json``, the quantization config (``quantize_config.json``, then
        ``quant_config.json``, then ``config.json["quantization_config"]``) and the weights
        (``model.safetensors``; shards listed in ``model.safetensors.index.json``; or one
        old AutoGPTQ-named ``*.safetensors``). Pickle files are never read.
    enc: the Encoding of every projection's input spikes (not mode ``"static"``).
    device: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a torch.device).
    device_map: optional ``{module name: device}``, e.g. ``{"model.layers.16": "cuda:1",
        "lm_head": "cuda:1"}``: each named module (with everything inside it) goes to its
        device, the rest to ``device``; tensors entering a placed module are moved to its device,
        so activations follow the layers across devices (pipeline placement, one device busy
        at a time).
    dtype: float16/bfloat16/float32 of the dense parts and activations; None = the
        checkpoint's ``torch_dtype``/``dtype`` (float32 when absent).

    Returns the ``transformers`` model (e.g. LlamaForCausalLM) in eval mode whose seven
    projections per decoder layer are ``SpikeLinear``. A calibration saved in the folder
    (``spikeops calibrate``: salient masks, gamma, theta per layer) refines ``enc`` per layer. Strict: a missing or unexpected tensor,
    a wrong dtype or shape, or an inconsistent config raises ValueError/TypeError naming the
    tensor's key and the expectation, and no model is returned.
    """
    fn = "load_gptq"
    _check_encoding(fn, enc)
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
    config, qc = _read_configs(fn, folder)
    tensors = _read_tensors(fn, folder)

    from transformers import AutoModelForCausalLM
    if dtype is None:
        dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
        _checks.dtype(fn, "config.json torch_dtype", dtype, MODEL_DTYPES)
    # Meta tensors cost no memory: the model exists only as shapes until the checkpoint's
    # tensors are assigned into it.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linears = {name: _projection(fn, model, name) for name in _projection_names(model)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    dense = _dense_state(fn, model, linears, tensors, tied, dtype)
    spiking = {name: _spike_linear(fn, name, lin, tensors, qc, enc)
               for name, lin in linears.items()}
    # Old LLaMA exports saved the rotary frequencies, which are recomputed from the config.
    known = set(dense) | _quant_keys(linears, tensors) | ({"lm_head.weight"} if tied else set())
    leftover = sorted(k for k in set(tensors) - known if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ValueError(f"{fn}: unexpected tensor(s) {_first(leftover)} in {folder}: not part "
                         f"of a {type(model).__name__} with GPTQ projections")

    # Everything is validated; from here on nothing can fail on the checkpoint's account.
    for name, module in spiking.items():
        _set_module(model, name, module)
    model.load_state_dict(dense, strict=False, assign=True)
    if tied:
        model.tie_weights()  # assign=True replaced the shared embedding Parameter
    _rebuild_rotary(model)
    left = [k for k, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ValueError(f"{fn}: no tensor in {folder} provides {_first(sorted(left))}")
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
    if (folder / CALIBRATION_FILE).exists():  # the seed methods' per-layer settings
        set_encoding(model, enc, Calibration.load(folder))
        log.info("load_gptq: applied the calibration in %s", folder / CALIBRATION_FILE)
    return model


def patch(model: torch.nn.Module, enc: Encoding,
          checkpoint_format: Optional[str] = None) -> torch.nn.Module:
    """Replace, in place, every submodule carrying GPTQ tensors ``qweight``, ``qzeros``,
    ``scales`` (and ``g_idx``, optional) by a ``SpikeLinear`` sharing them; returns ``model``.

    Such a submodule (an optimum/gptqmodel QuantLinear) must hold the checkpoint layout (not a
    kernel-specific repacking such as exllama's shuffled qweight) and int attributes ``bits``
    and ``group_size``; ``bias`` is kept when it is a tensor. ``sym`` comes from the module's
    ``sym`` attribute, else ``model.config.quantization_config``, else True.
    checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``; None = the config's
        ``checkpoint_format``/``format``, else ``"gptq"``. gptqmodel turns v1 zeros into v2 in
        memory: symmetric weights are detected from their zeros either way (GPTQWeight), for
        asymmetric ones pass ``checkpoint_format="gptq_v2"``.

    Every module is converted before any is swapped, so on error the model is unchanged.
    """
    fn = "patch"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    _check_encoding(fn, enc)
    qc = _config_dict(getattr(getattr(model, "config", None), "quantization_config", None))
    if checkpoint_format is None:
        checkpoint_format = qc.get("checkpoint_format", qc.get("format", "gptq"))
    _checks.choice(fn, "checkpoint_format", checkpoint_format, FORMATS)
    targets = [(name, m) for name, m in model.named_modules()
               if all(isinstance(getattr(m, a, None), torch.Tensor)
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
            w = GPTQWeight(m.qweight, m.qzeros, m.scales, getattr(m, "g_idx", None),
                           bits=getattr(m, "bits", None), group_size=getattr(m, "group_size", None),
                           sym=getattr(m, "sym", qc.get("sym", True)),
                           checkpoint_format=checkpoint_format)
            for attr, value in (("in_features", w.in_features), ("out_features", w.out_features)):
                if getattr(m, attr, value) != value:
                    raise ValueError(f"{attr} = {getattr(m, attr)} disagrees with the tensors' "
                                     f"{value}")
            bias = getattr(m, "bias", None)
            spiking[name] = SpikeLinear(w, enc, bias=bias if isinstance(bias, torch.Tensor)
                                        else None)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{fn}: module {name!r} ({type(m).__name__}): {e}") from e
    for name, module in spiking.items():
        _set_module(model, name, module)
    return model


def quantize(model: torch.nn.Module, calib_inputs, bits: int = 4, group_size: int = 128,
             sym: bool = True, desc_act: bool = False, damp_percent: float = 0.01,
             path: Optional[PathLike] = None) -> Dict[str, GPTQWeight]:
    """GPTQ (Frantar et al. 2022) of the seven projections of every decoder layer, in place.

    model: a float32/float16 ``transformers`` causal LM with ``model.model.layers`` (LLaMA
        style). Calibration runs on the model's device.
    calib_inputs: token ids, int64 ``[B, T]`` or a list of such batches.
    bits, group_size (-1 = one group over K), sym, desc_act (act-order), damp_percent: as in
        GPTQ.md; groups are formed when their first column is reached (static_groups=False).

    Layers are processed in order: the inputs of layer i are computed by the already quantized
    layers 0..i-1, one Hessian ``H = 2 X^T X / rows`` per projection is gathered by forward
    hooks, and every projection's ``weight`` is overwritten with its exact GPTQ weight
    ``W_hat = scale * (q - z)`` (rounded once more in a float16 model; a float32 model becomes
    its own fake-quant reference). Returns
    ``{"model.layers.{i}.{proj}": GPTQWeight}`` (v1 zeros); with ``path`` the checkpoint is
    also written there (``save_gptq``).
    """
    fn = "quantize"
    layers = _decoder_layers(fn, model)
    _checks.dtype(fn, "model dtype", model.dtype, (torch.float16, torch.float32))
    _checks.integer(fn, "bits", bits, 2, 8)
    _checks.choice(fn, "bits", bits, BITS)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or \
            (group_size != -1 and group_size < 1):
        raise ValueError(f"{fn}: group_size must be -1 or a positive int, got {group_size!r}")
    for name, flag in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if isinstance(damp_percent, bool) or not isinstance(damp_percent, (int, float)) or \
            not 0 < damp_percent <= 1:
        raise ValueError(f"{fn}: damp_percent must be a float in (0, 1], got {damp_percent!r}")
    batches = [calib_inputs] if isinstance(calib_inputs, torch.Tensor) else list(calib_inputs)
    if not batches:
        raise ValueError(f"{fn}: calib_inputs must hold at least one batch, got none")
    for i, b in enumerate(batches):
        _checks.tensor(fn, f"calib_inputs[{i}]", b, (torch.int64,), dim=2)

    weights = {}
    with torch.no_grad():
        inputs = _first_layer_inputs(model, layers[0], batches)
        for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer")):
            linears = {f"model.layers.{i}.{p}": layer.get_submodule(p) for p in PROJECTIONS}
            hessians = _hessians(layer, linears, inputs)
            for name, lin in linears.items():
                q, scale, zero, g_idx = _gptq(lin.weight.float().cpu(), hessians[name], bits,
                                              group_size, sym, desc_act, damp_percent)
                # v1 zeros (stored zero - 1), like optimum; _find_params keeps zero >= 1.
                weights[name] = GPTQWeight(pack(q, bits, dim=0), pack(zero - 1, bits, dim=1),
                                           scale.half(), g_idx.to(torch.int32), bits=bits,
                                           group_size=group_size, sym=sym,
                                           checkpoint_format="gptq")
                # scale * (q - z) is exact in float32 (an fp16 scale times a small integer):
                # the weights the error feedback saw and the spiking kernels compute with.
                lin.weight.copy_((scale[g_idx] * (q - zero[g_idx])).t())
            # The next layer sees what this one computes with its quantized weights.
            inputs = [((_layer_output(layer, args, kwargs),) + args[1:], kwargs)
                      for args, kwargs in inputs]
    if path is not None:
        save_gptq(model, weights, path)
    return weights


def save_gptq(model: torch.nn.Module, weights: Mapping[str, GPTQWeight], path: PathLike) -> None:
    """Write a standard GPTQ checkpoint folder (GPTQ.md "Writing").

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
                        f"{name}.qzeros": pack(z - 1, w.bits, dim=1),
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
        raise ValueError(f"{fn}: weights names modules absent from the model: {_first(missing)}")
    desc_act = any(not torch.equal(w.g_idx.cpu(), _trivial_g_idx(w)) for w in weights.values())
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


# ---- GPTQ ---------------------------------------------------------------------------------

def _find_params(w: torch.Tensor, bits: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale float32 ``[N]`` (fp16-representable) and zero int64 ``[N]`` of ``w [N, cols]``."""
    maxq = (1 << bits) - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:
        # GPTQ.md's scale 2 * max|w| / maxq for every row (the reference code's all-positive
        # rows get max / maxq and clip their upper half).
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    # The checkpoint stores scales in float16; quantizing with the rounded scale makes the
    # error feedback see exactly the weights the file will hold.
    scale = ((hi - lo) / maxq).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int64)
    else:
        # v1 files store zero - 1, so a true zero 0 would be -1 and overflow into the next
        # field (GPTQ.md); 1 costs at most one level at the top of the range.
        zero = torch.round(-lo / scale).clamp(1, maxq).to(torch.int64)
    return scale, zero


def _gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
          desc_act: bool, damp_percent: float):
    """GPTQ of one linear: ``W`` float32 ``[N, K]``, ``H`` float32 ``[K, K]``.

    Returns codes int64 ``[K, N]``, scales float32 ``[G, N]``, zeros int64 ``[G, N]`` and
    g_idx int64 ``[K]``, all in the original channel order.
    """
    N, K = W.shape
    maxq = (1 << bits) - 1
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0  # channels that never fired carry no information
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(K, dtype=H.dtype)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise ValueError(f"quantize: the damped Hessian is not positive definite; raise "
                         f"damp_percent (got {damp_percent}) or add calibration data") from e
    codes = torch.zeros(N, K, dtype=torch.int64)
    scales = torch.zeros(G, N)
    zeros = torch.zeros(G, N, dtype=torch.int64)
    for b1 in range(0, K, BLOCK):
        b2 = min(b1 + BLOCK, K)
        W1, Err1, Hinv1 = W[:, b1:b2].clone(), torch.zeros(N, b2 - b1), Hinv[b1:b2, b1:b2]
        for i in range(b2 - b1):
            j = b1 + i
            if j % gs == 0:
                # As in the reference code, the group's range is taken from W, which holds the
                # error feedback of earlier blocks (and of this block only for j == b1).
                scales[j // gs], zeros[j // gs] = _find_params(W[:, j:j + gs], bits, sym)
            s, z = scales[j // gs], zeros[j // gs]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s) + z, 0, maxq)
            codes[:, j] = q.to(torch.int64)
            err = (w - s * (q - z)) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b2:] -= Err1 @ Hinv[b1:b2, b2:]
    inv = torch.argsort(perm)
    g_idx = (torch.arange(K) // gs)[inv]  # channel perm[j] belongs to group j // gs
    return codes[:, inv].t().contiguous(), scales, zeros, g_idx


class _Captured(Exception):
    """Stops the forward pass once the first decoder layer's inputs are recorded."""


def _first_layer_inputs(model, first_layer, batches) -> List[Tuple[tuple, dict]]:
    """(args, kwargs) of the first decoder layer for every batch: hidden states plus what the
    model computes once for all layers (attention mask, rotary position embeddings)."""
    inputs = []

    def hook(_module, args, kwargs):
        if not args:  # hidden states go first, positionally, so later layers can swap them
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        inputs.append((args, kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(model.device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def _layer_output(layer, args, kwargs) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _hessians(layer, linears: Mapping[str, torch.nn.Module], inputs) -> Dict[str, torch.Tensor]:
    """``2 X^T X / rows`` (float32 ``[K, K]``, on the CPU) of every linear's inputs X over all
    calibration batches, running ``layer`` with its current (float) weights."""
    sums = {name: torch.zeros(lin.in_features, lin.in_features) for name, lin in linears.items()}
    rows = {name: 0 for name in linears}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float().cpu()
            sums[name] += x.t() @ x
            rows[name] += x.shape[0]
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(name)) for name, lin in linears.items()]
    try:
        for args, kwargs in inputs:
            layer(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {name: 2 * sums[name] / rows[name] for name in linears}


# ---- loading -----------------------------------------------------------------------------

def _check_encoding(fn: str, enc) -> None:
    # Checked before any file is read, so a wrong argument fails fast.
    if not isinstance(enc, Encoding):
        raise TypeError(f"{fn}: enc must be a spikeops.Encoding, got {type(enc).__name__}")
    if enc.mode == "static":
        raise ValueError(f"{fn}: enc.mode must not be 'static' (it needs per-call scales), "
                         f"got 'static'")


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


def _read_json(fn: str, file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{fn}: {file} must be readable JSON: {e}") from e


def _read_configs(fn: str, folder: Path):
    """The model config (without ``quantization_config``) and the QuantConfig."""
    from transformers import AutoConfig
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{fn}: {file} must exist (the model's config.json), not found")
    raw = _read_json(fn, file)
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{fn}: {file} must be a JSON object with 'model_type'")
    for name in QUANT_CONFIG_FILES:
        if (folder / name).is_file():
            qc = QuantConfig.parse(fn, _read_json(fn, folder / name), name)
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


def _weight_files(fn: str, folder: Path) -> Dict[Path, Optional[set]]:
    """The safetensors files to read, each with the keys the index assigns it (None: no index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(fn, index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{fn}: {index} must hold a non-empty 'weight_map' object")
        files: Dict[Path, Optional[set]] = {}
        for key, name in weight_map.items():
            files.setdefault(folder / name, set()).add(key)
        for file in files:
            if not file.is_file():
                raise ValueError(f"{fn}: shard {file.name} listed in {index.name} (for "
                                 f"{_first(sorted(files[file]))}) does not exist")
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


def _read_tensors(fn: str, folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    tensors: Dict[str, torch.Tensor] = {}
    for file, listed in _weight_files(fn, folder).items():
        try:
            part = load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{fn}: {file.name} must be a valid safetensors file: {e}") from e
        if listed is not None and set(part) != listed:
            extra, absent = sorted(set(part) - listed), sorted(listed - set(part))
            raise ValueError(f"{fn}: shard {file.name} must hold the tensors the index lists for "
                             f"it; " + (f"unlisted: {_first(extra)}" if extra else
                                        f"missing: {_first(absent)}"))
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise ValueError(f"{fn}: tensor {dup[0]} appears in more than one file")
        tensors.update(part)
    return tensors


def _projection_names(model) -> List[str]:
    layers = _decoder_layers("load_gptq", model)
    return [f"model.layers.{i}.{p}" for i in range(len(layers)) for p in PROJECTIONS]


def _decoder_layers(fn: str, model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{fn}: model must be a LLaMA-style causal LM with decoder layers at "
                         f"model.model.layers, got {type(model).__name__}")
    return layers


def _projection(fn: str, model, name: str) -> torch.nn.Linear:
    try:
        lin = model.get_submodule(name)
    except AttributeError:
        lin = None
    if not isinstance(lin, torch.nn.Linear):
        raise ValueError(f"{fn}: {type(model).__name__} must have a torch.nn.Linear at {name} "
                         f"(LLaMA-style projections), got {type(lin).__name__}")
    return lin


def _quant_keys(linears: Mapping[str, torch.nn.Linear], tensors: Mapping) -> set:
    """Keys the quantized projections may take from the checkpoint."""
    fields = ("qweight", "qzeros", "scales", "g_idx", "bias")
    return {f"{name}.{f}" for name in linears for f in fields if f"{name}.{f}" in tensors}


def _tensor(fn: str, tensors: Mapping, key: str, dtypes: Iterable[torch.dtype],
            shape: Tuple[int, ...]) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{fn}: missing tensor {key} (expected shape {list(shape)})")
    t = _checks.tensor(fn, f"tensor {key}", tensors[key], dtypes)
    _checks.shape(fn, f"tensor {key}", t, shape)
    return t


def _spike_linear(fn: str, name: str, lin: torch.nn.Linear, tensors: Mapping,
                  qc: QuantConfig, enc: Encoding) -> SpikeLinear:
    """The SpikeLinear replacing ``lin`` (meta ``[N, K]``), from the tensors under ``name``."""
    K, N, b = lin.in_features, lin.out_features, qc.bits
    G = 1 if qc.group_size == -1 else -(-K // qc.group_size)
    qweight = _tensor(fn, tensors, f"{name}.qweight", (torch.int32,), ((K * b + 31) // 32, N))
    qzeros = _tensor(fn, tensors, f"{name}.qzeros", (torch.int32,), (G, (N * b + 31) // 32))
    scales = _tensor(fn, tensors, f"{name}.scales", (torch.float16,), (G, N))
    g_idx = None
    if f"{name}.g_idx" in tensors:
        g_idx = _tensor(fn, tensors, f"{name}.g_idx", (torch.int32, torch.int64), (K,))
    bias = None
    if lin.bias is not None or f"{name}.bias" in tensors:
        bias = _tensor(fn, tensors, f"{name}.bias", BIAS_DTYPES, (N,))
        # Old AutoGPTQ files carry all-zero biases on bias-free architectures: harmless, kept.
        if lin.bias is None and bool(bias.any()):
            raise ValueError(f"{fn}: unexpected non-zero tensor {name}.bias: the architecture "
                             f"has no bias there (only all-zero biases are accepted)")
    try:
        w = GPTQWeight(qweight, qzeros, scales, g_idx, bits=b, group_size=qc.group_size,
                       sym=qc.sym, checkpoint_format=qc.checkpoint_format)
        return SpikeLinear(w, enc, bias=bias)
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
        t = _tensor(fn, tensors, key, (torch.float16, torch.bfloat16, torch.float32),
                    tuple(want.shape))
        dense[key] = t.to(dtype)
    return dense


def _rebuild_rotary(model) -> None:
    """Rotary embeddings keep their frequencies in non-persistent buffers, which no checkpoint
    holds: recompute them from the config instead of leaving them on the meta device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and \
                hasattr(module, "inv_freq"):
            _set_module(model, name, type(module)(config=model.config))


def _set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _config_dict(qc) -> dict:
    if qc is None:
        return {}
    return qc if isinstance(qc, dict) else qc.to_dict()


def _trivial_g_idx(w: GPTQWeight) -> torch.Tensor:
    gs = w.in_features if w.group_size == -1 else w.group_size
    return torch.arange(w.in_features, dtype=torch.int32) // gs


def _first(names: List[str], count: int = 5) -> str:
    """At most ``count`` names, and how many more."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more
