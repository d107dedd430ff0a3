"""Architectures: one allow-list (spikeops.architecture.SUPPORTED) decides what loading,
patching, quantization, transforms and the Runner accept; everything else is refused by name
before anything changes. A transform record is checked whole and follows the model through
``patch`` too."""

import copy
import json

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import spikeops
from spikeops.evaluate import generate
from spikeops.runner import Runner
from spikeops.transforms import CONFIG_KEY, restore_online, transform
from test_checkpoints import ENC, calib, fake_quantized_model, tiny_model

SIZES = dict(vocab_size=61, pad_token_id=0, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             max_position_embeddings=64)
# Families that look like LLaMA but compute something else (query/key norms, multipliers,
# (1 + w) norms, no rotary on some layers, ...).
OTHERS = ["Qwen3", "Granite", "Gemma", "SmolLM3", "StableLm", "Helium"]


def other_model(family: str):
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**SIZES)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("family", OTHERS)
def test_other_families_refused_by_name(family):
    model = other_model(family)
    before, tied = state(model), model.config.tie_word_embeddings
    name = f"model_type {model.config.model_type!r}"
    with pytest.raises(ValueError, match=f"Runner: .*{name}"):
        Runner(model, 8)
    for kind in ("rotate", "smooth"):
        with pytest.raises(ValueError, match=f"transform: .*{name}"):
            transform(model, kind, batches=[torch.zeros(1, 4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=f"quantize: .*{name}"):
        spikeops.quantize(model, torch.zeros(1, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=f"patch: .*{name}"):
        spikeops.patch(model, ENC)
    assert same_state(model, before) and model.config.tie_word_embeddings == tied
    # generate runs such a float model through its own forward, with its own arithmetic.
    ids = torch.randint(0, SIZES["vocab_size"], (5,))
    expected = model(input_ids=ids[None]).logits[0, -1].argmax()
    assert generate(model, ids, 1).tolist() == [int(expected)]


def test_checkpoint_of_another_family_refused(tmp_path):
    folder = tmp_path / "q"
    spikeops.quantize(tiny_model(), calib(), bits=4, group_size=32, path=folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen3"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="load_gptq: .*model_type 'qwen3'"):
        spikeops.load_gptq(folder, ENC)


def test_refused_rotate_leaves_the_model_untouched():
    """head_dim 48 is refused before the norms are folded or the embedding is rotated."""
    config = LlamaConfig(**{**SIZES, "hidden_size": 96, "num_attention_heads": 2, "head_dim": 48,
                            "tie_word_embeddings": True})
    model = LlamaForCausalLM(config).eval()
    before = state(model)
    with pytest.raises(ValueError, match="power-of-two head_dim, got 48"):
        transform(model, "rotate")
    assert same_state(model, before) and model.config.tie_word_embeddings
    assert getattr(model.config, CONFIG_KEY, None) is None


@pytest.mark.parametrize("batches", [[], [torch.zeros(0, 0, dtype=torch.int64)],
                                     [torch.zeros(1, 4)]])
def test_smooth_needs_token_batches(batches):
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    before = state(model)
    with pytest.raises(ValueError, match="'smooth' needs a non-empty list of token-id batches"):
        transform(model, "smooth", batches=batches)
    assert same_state(model, before)


@pytest.mark.parametrize("record", [
    ["rotate"], {"kind": "spin"}, {"kind": "rotate"}, {"kind": "rotate", "down_proj": []},
    {"kind": "rotate", "down_proj": {"width": 0}}, {"kind": "rotate", "down_proj": {"width": 4}},
    {"kind": "rotate", "down_proj": {"width": True}},
    {"kind": "rotate", "down_proj": {"width": 48, "mix": [[1, 0], [0, 1]]}},
    {"kind": "rotate", "down_proj": {"width": 48, "mix": [[2, 0, 0], [0, 1, 0], [0, 0, 1]]}},
    {"kind": "rotate", "down_proj": {"width": 48, "mix": "eye"}},
])
def test_malformed_transform_record_refused(record):
    model = LlamaForCausalLM(LlamaConfig(**SIZES)).eval()
    with pytest.raises(ValueError, match=CONFIG_KEY):
        restore_online(model, record)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_patch_puts_back_the_online_rotation(tmp_path):
    """A rotated checkpoint loaded by another loader and patched computes what load_gptq's
    model computes: patch restores the recorded down_proj rotation (once)."""
    model = tiny_model()
    transform(model, "rotate")
    folder = tmp_path / "rot"
    spikeops.quantize(model, calib(), bits=4, group_size=32, path=folder)
    loaded = spikeops.load_gptq(folder, ENC)
    other = fake_quantized_model(folder)
    assert getattr(other.config, CONFIG_KEY)["kind"] == "rotate"
    spikeops.patch(other, ENC)
    spikeops.patch(other, ENC)  # patching again must not rotate twice
    with torch.no_grad():
        assert torch.equal(other(calib()).logits, loaded(calib()).logits)
    broken = fake_quantized_model(folder)
    broken.config.spikeops_transform = {"kind": "rotate", "down_proj": {"width": 7}}
    with pytest.raises(ValueError, match="patch: .*7"):
        spikeops.patch(broken, ENC)
    assert not any(isinstance(m, spikeops.SpikeLinear) for m in broken.modules())


def test_runner_still_serves_llama():
    model = copy.deepcopy(tiny_model())
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(Runner(model, 6, head_dtype=None)(ids),
                                   model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def qwen2(sliding: bool = False, **sizes):
    """A tiny Qwen2 (SIZES, updated by ``sizes``): LLaMA's decoder layer with q/k/v biases
    (made non-zero here)."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**{**SIZES, **sizes, "use_sliding_window": sliding,
                                         "sliding_window": 4 if sliding else None})
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return model


def test_qwen2_runs_exactly(tmp_path):
    """Qwen2 (SDLLM and SpikingBrain convert it): the Runner's logits are transformers', the
    transforms keep the function, and a GPTQ checkpoint of it loads (biases included) and runs
    on spikes through the Runner as through transformers."""
    from test_runner import assert_same_logits
    model = qwen2()
    ids = torch.randint(0, SIZES["vocab_size"], (2, 9))
    assert_same_logits(model, ids, [6, 1, 2])
    with torch.no_grad():
        reference = model(input_ids=ids).logits
        for kind in ("rotate", "smooth"):
            transformed = copy.deepcopy(model)
            transform(transformed, kind, batches=[ids])
            torch.testing.assert_close(transformed(input_ids=ids).logits, reference,
                                       rtol=1e-4, atol=1e-4)
    transform(model, "rotate")
    spikeops.quantize(model, ids, bits=4, group_size=16, path=tmp_path / "q")
    loaded = spikeops.load_gptq(tmp_path / "q", spikeops.Encoding("absmax", 4))
    assert loaded.model.layers[0].self_attn.q_proj.bias is not None
    assert_same_logits(loaded, ids, [6, 3])
    with pytest.raises(ValueError, match="only full attention"):
        Runner(qwen2(sliding=True), 8)
