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

from typing import NamedTuple, Optional

import torch

# transformers model_type values: LLaMA, and Qwen2, whose decoder layer is LLaMA's with biases on
# the q/k/v projections (SpikeLinear and the transforms carry biases; a sliding window, when a
# Qwen2 config turns it on, is refused by the Runner and left to transformers' forward).
SUPPORTED = ("llama", "qwen2")



class Inputs(NamedTuple):
    """One activation of a decoder layer and the projections that read it."""

    parent: str                 # the module of the decoder layer whose forward calls them
    projections: tuple          # their attribute names in ``parent``, in call order
    norm: Optional[str]         # the RMSNorm of the decoder layer that makes the activation


# The four projection inputs of a decoder layer, by name. The transforms fold each norm into its
# projections and scale or rotate each input; calibration and statistics watch them; the
# projections of one input encode it once (nn.ProjectionGroup).
INPUTS = {
    "qkv": Inputs("self_attn", ("q_proj", "k_proj", "v_proj"), "input_layernorm"),
    "o": Inputs("self_attn", ("o_proj",), None),  # the attention's output
    "gate_up": Inputs("mlp", ("gate_proj", "up_proj"), "post_attention_layernorm"),
    "down": Inputs("mlp", ("down_proj",), None),  # act(gate) * up
}

# The quantized projections of every decoder layer, as paths below it (docs/checkpoints.md):
# model.layers.{i}.self_attn.{q,k,v,o}_proj and model.layers.{i}.mlp.{gate,up,down}_proj.
PROJECTIONS = tuple(f"{i.parent}.{p}" for i in INPUTS.values() for p in i.projections)


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
