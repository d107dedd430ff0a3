"""Outlier transforms (spikeops.transforms, docs/transforms.md): exact in float on random GQA
LLaMA models (tied and untied embeddings) and on the embedded model, the online rotation and its
fast Walsh-Hadamard transform, and the record that brings the online step back after saving."""

import copy

import pytest
import torch

import spikeops
from spikeops.floatmodel import load_float_model
from spikeops.transforms import (CONFIG_KEY, OnlineRotation, hadamard, random_orthogonal,
                                 transform)

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402


def random_llama(tied: bool, dtype=torch.float64) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=192,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                         head_dim=16, tie_word_embeddings=tied, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, and a few massive channels, as in real models
        for m in model.modules():
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
        model.model.embed_tokens.weight[:, :3] *= 30
    return model


@pytest.mark.parametrize("kind", ["rotate", "smooth"])
@pytest.mark.parametrize("tied", [True, False])
@torch.no_grad()
def test_transforms_keep_the_function(kind, tied):
    """Same logits within float rounding (the norms compute in float32 inside HF's LLaMA)."""
    model = random_llama(tied)
    ids = torch.randint(0, 256, (2, 24))
    ref = model(input_ids=ids).logits
    out = copy.deepcopy(model)
    record = transform(out, kind, batches=[ids[:1], ids[1:]])
    assert record["kind"] == kind and getattr(out.config, CONFIG_KEY) == record
    torch.testing.assert_close(out(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    changed = out.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(changed, model.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("kind", ["rotate", "smooth"])
@torch.no_grad()
def test_transforms_on_the_embedded_model(kind):
    from spikeops.commands import DEFAULT_DENSE, DEFAULT_TEXT
    from spikeops.evaluate import encode_text
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_DENSE, dtype=torch.float64).eval()
    ids = encode_text(DEFAULT_TEXT.read_text(encoding="utf-8"))[:256].reshape(2, 128)
    ref = model(input_ids=ids).logits
    transform(model, kind, batches=[ids])
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_rotate_spreads_massive_channels():
    """The residual rotation flattens channels that dwarf the rest: the largest |x| of the
    q/k/v input of every token drops against its mean |x|."""
    model = random_llama(False)
    ids = torch.randint(0, 256, (1, 16))
    seen = {}

    def spread(m):
        def hook(_m, args):
            x = args[0].abs()
            seen[m] = float((x.amax(-1) / x.mean(-1)).max())
        return hook

    before = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(spread("before"))
    with torch.no_grad():
        model(input_ids=ids)
    before.remove()
    transform(model, "rotate")
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(spread("after"))
    with torch.no_grad():
        model(input_ids=ids)
    assert seen["after"] < seen["before"] / 3


def test_hadamard_and_online_rotation():
    x = torch.randn(5, 3 * 16, dtype=torch.float64)
    H = hadamard(64)
    torch.testing.assert_close(H @ H.t(), torch.eye(64, dtype=torch.float64))
    mix = random_orthogonal(3, torch.Generator().manual_seed(1))
    rot = OnlineRotation(48, mix.tolist())
    T = rot.matrix()
    torch.testing.assert_close(T @ T.t(), torch.eye(48, dtype=torch.float64))
    torch.testing.assert_close(rot.rotate(x), x @ T)
    torch.testing.assert_close(rot.rotate(x.float()), (x @ T).float())  # factors per dtype
    # bfloat16: the input's rounding (2^-8 relative) carries through the sums of 16 terms
    torch.testing.assert_close(rot.rotate(x.bfloat16()), (x @ T).bfloat16(), atol=3e-2, rtol=0)
    with pytest.raises(ValueError, match="mix"):
        OnlineRotation(48, [[1.0]])


@torch.no_grad()
def test_saved_rotation_comes_back(tmp_path):
    """save_pretrained keeps the record; load_float_model and load_gptq put the online
    rotation back, so the saved model computes what the transformed one did."""
    model = random_llama(False, torch.float32)
    ids = torch.randint(0, 256, (1, 20))
    transform(model, "rotate", seed=3)
    ref = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "fp")
    loaded, _ = load_float_model(tmp_path / "fp")
    torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")  # without the online step
    assert not torch.allclose(plain(input_ids=ids).logits, ref, atol=1e-3)
    weights = spikeops.quantize(loaded, ids.repeat(4, 2), bits=8, group_size=32)
    quantized_ref = loaded(input_ids=ids).logits  # the float model with its GPTQ weights
    spikeops.save_gptq(loaded, weights, tmp_path / "q")
    spiking = spikeops.load_gptq(tmp_path / "q", spikeops.Encoding("minmax", 8))
    spikeops.calibrate.set_encoding(spiking, None)
    torch.testing.assert_close(spiking(input_ids=ids).logits, quantized_ref, rtol=1e-3,
                               atol=1e-3)


def test_transform_refuses():
    model = random_llama(True)
    with pytest.raises(ValueError, match="kind"):
        transform(model, "spin")
    with pytest.raises(ValueError, match="batches"):
        transform(model, "smooth")
    assert transform(model, "none") == {"kind": "none"}
    transform(model, "rotate")
    with pytest.raises(ValueError, match="already transformed"):
        transform(model, "rotate")
