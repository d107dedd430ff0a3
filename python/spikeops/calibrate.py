"""Per-layer calibration of the seed methods' encodings, and switching a whole model's encoding.

- SpikeLLM Optimal Brain Spiking (``"obs"``): the first-order saliency of input channel k of a
  layer is the calibration mean of ``((X W^T W) * X)[:, k]`` (signed, W the dequantized weights
  ``[N, K]``); the top ``salient_fraction`` of channels get ``salient_bits``.
- SDLLM (``"sdllm"``): the clipping ratio gamma of minmax, absmax and absmean spikes (SDLLM's
  membrane clipping for the signed modes; one each, as the modes scale differently), chosen per
  layer from a grid to minimise the layer's
  output error ``||(x_hat - x) W_hat^T||`` (x_hat the decoded spikes; ``spike_linear`` computes
  ``x_hat W_hat^T`` within the tolerance of docs/ops.md).
- LAS (``"las"``): the OAT thresholds from the layer's activation statistics:
  ``theta_nor`` = the ``las_quantile`` quantile of ``|x|``, ``theta_out`` = ``max |x|``.
- The spiking key cache (``"kv"``): each decoder layer's query moment (runner.query_moments,
  over every batch), kept with its q_proj; ``Runner(kv="spike4" | "spike8")`` codes the keys
  with the error feedback it gives (attention.key_feedback).

A ``Calibration`` is saved beside a checkpoint as ``spikeops_calibration.json`` (gamma, theta,
settings) and ``spikeops_calibration.safetensors`` (salient masks, query moments): never
pickle.
``load_gptq`` applies one found there unless told otherwise (its ``calibration`` argument).

``set_encoding`` gives a model's SpikeLinear layers their encodings: one Encoding, or one per
layer type (``{"down_proj": Encoding("minmax", 8), "*": Encoding("absmax", 4)}``), refined per
layer by a calibration, which fills only what the Encoding leaves open (gamma, theta: None) and
supplies the salient masks; a value the Encoding gives is never replaced. Each layer keeps the
calibration it was set with, so later calls without ``calibration=`` use it too, until
``calibration=None`` drops it. docs/research.md has the workflow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from . import _checks
from .architecture import PROJECTIONS
from .checkpoint import CALIBRATION_FILE, CALIBRATION_MASK_FILE
from .files import check_output, has_file, input_file, write_file
from .nn import SpikeLinear, kept_encodings, spike_layers
from .spikes import DEFAULT_GAMMA, GAMMA_MODES, Encoding, check_usable, encode

METHODS = ("obs", "sdllm", "las", "kv")
GAMMA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
# The keys of a per-layer-type encoding map: the projections' names, and "*" for the others.
LAYER_TYPES = tuple(p.rsplit(".", 1)[1] for p in PROJECTIONS)
ANY_TYPE = "*"
CURRENT = "current"  # set_encoding's default: each layer's calibration stays as it is


@dataclasses.dataclass
class LayerCalibration:
    salient: Optional[torch.Tensor] = None         # bool [K]: OBS salient channels
    # SDLLM clipping ratio per mode and activation grouping: key gamma_key(mode, group), the
    # mode itself per token ("absmax") and e.g. "absmaxg64" for groups of 64 channels.
    gamma: Optional[Dict[str, float]] = None
    theta: Optional[Tuple[float, float]] = None    # LAS (theta_nor, theta_out)
    # The spike bits gamma was searched for (Calibration.settings["bits"]): a clip that suits
    # 4-bit codes clips 8-bit ones for nothing, so other widths run unclipped. None: unknown.
    gamma_bits: Optional[int] = None
    # q_proj's only (method "kv"): its decoder layer's query moment, float32 [kv_heads, D, D].
    query_moment: Optional[torch.Tensor] = None


def gamma_key(mode: str, group: int) -> str:
    """The key of a calibrated gamma: ``mode`` per token, ``f"{mode}g{group}"`` for activation
    groups, whose narrower ranges take milder clips than the token's (docs/research.md)."""
    return f"{mode}g{group}" if group else mode


# gamma_key's keys: a mode of GAMMA_MODES, then gG for activation groups.
_GAMMA_KEY = re.compile(f"({'|'.join(GAMMA_MODES)})" + r"(?:g([1-9]\d*))?")


@dataclasses.dataclass
class Calibration:
    """Per-layer results, keyed by the SpikeLinear's module name, and the settings used."""

    layers: Dict[str, LayerCalibration]
    settings: dict

    def save(self, folder) -> None:
        """Write the JSON and safetensors files into ``folder``, each whole (files.write_file),
        tensors first; the JSON names the hash of its tensors, so a save interrupted between the
        two loads as an error, never as a mixture."""
        from safetensors.torch import save_file
        fn = "Calibration.save"
        folder = check_output(fn, folder)
        tensors = {f"{name}.salient": c.salient.to(torch.uint8).cpu().contiguous()
                 for name, c in self.layers.items() if c.salient is not None}
        tensors.update({f"{name}.query_moment": c.query_moment.float().cpu().contiguous()
                      for name, c in self.layers.items() if c.query_moment is not None})
        mask_file = write_file(fn, folder / CALIBRATION_MASK_FILE, lambda tmp: save_file(tensors, str(tmp)))
        layers = {name: {"gamma": c.gamma, "theta": list(c.theta) if c.theta else None,
                         "salient": c.salient is not None,
                         "query_moment": c.query_moment is not None}
                  for name, c in self.layers.items()}
        text = json.dumps({"format": 1, "settings": self.settings,
                           "masks_sha256": _sha256(mask_file), "layers": layers}, indent=1)
        write_file(fn, folder / CALIBRATION_FILE, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, folder) -> "Calibration":
        """Read a calibration written by ``save``; anything malformed raises ValueError."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        fn = "Calibration.load"
        folder = Path(folder)
        json_file, mask_file = input_file(fn, folder, CALIBRATION_FILE), folder / CALIBRATION_MASK_FILE
        try:
            raw = json.loads(json_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{fn}: cannot read {json_file}: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != 1 or \
                not isinstance(raw.get("layers"), dict):
            raise ValueError(f"{fn}: {json_file} is not a spikeops calibration "
                             f"(format 1 with a 'layers' object)")
        tensors = {}
        if has_file(fn, folder, CALIBRATION_MASK_FILE):
            if raw.get("masks_sha256") not in (None, _sha256(mask_file)):
                raise ValueError(f"{fn}: {mask_file} is not the mask file {json_file.name} was "
                                 f"saved with (an interrupted or mixed save); calibrate again")
            try:
                tensors = load_file(str(mask_file))
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{fn}: {mask_file} must be a valid safetensors file: {e}") \
                    from e
        def stored(name: str, entry: dict, field: str) -> Optional[torch.Tensor]:
            """The tensor saved for a layer's field, None where its JSON entry says none."""
            if not entry.get(field):
                return None
            key = f"{name}.{field}"
            if key not in tensors:
                raise ValueError(f"{fn}: {mask_file} lacks tensor {key!r}")
            return tensors[key]

        layers = {}
        for name, entry in raw["layers"].items():
            if not isinstance(entry, dict):
                raise ValueError(f"{fn}: layer {name!r} must be an object with gamma, theta, "
                                 f"salient and query_moment, got {entry!r}")
            gamma, theta = entry.get("gamma"), entry.get("theta")
            salient = stored(name, entry, "salient")
            if salient is not None:
                if salient.dtype != torch.uint8 or salient.dim() != 1 or \
                        bool((salient > 1).any()):
                    raise ValueError(f"{fn}: {name}.salient must be a uint8 [K] tensor of 0 "
                                     f"and 1, got {salient.dtype} {list(salient.shape)}")
                salient = salient.bool()
            if gamma is not None and not (
                    isinstance(gamma, dict)
                    and all(isinstance(k, str) and _GAMMA_KEY.fullmatch(k)
                            and int(_GAMMA_KEY.fullmatch(k).group(2) or 0) % 32 == 0
                            for k in gamma)
                    and all(_number(g) and 0 < g <= 1 for g in gamma.values())):
                raise ValueError(f"{fn}: layer {name!r}: gamma must map modes of "
                                 f"{GAMMA_MODES}, each alone or with gG (G a multiple of 32: "
                                 f"activation groups), to values in (0, 1], got {gamma!r}")
            if theta is not None and not (isinstance(theta, list) and len(theta) == 2
                                          and all(_number(t) for t in theta)
                                          and 0 < theta[0] < theta[1] < math.inf):
                raise ValueError(f"{fn}: layer {name!r}: theta must be [theta_nor, theta_out] "
                                 f"with 0 < theta_nor < theta_out, got {theta!r}")
            moment = stored(name, entry, "query_moment")
            if moment is not None and (moment.dtype != torch.float32 or moment.dim() != 3 or
                                       moment.shape[1] != moment.shape[2] or
                                       not bool(torch.isfinite(moment).all())):
                raise ValueError(f"{fn}: {name}.query_moment must be a finite float32 "
                                 f"[kv_heads, D, D] tensor, got {moment.dtype} "
                                 f"{list(moment.shape)}")
            layers[name] = LayerCalibration(salient, gamma, tuple(theta) if theta else None,
                                            query_moment=moment)
        settings = raw.get("settings", {})
        bits = settings.get("bits") if isinstance(settings, dict) else None
        if bits is not None and (not isinstance(bits, int) or isinstance(bits, bool)):
            raise ValueError(f"{fn}: settings.bits must be an int, got {bits!r}")
        for layer in layers.values():
            layer.gamma_bits = bits if layer.gamma is not None else None
        return cls(layers, settings)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _sha256(file: Path) -> str:
    import hashlib
    return hashlib.sha256(file.read_bytes()).hexdigest()


ENCODING_HELP = ("encodings: minmaxB, absmaxB, absmeanB (B bits, the sign included), oatB (B "
                 "planes), 'gC' for one threshold per group of C channels (a multiple of 32 "
                 "inside the weight groups; not with oat or salient channels), e.g. absmax4g64, "
                 "'+sS' for salient channels at S bits, e.g. minmax4+s6, and none "
                 "(float activations); per layer type, TYPE=ENC entries joined by ';' with '*' "
                 "for every other type, e.g. 'down_proj=minmax8;*=absmax4' (TYPE: q_proj, "
                 "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). minmax/absmax/absmean "
                 "take their gamma, oat its thresholds and salient channels their masks from the "
                 "model's calibration (spikeops calibrate)")


# Stands in for a calibration when only the grammar of an encoding is checked (the calibration
# that oat and salient channels need is checked where the encoding is set).
ANY_CALIBRATION = object()


def parse_encoding(spec: str, calibration):
    """What ``set_encoding`` takes, from a CLI spec: an Encoding (``minmax4``, ``absmax4+s6``,
    ``oat8``), None (``none``: float activations), or a per-layer-type map
    (``down_proj=minmax8;*=absmax4``). Specs that need a calibration are refused without one."""
    if "=" not in spec:
        return _parse_one(spec, spec, calibration)
    by_type = {}
    for entry in spec.split(";"):
        kind, _, one = entry.partition("=")
        if kind not in LAYER_TYPES + (ANY_TYPE,) or kind in by_type:
            raise ValueError(f"encoding {spec!r}: each ';'-separated entry must be TYPE=ENC with "
                             f"TYPE one of {', '.join(LAYER_TYPES)} or '*' (every other type), "
                             f"each once, got {entry!r}")
        by_type[kind] = _parse_one(one, spec, calibration)
    return by_type


def _parse_one(one: str, spec: str, calibration) -> Optional[Encoding]:
    if one == "none":
        return None
    match = re.fullmatch(r"(minmax|absmax|absmean|oat)(\d+)(?:g(\d+))?(?:\+s(\d+))?", one)
    if match is None:
        raise ValueError(f"unknown encoding {one!r} in {spec!r}; {ENCODING_HELP}")
    mode, n, group, salient = (match.group(1), int(match.group(2)), match.group(3),
                               match.group(4))
    if (mode == "oat" or salient) and calibration is None:
        raise ValueError(f"encoding {one!r} needs a calibration (run spikeops calibrate first)")
    return Encoding(mode, n, salient_bits=int(salient) if salient else None,
                    group=int(group) if group else 0)


def check_encoding(fn: str, enc) -> None:
    """``enc`` is an Encoding (not mode ``"static"``, which needs per-call scales), None (float
    activations) or a map ``{layer type or "*": Encoding or None}`` of such values, whose layer
    types are LAYER_TYPES."""
    if isinstance(enc, Mapping):
        unknown = [k for k in enc if k not in LAYER_TYPES + (ANY_TYPE,)]
        if unknown:
            raise ValueError(f"{fn}: the keys of an encoding map must be layer types "
                             f"{LAYER_TYPES} or {ANY_TYPE!r} (every other type), got "
                             f"{unknown[0]!r}")
        values = [(f"enc[{k!r}]", v) for k, v in enc.items()]
    else:
        values = [("enc", enc)]
    for name, value in values:
        if value is not None and not isinstance(value, Encoding):
            raise TypeError(f"{fn}: {name} must be a spikeops.Encoding, None (float "
                            f"activations) or, for enc, a map of layer types to them, got "
                            f"{type(value).__name__}")
        if value is not None and value.mode == "static":
            raise ValueError(f"{fn}: {name}.mode must not be 'static' (it needs per-call "
                             f"scales), got 'static'")


def type_encoding(fn: str, enc, name: str) -> Optional[Encoding]:
    """The entry of ``enc`` (checked by check_encoding) for the layer called ``name``."""
    if not isinstance(enc, Mapping):
        return enc
    kind = name.rsplit(".", 1)[-1]
    if kind in enc:
        return enc[kind]
    if ANY_TYPE in enc:
        return enc[ANY_TYPE]
    raise ValueError(f"{fn}: the encoding map has no entry for layer {name!r} (type {kind!r}) "
                     f"and no {ANY_TYPE!r} entry for every other type, got keys {list(enc)}")


def layer_encoding(enc: Optional[Encoding], cal: Optional[LayerCalibration]):
    """The Encoding and salient mask of one layer: ``enc`` with what it leaves open filled from
    the layer's calibration: gamma (GAMMA_MODES, for encodings of the bits and activation group
    it was searched for; DEFAULT_GAMMA otherwise and where the calibration has none), theta (oat) and the salient
    mask (when ``enc.salient_bits`` is set). A value ``enc`` gives is kept."""
    if enc is None:
        return None, None
    if enc.mode in GAMMA_MODES and enc.gamma is None:
        gamma = _calibrated_gamma(enc, cal)
        enc = dataclasses.replace(enc, gamma=DEFAULT_GAMMA if gamma is None else gamma)
    if enc.mode == "oat" and enc.theta is None and cal is not None:
        enc = dataclasses.replace(enc, theta=cal.theta)
    mask = cal.salient if enc.salient_bits is not None and cal is not None else None
    return enc, mask


def _calibrated_gamma(enc: Encoding, cal: Optional[LayerCalibration]) -> Optional[float]:
    """The layer's calibrated gamma for ``enc``'s mode and activation group, if it was searched
    for ``enc``'s bits (or for unknown bits), else None."""
    if cal is None or not cal.gamma or cal.gamma_bits not in (None, enc.bits):
        return None
    return cal.gamma.get(gamma_key(enc.mode, enc.group))


def _unused(enc: Optional[Encoding], cal: Optional[LayerCalibration]) -> List[Tuple[str, str]]:
    """``(parameter, value enc gives)`` of each calibrated value of ``cal`` that ``enc``'s own
    gamma or theta keeps from use."""
    if enc is None or cal is None:
        return []
    unused = []
    calibrated = _calibrated_gamma(enc, cal)
    if enc.gamma is not None and calibrated is not None and calibrated != enc.gamma:
        unused.append(("gamma", str(enc.gamma)))
    if enc.theta is not None and cal.theta is not None and tuple(enc.theta) != cal.theta:
        unused.append(("theta", str(tuple(enc.theta))))
    return unused


def _searched_for_other(enc: Optional[Encoding], cal: Optional[LayerCalibration]):
    """``(encoding label, bits, groups)`` when ``cal`` holds gammas for ``enc``'s mode that were
    searched for other spikes (another width, or other activation groups: ``groups``, 0 = per
    token), so that ``enc``, whose gamma is left open, runs unclipped; else None."""
    if enc is None or enc.gamma is not None or cal is None or not cal.gamma \
            or _calibrated_gamma(enc, cal) is not None:
        return None
    groups = tuple(sorted(int(m.group(2) or 0) for m in map(_GAMMA_KEY.fullmatch, cal.gamma)
                          if m.group(1) == enc.mode))
    return (enc.label, cal.gamma_bits, groups) if groups else None


def set_encoding(model: torch.nn.Module, enc, calibration=CURRENT) -> torch.nn.Module:
    """Give every SpikeLinear of ``model`` its encoding; returns ``model``.

    enc: an Encoding, None (float activations), or a map from layer type (``"q_proj"``, ...,
        ``"down_proj"``) to an Encoding or None, with ``"*"`` for every type it does not name,
        e.g. ``{"down_proj": Encoding("minmax", 8), "*": Encoding("absmax", 4)}``.
    calibration: a Calibration, None (no calibration) or ``"current"`` (the default): the one
        each layer was last set with (load_gptq's, unless changed since). It fills what the
        Encoding leaves open (``layer_encoding``); calibrated values an Encoding's own gamma or
        theta keeps from use are announced with a warning, and so are encodings that run
        unclipped because the calibrated gamma was searched for other bits or another
        activation group. An encoding that needs what the calibration lacks (oat without theta,
        salient_bits without a mask) is refused.

    All layers are checked before any changes. The effective per-layer encodings: ``encodings``.
    """
    fn = "set_encoding"
    check_encoding(fn, enc)
    if isinstance(calibration, str):
        if calibration != CURRENT:
            raise ValueError(f"{fn}: calibration must be a Calibration, None or "
                             f"{CURRENT!r}, got {calibration!r}")
    elif calibration is not None and not isinstance(calibration, Calibration):
        raise TypeError(f"{fn}: calibration must be a spikeops Calibration, None or "
                        f"{CURRENT!r}, got {type(calibration).__name__}")
    layers = spike_layers(model)
    plan, unused, other = {}, {}, {}
    for name, layer in layers.items():
        if isinstance(calibration, str):  # CURRENT
            cal = layer.calibration
        else:
            cal = calibration.layers.get(name) if calibration is not None else None
        given = type_encoding(fn, enc, name)
        for what in _unused(given, cal):
            unused.setdefault(what, []).append(name)
        searched = _searched_for_other(given, cal)
        if searched is not None:
            other.setdefault(searched, []).append(name)
        layer_enc, mask = layer_encoding(given, cal)
        if layer_enc is not None:
            check_usable(f"{fn}: layer {name!r}", layer_enc, mask)
        if mask is not None:
            mask = mask.to(layer.device)
            if mask.shape != (layer.in_features,):
                raise ValueError(f"{fn}: calibration of {name!r} has a salient mask of shape "
                                 f"{list(mask.shape)}, the layer has K = {layer.in_features}")
        plan[name] = (layer_enc, mask, cal)
    for (param, value), names in unused.items():
        warnings.warn(f"{fn}: the Encoding gives {param}={value}, so the calibrated {param} of "
                      f"{len(names)} layer(s) (e.g. {names[0]!r}) is not used: an Encoding's "
                      f"own values are never replaced (leave {param} None to use the "
                      f"calibration's)", stacklevel=2)
    for (label, bits, groups), names in other.items():
        searched = (f"{bits}-bit spikes" if bits is not None else "spikes of unknown width") + \
            " " + " and ".join(f"in groups of {g} channels" if g else "per token" for g in groups)
        warnings.warn(f"{fn}: the calibrated gamma of {len(names)} layer(s) (e.g. "
                      f"{names[0]!r}) was searched for {searched}, so {label} runs there "
                      f"unclipped (gamma 1.0); spikeops calibrate --bits/--groups searches one "
                      f"for it", stacklevel=2)
    for name, (layer_enc, mask, cal) in plan.items():
        layers[name].set_encoding(layer_enc, mask)
        layers[name].calibration = cal
    return model


def encodings(model: torch.nn.Module) -> Dict[str, Optional[Encoding]]:
    """The effective Encoding of every SpikeLinear of ``model`` (None: float activations), with
    the calibrated gamma and theta filled in; each layer's ``salient_mask`` and ``calibration``
    (its LayerCalibration) are attributes of the layer."""
    return {name: layer.enc for name, layer in spike_layers(model).items()}


@torch.no_grad()
def collect_inputs(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                   max_tokens: int = 4096) -> Dict[str, torch.Tensor]:
    """Inputs ``x`` (float32 ``[T, K]``, at most ``max_tokens`` rows) of every SpikeLinear when
    the model runs on float activations; the layers' encodings are restored afterwards."""
    layers = spike_layers(model)
    inputs: Dict[str, List[torch.Tensor]] = {name: [] for name in layers}
    counts = dict.fromkeys(layers, 0)

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            take = max_tokens - counts[name]
            if take > 0:
                inputs[name].append(x[:take].cpu())
                counts[name] += min(take, x.shape[0])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers.items()]
    try:
        with kept_encodings(layers, enc=None):
            device = next(iter(layers.values())).device
            for ids in batches:
                if min(counts.values()) >= max_tokens:
                    break  # every layer has its rows: the rest of the batches would be discarded
                model(input_ids=ids.to(device))
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(xs) for name, xs in inputs.items() if xs}


def _dense_weight(layer: SpikeLinear) -> torch.Tensor:
    """W_hat float32 [N, K] on the CPU."""
    return layer.dequantize().float().cpu()


def _best_gamma(x: torch.Tensor, W: torch.Tensor, gram: Optional[torch.Tensor], mode: str,
                bits: int, group: int, grid) -> float:
    """The gamma of ``grid`` whose spikes of x (activation groups of ``group`` channels) give
    the smallest ``||(x_hat - x) W^T||^2``, computed as ``sum((D^T D) * (W^T W))`` with
    D = x_hat - x when that is cheaper (K < N)."""
    def error(g):
        d = encode(x, Encoding(mode, bits, gamma=g, group=group)).decode() - x
        if gram is not None:
            return float(((d.t() @ d) * gram).sum())
        return float((d @ W.t()).pow(2).sum())
    return min(grid, key=error)


def calibrate(model: torch.nn.Module, batches: Iterable[torch.Tensor],
              methods: Iterable[str] = METHODS, bits: int = 4, salient_fraction: float = 0.1,
              las_quantile: float = 0.99, max_tokens: int = 512,
              gamma_grid: Iterable[float] = GAMMA_GRID,
              groups: Iterable[int] = (0,)) -> Calibration:
    """Calibrate every SpikeLinear of ``model`` on ``batches`` of token ids (int64 ``[B, T]``).

    methods: any of ``"obs"``, ``"sdllm"``, ``"las"``. bits: the spike bits the SDLLM gamma is
    searched for. salient_fraction: share of channels OBS marks salient (SpikeLLM: 10%, with
    ``salient_bits = bits + 1``; 5% with ``bits + 2``). las_quantile: quantile of ``|x|`` that
    becomes ``theta_nor``. max_tokens: input rows per layer the methods use (the first ones of
    the batches; "kv" reads every batch). gamma_grid: the SDLLM candidates, each in (0, 1].
    groups: the activation
    groupings (channels per group, 0: per token) the SDLLM gamma is searched for, one gamma per
    mode and grouping; encodings with another grouping run unclipped (announced).
    """
    fn = "calibrate"
    methods = tuple(methods)
    for m in methods:
        _checks.choice(fn, "methods", m, METHODS)
    _checks.integer(fn, "bits", bits, 2, 16)
    groups = tuple(groups)
    for group in groups:
        _checks.integer(fn, "groups", group, 0, 1 << 23)
    if not groups or len(set(groups)) != len(groups) or any(g % 32 for g in groups):
        raise ValueError(f"{fn}: groups must hold distinct values, each 0 (per token) or a "
                         f"positive multiple of 32, got {groups!r}")
    if not (isinstance(salient_fraction, float) and 0 < salient_fraction < 1):
        raise ValueError(f"{fn}: salient_fraction must be a float in (0, 1), got "
                         f"{salient_fraction!r}")
    if not (isinstance(las_quantile, float) and 0 < las_quantile < 1):
        raise ValueError(f"{fn}: las_quantile must be a float in (0, 1), got {las_quantile!r}")
    _checks.integer(fn, "max_tokens", max_tokens, 1, 1 << 24)
    gamma_grid = tuple(gamma_grid)
    if not gamma_grid or not all(_number(g) and 0 < g <= 1 for g in gamma_grid):
        raise ValueError(f"{fn}: gamma_grid must hold numbers in (0, 1], got {gamma_grid!r}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = _checks.token_batches(fn, "batches", batches, vocab if vocab else 1 << 62)
    inputs = collect_inputs(model, batches, max_tokens)
    if not inputs:
        raise ValueError(f"{fn}: batches must hold at least one batch of token ids, got none")
    layers = spike_layers(model)
    result = {}
    for name, x in tqdm(inputs.items(), desc="calibrate", unit="layer"):
        layer = layers[name]
        cal = LayerCalibration(gamma_bits=bits if "sdllm" in methods else None)
        W = _dense_weight(layer)  # [N, K]
        if "obs" in methods:
            saliency = ((x @ W.t() @ W) * x).mean(0)
            top = max(1, math.ceil(salient_fraction * layer.in_features))
            cal.salient = torch.zeros(layer.in_features, dtype=torch.bool)
            cal.salient[saliency.topk(top).indices] = True
        if "sdllm" in methods:
            gram = W.t() @ W if W.shape[1] < W.shape[0] else None
            cal.gamma = {gamma_key(mode, group): _best_gamma(x, W, gram, mode, bits, group,
                                                             gamma_grid)
                         for group in groups for mode in GAMMA_MODES}
        if "las" in methods:
            a = x.abs().flatten()
            theta_out = float(a.max())
            theta_nor = float(torch.quantile(a[:1 << 24], las_quantile))
            if not 0 < theta_nor < theta_out:  # degenerate inputs (all equal, or all zero)
                theta_out = max(theta_out, 1e-6)
                theta_nor = theta_out / 2
            cal.theta = (theta_nor, theta_out)
        result[name] = cal
    if "kv" in methods:
        from .runner import query_moments
        names = {id(m): name for name, m in layers.items()}
        with kept_encodings(layers, enc=None):
            moments = query_moments(model, batches)
        for layer, moment in zip(model.model.layers, moments):
            name = names.get(id(getattr(layer.self_attn, "q_proj", None)))
            if name is None:
                raise ValueError(f"{fn}: method 'kv' needs every decoder layer's q_proj to be "
                                 f"a SpikeLinear (a model from load_gptq)")
            result[name].query_moment = moment
    # What was used, not what was asked for: fewer tokens than max_tokens may have run.
    settings = {"methods": list(methods), "bits": bits, "groups": list(groups),
                "salient_fraction": salient_fraction,
                "las_quantile": las_quantile, "gamma_grid": list(gamma_grid),
                "tokens": max(x.shape[0] for x in inputs.values())}
    return Calibration(result, settings)
