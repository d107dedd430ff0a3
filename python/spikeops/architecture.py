"""The model architectures spikeops runs, and their structure: one allow-list that loading,
patching, quantization, transforms, import and the Runner all check (docs/checkpoints.md,
"Architectures").

An architecture is supported when every part of spikeops that depends on its structure is
implemented for it and tested against transformers' logits: the seven projections replaced by
``SpikeLinear``, the transforms' folding of the RMSNorm (``g * x / rms(x)``), the Runner's
attention (rotary embedding, no query/key norms, no score or residual multipliers). Families that
differ in any of these (Qwen3's query/key norms, Granite's multipliers, Gemma's ``(1 + w)``
norm, ...) are refused by name rather than run with other arithmetic.
"""

from __future__ import annotations

import torch

# transformers model_type values: LLaMA, and Qwen2, whose decoder layer is LLaMA's with biases on
# the q/k/v projections (SpikeLinear and the transforms carry biases; a sliding window, when a
# Qwen2 config turns it on, is refused by the Runner and left to transformers' forward).
SUPPORTED = ("llama", "qwen2")

# The quantized projections of every decoder layer (docs/checkpoints.md):
# model.layers.{i}.self_attn.{q,k,v,o}_proj and model.layers.{i}.mlp.{gate,up,down}_proj.
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def check_supported(fn: str, model) -> None:
    """Refuse a model, config or ``model_type`` string that is not in SUPPORTED."""
    config = getattr(model, "config", model)
    model_type = model if isinstance(model, str) else getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"{fn}: model must be a LLaMA-architecture causal LM (model_type one of "
                         f"{SUPPORTED}: LLaMA, Qwen2), got model_type {model_type!r} "
                         f"({type(model).__name__}): "
                         f"other architectures are refused rather than run with other "
                         f"arithmetic (docs/checkpoints.md, 'Architectures')")


def decoder_layers(fn: str, model) -> torch.nn.ModuleList:
    """``model.model.layers`` of a supported causal LM."""
    check_supported(fn, model)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{fn}: model must be a LLaMA-architecture causal LM with decoder "
                         f"layers at model.model.layers, got {type(model).__name__}")
    return layers


def head_dim_of(config) -> int:
    """The width of one attention head: ``head_dim`` when the config gives it."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
