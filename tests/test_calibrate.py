"""Calibration of the seed methods (OBS saliency, SDLLM gamma, LAS thresholds), its files, and
switching encodings with it, on the tiny GPTQ LLaMA of conftest.py."""

import json
import math

import pytest
import torch

import spikeops
from helpers import tiny_batches
from spikeops.calibrate import Calibration, calibrate, set_encoding
from spikeops.checkpoint import CALIBRATION_FILE, CALIBRATION_MASK_FILE
from spikeops.nn import spike_layers

MINMAX4 = spikeops.Encoding("minmax", 4)


def test_calibration_values_and_round_trip(model, calibration, tmp_path):
    cal = calibration
    layers = spike_layers(model)
    assert set(cal.layers) == set(layers)
    for name, c in cal.layers.items():
        K = layers[name].in_features
        assert c.salient.dtype == torch.bool and int(c.salient.sum()) == math.ceil(0.1 * K)
        assert set(c.gamma) == {"minmax", "absmax", "absmean"}
        assert all(0 < g <= 1 for g in c.gamma.values()) and c.gamma_bits == 4
        assert 0 < c.theta[0] < c.theta[1]
    moments = {n for n, c in cal.layers.items() if c.query_moment is not None}
    assert moments == {n for n in layers if n.endswith("self_attn.q_proj")}
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    for name, c in cal.layers.items():
        d = back.layers[name]
        assert torch.equal(c.salient, d.salient) and c.gamma == d.gamma and c.theta == d.theta
        assert d.gamma_bits == 4
        assert (d.query_moment is None) == (name not in moments)
        if name in moments:
            assert torch.equal(c.query_moment, d.query_moment)
    assert back.settings == cal.settings


def test_query_moments_are_the_queries_second_moment(model, calibration):
    """Method kv: each layer's query moment is the mean of q^T q per kv head over its query
    heads and the batches' tokens, q the queries after the rotary embedding on float
    activations, computed here independently through transformers' own modules and
    apply_rotary_pos_emb, in float64."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    config = model.config
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = config.hidden_size // H
    set_encoding(model, None)
    sums, count = [0] * len(model.model.layers), 0
    with torch.no_grad():
        for ids in tiny_batches():
            out = model(input_ids=ids, output_hidden_states=True)
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
            count += ids.numel() * (H // Hkv)
            for i, layer in enumerate(model.model.layers):
                h = layer.input_layernorm(out.hidden_states[i])
                q = layer.self_attn.q_proj(h).view(1, -1, H, D).transpose(1, 2)
                cos, sin = model.model.rotary_emb(h, positions)
                q, _ = apply_rotary_pos_emb(q, q, cos, sin)
                rows = q.double()[0].reshape(Hkv, -1, D)  # heads h // (H / Hkv) together
                sums[i] = sums[i] + rows.transpose(1, 2) @ rows
    for i, want in enumerate(sums):
        got = calibration.layers[f"model.layers.{i}.self_attn.q_proj"].query_moment
        assert got.dtype == torch.float32 and got.shape == (Hkv, D, D)
        want = want / count
        torch.testing.assert_close(got.double(), want, rtol=1e-4,
                                   atol=1e-6 * float(want.abs().max()))


def test_runner_codes_keys_with_the_calibrated_moments(model, calibration):
    """load_gptq / set_encoding give q_proj its calibration; a Runner with a spiking cache takes
    the query moments from there (no announcement) and codes keys with feedback."""
    import warnings
    from spikeops.runner import Runner
    set_encoding(model, MINMAX4, calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner = Runner(model, max_len=16, kv="spike4")
    runner(tiny_batches()[0][:, :12])
    assert all(kv.key_feedback is not None for kv in runner.spike_kv)
    first = runner.spike_kv[0]
    assert torch.equal(first.query_moment.float(),
                       calibration.layers["model.layers.0.self_attn.q_proj"].query_moment)


def test_malformed_query_moment_is_refused(model, tmp_path):
    from safetensors.torch import load_file, save_file
    calibrate(model, tiny_batches(), methods=["kv"]).save(tmp_path)
    raw = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    raw["masks_sha256"] = None
    (tmp_path / CALIBRATION_FILE).write_text(json.dumps(raw))
    good = load_file(str(tmp_path / CALIBRATION_MASK_FILE))
    key = next(iter(good))
    for bad in (good[key].double(), good[key][0], good[key] * float("nan"),
                good[key][:, :, :-1]):
        save_file({**good, key: bad.contiguous()}, str(tmp_path / CALIBRATION_MASK_FILE))
        with pytest.raises(ValueError, match="query_moment must be a finite float32"):
            Calibration.load(tmp_path)
    save_file({k: v for k, v in good.items() if k != key}, str(tmp_path / CALIBRATION_MASK_FILE))
    with pytest.raises(ValueError, match="lacks tensor"):
        Calibration.load(tmp_path)


def test_gamma_fills_only_its_bit_width(model, calibration):
    """The gamma searched for 4-bit spikes fills 4-bit encodings of every mode; 8-bit ones run
    unclipped (docs/research.md)."""
    from spikeops.calibrate import encodings
    name, c = next(iter(calibration.layers.items()))
    for mode in ("minmax", "absmax", "absmean"):
        set_encoding(model, spikeops.Encoding(mode, 4), calibration)
        assert encodings(model)[name].gamma == c.gamma[mode]
        with pytest.warns(UserWarning, match=f"searched for 4-bit spikes per token, so "
                                             f"{mode}8 runs there unclipped"):
            set_encoding(model, spikeops.Encoding(mode, 8), calibration)
        assert encodings(model)[name].gamma == 1.0


def test_gamma_fills_only_its_activation_group(model, calibration):
    """The gamma searched per token does not fill grouped encodings (announced), and one
    searched for groups of 32 fills exactly those (docs/research.md)."""
    from spikeops.calibrate import encodings
    name = next(iter(calibration.layers))
    with pytest.warns(UserWarning, match="absmax4g32 runs there unclipped"):
        set_encoding(model, spikeops.Encoding("absmax", 4, group=32), calibration)
    assert encodings(model)[name].gamma == 1.0
    grouped = calibrate(model, tiny_batches(), methods=["sdllm"], groups=(32,),
                        gamma_grid=(0.5, 0.75, 1.0))
    assert grouped.settings["groups"] == [32]
    set_encoding(model, spikeops.Encoding("absmax", 4, group=32), grouped)
    assert encodings(model)[name].gamma == grouped.layers[name].gamma["absmaxg32"]
    with pytest.warns(UserWarning, match="in groups of 32 channels, so absmax4 runs"):
        set_encoding(model, spikeops.Encoding("absmax", 4), grouped)
    # One calibration for both: a gamma per mode and grouping, each filling its own encodings.
    both = calibrate(model, tiny_batches(), methods=["sdllm"], groups=(0, 32),
                     gamma_grid=(0.5, 0.75, 1.0))
    assert set(both.layers[name].gamma) == {"minmax", "absmax", "absmean", "minmaxg32",
                                             "absmaxg32", "absmeang32"}
    assert both.layers[name].gamma["absmaxg32"] == grouped.layers[name].gamma["absmaxg32"]
    for group in (0, 32):
        set_encoding(model, spikeops.Encoding("absmax", 4, group=group), both)
        assert encodings(model)[name].gamma == both.layers[name].gamma[
            "absmaxg32" if group else "absmax"]
    with pytest.warns(UserWarning, match="per token and in groups of 32 channels, so minmax8g32"):
        set_encoding(model, spikeops.Encoding("minmax", 8, group=32), both)
    for bad in ((48,), (0, 0), ()):
        with pytest.raises(ValueError, match="groups must hold"):
            calibrate(model, tiny_batches(), methods=["sdllm"], groups=bad)


def test_obs_saliency_is_the_first_order_term(model):
    """Independent recomputation for one layer: mean over tokens of (X W^T W) * X."""
    from spikeops.calibrate import collect_inputs
    name = "model.layers.1.mlp.down_proj"
    layer = spike_layers(model)[name]
    x = collect_inputs(model, tiny_batches())[name].double()
    W = layer.dequantize().double()
    saliency = ((x @ W.t() @ W) * x).mean(0)
    top = saliency.topk(math.ceil(0.1 * layer.in_features)).indices
    cal = calibrate(model, tiny_batches(), methods=["obs"])
    assert torch.equal(cal.layers[name].salient.nonzero().flatten().sort().values,
                       top.sort().values)
    assert cal.layers[name].gamma is None and cal.layers[name].theta is None


def test_sdllm_gamma_minimises_the_layer_error(model):
    """The chosen gamma minimises the layer's output error on spikes, computed here with the
    spiking layer itself (the search uses the decoded spikes; the two agree within the kernel's
    tolerance, so only a near-tie could pick another gamma)."""
    from spikeops.calibrate import GAMMA_GRID, collect_inputs
    cal = calibrate(model, tiny_batches(), methods=["sdllm"], bits=3)
    assert cal.settings["gamma_grid"] == list(GAMMA_GRID) and cal.settings["tokens"] == 256
    name = "model.layers.0.self_attn.q_proj"
    layer = spike_layers(model)[name]
    x = collect_inputs(model, tiny_batches(), 512)[name]
    y = x @ layer.dequantize().float().t()
    for mode in ("absmax", "absmean"):
        errors = {g: float((layer.from_spikes(spikeops.encode(x, spikeops.Encoding(
            mode, 3, gamma=g)), torch.float32, bias=False) - y).pow(2).sum()) for g in GAMMA_GRID}
        assert errors[cal.layers[name].gamma[mode]] <= min(errors.values()) * (1 + 1e-4)


def test_malformed_calibration_is_refused(model, tmp_path):
    calibrate(model, tiny_batches(), methods=["las"]).save(tmp_path)
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
    loaded = spikeops.load_gptq(folder, spikeops.Encoding("oat", 8))
    for name, layer in spike_layers(loaded).items():
        assert layer.enc.theta == cal.layers[name].theta


# ----------------------------------------------------------------------------- damaged calibrations
def test_interrupted_calibration_save_never_mixes(folder):
    model = spikeops.load_gptq(folder, MINMAX4)
    old = calibrate(model, tiny_batches(), methods=["obs"], salient_fraction=0.1)
    new = calibrate(model, tiny_batches(), methods=["obs"], salient_fraction=0.3)
    old.save(folder)
    json_before = (folder / CALIBRATION_FILE).read_text()
    new.save(folder)
    (folder / CALIBRATION_FILE).write_text(json_before)  # as if the new JSON had not landed
    with pytest.raises(ValueError, match="interrupted or mixed"):
        Calibration.load(folder)
    new.save(folder)
    loaded = Calibration.load(folder)
    name = next(iter(new.layers))
    assert torch.equal(loaded.layers[name].salient, new.layers[name].salient)


def test_malformed_calibrations_raise_value_error(folder):
    model = spikeops.load_gptq(folder, MINMAX4)
    calibrate(model, tiny_batches(), methods=["obs", "las"]).save(folder)
    good_json, good_masks = (folder / CALIBRATION_FILE).read_text(), (folder / CALIBRATION_MASK_FILE).read_bytes()
    name = next(iter(json.loads(good_json)["layers"]))

    def layers_with(entry):
        raw = json.loads(good_json)
        raw["layers"][name] = entry
        raw.pop("masks_sha256")
        return json.dumps(raw)

    cases = [(CALIBRATION_FILE, layers_with(5)), (CALIBRATION_FILE, layers_with(None)),
             (CALIBRATION_FILE, layers_with({"theta": ["a", "b"]})),
             (CALIBRATION_FILE, b"\xff\xfe not utf-8"),
             (CALIBRATION_MASK_FILE, good_masks[: len(good_masks) // 2])]
    for file, content in cases:
        (folder / CALIBRATION_FILE).write_text(good_json)
        (folder / CALIBRATION_MASK_FILE).write_bytes(good_masks)
        if file == CALIBRATION_MASK_FILE:  # a damaged mask file under a JSON without its hash
            raw = json.loads(good_json)
            raw.pop("masks_sha256")
            (folder / CALIBRATION_FILE).write_text(json.dumps(raw))
        target = folder / file
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        with pytest.raises(ValueError):
            Calibration.load(folder)
    from safetensors.torch import load_file, save_file
    (folder / CALIBRATION_FILE).write_text(json.dumps({**json.loads(good_json), "masks_sha256": None}))
    (folder / CALIBRATION_MASK_FILE).write_bytes(good_masks)
    masks = {k: v.float() * 0.5 for k, v in load_file(str(folder / CALIBRATION_MASK_FILE)).items()}
    save_file(masks, str(folder / CALIBRATION_MASK_FILE))
    with pytest.raises(ValueError, match="uint8"):
        Calibration.load(folder)


def test_calibrate_and_quantize_check_their_token_ids(checkpoint, folder):
    model = spikeops.load_gptq(folder, MINMAX4)
    for batches, error in [(torch.full((1, 8), 999), ValueError),
                           (torch.rand(1, 8), TypeError), ([1, 2, 3], TypeError)]:
        with pytest.raises(error, match="batches"):
            calibrate(model, batches)
    for max_tokens, error in [(0, ValueError), (2.5, TypeError)]:
        with pytest.raises(error, match="max_tokens"):
            calibrate(model, tiny_batches(), max_tokens=max_tokens)
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    with pytest.raises(ValueError, match="calib_inputs"):
        spikeops.quantize(dense, torch.full((1, 8), 999))
    with torch.no_grad():
        dense.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        spikeops.quantize(dense, tiny_batches()[0])
