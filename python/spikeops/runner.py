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

One-token decode steps have a second form with static shapes (``Runner._decode_step``): the
length is a device tensor, the new key and value are written at that index, and attention reads
a fixed span of the cache under a mask built on the device, so that nothing in the step reads a
value back to the host and a CUDA graph can hold it (docs/performance.md, "Whole model under
CUDA graphs").
"""

from __future__ import annotations

import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules import module as module_hooks

from . import _checks
from .architecture import INPUTS, check_supported, head_dim_of
from .attention import KV_MODES, PV_MODES, SpikeKV
from .nn import GROUP_ATTR, SpikeLinear

HEAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# head_dtype's default: the fastest dtype that holds the head (Runner, auto_head_dtype).
HEAD_AUTO = "auto"
# The per-layer modules a Runner calls, as attribute paths of a decoder layer, besides the
# query/key/value projections (_qkv).
_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn.o_proj")
# Static decode steps attend over a span of the cache: the smallest power of two of at least
# this many keys that holds the written ones, or max_len. Each span is one captured graph; the
# masked keys beyond the written ones cost at most as much attention again as the written ones.
MIN_SPAN = 256
# Eager runs of a step before it is captured (lazy initialisation, workspaces, as PyTorch's CUDA
# graph documentation asks); each writes the same cache slot with the same values.
GRAPH_WARMUP = 3


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

    ``head_dtype``: how ``lm_head`` runs. None: as the model's module (logits equal
    transformers'). A dtype (``torch.float16``, ``torch.bfloat16``): on a copy of its weight in
    that dtype, with the hidden state rounded to it, accumulated as the matrix product of that
    dtype does, the logits returned as float32. ``"auto"`` (the default): a float32 head of a
    Linear runs in float16 where float16 provably holds it (``auto_head_dtype``), else in
    bfloat16; a head in another dtype runs as it is. A decode step reads the whole head: on the
    CPU the float32 head of a small model is most of the step (SmolLM2-135M: 49,152 x 576
    floats, 113 MB per token), its float16 copy reads half on the CPU's fastest path
    (docs/performance.md, "Whole model on the CPU"). Logits then differ from float32's by the
    rounding of the hidden state and the weights to float16 (11 significant bits); greedy
    tokens can differ where two logits nearly tie. ``runner.head_dtype`` is the dtype chosen
    (None: the module as it is).

    Prompts of different lengths are left-padded: ``runner(ids, pad=pad)`` on the prompt call,
    ``pad`` int ``[batch]`` the number of padding tokens that start each row. Until ``reset()``
    a row's positions count from its first real token and no query attends to a padding key,
    so a row's logits are those of its prompt alone, up to float rounding (the attention
    then sums over more masked keys).

    ``cuda_graphs``: one-token decode steps as CUDA graphs. None (the default) uses them where
    they apply, a model on a CUDA device with the float cache, since a decode step is mostly
    kernel launches on a GPU and defaults should be fast on the device they run on; True asks
    for them and refuses what cannot have them (a model not on CUDA, a spiking cache, whose
    writes reallocate and take host positions, a dynamic rotary embedding, which reads the
    positions back); False runs every step eagerly. The static-shape step (module docstring)
    is captured once per key span (``MIN_SPAN``: 256, 512, ... up to ``max_len``) when a
    sequence first reaches it, after ``GRAPH_WARMUP`` eager runs on a side stream, and replayed
    with the ids copied into its input buffer; the logits returned are a copy. ``reset()``
    keeps the graphs. Prompts (T > 1) run eagerly. A graph step's logits equal the eager
    step's up to float rounding: its attention also sums the masked keys of the span, in
    another order (docs/performance.md, "Whole model under CUDA graphs"). While
    ``spikeops.track`` is active on the model (an observer on any of its SpikeLinear layers)
    steps run eagerly, so that its observers see every one; other Python hooks on the model's
    modules run when a step is captured, not when it is replayed.
    A graph holds the model as it was when captured (its kernels, their arguments, the
    encodings): after changing the model (``set_encoding``, new weights) make a new Runner.
    """

    def __init__(self, model: torch.nn.Module, max_len: int, batch: int = 1,
                 head_dtype=HEAD_AUTO, kv: str = "float",
                 kv_rotate: Optional[bool] = None, kv_pv: Optional[str] = None,
                 cuda_graphs: Optional[bool] = None):
        fn = "Runner"
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"{fn}: cuda_graphs must be a bool or None, got "
                            f"{type(cuda_graphs).__name__}")
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
        check_head_dtype(fn, head_dtype)
        if head_dtype == HEAD_AUTO:
            head_dtype = auto_head_dtype(self.norm, self.lm_head)
        elif head_dtype is not None:
            if not isinstance(self.lm_head, torch.nn.Linear):
                raise ValueError(f"{fn}: head_dtype needs lm_head to be a torch.nn.Linear, got "
                                 f"{type(self.lm_head).__name__}")
        self.head_dtype = head_dtype
        self.head_params = None if head_dtype is None else \
            {name: t.detach().to(head_dtype) for name, t in self.lm_head.named_parameters()}
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
            # Each layer's slice as a view made once: a decode step indexes it 30 times per
            # tensor, and each select is an op.
            self._layer_kv = list(zip(self.keys.unbind(0), self.values.unbind(0)))
        else:
            rotate = kv_rotate is not False
            # PV on spikes by default: the channel-major value cache is read in place, where
            # the float product decodes the whole value cache at every step (README).
            pv = kv_pv or "spike"
            moments = [_query_moment(layer) for layer in layers]
            missing = sum(m is None for m in moments)
            if missing:
                warnings.warn(
                    f"{fn}: kv={kv!r}: {missing} of {len(moments)} layers have no query moment "
                    f"in the model's calibration, so their keys are coded by rounding alone, "
                    f"without the error feedback (README, 'Attention on spikes', has what it "
                    f"gains); spikeops calibrate (method 'kv') makes them",
                    stacklevel=2)
            self.spike_kv = [SpikeKV(fn, kv, rotate, pv, batch, self.kv_heads, max_len,
                                     self.head_dim, w.dtype, w.device, model=model,
                                     query_moment=m)
                             for m in moments]
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.pad = None  # left padding of the sequences' rows (int64 [batch]), or None
        # query_moments' sink: called with (layer, queries) by every eager step, or None.
        self._query_sink = None
        # Whether one-token steps take _static_step. Its inputs are allocated whatever the
        # answer (a few bytes per row and key; the tests run the step on the CPU): the ids,
        # the position of the new token, the rows' left padding (zeros without) and the key
        # indices of the mask, each at a fixed address for the graphs.
        self._static = self._graphs_apply(fn, cuda_graphs)
        self._spike_layers = [m for m in model.modules() if isinstance(m, SpikeLinear)]
        self._ids = torch.zeros(batch, 1, dtype=torch.int64, device=w.device)
        self._position = torch.zeros(1, dtype=torch.int64, device=w.device)
        self._pad = torch.zeros(batch, dtype=torch.int64, device=w.device)
        self._key_index = torch.arange(max_len, device=w.device)
        # key span -> (CUDAGraph, its logits); None: the step runs eagerly (not on CUDA)
        self._graphs = {} if w.device.type == "cuda" else None

    def _graphs_apply(self, fn: str, cuda_graphs: Optional[bool]) -> bool:
        """Whether decode steps take the static-shape step (as CUDA graphs): ``cuda_graphs``
        resolved against the model (class docstring)."""
        if cuda_graphs is False:
            return False
        rope_type = getattr(self.rotary, "rope_type", "default")
        why = None
        if self.kv != "float":
            why = (f"the float key-value cache (kv='float'), got kv={self.kv!r}: the spiking "
                   f"caches take host positions and reallocate as they grow")
        elif "dynamic" in rope_type:
            why = (f"a rotary embedding with fixed frequencies, got rope_type {rope_type!r}, "
                   f"which reads the positions back to the host")
        elif self.device.type != "cuda":
            why = f"a model on a CUDA device, got one on {self.device}"
        if why is not None and cuda_graphs:
            raise ValueError(f"{fn}: cuda_graphs=True needs {why}; pass cuda_graphs=None "
                             f"(graphs where they apply) or False")
        return why is None

    @property
    def cuda_graphs(self) -> bool:
        """Whether one-token decode steps run as CUDA graphs (``cuda_graphs`` resolved)."""
        return self._static and self._graphs is not None

    def cache_bytes_per_token(self) -> int:
        """Bytes of key-value cache one token position takes, all layers and rows of the batch:
        float: keys and values in the embedding's dtype; spike: planes, sign and scale."""
        if self.kv == "float":
            return 2 * self.keys[:, :, :, 0].numel() * self.keys.element_size()
        return sum(layer.bytes_per_token() for layer in self.spike_kv)

    def reset(self) -> None:
        """Forget the sequences: the next call is a prompt. CUDA graphs are kept: the next
        sequences' steps replay them."""
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
            if self.pad is not None:
                self._pad.copy_(self.pad)
            else:
                self._pad.zero_()
        # spikeops.track observes through the layers' observers (Python calls), which a graph
        # replay would skip.
        if T == 1 and self._static and \
                not any(m.observer is not None for m in self._spike_layers):
            logits = self._static_step(ids, start)
        else:
            logits = self._eager(ids, start, last_only)
        self.length = start + T
        return logits

    def _eager(self, ids: torch.Tensor, start: int, last_only: bool) -> torch.Tensor:
        """Logits of ``ids [batch, T]`` as tokens ``start .. start + T``, shapes of this call."""
        x = self.embed(ids.to(self.device))
        B, T = ids.shape
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

        def attend(i, q, k, v):
            if self._query_sink is not None:
                self._query_sink(i, q)
            if self.kv == "float":
                keys, values = self._layer_kv[i]
                keys[:, :, start:end] = k
                values[:, :, start:end] = v
                return self._attention(i, q, end, mask)
            return self.spike_kv[i].step(q, k, v, start, end, mask, self.scaling[i], self.pad)
        x = self._layers(x, positions, attend)
        return self._logits(x[:, -1:] if last_only else x)

    def _decode_step(self, span: int) -> torch.Tensor:
        """The one-token step with static shapes, what a graph captures: the ids in ``_ids``,
        their position in ``_position``, attention over the first ``span`` cache slots (those
        past the position masked). Nothing here reads a device value on the host."""
        x = self.embed(self._ids)
        positions = (self._position - self._pad).unsqueeze(1)  # [batch, 1], as _eager's
        keys = self._key_index[:span]
        mask = (keys <= self._position) & (keys >= self._pad.view(-1, 1, 1, 1))

        def attend(i, q, k, v):
            keys, values = self._layer_kv[i]
            keys.index_copy_(2, self._position, k)
            values.index_copy_(2, self._position, v)
            return self._attention(i, q, span, mask)
        return self._logits(self._layers(x, positions, attend))

    def _static_step(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Logits of the one-token ``ids`` at position ``start`` through ``_decode_step``: as
        the replay of its graph on CUDA (captured for the span on first use), else eagerly."""
        span = min(self.max_len, max(MIN_SPAN, 1 << start.bit_length()))  # > start
        self._ids.copy_(ids)
        self._position.fill_(start)
        if self._graphs is None:
            return self._decode_step(span)
        # Capture and replay run on the current device's streams: make it the model's.
        with torch.cuda.device(self.device):
            if span not in self._graphs:
                self._graphs[span] = self._capture(span)
            graph, logits = self._graphs[span]
            graph.replay()
        return logits.clone()

    def _capture(self, span: int):
        """(CUDAGraph, its logits) of ``_decode_step(span)``: warm-up runs on a side stream,
        then the capture, the graphs of one Runner sharing one memory pool."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                self._decode_step(span)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self._graphs.values()))[0].pool() if self._graphs else None
        with torch.cuda.graph(graph, pool=pool):
            logits = self._decode_step(span)
        return graph, logits

    def _layers(self, x: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers on ``x [batch, T, hidden]`` at ``positions [batch, T]``;
        ``attend(i, q, k, v)`` caches layer i's keys and values ``[batch, kv_heads, T,
        head_dim]`` and returns the attention of the queries ``[batch, heads, T, head_dim]``."""
        B, T = x.shape[:2]
        cos, sin = self.rotary(x, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)   # [B, 1, T, head_dim]
        # transformers' rotary product x * cos + rotate_half(x) * sin, where rotate_half(x) =
        # cat(-x2, x1) of x's halves, as x * cos + roll(x, half) * cat(-sin1, sin2): the same
        # products bit for bit (negation is exact), three ops fewer per tensor and layer.
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # The residual stream as rows [B * T, hidden]: the projections take 2-D rows as they
        # are, where a [B, T, hidden] input costs each call two reshapes.
        x = x.reshape(B * T, -1)
        for i, parts in enumerate(self.layers):
            h = parts["input_layernorm"](x)
            q, k, v = parts["qkv"](h)
            q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            a = attend(i, q, k, v)
            x = x + parts["self_attn.o_proj"](a.transpose(1, 2).reshape(B * T, -1))
            x = x + parts["mlp"](parts["post_attention_layernorm"](x))
        return x.view(B, T, -1)

    def _attention(self, i: int, q: torch.Tensor, keys: int,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
        """SDPA of ``q`` over the first ``keys`` slots of layer i's float cache."""
        cached_keys, cached_values = self._layer_kv[i]
        return F.scaled_dot_product_attention(
            q, cached_keys[:, :, :keys], cached_values[:, :, :keys], attn_mask=mask,
            scale=self.scaling[i], enable_gqa=self.kv_heads != self.heads)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.head_params is None:
            return self.lm_head(h).float()
        h = h.to(self.head_params["weight"].dtype)
        if type(self.lm_head) is torch.nn.Linear and not _hooked(self.lm_head):
            # nn.Linear's own forward on the copies: functional_call costs about 0.4 ms a call
            # (a few percent of a CPU decode step) to swap them in, for the hooks only.
            return F.linear(h, self.head_params["weight"], self.head_params.get("bias")).float()
        # Through the module, so that its hooks, such as the statistics' count of lm_head's
        # MACs, see the call.
        return torch.func.functional_call(self.lm_head, self.head_params, (h,)).float()


def _query_moment(layer) -> Optional[torch.Tensor]:
    """The query moment of a decoder layer's calibration (its q_proj's, calibrate method
    "kv"), or None."""
    cal = getattr(getattr(layer.self_attn, "q_proj", None), "calibration", None)
    return getattr(cal, "query_moment", None)


@torch.no_grad()
def query_moments(model: torch.nn.Module, batches) -> List[torch.Tensor]:
    """Per decoder layer, the second moment of its queries after the rotary embedding, per kv
    head over the query heads that read it: float32 ``[kv_heads, head_dim, head_dim]``, the mean
    of ``q^T q`` over every token of ``batches`` (int64 ``[B, T]`` token ids, no padding, or
    one such tensor) and those heads, as the model runs now (calibrate runs it on float
    activations: method "kv"). SpikeKV codes keys by it (attention.key_feedback)."""
    fn = "query_moments"
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    batches = _checks.token_batches(fn, "batches", batches, vocab if vocab else 1 << 62)
    sums: dict = {}
    tokens = 0
    for ids in batches:
        runner = Runner(model, ids.shape[1], batch=ids.shape[0], cuda_graphs=False)

        def sink(i, q):
            B, H, T, D = q.shape
            rows = q.double().reshape(B, runner.kv_heads, H // runner.kv_heads, T, D)
            rows = rows.transpose(1, 0).reshape(runner.kv_heads, -1, D)
            sums[i] = sums.get(i, 0) + rows.transpose(1, 2) @ rows
        runner._query_sink = sink
        runner(ids)
        tokens += ids.numel()
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    return [(sums[i] / (tokens * group)).float().cpu() for i in range(len(sums))]


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs forward hooks of its own or global ones."""
    return bool(module._forward_hooks or module._forward_pre_hooks or
                module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks)


def check_head_dtype(fn: str, head_dtype) -> None:
    """Refuse a ``head_dtype`` other than "auto", None and HEAD_DTYPES."""
    if not (head_dtype is None or head_dtype == HEAD_AUTO or
            isinstance(head_dtype, torch.dtype) and head_dtype in HEAD_DTYPES):
        raise ValueError(f"{fn}: head_dtype must be {HEAD_AUTO!r}, None or one of "
                         f"{HEAD_DTYPES}, got {head_dtype!r}")


def auto_head_dtype(norm: torch.nn.Module, lm_head: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype ``Runner(head_dtype="auto")`` runs ``lm_head`` in, None for the module as it
    is: a float32 ``nn.Linear`` head in float16 where no value of the product can reach
    float16's range, else in bfloat16 (float32's range, 8 significant bits); other heads as
    they are.

    The proof of range, from the weights alone: the final norm is an RMSNorm, ``g * x / rms(x)``
    with ``rms(x) >= sqrt(mean(x^2))``, so the normalized x has a Euclidean norm of at most
    sqrt(d) and the hidden state h at most ``H = sqrt(d) * max|g|``. Every element of h is at
    most H, and every logit and every partial sum of one (Cauchy-Schwarz over any subset of the
    d terms) at most ``H * max_j ||W_j|| + max|b|``. float16 is chosen when twice both bounds
    stay below its largest value (65,504), the factor 2 covering the rounding of the inputs."""
    weight = getattr(lm_head, "weight", None)
    if not isinstance(lm_head, torch.nn.Linear) or weight.dtype != torch.float32:
        return None
    gain = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or not isinstance(gain, torch.Tensor) or \
            gain.shape != (weight.shape[1],):
        return torch.bfloat16
    with torch.no_grad():
        hidden = weight.shape[1] ** 0.5 * float(gain.float().abs().max())
        logit = hidden * float(weight.norm(dim=1).max())
        if lm_head.bias is not None:
            logit += float(lm_head.bias.abs().max())
    limit = torch.finfo(torch.float16).max
    return torch.float16 if 2 * max(hidden, logit) < limit else torch.bfloat16

