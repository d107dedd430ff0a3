"""Evaluation of causal language models, dense or spiking: perplexity on a text with sliding
windows, and greedy or sampled generation. Tokens are the model's tokenizer's, or bytes (one
token per UTF-8 byte, vocabulary 256) when no tokenizer is given."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from . import _checks


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
               batch_size: int = 8, progress=True) -> float:
    """Perplexity of ``tokens`` (int64 ``[T]``) under a causal LM, with sliding windows of
    ``window`` tokens moved by ``stride`` (default window / 2): every token after the first is
    predicted exactly once, with at least ``window - stride`` tokens of context except at the
    start. Returns exp(mean negative log-likelihood). ``progress``: True for a bar of its own,
    False for none, or a tqdm bar to advance by one per window."""
    fn = "perplexity"
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
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        chunk = spans[i:i + batch_size]
        length = max(end - start for start, end, _ in chunk)
        ids = torch.zeros(len(chunk), length, dtype=torch.int64)
        mask = torch.zeros(len(chunk), length, dtype=torch.bool)
        for j, (start, end, first) in enumerate(chunk):
            ids[j, : end - start] = tokens[start:end]
            mask[j, first - start: end - start] = True  # positions whose token is scored
        logits = model(input_ids=ids.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = ids[:, 1:].to(device)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        scored = mask[:, 1:].to(device)
        nll -= float(picked[scored].double().sum())
        count += int(scored.sum())
        bar.update(len(chunk))
    if own_bar:
        bar.close()
    return math.exp(nll / count)


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
def generate(model, prompt: torch.Tensor, max_new_tokens: int = 100, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, stop=()) -> torch.Tensor:
    """Continue ``prompt`` (int64 ``[T]``) by ``max_new_tokens`` tokens: greedy when
    ``temperature`` is 0, else sampled from softmax(logits / temperature), optionally restricted
    to the ``top_k`` most likely tokens; a token of ``stop`` ends it (and is not returned). Uses
    a key-value cache (``spikeops.runner.Runner`` for LLaMA-architecture models). Returns the
    new tokens."""
    fn = "generate"
    _checks.tensor(fn, "prompt", prompt, (torch.int64, torch.int32), dim=1)
    if prompt.shape[0] < 1:
        raise ValueError(f"{fn}: prompt must hold at least one token, got none")
    _checks.integer(fn, "max_new_tokens", max_new_tokens, 0, 1 << 20)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{fn}: temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None:
        _checks.integer(fn, "top_k", top_k, 1, 1 << 24)
    # The key-value cache is preallocated for the whole sequence: bounded by the context the
    # model was trained for, not by the request.
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(context, int) and prompt.shape[0] + max_new_tokens > context:
        raise ValueError(f"{fn}: the prompt's {prompt.shape[0]} tokens plus max_new_tokens = "
                         f"{max_new_tokens} must fit the model's context of {context} tokens "
                         f"(max_position_embeddings)")
    device = next(model.parameters(), next(model.buffers(), torch.empty(0))).device
    gen = torch.Generator().manual_seed(seed)
    ids = prompt.to(torch.int64).unsqueeze(0).to(device)
    step = _stepper(model, prompt.shape[0] + max_new_tokens)
    out = []
    for _ in range(max_new_tokens):
        logits = step(ids)[0, -1].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[0])).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        if token in stop:
            break
        out.append(token)
        ids = torch.tensor([[token]], device=device)
    return torch.tensor(out, dtype=torch.int64)


def _stepper(model, max_len: int):
    """``step(ids) -> logits`` continuing one sequence: the lean ``Runner`` for
    LLaMA-architecture models (the same logits, faster), else transformers' forward with its
    cache."""
    from .runner import Runner
    try:
        runner = Runner(model, max_len)
    except ValueError:
        runner = None
    if runner is not None:
        return lambda ids: runner(ids, last_only=True)
    cache = None

    def step(ids):
        nonlocal cache
        logits, cache = forward_step(model, ids, cache)
        return logits
    return step


@dataclass
class Row:
    """One row of ``compare``: ``encoding`` is a spike encoding's label, ``"dense"`` (the float
    model) or ``"float"`` (GPTQ weights on float activations). ``sops_per_mac``: synaptic
    operations (spikes x outputs) per multiply-accumulate of the dense layers."""

    encoding: str
    perplexity: float
    firing_rate: Optional[float]
    sops_per_mac: Optional[float]
    tokens: int


def compare(model, tokens: torch.Tensor, encodings, calibration=None, dense_model=None,
            window: int = 256, progress: bool = True, dense_tokens: Optional[torch.Tensor] = None):
    """Perplexity, firing rate and SOPs per MAC of ``model`` (with SpikeLinear layers) under
    each entry of ``encodings`` (``{label: Encoding or None}``; None = GPTQ weights on float
    activations), refined per layer by ``calibration``; first ``dense_model`` (a float model,
    on ``dense_tokens``, default ``tokens``) if given. One progress bar covers every row.
    Returns ``Row``s; the model's encodings are restored afterwards."""
    from .calibrate import set_encoding, spike_layers
    from .stats import track
    stride = window // 2
    per_row = len(_windows(tokens.shape[0], window, stride))
    bar = tqdm(total=per_row * (len(encodings) + (dense_model is not None)), desc="eval",
               unit="window", disable=not progress)
    rows = []
    if dense_model is not None:
        dense_tokens = tokens if dense_tokens is None else dense_tokens
        rows.append(Row("dense", perplexity(dense_model, dense_tokens, window, progress=bar),
                        None, None, dense_tokens.shape[0]))
    saved = {name: (m.enc, m.salient_mask) for name, m in spike_layers(model).items()}
    try:
        for label, enc in encodings.items():
            bar.set_postfix_str(label)
            set_encoding(model, enc, calibration)
            with track(model) as tracker:
                ppl = perplexity(model, tokens, window, progress=bar)
            t = tracker.totals()
            spiking = enc is not None
            rows.append(Row("float" if not spiking else label, ppl,
                            t["firing_rate"] if spiking else None,
                            t["sops"] / t["macs"] if spiking and t["macs"] else None,
                            tokens.shape[0]))
    finally:
        bar.close()
        for name, m in spike_layers(model).items():
            m.set_encoding(*saved[name])
    return rows
