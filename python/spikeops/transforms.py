"""Equivalent transforms of a float LLaMA-style model that take activation outliers out of the
projections' inputs before GPTQ and spike encoding (docs/transforms.md). Both are exact in real
arithmetic: the transformed float model computes the same function, up to float rounding.

- ``smooth`` (SmoothQuant / OmniQuant-LET): per-channel scales s divide a projection's input and
  multiply its weight columns, folded into the RMSNorm weights (inputs of q/k/v and gate/up), into
  ``v_proj``'s rows (input of ``o_proj``) and ``up_proj``'s rows (input of ``down_proj``). The
  migration strength alpha of ``s = max|x|^alpha / max|w|^(1 - alpha)`` is chosen per layer and
  input on calibration data.
- ``rotate`` (QuaRot): the RMSNorm weights are folded into the following linears; the residual
  stream is rotated by an orthogonal matrix Q (a randomized Hadamard matrix) folded into the
  embeddings, the q/k/v/gate/up inputs, the o/down outputs and ``lm_head``; the values of every
  attention head are rotated by a Hadamard matrix folded into ``v_proj`` and ``o_proj``; and the
  input of ``down_proj`` is rotated online, by a fast Walsh-Hadamard transform (blockwise over
  the odd factor of the width, e.g. 1536 = 3 x 512, mixed by a 3 x 3 orthogonal matrix), whose
  inverse is folded into ``down_proj``. The online step is recorded in ``config.json`` under
  ``spikeops_transform``, and ``load_gptq`` / ``load_float_model`` put it back.

The spike arithmetic is untouched: transforms change weights and add one documented float step.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch

from . import _checks, ops
from .architecture import INPUTS, decoder_layers, head_dim_of

TRANSFORMS = ("none", "smooth", "rotate")
CONFIG_KEY = "spikeops_transform"
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # smooth: migration strengths tried per input


# ---------------------------------------------------------------------------- Hadamard pieces
def hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """The orthonormal Sylvester Hadamard matrix of order n (a power of two)."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def split_width(width: int):
    """``(odd, pow2)`` with ``width = odd * pow2``."""
    pow2 = width & -width
    return width // pow2, pow2


def random_orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal matrix, float64 ``[n, n]``."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).contiguous()


class OnlineRotation:
    """A forward pre-hook that rotates a module's input by ``T = kron(mix, H_n)`` (``mix`` an
    orthogonal ``[b, b]``, H_n the orthonormal Hadamard matrix of order n, width b * n): each
    block of n channels times H_n, then the b blocks mixed by ``mix``. The module's weight holds
    ``W T`` so that its output is unchanged.

    H_n is applied by the op ``spikeops::hadamard`` (docs/ops.md, hadamard): a fast
    Walsh-Hadamard transform in float64 (n log2 n additions), each output rounded once to x's
    dtype and then scaled by 1/sqrt(n) as ``y * (1 / sqrt(n))`` would; at decode about 4 us a
    call where a matrix product with the +-1 matrix took some 40 (docs/transforms.md, "The
    online rotation's cost")."""

    def __init__(self, width: int, mix: Optional[List[List[float]]]):
        self.blocks, self.n = split_width(width)
        self.mix = torch.tensor(mix, dtype=torch.float64) if mix is not None else None
        if self.mix is not None and tuple(self.mix.shape) != (self.blocks, self.blocks):
            raise ValueError(f"OnlineRotation: mix must be [{self.blocks}, {self.blocks}] for "
                             f"width {width}, got {list(self.mix.shape)}")
        self._mix_t = {}  # (device, dtype) -> mix transposed

    def matrix(self) -> torch.Tensor:
        """T, float64 ``[width, width]``: ``x -> x @ T``."""
        mix = self.mix if self.mix is not None else torch.eye(self.blocks, dtype=torch.float64)
        return torch.kron(mix, hadamard(self.n))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.hadamard(x, self.n, 1.0 / math.sqrt(self.n))
        if self.mix is None:
            return y
        key = (x.device, x.dtype)
        if key not in self._mix_t:
            self._mix_t[key] = self.mix.t().contiguous().to(*key)
        # (x @ kron(A, H))[i*n + j] = sum_k A[k, i] (x_k @ H)[j]
        y = self._mix_t[key] @ y.reshape(*x.shape[:-1], self.blocks, self.n)
        return y.reshape(x.shape)

    def __call__(self, module, args):
        return (self.rotate(args[0]),) + tuple(args[1:])

    def record(self) -> dict:
        return {"width": self.blocks * self.n,
                "mix": self.mix.tolist() if self.mix is not None else None}

    def __repr__(self) -> str:
        return f"OnlineRotation(width={self.blocks * self.n}, blocks={self.blocks}, n={self.n})"


def online_rotation(module: torch.nn.Module) -> Optional[OnlineRotation]:
    """The OnlineRotation a module's forward pre-hook applies to its input (a rotated model's
    ``down_proj``), or None. ``module(x)`` rotates x first; ``module.forward(x)`` runs the
    projection alone, e.g. on inputs captured after the rotation (docs/transforms.md)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"online_rotation: module must be a torch.nn.Module, got "
                        f"{type(module).__name__}")
    return next((h for h in module._forward_pre_hooks.values()
                 if isinstance(h, OnlineRotation)), None)


# ---------------------------------------------------------------------------- applying
def transform(model: torch.nn.Module, kind: str, batches: Optional[Iterable[torch.Tensor]] = None,
              seed: int = 0, alphas: Iterable[float] = ALPHAS) -> dict:
    """Apply transform ``kind`` (``"none"``, ``"smooth"``, ``"rotate"``) to a float LLaMA-style
    causal LM in place and return its record (also stored in ``model.config`` under
    ``spikeops_transform``, so that ``save_pretrained`` / ``save_gptq`` keep it).

    batches: calibration token ids (int64 ``[B, T]``), needed by ``smooth`` (activation ranges).
    seed: the random rotation of ``rotate``. alphas: ``smooth``'s migration strengths to try.
    """
    fn = "transform"
    _checks.choice(fn, "kind", kind, TRANSFORMS)
    layers = decoder_layers(fn, model)
    if getattr(model.config, CONFIG_KEY, None):
        raise ValueError(f"{fn}: model is already transformed "
                         f"({getattr(model.config, CONFIG_KEY)})")
    _checks.integer(fn, "seed", seed, 0, 2**63 - 1)
    if kind == "none":
        return {"kind": "none"}
    # Everything that can refuse is checked here, before the first weight changes.
    if kind == "smooth":
        batches = list(batches) if batches is not None else []
        if not batches or not all(isinstance(b, torch.Tensor) and b.dim() == 2 and b.numel()
                                  and not b.is_floating_point() for b in batches):
            raise ValueError(f"{fn}: 'smooth' needs a non-empty list of token-id batches "
                             f"(integer [B, T] tensors), got {len(batches)} batch(es)")
        alphas = tuple(alphas)
        if not alphas or not all(isinstance(a, (int, float)) and 0 <= a <= 1 for a in alphas):
            raise ValueError(f"{fn}: alphas must be migration strengths in [0, 1], got {alphas}")
    else:
        head_dim = head_dim_of(model.config)
        if head_dim & (head_dim - 1):
            raise ValueError(f"{fn}: rotate needs a power-of-two head_dim, got {head_dim}")
    with torch.no_grad():
        if kind == "smooth":
            record = _smooth(model, layers, batches, alphas)
        else:
            record = _rotate(model, layers, seed)
    setattr(model.config, CONFIG_KEY, record)
    return record


def restore_online(model: torch.nn.Module, record: Optional[dict],
                   fn: str = "restore_online") -> None:
    """Put back the online steps of a saved transform record (``config.json``'s
    ``spikeops_transform``) on a loaded model: the record is checked whole, and against the
    model, before anything changes; a down_proj that already rotates by it is left as it is."""
    rotation = recorded_rotation(fn, model, record)
    if rotation is None:
        return
    for layer in decoder_layers(fn, model):
        down = layer.mlp.down_proj
        if online_rotation(down) is None:
            down.register_forward_pre_hook(rotation)


def recorded_rotation(fn: str, model: torch.nn.Module,
                      record: Optional[dict]) -> Optional[OnlineRotation]:
    """The online rotation a transform record asks for on ``model``'s down_proj inputs (None
    for none), after checking the record and that it fits the model."""
    if record is None or record == {}:
        return None
    if not isinstance(record, dict) or record.get("kind") not in TRANSFORMS:
        raise ValueError(f"{fn}: {CONFIG_KEY} must be a transform record with kind 'none', "
                         f"'smooth' or 'rotate', got {record!r}")
    if record["kind"] != "rotate":
        return None
    online = record.get("down_proj")
    width = online.get("width") if isinstance(online, dict) else None
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"{fn}: {CONFIG_KEY}['down_proj'] must give the online rotation's "
                         f"width as a positive integer, got {online!r}")
    mix = online.get("mix")
    blocks = split_width(width)[0]
    try:
        rotation = OnlineRotation(width, mix)
        ok = mix is None or bool(torch.allclose(rotation.mix @ rotation.mix.t(),
                                                torch.eye(blocks, dtype=torch.float64),
                                                atol=1e-9))
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {CONFIG_KEY}['down_proj']['mix'] must be an orthogonal "
                         f"[{blocks}, {blocks}] matrix of numbers for width {width}, got {mix!r}")
    for i, layer in enumerate(decoder_layers(fn, model)):
        down = layer.mlp.down_proj
        if down.in_features != width:
            raise ValueError(f"{fn}: layer {i}'s down_proj has {down.in_features} inputs, the "
                             f"online rotation recorded in {CONFIG_KEY} {width}")
        present = [h for h in down._forward_pre_hooks.values() if isinstance(h, OnlineRotation)]
        if present and present[0].record() != rotation.record():
            raise ValueError(f"{fn}: layer {i}'s down_proj already rotates its input by another "
                             f"online rotation ({present[0]})")
    return rotation


def _projections(layer, inputs) -> tuple:
    """The projection modules of decoder ``layer`` that read ``inputs`` (architecture.INPUTS)."""
    parent = layer.get_submodule(inputs.parent)
    return tuple(getattr(parent, name) for name in inputs.projections)


def _fold_norm(norm, linears) -> None:
    """RMSNorm(x) = g * x / rms(x): g moves into the columns of the linears that read it."""
    g = norm.weight.double()
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _untie_head(model) -> None:
    """lm_head gets its own weight: the transforms change it differently from the embedding."""
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    # transformers 5 also records the tie per submodel config.
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def _rotate(model, layers, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    d = cfg.hidden_size
    head_dim = head_dim_of(cfg)
    _untie_head(model)
    for layer in layers:
        for inputs in INPUTS.values():
            if inputs.norm is not None:
                _fold_norm(layer.get_submodule(inputs.norm), _projections(layer, inputs))
    _fold_norm(model.model.norm, (model.lm_head,))

    # Residual rotation Q = diag(signs) kron(O_odd, H_pow2): orthogonal, spreads every channel
    # over all d channels.
    odd, pow2 = split_width(d)
    signs = torch.randint(0, 2, (d,), generator=gen, dtype=torch.float64) * 2 - 1
    Q = signs[:, None] * torch.kron(random_orthogonal(odd, gen), hadamard(pow2))

    def right(lin, M):  # input side: y = x W^T with x -> x M  =>  W -> W M
        lin.weight.copy_((lin.weight.double() @ M).to(lin.weight.dtype))

    def left(lin, M):   # output side: y -> y M  =>  W -> M^T W
        lin.weight.copy_((M.t() @ lin.weight.double()).to(lin.weight.dtype))
        if lin.bias is not None:
            lin.bias.copy_((lin.bias.double() @ M).to(lin.bias.dtype))

    emb = model.model.embed_tokens.weight
    emb.copy_((emb.double() @ Q).to(emb.dtype))
    right(model.lm_head, Q)
    H_head = hadamard(head_dim)
    kv_heads = cfg.num_key_value_heads
    heads = cfg.num_attention_heads
    mlp_width = layers[0].mlp.down_proj.in_features
    odd_mlp, _ = split_width(mlp_width)
    online = OnlineRotation(mlp_width, random_orthogonal(odd_mlp, gen).tolist()
                            if odd_mlp > 1 else None)
    T = online.matrix()
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for inputs in INPUTS.values():
            if inputs.norm is not None:  # a reader of the residual stream (through its norm)
                for lin in _projections(layer, inputs):
                    right(lin, Q)
        left(attn.o_proj, Q)
        left(mlp.down_proj, Q)
        # Values per head: v -> v H (v_proj's rows), o_proj's input columns -> W_o H.
        left(attn.v_proj, torch.block_diag(*[H_head] * kv_heads))
        right(attn.o_proj, torch.block_diag(*[H_head] * heads))
        right(mlp.down_proj, T)
        mlp.down_proj.register_forward_pre_hook(online)
    return {"kind": "rotate", "seed": seed, "down_proj": online.record()}


def _watch_inputs(model, layers, batches, see) -> None:
    """Runs ``model`` on the token-id ``batches`` and calls ``see(layer index, kind, x)`` with
    each of the four INPUTS of every layer, as its first projection receives it (after any online
    rotation, whose hook was registered first)."""
    handles = []
    for i, layer in enumerate(layers):
        for kind, inputs in INPUTS.items():
            first = layer.get_submodule(f"{inputs.parent}.{inputs.projections[0]}")
            handles.append(first.register_forward_pre_hook(
                lambda _m, args, i=i, kind=kind: see(i, kind, args[0])))
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_outliers(model: torch.nn.Module, ids: torch.Tensor) -> Dict[str, dict]:
    """How far the largest |x| of a projection input stands out, per input kind (the q/k/v,
    o_proj, gate/up and down_proj inputs, as the projections see them, online rotation
    included), over all layers of one forward of ``ids`` (int64 ``[1, T]``): the largest |x| of
    the first token, the median over the other tokens of their largest |x|, and the median over
    all tokens of (largest |x| / mean |x|), the outlier ratio that per-token 4-bit codes suffer
    from."""
    seen: Dict[str, List[torch.Tensor]] = {kind: [] for kind in INPUTS}
    _watch_inputs(model, decoder_layers("input_outliers", model), [ids],
                  lambda _i, kind, x: seen[kind].append(x[0].float().abs().cpu()))
    out = {}
    for kind, xs in seen.items():
        x = torch.stack(xs)                                  # [layers, T, K]
        top = x.amax(-1)                                     # [layers, T]
        out[kind] = {"first_token_max": float(top[:, 0].max()),
                     "other_tokens_max_median": float(top[:, 1:].median()),
                     "max_over_mean_median": float((top / x.mean(-1)).median())}
    return out


# ---------------------------------------------------------------------------- smooth
def _smoothed_inputs(model, layers, batches, rows: int = 512):
    """One pass over the calibration batches: ``(ranges, samples)`` of the four inputs of every
    layer, keyed (layer index, kind of INPUTS): max |x| per input channel, and up to ``rows``
    input rows, both float64 on the CPU."""
    ranges: Dict[tuple, torch.Tensor] = {}
    samples: Dict[tuple, List[torch.Tensor]] = {}

    def see(i, kind, x):
        key = (i, kind)
        x = x.detach().reshape(-1, x.shape[-1])
        top = x.abs().amax(0).double().cpu()
        ranges[key] = torch.maximum(ranges[key], top) if key in ranges else top
        have = sum(t.shape[0] for t in samples.get(key, []))
        if have < rows:
            samples.setdefault(key, []).append(x[: rows - have].double().cpu())

    _watch_inputs(model, layers, batches, see)
    return ranges, {k: torch.cat(v) for k, v in samples.items()}


def _fake_quant_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> float:
    """Output error of one input after smoothing by s, with 4-bit per-token activations and
    4-bit per-row weights (round to nearest): the quantity alpha is chosen to minimise."""
    xs, ws = x / s, w * s
    qa = (xs.abs().amax(1, keepdim=True) / 7).clamp(min=1e-8)
    xq = (xs / qa).round().clamp(-7, 7) * qa
    qw = (ws.abs().amax(1, keepdim=True) / 7).clamp(min=1e-8)
    wq = (ws / qw).round().clamp(-7, 7) * qw
    return float(((xq @ wq.t()) - x @ w.t()).pow(2).sum())


def _smooth(model, layers, batches, alphas) -> dict:
    ranges, samples = _smoothed_inputs(model, layers, batches)
    cfg = model.config
    head_dim = head_dim_of(cfg)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    chosen = {}
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for key, inputs in INPUTS.items():
            lins = _projections(layer, inputs)
            xmax = ranges[(i, key)].clamp(min=1e-5)
            w = torch.cat([lin.weight.double().cpu() for lin in lins])
            wmax = w.abs().amax(0).clamp(min=1e-5)
            if key == "o":
                # One scale per value channel: the query heads sharing a key-value head share it.
                xmax = xmax.view(-1, group, head_dim).amax(1).repeat_interleave(group, 0).flatten()
                wmax = wmax.view(-1, group, head_dim).amax(1).repeat_interleave(group, 0).flatten()
            x = samples[(i, key)]
            best = min(alphas, key=lambda a: _fake_quant_error(
                x, w, xmax.pow(a) / wmax.pow(1 - a)))
            s = xmax.pow(best) / wmax.pow(1 - best)
            chosen[f"{i}.{key}"] = best
            for lin in lins:
                lin.weight.copy_((lin.weight.double() * s.to(lin.weight.device)[None, :])
                                 .to(lin.weight.dtype))
            if inputs.norm is not None:
                norm = layer.get_submodule(inputs.norm)
                norm.weight.copy_((norm.weight.double() / s.to(norm.weight.device))
                                  .to(norm.weight.dtype))
            elif key == "o":
                sv = s.view(-1, group, head_dim)[:, 0].flatten().to(attn.v_proj.weight.device)
                _scale_rows(attn.v_proj, 1 / sv)
            else:
                _scale_rows(mlp.up_proj, 1 / s.to(mlp.up_proj.weight.device))
    return {"kind": "smooth", "alpha": chosen}


def _scale_rows(lin, factor: torch.Tensor) -> None:
    lin.weight.copy_((lin.weight.double() * factor[:, None]).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() * factor).to(lin.bias.dtype))
