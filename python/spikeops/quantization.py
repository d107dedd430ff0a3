"""GPTQ quantization (Frantar et al. 2022) of the decoder projections of a float LLaMA-style
model: the algorithm, the Hessians of the projections' inputs and the first decoder layer's
inputs. docs/checkpoints.md describes the format it writes."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from tqdm.auto import tqdm

from . import _checks
from .architecture import PROJECTIONS, decoder_layers
from .checkpoint import PathLike, save_gptq
from .gptq import GPTQWeight, check_bits_group_size, pack, v1_stored_zeros

BLOCK = 128  # GPTQ's lazy-batch width: columns whose error feedback is applied together


def quantize(model: torch.nn.Module, calib_inputs, bits: int = 4, group_size: int = 128,
             sym: bool = True, desc_act: bool = False, damp_percent: float = 0.01,
             path: Optional[PathLike] = None) -> Dict[str, GPTQWeight]:
    """GPTQ (Frantar et al. 2022) of the seven projections of every decoder layer, in place.

    model: a float32/float16 ``transformers`` causal LM with ``model.model.layers`` (LLaMA
        style). Calibration runs on the model's device.
    calib_inputs: token ids, int64 ``[B, T]`` or a list of such batches.
    bits, group_size (-1 = one group over K), sym, desc_act (act-order), damp_percent: as in
        docs/checkpoints.md; groups are formed when their first column is reached
        (static_groups=False).

    Layers are processed in order: the inputs of layer i are computed by the already quantized
    layers 0..i-1, one Hessian ``H = 2 X^T X / rows`` per projection is gathered by forward
    hooks, and every projection's ``weight`` is overwritten with its exact GPTQ weight
    ``W_hat = scale * (q - z)`` (rounded once more in a float16 model; a float32 model becomes
    its own fake-quant reference). Returns
    ``{"model.layers.{i}.{proj}": GPTQWeight}`` (v1 zeros); with ``path`` the checkpoint is
    also written there (``save_gptq``).
    """
    fn = "quantize"
    layers = decoder_layers(fn, model)
    _checks.dtype(fn, "model dtype", model.dtype, (torch.float16, torch.float32))
    check_bits_group_size(fn, bits, group_size)
    for name, flag in (("sym", sym), ("desc_act", desc_act)):
        if not isinstance(flag, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flag).__name__}")
    if isinstance(damp_percent, bool) or not isinstance(damp_percent, (int, float)) or \
            not 0 < damp_percent <= 1:
        raise ValueError(f"{fn}: damp_percent must be a float in (0, 1], got {damp_percent!r}")
    batches = _checks.token_batches(fn, "calib_inputs", calib_inputs, model.config.vocab_size)
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{fn}: model parameter {name} holds NaN or Inf; GPTQ needs finite "
                             f"weights")

    weights = {}
    with torch.no_grad():
        inputs = _first_layer_inputs(model, layers[0], batches)
        for i, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer")):
            linears = {f"model.layers.{i}.{p}": layer.get_submodule(p) for p in PROJECTIONS}
            hessians = _hessians(layer, linears, inputs)
            for name, lin in linears.items():
                q, scale, zero, g_idx = _gptq(lin.weight.float().cpu(), hessians[name], bits,
                                              group_size, sym, desc_act, damp_percent)
                # v1 zeros, like optimum; _find_params keeps zero >= 1.
                weights[name] = GPTQWeight(pack(q, bits, dim=0),
                                           pack(v1_stored_zeros(zero), bits, dim=1),
                                           scale.half(), g_idx.to(torch.int32), bits=bits,
                                           group_size=group_size, sym=sym,
                                           checkpoint_format="gptq",
                                           in_features=lin.in_features)
                # scale * (q - z) is exact in float32 (an fp16 scale times a small integer):
                # the weights the error feedback saw and the spiking kernels compute with.
                lin.weight.copy_((scale[g_idx] * (q - zero[g_idx])).t())
            # The next layer sees what this one computes with its quantized weights.
            inputs = [((_layer_output(layer, args, kwargs),) + args[1:], kwargs)
                      for args, kwargs in inputs]
    if path is not None:
        save_gptq(model, weights, path)
    return weights


def _find_params(w: torch.Tensor, bits: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale float32 ``[N]`` (fp16-representable) and zero int64 ``[N]`` of ``w [N, cols]``."""
    maxq = (1 << bits) - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:
        # docs/checkpoints.md's scale 2 * max|w| / maxq for every row (the reference code's
        # all-positive rows get max / maxq and clip their upper half).
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
        # field (docs/checkpoints.md); 1 costs at most one level at the top of the range.
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
