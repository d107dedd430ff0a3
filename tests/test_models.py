"""Calibration of the seed methods, switching encodings, evaluation and the command line, on a
tiny GPTQ LLaMA written in a temporary folder."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import spikeops
from spikeops import __main__ as cli
from spikeops.calibrate import Calibration, calibrate, set_encoding, spike_layers
from spikeops.evaluate import compare, decode_tokens, encode_text, generate, perplexity

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(120))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    dense = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("tiny")
    dense.save_pretrained(root / "fp")
    (root / "text.txt").write_text(TEXT)
    ids = encode_text(TEXT)[:1024].reshape(4, 256)
    spikeops.save_gptq(dense, spikeops.quantize(dense, ids, bits=4, group_size=32), root / "q")
    return root


@pytest.fixture
def model(checkpoint):
    return spikeops.load_gptq(checkpoint / "q", spikeops.Encoding("minmax", 4))


def batches():
    return encode_text(TEXT)[:256].reshape(2, 128).split(1)


@pytest.fixture(scope="module")
def calibration(checkpoint):
    model = spikeops.load_gptq(checkpoint / "q", spikeops.Encoding("minmax", 4))
    return calibrate(model, batches(), salient_fraction=0.1)


def test_calibration_values_and_round_trip(model, calibration, tmp_path):
    cal = calibration
    layers = spike_layers(model)
    assert set(cal.layers) == set(layers)
    for name, c in cal.layers.items():
        K = layers[name].in_features
        assert c.salient.dtype == torch.bool and int(c.salient.sum()) == math.ceil(0.1 * K)
        assert set(c.gamma) == {"absmax", "absmean"} and all(0 < g <= 1 for g in c.gamma.values())
        assert 0 < c.theta[0] < c.theta[1]
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    for name, c in cal.layers.items():
        d = back.layers[name]
        assert torch.equal(c.salient, d.salient) and c.gamma == d.gamma and c.theta == d.theta
    assert back.settings == cal.settings


def test_obs_saliency_is_the_first_order_term(model):
    """Independent recomputation for one layer: mean over tokens of (X W^T W) * X."""
    from spikeops.calibrate import collect_inputs
    name = "model.layers.1.mlp.down_proj"
    layer = spike_layers(model)[name]
    x = collect_inputs(model, batches())[name].double()
    W = layer.dequantize().double()
    saliency = ((x @ W.t() @ W) * x).mean(0)
    top = saliency.topk(math.ceil(0.1 * layer.in_features)).indices
    cal = calibrate(model, batches(), methods=["obs"])
    assert torch.equal(cal.layers[name].salient.nonzero().flatten().sort().values,
                       top.sort().values)
    assert cal.layers[name].gamma is None and cal.layers[name].theta is None


def test_sdllm_gamma_minimises_the_layer_error(model):
    from spikeops.calibrate import GAMMA_GRID, _dense_weight, _layer_error, collect_inputs
    cal = calibrate(model, batches(), methods=["sdllm"], bits=3)
    name = "model.layers.0.self_attn.q_proj"
    layer = spike_layers(model)[name]
    x = collect_inputs(model, batches(), 2048)[name]
    y = x @ _dense_weight(layer).t()
    for mode in ("absmax", "absmean"):
        errors = {g: _layer_error(layer, x, spikeops.Encoding(mode, 3, gamma=g), y)
                  for g in GAMMA_GRID}
        assert errors[cal.layers[name].gamma[mode]] == min(errors.values())


def test_malformed_calibration_is_refused(model, tmp_path):
    calibrate(model, batches(), methods=["las"]).save(tmp_path)
    raw = json.loads((tmp_path / "spikeops_calibration.json").read_text())
    name = next(iter(raw["layers"]))
    raw["layers"][name]["theta"] = [2.0, 1.0]
    (tmp_path / "spikeops_calibration.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="theta"):
        Calibration.load(tmp_path)
    (tmp_path / "spikeops_calibration.json").write_text("{not json")
    with pytest.raises(ValueError, match="spikeops_calibration.json"):
        Calibration.load(tmp_path)


def test_set_encoding_and_load_apply_the_calibration(checkpoint, model, calibration, tmp_path):
    cal = calibration
    set_encoding(model, spikeops.Encoding("absmax", 4, salient_bits=6), cal)
    for name, layer in spike_layers(model).items():
        assert layer.enc.gamma == cal.layers[name].gamma["absmax"]
        assert torch.equal(layer.salient_mask, cal.layers[name].salient)
    set_encoding(model, None)
    assert all(layer.enc is None for layer in spike_layers(model).values())
    with pytest.raises(TypeError, match="enc"):
        set_encoding(model, "minmax4")
    import shutil
    folder = tmp_path / "q"
    shutil.copytree(checkpoint / "q", folder)
    cal.save(folder)
    loaded = spikeops.load_gptq(folder, spikeops.Encoding("oat", theta=(1.0, 2.0), planes=8))
    for name, layer in spike_layers(loaded).items():
        assert layer.enc.theta == cal.layers[name].theta


@torch.no_grad()
def test_perplexity_windows(model):
    tokens = encode_text(TEXT)[:300]
    set_encoding(model, None)
    logits = model(input_ids=tokens[None]).logits[0, :-1].float()
    full = math.exp(float(F.cross_entropy(logits, tokens[1:])))
    assert perplexity(model, tokens, window=512, progress=False) == pytest.approx(full, rel=1e-5)
    slid = perplexity(model, tokens, window=64, stride=32, progress=False)
    assert math.isfinite(slid) and slid == pytest.approx(full, rel=0.2)


@torch.no_grad()
def test_generate_greedy_matches_full_recompute(model):
    prompt = encode_text("def f1(x):\n")
    out = generate(model, prompt, 12)
    ids = prompt.clone()
    for _ in range(12):  # no cache: the whole sequence every step
        ids = torch.cat([ids, model(input_ids=ids[None]).logits[0, -1].argmax().view(1)])
    assert torch.equal(out, ids[prompt.shape[0]:])
    assert isinstance(decode_tokens(out), str)
    sampled = generate(model, prompt, 8, temperature=0.8, top_k=5, seed=1)
    assert torch.equal(sampled, generate(model, prompt, 8, temperature=0.8, top_k=5, seed=1))


def test_compare_and_firing_rates(model):
    tokens = encode_text(TEXT)[:400]
    encodings = {"float": None, "minmax4": spikeops.Encoding("minmax", 4),
                 "absmax4": spikeops.Encoding("absmax", 4)}
    rows = compare(model, tokens, encodings, window=128, progress=False)
    assert [r[0] for r in rows] == list(encodings) and rows[0][2] is None
    assert all(math.isfinite(r[1]) for r in rows) and 0 < rows[1][2] < 1
    set_encoding(model, spikeops.Encoding("minmax", 4))
    with spikeops.track(model) as tracker:
        model(input_ids=tokens[None, :50])
    up = next(r for r in tracker.layers() if r.name == "model.layers.0.mlp.up_proj")
    assert up.tokens == 50 and up.P == 4 and 0 < up.firing_rate < 1
    assert all(layer.observer is None for layer in spike_layers(model).values())


def test_cli(checkpoint, tmp_path, capsys):
    text = str(checkpoint / "text.txt")
    out = tmp_path / "q3"
    assert cli.main(["quantize", str(checkpoint / "fp"), str(out), "--text", text, "--bits", "3",
                     "--group-size", "32", "--samples", "4", "--seq-len", "128"]) == 0
    assert cli.main(["calibrate", str(out), "--text", text, "--samples", "2",
                     "--seq-len", "128"]) == 0
    assert cli.main(["eval", str(out), "--text", text, "--max-tokens", "600",
                     "--encodings", "minmax4,absmax4+s6,oat8", "--dense",
                     str(checkpoint / "fp")]) == 0
    table = capsys.readouterr().out
    for label in ("dense float", "GPTQ, float activations", "minmax4", "absmax4+s6", "oat8"):
        assert label in table
    assert cli.main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    assert cli.main(["eval", str(checkpoint / "q"), "--text", text, "--encodings", "oat8"]) == 2
    assert "calibration" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "missing")])


def test_demo_on_the_embedded_model(capsys):
    """The README's main command, smaller: the shipped checkpoint loads, with its calibration,
    and every encoding stays close to the dense model's perplexity but absmean (docs)."""
    assert cli.DEFAULT_MODEL.is_dir() and cli.DEFAULT_DENSE.is_dir() and cli.DEFAULT_TEXT.is_file()
    assert cli.main(["demo", "--max-tokens", "512", "--in-features", "256",
                     "--out-features", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line[:32].strip(): line[32:].split() for line in out.splitlines()
            if line[:32].strip() in ("dense float", "GPTQ, float activations", "minmax4",
                                     "minmax4+s6", "absmax4", "oat8")}
    dense = float(rows["dense float"][0])
    assert 1 < dense < 8  # a trained byte-level model, far below the unigram 23
    for label in ("GPTQ, float activations", "minmax4", "minmax4+s6", "absmax4", "oat8"):
        assert float(rows[label][0]) < 1.25 * dense, label
    assert "spec ok" in out and " NO " not in out


@torch.no_grad()
def test_device_map(checkpoint):
    """Placed modules keep the model's results; bad keys and devices are refused."""
    enc = spikeops.Encoding("absmax", 4)
    ids = encode_text(TEXT)[:64][None]
    plain = spikeops.load_gptq(checkpoint / "q", enc)(input_ids=ids).logits
    mapped = spikeops.load_gptq(checkpoint / "q", enc, device_map={
        "model.layers.1": "cpu", "model.layers.1.mlp": "cpu", "lm_head": "cpu"})
    assert torch.equal(mapped(input_ids=ids).logits, plain)
    with pytest.raises(ValueError, match="device_map key 'model.layers.9'"):
        spikeops.load_gptq(checkpoint / "q", enc, device_map={"model.layers.9": "cpu"})
    with pytest.raises(ValueError, match="device"):
        spikeops.load_gptq(checkpoint / "q", enc, device_map={"lm_head": "tpu:7"})
    with pytest.raises(TypeError, match="device_map"):
        spikeops.load_gptq(checkpoint / "q", enc, device_map=["lm_head"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@torch.no_grad()
def test_device_map_across_devices(checkpoint):
    """Layer 0 on the CPU, layer 1 and the head on the GPU: the spiking model gives the logits of
    the all-CPU model (up to float accumulation order in attention), and generates with its
    key-value cache spread over both devices."""
    from helpers import CUDA_REASON, cuda_ready
    if not cuda_ready():
        pytest.skip(CUDA_REASON)
    enc = spikeops.Encoding("minmax", 4)
    ids = encode_text(TEXT)[:64][None]
    cpu = spikeops.load_gptq(checkpoint / "q", enc)
    split = spikeops.load_gptq(checkpoint / "q", enc, device_map={
        "model.layers.1": "cuda", "model.norm": "cuda", "lm_head": "cuda"})
    assert split.model.layers[1].mlp.up_proj.qweight.is_cuda
    torch.testing.assert_close(split(input_ids=ids).logits.cpu(), cpu(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)
    assert generate(split, encode_text("def f1(x):\n"), 8).shape == (8,)
