"""Evaluation of causal language models, dense or spiking: perplexity on a text with sliding
windows, and greedy or sampled generation. Tokens are the model's tokenizer's, or bytes (one
token per UTF-8 byte, vocabulary 256) when no tokenizer is given."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import _checks
from .calibrate import CURRENT
from .runner import HEAD_AUTO


def encode_text(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids int64 ``[T]``: the tokenizer's, or the UTF-8 bytes of ``text``."""
    if not isinstance(text, str):
        raise TypeError(f"encode_text: text must be a str, got {type(text).__name__}")
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)


def decode_tokens(tokens, tokenizer=None) -> str:
    """Inverse of ``encode_text`` (invalid UTF-8 byte sequences are replaced)."""
    ids = [int(t) for t in tokens]
    if tokenizer is None:
        return bytes(ids).decode("utf-8", errors="replace")
    return tokenizer.decode(ids)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 256, stride: Optional[int] = None,
               batch_size: int = 8, progress=True, kv: str = "float") -> float:
    """Perplexity of ``tokens`` (int64 ``[T]``) under a causal LM, with sliding windows of
    ``window`` tokens moved by ``stride`` (default window / 2): every token after the first is
    predicted exactly once, with at least ``window - stride`` tokens of context except at the
    start. Returns exp(mean negative log-likelihood). ``progress``: True for a bar of its own,
    False for none, or a tqdm bar to advance by one per window. ``perplexity_interval`` gives
    the same value with a bootstrap interval. ``kv``: ``"float"`` runs the model's own
    forward; ``"spike4"`` / ``"spike8"`` run each batch of windows through a ``Runner`` with
    that bit-plane key-value cache (attention on spikes; README, "Attention on spikes")."""
    nll, count = window_nll(model, tokens, window, stride, batch_size, progress, kv)
    return math.exp(sum(nll) / sum(count))


@dataclass(frozen=True)
class Perplexity:
    """A perplexity and its bootstrap interval (``perplexity_interval``)."""

    value: float
    low: float
    high: float
    windows: int


BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95


def perplexity_interval(model, tokens: torch.Tensor, window: int = 256,
                        stride: Optional[int] = None, batch_size: int = 8,
                        progress=True, kv: str = "float") -> Perplexity:
    """``perplexity`` with a 95% bootstrap interval over its windows (docs/research.md,
    "Intervals"): the windows are resampled with replacement 1000 times (``torch.Generator``
    seeded 0); each resample's perplexity is exp(sum of its NLLs / its scored tokens); low and
    high are the 2.5% and 97.5% quantiles. Windows, not tokens, are the units, since the tokens
    of one text are not independent; the interval shows how much the value depends on which
    stretches of text were read. One window gives low = high = value."""
    nll, count = window_nll(model, tokens, window, stride, batch_size, progress, kv)
    low, high = _bootstrap(nll, count)
    return Perplexity(math.exp(sum(nll) / sum(count)), low, high, len(nll))


def _bootstrap(nll: Sequence[float], count: Sequence[int]) -> Tuple[float, float]:
    """The interval of ``perplexity_interval`` from per-window NLL sums and scored tokens."""
    n = len(nll)
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    idx = torch.randint(0, n, (BOOTSTRAP_SAMPLES, n), generator=gen)
    nll_t = torch.tensor(nll, dtype=torch.float64)[idx].sum(1)
    count_t = torch.tensor(count, dtype=torch.float64)[idx].sum(1)
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = torch.quantile(torch.exp(nll_t / count_t), q).tolist()
    return low, high


@torch.no_grad()
def window_nll(model, tokens: torch.Tensor, window: int = 256, stride: Optional[int] = None,
               batch_size: int = 8, progress=True,
               kv: str = "float") -> Tuple[List[float], List[int]]:
    """Per window of ``perplexity``: the sum of the negative log-likelihoods of its scored
    tokens (float64) and their number."""
    from .attention import KV_MODES
    from .runner import Runner
    fn = "perplexity"
    _checks.choice(fn, "kv", kv, KV_MODES)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module (a causal LM), got "
                        f"{type(model).__name__}")
    _checks.tensor(fn, "tokens", tokens, (torch.int64, torch.int32), dim=1)
    _checks.integer(fn, "window", window, 2, 1 << 20)
    stride = window // 2 if stride is None else stride
    _checks.integer(fn, "stride", stride, 1, window)
    _checks.integer(fn, "batch_size", batch_size, 1, 1 << 16)
    T = tokens.shape[0]
    if T < 2:
        raise ValueError(f"{fn}: tokens must hold at least 2 tokens, got {T}")
    device = next(model.parameters(), next(model.buffers(), torch.empty(0))).device
    spans = _windows(T, window, stride)
    own_bar = isinstance(progress, bool)
    bar = tqdm(total=len(spans), desc="perplexity", unit="window",
               disable=not progress) if own_bar else progress
    nll, count = [], []
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        length = max(end - start for start, end, _ in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.int64)
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for j, (start, end, first) in enumerate(chunk):
            ids[j, : end - start] = tokens[start:end]
            mask[j, first - start: end - start] = True  # positions whose token is scored
        if kv == "float":
            # Windows shorter than `length` are padded at their end: causal attention keeps
            # the padding out of every scored position.
            logits = model(input_ids=ids.to(device)).logits.float()
        else:
            # A spiking cache's key offset and key channel scale are set by a sequence's keys
            # (spikeops.attention), so padding would change a window's codes: windows of one
            # length run together.
            logits = None
            for n in sorted({end - start for start, end, _ in chunk}):
                rows = [j for j, (start, end, _) in enumerate(chunk) if end - start == n]
                # lm_head as the model's: the same logits as the forward of kv="float"
                out = Runner(model, n, batch=len(rows), head_dtype=None, kv=kv)(ids[rows, :n])
                if logits is None:  # positions past a window's end are never scored
                    logits = out.new_zeros(len(chunk), length, out.shape[-1])
                logits[rows, :n] = out
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        scored = mask[:, 1:].to(device)
        nll += (-torch.where(scored, picked, 0).double().sum(1)).tolist()
        count += scored.sum(1).tolist()
        bar.update(len(chunk))
    if own_bar:
        bar.close()
    return nll, count


def _windows(T: int, window: int, stride: int):
    """Window w covers tokens [start, end) and scores positions [first, end) of it."""
    spans, scored_to = [], 1
    for start in range(0, T - 1, stride):
        end = min(start + window, T)
        if end <= scored_to:
            continue
        spans.append((start, end, scored_to))
        scored_to = end
        if end == T:
            break
    return spans


def cache_arg(model) -> str:
    """The name of a model's key-value cache argument and output: transformers renamed
    ``past_key_values`` to ``cache`` (5.2x); spikeops serves both."""
    if _CACHE_ARG.get(type(model)) is None:
        params = inspect.signature(type(model).forward).parameters
        _CACHE_ARG[type(model)] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARG[type(model)]


def forward_step(model, ids: torch.Tensor, cache):
    """One cached forward: ``(logits, cache)``."""
    name = cache_arg(model)
    result = model(input_ids=ids, use_cache=True, **{name: cache})
    return result.logits, getattr(result, name)


_CACHE_ARG: dict = {}


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int = 100, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, stop=(), lengths=None,
             head_dtype=HEAD_AUTO, kv: str = "float"):
    """Continue prompts by ``max_new_tokens`` tokens: greedy when ``temperature`` is 0, else
    sampled from softmax(logits / temperature), optionally restricted to the ``top_k`` most
    likely tokens; a token of ``stop`` ends a prompt's continuation (and is not returned).

    prompt: one prompt, int64 ``[T]`` (returns its new tokens, int64 ``[n]``); or a batch (returns
        a list of such tensors, one per prompt): a list of 1-D prompts of any lengths, or a
        ``[B, T]`` tensor whose row b holds its prompt in its last ``lengths[b]`` positions
        (left padding; ``lengths`` None: every row is a prompt of T tokens).

    Uses a key-value cache: ``spikeops.runner.Runner`` for LLaMA-architecture models, which
    runs a batch as one, left-padded (a row's logits are its single-prompt ones up to float
    rounding); other models run transformers' forward, one prompt at a time. Sampling draws the
    rows' tokens from one generator in row order, so a sampled row depends on its batch (one
    prompt at a time: a generator of the same seed per row).
    head_dtype: the Runner's ``lm_head`` dtype: ``"auto"`` (float16 or bfloat16 for a float32
    head, faster, with other rounding: ``spikeops.runner.Runner``; the model's own head for
    models the Runner does not run), None (the model's own), or a dtype (refused for models the
    Runner does not run). kv: the Runner's key-value cache (``"float"``, or ``"spike4"`` /
    ``"spike8"``: bit-plane spikes, attention on spikes); other than float, refused for models
    the Runner does not run."""
    from .attention import KV_MODES
    fn = "generate"
    _checks.choice(fn, "kv", kv, KV_MODES)
    rows = _prompts(fn, prompt, lengths)
    _checks.integer(fn, "max_new_tokens", max_new_tokens, 0, 1 << 20)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{fn}: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        _checks.integer(fn, "top_k", top_k, 1, 1 << 24)
    # The key-value cache is preallocated for the whole sequence: bounded by the context the
    # model was trained for, not by the request.
    longest = max(r.shape[0] for r in rows)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and longest + max_new_tokens > context:
        raise ValueError(f"{fn}: the prompt's {longest} tokens plus max_new_tokens = "
                         f"{max_new_tokens} must fit the model's context of {context} tokens "
                         f"(max_position_embeddings)")
    device = next(model.parameters(), next(model.buffers(), torch.empty(0))).device
    pad = [longest - r.shape[0] for r in rows]
    step = _stepper(fn, model, longest + max_new_tokens, pad, head_dtype, kv)
    if step is None:  # a batch without the Runner: one prompt at a time
        return [generate(model, r, max_new_tokens, temperature, top_k, seed, stop)
                for r in rows]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(rows), longest, dtype=torch.int64)
    for row, r, p in zip(ids, rows, pad):
        row[p:] = r
    ids = ids.to(device)
    out, done = [[] for _ in rows], [False] * len(rows)
    for _ in range(max_new_tokens):
        logits = step(ids)[:, -1].float().cpu()
        tokens = [_pick(row, temperature, top_k, gen) for row in logits]
        for b, token in enumerate(tokens):
            if done[b] or token in stop:
                done[b] = True
            else:
                out[b].append(token)
        if all(done):
            break
        ids = torch.tensor(tokens, device=device).unsqueeze(1)
    out = [torch.tensor(o, dtype=torch.int64) for o in out]
    return out[0] if isinstance(prompt, torch.Tensor) and prompt.dim() == 1 else out


def _prompts(fn: str, prompt, lengths) -> List[torch.Tensor]:
    """The prompts of ``generate``'s ``prompt`` and ``lengths``, one 1-D tensor each."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise ValueError(f"{fn}: prompt must hold at least one prompt, got an empty list")
        rows = [_checks.tensor(fn, f"prompt[{i}]", p, (torch.int64, torch.int32), dim=1)
                for i, p in enumerate(prompt)]
    elif isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        _checks.tensor(fn, "prompt", prompt, (torch.int64, torch.int32))
        B, T = prompt.shape
        if B < 1 or T < 1:
            raise ValueError(f"{fn}: a [B, T] prompt must hold at least one row and one token, "
                             f"got shape {list(prompt.shape)}")
        if lengths is None:
            lengths = [T] * B
        if isinstance(lengths, torch.Tensor):
            lengths = lengths.tolist()
        if not isinstance(lengths, (list, tuple)) or len(lengths) != B or not all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= T for n in lengths):
            raise ValueError(f"{fn}: lengths must give each of the B = {B} rows of prompt its "
                             f"prompt length in [1, T = {T}], got {lengths!r}")
        return [row[T - n:] for row, n in zip(prompt, lengths)]
    else:
        _checks.tensor(fn, "prompt", prompt, (torch.int64, torch.int32), dim=1)
        rows = [prompt]
    if lengths is not None:
        raise ValueError(f"{fn}: lengths is only taken with a [B, T] prompt tensor, got lengths "
                         f"{lengths!r} with {type(prompt).__name__} prompt")
    for i, r in enumerate(rows):
        if r.shape[0] < 1:
            raise ValueError(f"{fn}: every prompt must hold at least one token, prompt "
                             f"{i} has none")
    return rows


def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int],
          gen: torch.Generator) -> int:
    """The next token from one row of logits (``generate``)."""
    if temperature == 0:
        return int(logits.argmax())
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))


def _stepper(fn: str, model, max_len: int, pad: List[int], head_dtype, kv="float"):
    """``step(ids) -> logits`` continuing ``len(pad)`` sequences whose prompts carry ``pad``
    left-padding tokens: the lean ``Runner`` for LLaMA-architecture models (the same logits,
    faster), else transformers' forward with its cache for one sequence, else None."""
    from .runner import Runner, check_head_dtype
    check_head_dtype(fn, head_dtype)
    try:
        runner = Runner(model, max_len, batch=len(pad), head_dtype=head_dtype, kv=kv)
    except ValueError as e:
        if head_dtype not in (None, HEAD_AUTO):
            raise ValueError(f"{fn}: head_dtype needs a model the Runner runs: {e}") from e
        if kv != "float":
            raise ValueError(f"{fn}: kv={kv!r} needs a model the Runner runs: {e}") from e
        runner = None
    if runner is not None:
        padding = torch.tensor(pad) if any(pad) else None
        # The padding belongs to the prompt, the first call; the Runner keeps it.
        return lambda ids: runner(ids, last_only=True,
                                  pad=padding if runner.length == 0 else None)
    if len(pad) > 1:
        return None
    cache = None

    def step(ids):
        nonlocal cache
        logits, cache = forward_step(model, ids, cache)
        return logits
    return step


@dataclass
class Row:
    """One row of ``compare``: ``encoding`` is a spike encoding's label, ``"dense"`` (the float
    model) or ``"float"`` (GPTQ weights on float activations). ``perplexity_low`` and
    ``perplexity_high``: its 95% bootstrap interval (``perplexity_interval``). ``firing_rate``:
    spikes / spike slots, each element counting its own planes; ``sops_per_mac``: synaptic
    operations (spikes x outputs) per multiply-accumulate of the dense layers (both over the
    spiking projections, docs/energy.md). ``energy``: of spiking rows, ``Tracker.energy()`` of
    the evaluation (pJ: the projections, the whole model with attention and ``lm_head`` as
    dense MACs, and those MACs). ``planes``: of spiking rows, the bit planes per activation
    element of the spiking projections, sign and range bits included (``LayerStats.planes``),
    averaged over every projection input of the evaluation. The last four are None in rows
    cached before they existed. ``kv``: the key-value cache of the evaluation (``"float"``:
    the model's own forward; ``"spike4"`` / ``"spike8"``: a ``Runner`` with that bit-plane
    cache)."""

    encoding: str
    perplexity: float
    firing_rate: Optional[float]
    sops_per_mac: Optional[float]
    tokens: int
    perplexity_low: Optional[float] = None
    perplexity_high: Optional[float] = None
    energy: Optional[dict] = None
    planes: Optional[float] = None
    kv: str = "float"


def compare(model, tokens: torch.Tensor, encodings, calibration=CURRENT, dense_model=None,
            window: int = 256, progress: bool = True, dense_tokens: Optional[torch.Tensor] = None,
            kv: str = "float"):
    """The comparison table (docs/research.md): ``Row``s of perplexity with its 95% interval,
    firing rate, SOPs per MAC and energy of ``model`` (a model with SpikeLinear layers:
    ``load_gptq``) under each entry of ``encodings``, a dict ``{label: enc}`` whose ``enc`` is
    what ``set_encoding`` takes: an Encoding, None (GPTQ weights on float activations: the
    ``"float"`` row) or a per-layer-type map. ``calibration`` is ``set_encoding``'s (default
    ``"current"``: each layer's own). First, if given, ``dense_model``: a float causal LM
    (``torch.nn.Module``; ``load_float_model`` returns ``(model, tokenizer)``: pass the model),
    on ``dense_tokens`` (default ``tokens``). Perplexities use windows of ``window`` tokens,
    stride window / 2, with the key-value cache ``kv`` (``perplexity``'s; every row, the dense
    one included). One progress bar covers every row; the model's encodings are restored
    afterwards."""
    from .calibrate import check_encoding, set_encoding
    from .nn import kept_encodings, spike_layers
    from .stats import track
    from .attention import KV_MODES
    fn = "compare"
    _checks.choice(fn, "kv", kv, KV_MODES)
    layers = spike_layers(model)
    _checks.tensor(fn, "tokens", tokens, (torch.int64, torch.int32), dim=1)
    if not isinstance(encodings, Mapping):
        raise TypeError(f"{fn}: encodings must be a dict {{label: Encoding, None or a "
                        f"per-layer-type map}}, got {type(encodings).__name__}")
    for label, enc in encodings.items():
        if not isinstance(label, str):
            raise TypeError(f"{fn}: the labels of encodings must be str, got {label!r}")
        check_encoding(f"{fn}: encodings[{label!r}]", enc)
    if dense_model is not None and not isinstance(dense_model, torch.nn.Module):
        raise TypeError(f"{fn}: dense_model must be a float causal LM (torch.nn.Module), got "
                        f"{type(dense_model).__name__}; load_float_model returns (model, "
                        f"tokenizer): pass its model")
    if dense_tokens is not None:
        _checks.tensor(fn, "dense_tokens", dense_tokens, (torch.int64, torch.int32), dim=1)
    _checks.integer(fn, "window", window, 2, 1 << 20)
    per_row = len(_windows(tokens.shape[0], window, window // 2))
    bar = tqdm(total=per_row * (len(encodings) + (dense_model is not None)), desc="eval",
               unit="window", disable=not progress)
    rows = []
    if dense_model is not None:
        dense_tokens = tokens if dense_tokens is None else dense_tokens
        p = perplexity_interval(dense_model, dense_tokens, window, progress=bar, kv=kv)
        rows.append(Row("dense", p.value, None, None, dense_tokens.shape[0], p.low, p.high,
                        kv=kv))
    try:
        with kept_encodings(layers):
            for label, enc in encodings.items():
                bar.set_postfix_str(label)
                set_encoding(model, enc, calibration)
                with track(model) as tracker:
                    p = perplexity_interval(model, tokens, window, progress=bar, kv=kv)
                t = tracker.totals()
                spiking = enc is not None
                rows.append(Row(label if spiking else "float", p.value,
                                t["firing_rate"] if spiking else None,
                                t["sops"] / t["macs"] if spiking and t["macs"] else None,
                                tokens.shape[0], p.low, p.high,
                                tracker.energy() if spiking else None,
                                t["planes"] if spiking else None, kv))
    finally:
        bar.close()
    return rows
