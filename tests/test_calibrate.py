"""Calibration of the seed methods (OBS saliency, SDLLM gamma, LAS thresholds), its files, and
switching encodings with it, on the tiny GPTQ LLaMA of conftest.py."""

import json
import math

import pytest
import torch

import spikeops
from helpers import tiny_batches
from spikeops.calibrate import Calibration, calibrate, set_encoding
from spikeops.nn import spike_layers


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
