"""A lean forward pass for LLaMA-architecture causal LMs: prefill and decode without the
per-call machinery of transformers' ``forward`` (argument handling, cache objects, mask
builders, output records), which costs more than the spiking layers themselves at decode on a
CPU (docs/performance.md, "Whole model on the CPU").

``Runner`` calls the model's own modules (embedding, norms, projections, MLP, ``lm_head``) and
its rotary embedding, so it runs whatever they are: SpikeLinear projections with their
encodings, projection groups (one encoding of an input for q/k/v and for gate/up) and online
rotations, or float ``nn.Linear``. Only the attention plumbing is its own: rotary position
embedding, a preallocated key-value cache and ``scaled_dot_product_attention``, the same
arithmetic as transformers' SDPA attention.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks
from .architecture import INPUTS, check_supported, head_dim_of
from .attention import KV_MODES, PV_MODES, SpikeKV
from .nn import GROUP_ATTR

HEAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The per-layer modules a Runner calls, as attribute paths of a decoder layer, besides the
# query/key/value projections (_qkv).
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.o_proj")


def _part(fn: str, root, path: str):
    obj = root
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            raise ValueError(f"{fn}: model must be a LLaMA-architecture causal LM with "
                             f"'{path}', which {type(root).__name__} lacks")
    return obj


def _qkv(fn: str, layer):
    """x -> (q, k, v) of decoder ``layer``: its ProjectionGroup where it has one (one encoding
    of x for the three), else each projection."""
    group = getattr(layer.self_attn, GROUP_ATTR, None)
    if group is not None:
        return group
    projections = [_part(fn, layer.self_attn, name) for name in INPUTS["qkv"].projections]
    return lambda x: tuple(p(x) for p in projections)


class Runner:
    """Prefill and decode of ``model`` (a transformers LLaMA-architecture causal LM, float or
    patched with SpikeLinear layers) for ``batch`` sequences of at most ``max_len`` tokens.

    ``logits = runner(ids)`` runs int64 ``ids [batch, T]`` as the next T tokens of every
    sequence (the first call is the prompt) and returns float logits ``[batch, T, vocab]``
    (``last_only=True``: ``[batch, 1, vocab]``, skipping ``lm_head`` for the others).
    ``reset()`` starts new sequences. The key-value cache is preallocated in the dtype and on
    the device of the model's embedding (the words of a spiking value cache grow with the
    written tokens, 32 at a time: attention.ValueCache).

    ``head_dtype``: None runs ``lm_head`` as the model's module (logits equal transformers'); a
    dtype (``torch.bfloat16``) runs it on a copy of its weight in that dtype, with the hidden
    state rounded to it, accumulated as the matrix product of that dtype does, the logits
    returned as float32. On the CPU the float32 head of a small model is most of a decode step
    (SmolLM2-135M: 49,152 x 576 floats, 113 MB read per token); bfloat16 reads half and runs
    on the CPU's bfloat16 dot products (docs/performance.md, "Whole model on the CPU"). Its
    logits differ from float32's by bfloat16 rounding; greedy tokens can differ.

    Prompts of different lengths are left-padded: ``runner(ids, pad=pad)`` on the prompt call,
    ``pad`` int ``[batch]`` the number of padding tokens that start each row. Until ``reset()``
    a row's positions count from its first real token and no query attends to a padding key,
    so a row's logits are those of its prompt alone, up to float rounding (the attention
    then sums over more masked keys).
    """

    def __init__(self, model: torch.nn.Module, max_len: int, batch: int = 1,
                 head_dtype: Optional[torch.dtype] = None, kv: str = "float",
                 kv_rotate: Optional[bool] = None, kv_pv: Optional[str] = None):
        fn = "Runner"
        _checks.choice(fn, "kv", kv, KV_MODES)
        if kv_pv is not None:
            _checks.choice(fn, "kv_pv", kv_pv, PV_MODES)
        if kv_rotate is not None and not isinstance(kv_rotate, bool):
            raise TypeError(f"{fn}: kv_rotate must be a bool or None, got "
                            f"{type(kv_rotate).__name__}")
        if kv == "float" and (kv_rotate or kv_pv is not None):
            raise ValueError(f"{fn}: kv_rotate and kv_pv are settings of the spiking caches (kv "
                             f"'spike4', 'spike8'), got kv_rotate={kv_rotate}, kv_pv={kv_pv!r} "
                             f"with kv='float'")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
        _checks.integer(fn, "max_len", max_len, 1, 1 << 20)
        _checks.integer(fn, "batch", batch, 1, 1 << 16)
        check_supported(fn, model)
        self.embed = _part(fn, model, "model.embed_tokens")
        self.norm = _part(fn, model, "model.norm")
        self.rotary = _part(fn, model, "model.rotary_emb")
        self.lm_head = _part(fn, model, "lm_head")
        self.head_params = None
        if head_dtype is not None:
            _checks.dtype(fn, "head_dtype", head_dtype, HEAD_DTYPES)
            if not isinstance(self.lm_head, torch.nn.Linear):
                raise ValueError(f"{fn}: head_dtype needs lm_head to be a torch.nn.Linear, got "
                                 f"{type(self.lm_head).__name__}")
            # Run through the module (torch.func.functional_call), so that its hooks, such as
            # the statistics' count of lm_head's MACs, see the call.
            self.head_params = {name: t.detach().to(head_dtype)
                                for name, t in self.lm_head.named_parameters()}
        layers = _part(fn, model, "model.layers")
        config = model.config
        for name in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
            if not isinstance(getattr(config, name, None), int):
                raise ValueError(f"{fn}: model.config.{name} must be an int, got "
                                 f"{getattr(config, name, None)!r}")
        layer_types = getattr(config, "layer_types", None) or ()
        if getattr(config, "sliding_window", None) or \
                any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{fn}: only full attention is supported, got sliding_window = "
                             f"{getattr(config, 'sliding_window', None)!r}, layer_types = "
                             f"{list(layer_types)}")
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.layers = [{p: _part(fn, layer, p) for p in _LAYER_PARTS} for layer in layers]
        for parts, layer in zip(self.layers, layers):
            parts["qkv"] = _qkv(fn, layer)
        self.scaling = [_part(fn, layer, "self_attn.scaling") for layer in layers]
        w = self.embed.weight
        self.kv, self.device = kv, w.device
        if kv == "float":
            shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
            self.keys = torch.zeros(shape, dtype=w.dtype, device=w.device)
            self.values = torch.zeros_like(self.keys)
        else:
            rotate = kv_rotate is not False
            # PV on spikes by default: the channel-major value cache is read in place, where
            # the float product decodes the whole value cache at every step (README).
            pv = kv_pv or "spike"
            self.spike_kv = [SpikeKV(fn, kv, rotate, pv, batch, self.kv_heads, max_len,
                                     self.head_dim, w.dtype, w.device) for _ in self.layers]
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.pad = None  # left padding of the sequences' rows (int64 [batch]), or None

    def cache_bytes_per_token(self) -> int:
        """Bytes of key-value cache one token position takes, all layers and rows of the batch:
        float: keys and values in the embedding's dtype; spike: planes, sign and scale."""
        if self.kv == "float":
            return 2 * self.keys[:, :, :, 0].numel() * self.keys.element_size()
        return sum(layer.bytes_per_token() for layer in self.spike_kv)

    def reset(self) -> None:
        """Forget the sequences: the next call is a prompt."""
        self.length = 0
        self.pad = None

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, last_only: bool = False,
                 pad: Optional[torch.Tensor] = None) -> torch.Tensor:
        fn = "Runner"
        _checks.tensor(fn, "ids", ids, (torch.int64, torch.int32), dim=2)
        B, T = ids.shape
        if B != self.batch or T < 1:
            raise ValueError(f"{fn}: ids must have shape [batch, T] = [{self.batch}, T >= 1], "
                             f"got {list(ids.shape)}")
        start = self.length
        if start + T > self.max_len:
            raise ValueError(f"{fn}: {start} cached + {T} new tokens exceed max_len = "
                             f"{self.max_len}")
        if pad is not None:
            _checks.tensor(fn, "pad", pad, (torch.int64, torch.int32), dim=1)
            if start or pad.shape[0] != B or bool((pad < 0).any() | (pad >= T).any()):
                raise ValueError(f"{fn}: pad is given with the prompt (the first call after "
                                 f"reset), one count per row in [0, T = {T}), got "
                                 f"{pad.tolist()} with {start} tokens cached")
        if start == 0:  # a prompt sets the padding afresh, even after a failed one
            self.pad = None if pad is None else pad.to(device=self.device, dtype=torch.int64)
        x = self.embed(ids.to(self.device))
        positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        end = start + T
        # Queries see every cached key and the new ones up to their own position.
        mask = None
        if self.pad is not None:
            # A row's positions start at its first real token; its queries see no padding key,
            # and a padding query sees itself only (a finite, unused result).
            keys = torch.arange(end, device=x.device)
            query = positions[0].unsqueeze(1)
            mask = (keys <= query) & (keys >= self.pad.view(B, 1, 1)) | (keys == query)
            mask = mask.unsqueeze(1)  # [B, 1, T, end]
            positions = (positions - self.pad.unsqueeze(1)).clamp(min=0)
        elif T > 1:
            mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(start)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)   # [B, 1, T, head_dim]
        for i, parts in enumerate(self.layers):
            h = parts["input_layernorm"](x)
            q, k, v = parts["qkv"](h)
            q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.kv_heads, self.head_dim)
            v = v.view(B, T, self.kv_heads, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k.transpose(1, 2)
            k = k * cos + _rotate_half(k) * sin
            if self.kv == "float":
                self.keys[i, :, :, start:end] = k
                self.values[i, :, :, start:end] = v.transpose(1, 2)
                a = F.scaled_dot_product_attention(
                    q, self.keys[i, :, :, :end], self.values[i, :, :, :end], attn_mask=mask,
                    scale=self.scaling[i], enable_gqa=self.kv_heads != self.heads)
            else:
                self.spike_kv[i].write(k, v.transpose(1, 2), start, self.pad)
                a = self.spike_kv[i].attend(q, end, mask, self.scaling[i])
            x = x + parts["self_attn.o_proj"](a.transpose(1, 2).reshape(B, T, -1))
            x = x + parts["mlp"](parts["post_attention_layernorm"](x))
        self.length = end
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)
        if self.head_params is None:
            return self.lm_head(h).float()
        h = h.to(self.head_params["weight"].dtype)
        return torch.func.functional_call(self.lm_head, self.head_params, (h,)).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
