"""transformers' ``AutoModelForCausalLM.from_pretrained`` of spikeops checkpoints (the
``"spikeops"`` quantization method, docs/integrations.md): the model is load_gptq's, bit for bit,
and what from_pretrained's arguments cannot mean for it is refused by name."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import spikeops
from spikeops.calibrate import calibrate, encodings, set_encoding
from spikeops.checkpoint import read_tensors
from spikeops.calibrate import parse_encoding
from spikeops.commands import DEFAULT_MODEL, load_calibration
from spikeops.evaluate import generate
from spikeops.nn import spike_layers
from spikeops.transforms import CONFIG_KEY, online_rotation, transform
from test_architecture import SIZES, qwen2

ABSMAX4 = spikeops.Encoding("absmax", 4)
MINMAX4 = spikeops.Encoding("minmax", 4)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded model with its config.json written as save_gptq now writes it (its
    quantization_config names quant_method "spikeops" and an encoding, here absmax4)."""
    folder = tmp_path_factory.mktemp("embedded") / "model"
    shutil.copytree(DEFAULT_MODEL, folder)
    edit_config(folder, lambda c: c["quantization_config"].update(quant_method="spikeops",
                                                                  encoding="absmax4"))
    return folder


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 (q/k/v biases) quantized and written by spikeops.quantize -> save_gptq."""
    folder = tmp_path_factory.mktemp("qwen2") / "q"
    ids = torch.randint(0, SIZES["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(3))
    spikeops.quantize(qwen2(), ids, bits=4, group_size=16, path=folder)
    return folder


def test_embedded_model_is_load_gptqs(embedded):
    """Same modules, same encodings (the saved calibration applied), same logits bit for bit,
    as load_gptq of the folder and of the package's own embedded model."""
    model = AutoModelForCausalLM.from_pretrained(embedded)
    reference = spikeops.load_gptq(embedded, ABSMAX4)
    ids = torch.randint(0, 256, (2, 48))
    assert model.dtype == torch.float32 and not model.training
    assert isinstance(model.model.layers[0].mlp.down_proj, spikeops.SpikeLinear)
    assert encodings(model) == encodings(reference)
    assert torch.equal(logits(model, ids), logits(reference, ids))
    assert torch.equal(logits(model, ids), logits(spikeops.load_gptq(DEFAULT_MODEL, ABSMAX4), ids))
    assert model.config.quantization_config.encoding == "absmax4"
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def test_save_gptq_writes_the_method(tiny_qwen2):
    config = json.loads((tiny_qwen2 / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "spikeops"
    assert config["quantization_config"]["encoding"] == "minmax4"
    # GPTQ readers (AutoGPTQ, GPTQModel) read quantize_config.json first: still GPTQ.
    assert json.loads((tiny_qwen2 / "quantize_config.json").read_text())["quant_method"] == "gptq"


def test_qwen2_is_load_gptqs(tiny_qwen2):
    ids = torch.randint(0, SIZES["vocab_size"], (2, 11))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert torch.equal(logits(model, ids), logits(spikeops.load_gptq(tiny_qwen2, MINMAX4), ids))


def test_override_encoding_calibration_and_dtype(embedded):
    """quantization_config=SpikeopsConfig(...) overrides the encoding and the calibration,
    dtype= the dtype; each gives load_gptq's model of the same arguments."""
    ids = torch.randint(0, 256, (1, 33))
    config = spikeops.SpikeopsConfig(encoding="down_proj=minmax8;*=absmean4", calibration="none")
    model = AutoModelForCausalLM.from_pretrained(embedded, quantization_config=config,
                                                 dtype=torch.bfloat16)
    enc = {"down_proj": spikeops.Encoding("minmax", 8), "*": spikeops.Encoding("absmean", 4)}
    reference = spikeops.load_gptq(embedded, enc, dtype=torch.bfloat16, calibration=None)
    assert model.dtype == torch.bfloat16
    assert encodings(model) == encodings(reference)
    assert torch.equal(logits(model, ids), logits(reference, ids))
    float_acts = AutoModelForCausalLM.from_pretrained(
        embedded, quantization_config=spikeops.SpikeopsConfig(encoding="none"))
    assert torch.equal(logits(float_acts, ids), logits(spikeops.load_gptq(embedded, None), ids))


def test_old_checkpoint_with_a_config_passed(tiny_qwen2, tmp_path):
    """A checkpoint whose config.json has no quantization_config (its GPTQ config only in
    quantize_config.json) loads when the user passes the spikeops config."""
    old = tmp_path / "old"
    shutil.copytree(tiny_qwen2, old)
    edit_config(old, lambda c: c.pop("quantization_config"))
    ids = torch.randint(0, SIZES["vocab_size"], (1, 7))
    model = AutoModelForCausalLM.from_pretrained(
        old, quantization_config=spikeops.SpikeopsConfig(encoding="absmax4"))
    assert torch.equal(logits(model, ids), logits(spikeops.load_gptq(old, ABSMAX4), ids))


def test_generate(embedded):
    """transformers' generate runs the spiking model: greedy tokens are the argmax of
    load_gptq's logits, step by step."""
    model = AutoModelForCausalLM.from_pretrained(embedded)
    reference = spikeops.load_gptq(embedded, ABSMAX4)
    prompt = torch.tensor([[100, 101, 102, 32, 40]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ids = prompt
    for _ in range(4):
        ids = torch.cat([ids, logits(reference, ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"device_map": "auto"}, ValueError, ["device_map='auto'", "refused"]),
    ({"device_map": {"model.layers.0": "cpu"}}, ValueError, ["device_map", "''"]),
    ({"device_map": {"": "disk"}}, ValueError, ["disk", "offloading"]),
    ({"dtype": torch.float64}, TypeError, ["dtype", "torch.float64"]),
    ({"rms_norm_eps": 0.5}, ValueError, ["rms_norm_eps", "0.5", "config.json"]),
    ({"quantization_config": {"bits": 8}}, ValueError, ["bits", "disagrees"]),
    ({"quantization_config": {"encoding": "spiky4"}}, ValueError, ["encoding", "spiky4"]),
    ({"quantization_config": {"encoding": "oat8", "calibration": "none"}}, ValueError,
     ["oat8", "calibration"]),
])
def test_refused_arguments(embedded, kwargs, error, words):
    if isinstance(kwargs.get("quantization_config"), dict):
        config = kwargs["quantization_config"]
        if "encoding" in config and config["encoding"] == "spiky4":
            # A malformed encoding is refused when the config is made.
            with pytest.raises(ValueError, match="spiky4"):
                spikeops.SpikeopsConfig(**config)
            return
        kwargs = {"quantization_config": spikeops.SpikeopsConfig(**config)}
    with pytest.raises(error) as e:
        AutoModelForCausalLM.from_pretrained(embedded, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cpu_half_precision_is_announced(embedded, caplog):
    with caplog.at_level("WARNING", logger="spikeops"):
        model = AutoModelForCausalLM.from_pretrained(embedded, dtype=torch.float16)
    assert model.dtype == torch.float16
    assert any("float16 on the CPU" in r.getMessage() for r in caplog.records)


def test_unsupported_architecture_refused(tiny_qwen2, tmp_path):
    other = tmp_path / "qwen3"
    shutil.copytree(tiny_qwen2, other)
    edit_config(other, lambda c: c.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(ValueError, match="model_type 'qwen3'"):
        AutoModelForCausalLM.from_pretrained(other)


def test_encoding_missing_refused(embedded, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(embedded, bare)
    edit_config(bare, lambda c: c["quantization_config"].pop("encoding"))
    with pytest.raises(ValueError, match="must give 'encoding'"):
        AutoModelForCausalLM.from_pretrained(bare)


def assert_round_trip(model, saved, spec, ids):
    """from_pretrained and load_gptq of the saved folder (its recorded encoding, its saved
    calibration) give the model's logits bit for bit."""
    config = json.loads((saved / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "spikeops"
    assert config["quantization_config"]["encoding"] == spec
    calibration = load_calibration(saved)
    want = logits(model, ids)
    again = AutoModelForCausalLM.from_pretrained(saved)
    assert encodings(again) == encodings(model)
    assert torch.equal(logits(again, ids), want)
    loaded = spikeops.load_gptq(saved, parse_encoding(spec, calibration))
    assert torch.equal(logits(loaded, ids), want)


def assert_same_calibration(got, want):
    assert got.settings == want.settings and got.layers.keys() == want.layers.keys()
    for name, layer in want.layers.items():
        other = got.layers[name]
        assert (other.gamma, other.theta) == (layer.gamma, layer.theta), name
        assert (other.salient is None) == (layer.salient is None), name
        assert layer.salient is None or torch.equal(other.salient, layer.salient), name


def test_save_pretrained_round_trip(embedded, tmp_path):
    """The embedded model on salient channels (its calibration's masks and gamma): the saved
    folder holds the checkpoint's GPTQ tensors as they were, the calibration, and loads into
    the same model; after set_encoding, the encoding it runs is recorded when named."""
    spec = "down_proj=minmax8;*=absmax4+s6"
    model = AutoModelForCausalLM.from_pretrained(
        embedded, quantization_config=spikeops.SpikeopsConfig(encoding=spec))
    ids = torch.randint(0, 256, (2, 40))
    saved = model.save_pretrained(tmp_path / "saved")
    assert saved == tmp_path / "saved"
    assert sorted(p.name for p in saved.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "quantize_config.json",
        "spikeops_calibration.json", "spikeops_calibration.safetensors"]
    original, written = read_tensors("test", embedded), read_tensors("test", saved)
    for key, t in original.items():
        if key.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(written[key], t) and written[key].dtype == t.dtype, key
    assert json.loads((saved / "quantize_config.json").read_text())["quant_method"] == "gptq"
    assert_same_calibration(load_calibration(saved), load_calibration(embedded))
    assert_round_trip(model, saved, spec, ids)

    set_encoding(model, spikeops.Encoding("minmax", 8))
    with pytest.raises(ValueError, match="runs Encoding"):
        model.save_pretrained(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    assert_round_trip(model, model.save_pretrained(tmp_path / "other", encoding="minmax8"),
                      "minmax8", ids)


def test_save_pretrained_keeps_the_rotation(tmp_path):
    """A rotated Qwen2 (online rotation of down_proj inputs, recorded in config.json), on an
    encoding that reads the calibration saved beside it: saved and loaded, the same logits."""
    model = qwen2()
    transform(model, "rotate")
    ids = torch.randint(0, SIZES["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(5))
    spikeops.quantize(model, ids, bits=4, group_size=16, path=tmp_path / "q")
    calibrate(spikeops.load_gptq(tmp_path / "q", None), ids.split(1)).save(tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=spikeops.SpikeopsConfig(encoding="oat8"))
    saved = loaded.save_pretrained(tmp_path / "saved")
    record = json.loads((saved / "config.json").read_text())[CONFIG_KEY]
    assert record == json.loads((tmp_path / "q" / "config.json").read_text())[CONFIG_KEY]
    assert record["kind"] == "rotate"
    assert_round_trip(loaded, saved, "oat8", ids[:2, :9])
    # Without its online rotation the model computes something else: refused, not saved.
    down = loaded.model.layers[1].mlp.down_proj
    hook = next(k for k, h in down._forward_pre_hooks.items() if h is online_rotation(down))
    del down._forward_pre_hooks[hook]
    with pytest.raises(ValueError, match="layer 1's down_proj has no online rotation"):
        loaded.save_pretrained(tmp_path / "unrotated")


def test_save_pretrained_refusals_leave_folders_as_they_were(embedded, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(embedded)
    with pytest.raises(ValueError, match="loaded from"):
        model.save_pretrained(embedded)
    with pytest.raises(ValueError, match="inside the installed spikeops package"):
        model.save_pretrained(DEFAULT_MODEL.parent / "saved")
    with pytest.raises(TypeError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    set_encoding(model, ABSMAX4, calibration=calibrate_nothing(model))
    with pytest.raises(ValueError, match="another calibration"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # Without a calibration (dropped since loading), none is written.
    set_encoding(model, ABSMAX4, calibration=None)
    uncalibrated = model.save_pretrained(tmp_path / "uncalibrated")
    assert not (uncalibrated / "spikeops_calibration.json").exists()
    assert_round_trip(model, uncalibrated, "absmax4", torch.randint(0, 256, (1, 20)))
    # A save that fails while writing leaves the folder of an earlier save whole.
    model = AutoModelForCausalLM.from_pretrained(embedded)
    saved = model.save_pretrained(tmp_path / "saved")
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def full_disk(self, folder):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(spikeops.calibrate.Calibration, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert not model.save_pretrained(tmp_path / "nothing", is_main_process=False).exists()


def calibrate_nothing(model):
    """A calibration other than the loaded one: every layer's entry empty."""
    from spikeops.calibrate import Calibration, LayerCalibration
    return Calibration({name: LayerCalibration() for name in spike_layers(model)}, {})


def word_tokenizer(words):
    """A real transformers tokenizer of whole words (tokenizers' WordLevel), ids in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")


def test_pipeline_text_generation(tmp_path):
    """pipeline("text-generation") on a folder holding a tiny LLaMA quantized by spikeops and
    its word tokenizer: the greedy text is spikeops' generate's tokens decoded; the pipeline's
    save_pretrained writes a folder that generates the same."""
    from transformers import LlamaConfig, LlamaForCausalLM, pipeline
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(SIZES["vocab_size"] - 4)]
    tokenizer = word_tokenizer(words)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**SIZES, bos_token_id=1, eos_token_id=2)).eval()
    ids = torch.randint(4, SIZES["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(1))
    spikeops.quantize(dense, ids, bits=4, group_size=16, path=tmp_path / "q")
    tokenizer.save_pretrained(tmp_path / "q")
    prompt = "w5 w17 w3 w40"
    pipe = pipeline("text-generation", model=str(tmp_path / "q"))
    assert isinstance(pipe.model.model.layers[0].mlp.up_proj, spikeops.SpikeLinear)
    greedy = dict(max_new_tokens=6, do_sample=False, return_full_text=False)
    text = pipe(prompt, **greedy)[0]["generated_text"]
    prompt_ids = torch.tensor(tokenizer(prompt)["input_ids"])
    # The folder's generation config ends a text at </s> (id 2), as the pipeline does.
    new = generate(spikeops.load_gptq(tmp_path / "q", MINMAX4), prompt_ids, 6, stop=(2,))
    assert len(new) > 0 and text == tokenizer.decode(new.tolist()), text
    pipe.save_pretrained(tmp_path / "saved")
    again = pipeline("text-generation", model=str(tmp_path / "saved"))
    assert again(prompt, **greedy)[0]["generated_text"] == text


def test_config_validation():
    with pytest.raises(ValueError, match="calibration"):
        spikeops.SpikeopsConfig(encoding="absmax4", calibration="latest")
    with pytest.raises(ValueError, match="bits"):
        spikeops.SpikeopsConfig(bits=5)
    with pytest.raises(TypeError, match="encoding must be a str"):
        spikeops.SpikeopsConfig(encoding=4)
    config = spikeops.SpikeopsConfig(encoding="absmax4")
    assert config.get_loading_attributes() == {"encoding": "absmax4", "calibration": "saved"}
    spikeops.register_with_transformers()  # again: nothing changes
