"""Whole-model benchmark: a randomly initialised LLaMA (LLaMA-2-7B shape on GPU) run three ways,
side by side in one run:

- ``hf-fp16``: the transformers model in fp16 (fp32 on CPU), every projection an ``nn.Linear``;
- ``spikeops-W4-minmax4``: the same model with every projection a ``SpikeLinear`` on random
  symmetric W4 g128 GPTQ weights, minmax-4 spikes; no fp16 copy of any projection exists (checked);
- ``timestep-sim-T15``: every projection simulated the SpikeLLM / LAS way in PyTorch: minmax-4
  codes as rate-coded spike trains over T = 15 steps, one dense matmul per step;
- decode only, the spiking model through ``spikeops.Runner`` (what ``generate`` runs) instead of
  transformers' forward: ``spikeops-W4-minmax4-runner`` with eager steps
  (``cuda_graphs=False``) and ``spikeops-W4-minmax4-runner-graphs`` with the Runner's own CUDA
  graph of the step (GPU only); both timed as called, not inside the harness's graph, so the
  eager entry includes its launch cost (``measure(capture=False)``).

Regimes (groups): decode at batch 1 and 16 (one token per sequence after a 128-token context in a
transformers ``StaticCache``; tokens/s = batch / step time) and prefill of 2048 tokens (256 on
CPU; tokens/s = tokens / forward time). On GPU each step is captured in a CUDA graph, like the
layer benchmarks; ``extra_info`` holds tokens/s, peak GPU memory of the variant (weights, cache
and activations) and the graph flag. Embeddings, norms and ``lm_head`` stay dense in all three
(as in GPTQ checkpoints).

On CPU a 2-layer, 256-wide model runs the same code as a smoke test and CPU figure.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import spikeops
from spikeops.evaluate import cache_arg

from harness import DENSE_DTYPE, DEVICE, ENCODINGS, ON_GPU, gptq_layer, measure

transformers = pytest.importorskip("transformers")

SHAPE = (dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
         if ON_GPU else
         dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=512))
CONTEXT = 128
PREFILL = 2048 if ON_GPU else 256
T = 15
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SPIKING = "spikeops-W4-minmax4"
RUNNER, RUNNER_GRAPHS = f"{SPIKING}-runner", f"{SPIKING}-runner-graphs"
# Spiking first, then its Runner entries, so that build() (one model at a time) reuses it.
VARIANTS = ("hf-fp16", SPIKING, RUNNER, RUNNER_GRAPHS, f"timestep-sim-T{T}")
REGIMES = ("decode-batch1", "decode-batch16", f"prefill-{PREFILL}")
_reference = {"__name__": "hf-fp16"}


class TimestepLinear(torch.nn.Module):
    """A projection as the PyTorch simulations run it: per-token minmax-4 codes, T binary spike
    trains (code > t), one dense matmul per step, then scale and zero point."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.register_buffer("row_sum", linear.weight.sum(1))

    def forward(self, x):
        mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        scale = ((mx - mn) / T).clamp_min(1e-8)
        zero = torch.round(-mn / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, T)
        acc = torch.zeros(*x.shape[:-1], self.weight.shape[0], dtype=torch.float32,
                          device=x.device)
        for t in range(T):
            acc += F.linear((q > t).to(x.dtype), self.weight)
        return (scale * (acc - zero * self.row_sum)).to(x.dtype)


def _replace(model, make):
    for i, layer in enumerate(model.model.layers):
        for path in PROJECTIONS:
            parent_name, name = path.split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, name, make(i, getattr(parent, name)))


@functools.lru_cache(maxsize=1)
def build(variant: str):
    """The model of ``variant`` (one at a time: the previous one is released first)."""
    if ON_GPU:
        torch.cuda.empty_cache()
    config = transformers.LlamaConfig(**SHAPE, max_position_embeddings=4096)
    with torch.device(DEVICE):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=DENSE_DTYPE)
    if variant == SPIKING:
        def spiking(i, lin):
            w = gptq_layer(lin.in_features, lin.out_features, 4, seed=i)
            return spikeops.SpikeLinear(w, ENCODINGS["minmax4"])
        _replace(model, spiking)
        dense = [n for n, m in model.model.layers.named_modules()
                 if isinstance(m, torch.nn.Linear)]
        assert not dense, f"fp16 copies left in the spiking model: {dense[:3]}"
    elif variant.startswith("timestep"):
        _replace(model, lambda i, lin: TimestepLinear(lin))
    return model.eval()


def decode_inputs(model, batch: int):
    """(prompt ids [batch, CONTEXT], the next ids [batch, 1]), the same for every variant."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, CONTEXT), device=DEVICE, generator=gen)
    return prompt, torch.randint(0, vocab, (batch, 1), device=DEVICE, generator=gen)


def decode_step(model, batch: int):
    """One decode step after a CONTEXT-token prefill into a StaticCache; every call writes the
    same cache slot, so each round is the same step."""
    prompt, ids = decode_inputs(model, batch)
    cache = transformers.StaticCache(config=model.config, max_cache_len=CONTEXT + 1)
    model(input_ids=prompt, use_cache=True, cache_position=torch.arange(CONTEXT, device=DEVICE),
          **{cache_arg(model): cache})
    pos = torch.tensor([CONTEXT], device=DEVICE)

    def rewind():
        # Recent transformers keep the write position in the cache layers (a device tensor
        # advanced in place, or an int), older ones take it from cache_position: set it back to
        # CONTEXT before every step so that no step runs past the cache (also inside a graph).
        for layer in getattr(cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(CONTEXT)
            elif isinstance(length, int):
                layer.cumulative_length = CONTEXT

    def step():
        rewind()
        return model(input_ids=ids, use_cache=True, cache_position=pos,
                     **{cache_arg(model): cache})
    return step


def runner_step(model, batch: int, cuda_graphs: bool):
    """One decode step of a ``spikeops.Runner`` after a CONTEXT-token prompt, its cache as long
    as the StaticCache above (so the graph step attends over the same CONTEXT + 1 slots);
    every call rewinds the Runner to CONTEXT tokens, so each round is the same step. One step
    runs here, so that a graph is captured before timing. Returns (step, runner)."""
    prompt, ids = decode_inputs(model, batch)
    runner = spikeops.Runner(model, CONTEXT + 1, batch=batch, cuda_graphs=cuda_graphs)
    runner(prompt)

    def step():
        runner.length = CONTEXT
        return runner(ids)
    step()
    return step, runner


CASES = [pytest.param(v, r, id=f"{r}-{v}") for v in VARIANTS for r in REGIMES
         if v not in (RUNNER, RUNNER_GRAPHS) or r.startswith("decode")]


@pytest.mark.parametrize("variant, regime", CASES)
def test_model(benchmark, variant, regime):
    if variant == RUNNER_GRAPHS and not ON_GPU:
        pytest.skip("CUDA graphs of the Runner: no GPU (or spikeops built without CUDA)")
    runs_runner = variant in (RUNNER, RUNNER_GRAPHS)
    model = build(SPIKING if runs_runner else variant)
    if ON_GPU:  # the peak of this regime: resident weights plus its cache and activations
        torch.cuda.reset_peak_memory_stats()
    info = dict(layers=SHAPE["num_hidden_layers"], hidden=SHAPE["hidden_size"], variant=variant)
    with torch.no_grad():
        if regime.startswith("decode"):
            batch = int(regime.removeprefix("decode-batch"))
            tokens = batch
            if runs_runner:
                fn, runner = runner_step(model, batch, cuda_graphs=variant == RUNNER_GRAPHS)
                info["runner_cuda_graphs"] = runner.cuda_graphs
            else:
                fn = decode_step(model, batch)
        else:
            ids = torch.randint(0, model.config.vocab_size, (1, PREFILL), device=DEVICE)
            fn, tokens = (lambda: model(input_ids=ids, use_cache=False)), PREFILL
        median = measure(benchmark, fn, f"model {regime}", variant, extra=info,
                         reference=_reference, capture=not runs_runner)
    if median is not None:
        benchmark.extra_info["tokens_per_s"] = tokens / median
    if ON_GPU:
        benchmark.extra_info["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
