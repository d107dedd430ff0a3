"""Evaluation of spiking models: sliding-window perplexity, cached generation, the comparison
table and firing rates, on the tiny GPTQ LLaMA of conftest.py."""

import math

import pytest
import torch
import torch.nn.functional as F

import spikeops
from helpers import TEXT
from spikeops.calibrate import set_encoding
from spikeops.nn import spike_layers
from spikeops.evaluate import compare, decode_tokens, encode_text, generate, perplexity


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
    assert [r.encoding for r in rows] == list(encodings) and all(r.tokens == 400 for r in rows)
    assert rows[0].firing_rate is None and rows[0].sops_per_mac is None
    assert all(math.isfinite(r.perplexity) for r in rows) and 0 < rows[1].firing_rate < 1
    # SOPs per MAC = sum spikes * N / sum tokens * K * N, the firing rate times P weighted by N
    # instead of 1 (P = 4 planes for minmax4, 3 magnitude planes for absmax4).
    assert rows[1].sops_per_mac == pytest.approx(4 * rows[1].firing_rate, rel=0.05)
    assert rows[2].sops_per_mac == pytest.approx(3 * rows[2].firing_rate, rel=0.05)
    set_encoding(model, None)  # the model on float activations stands in for a dense model
    dense = compare(model, tokens, {}, dense_model=model, window=128, progress=False)
    assert [r.encoding for r in dense] == ["dense"] and dense[0].perplexity == rows[0].perplexity
    set_encoding(model, spikeops.Encoding("minmax", 4))
    with spikeops.track(model) as tracker:
        model(input_ids=tokens[None, :50])
    up = next(r for r in tracker.layers() if r.name == "model.layers.0.mlp.up_proj")
    assert up.tokens == 50 and up.P == 4 and 0 < up.firing_rate < 1
    assert all(layer.observer is None for layer in spike_layers(model).values())


@torch.no_grad()
def test_projections_of_one_input_share_one_encoding(model, monkeypatch):
    """load_gptq groups q/k/v and gate/up: one encoding per activation, identical logits,
    statistics still per projection; layers whose encodings differ encode on their own."""
    import spikeops.nn as nn_module
    calls = []
    real = nn_module.encode_rows
    monkeypatch.setattr(nn_module, "encode_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = encode_text(TEXT)[:64][None]
    layers = spike_layers(model)
    with spikeops.track(model) as tracker:
        shared = model(input_ids=ids).logits
    assert len(calls) == 4 * 2  # per layer: q/k/v once, o, gate/up once, down
    assert len(tracker.layers()) == 7 * 2 and all(r.tokens == 64 for r in tracker.layers())
    # Each projection alone (the group never starts): the same logits from 7 encodings a layer.
    groups = [m for m in model.modules() if isinstance(m, spikeops.nn.ProjectionGroup)]
    assert len(groups) == 2 * 2
    start = spikeops.nn.ProjectionGroup.start
    monkeypatch.setattr(spikeops.nn.ProjectionGroup, "start", lambda self, x: None)
    calls.clear()
    assert torch.equal(model(input_ids=ids).logits, shared) and len(calls) == 7 * 2
    monkeypatch.setattr(spikeops.nn.ProjectionGroup, "start", start)
    assert all(g.spikes is None and g.input is None for g in groups)  # dropped after each call
    layers["model.layers.0.self_attn.k_proj"].set_encoding(spikeops.Encoding("absmax", 4))
    calls.clear()
    model(input_ids=ids)
    assert len(calls) == 4 * 2 + 2  # layer 0's q, k and v each encode
    # Under inference_mode (inference tensors) and through the group's own call alike.
    # Back to q's encoding (minmax4 with its calibrated gamma): shared again.
    layers["model.layers.0.self_attn.k_proj"].set_encoding(
        layers["model.layers.0.self_attn.q_proj"].enc)
    calls.clear()
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, shared)
    assert len(calls) == 4 * 2
    attn = model.model.layers[0].self_attn
    h = torch.randn(3, attn.q_proj.in_features)
    calls.clear()
    assert all(torch.equal(y, m(h)) for y, m in zip(attn.input_group(h), groups[0].members))
    assert len(calls) == 1 + 3


def test_kept_encodings_restores_every_layer_after_an_error(model):
    """compare, calibration and learn_clipping switch layers to float activations or other
    encodings inside spikeops.nn.kept_encodings: each layer gets its Encoding, mask and
    calibration back, also when the block fails."""
    from spikeops.nn import kept_encodings
    layers = spike_layers(model)
    before = {n: (m.enc, m.salient_mask, m.calibration) for n, m in layers.items()}
    with pytest.raises(RuntimeError, match="inside"):
        with kept_encodings(layers, enc=None):
            assert all(m.enc is None for m in layers.values())
            set_encoding(model, spikeops.Encoding("absmax", 8))
            raise RuntimeError("inside")
    assert {n: (m.enc, m.salient_mask, m.calibration) for n, m in layers.items()} == before


def test_rows_report_planes_per_element(model):
    """``Row.planes``: bit planes per activation element, sign and range bits included,
    averaged over the projection inputs by their sizes (docs/research.md, "Planes")."""
    from spikeops.calibrate import Calibration
    from spikeops.calibrate import parse_encoding
    from spikeops.commands import DEFAULT_MODEL
    calibration = Calibration.load(DEFAULT_MODEL)
    specs = ["minmax4", "absmax4", "oat8", "down_proj=minmax8;*=absmax4"]
    rows = compare(model, encode_text(TEXT)[:130], {s: parse_encoding(s, calibration)
                                                    for s in specs} | {"float": None},
                   calibration, progress=False)
    planes = {r.encoding: r.planes for r in rows}
    layers = spike_layers(model).items()
    down = sum(m.in_features for n, m in layers if n.endswith("down_proj"))
    total = sum(m.in_features for _, m in layers)
    assert planes == {"minmax4": 4.0, "absmax4": 4.0, "oat8": 8 + 1 + 1,
                      "down_proj=minmax8;*=absmax4": pytest.approx(4 + 4 * down / total),
                      "float": None}


# ----------------------------------------------------------------------------- kv caches
@torch.no_grad()
def test_perplexity_with_a_spiking_cache_runs_the_runner(model):
    """kv="spike8": one window of 300 tokens is the Runner's logits with that cache; a batch of
    windows of different lengths (the last one shorter, padded at its end) scores each as
    alone; kv="float" stays transformers' forward."""
    from spikeops.runner import Runner
    tokens = encode_text(TEXT)[:300]
    set_encoding(model, spikeops.Encoding("absmax", 4))
    logits = Runner(model, 300, head_dtype=None, kv="spike8")(tokens[None])[0, :-1]
    alone = math.exp(float(F.cross_entropy(logits, tokens[1:])))
    assert perplexity(model, tokens, window=512, progress=False, kv="spike8") == \
        pytest.approx(alone, rel=1e-6)
    slid = perplexity(model, tokens, window=128, progress=False, kv="spike8")
    windows = perplexity(model, tokens, window=128, batch_size=1, progress=False, kv="spike8")
    assert slid == pytest.approx(windows, rel=1e-5)
    assert slid == pytest.approx(perplexity(model, tokens, window=128, progress=False), rel=0.1)
    with pytest.raises(ValueError, match="kv"):
        perplexity(model, tokens, progress=False, kv="spike2")


def test_rows_and_generate_name_the_cache(model):
    tokens = encode_text(TEXT)[:200]
    rows = compare(model, tokens, {"absmax4": spikeops.Encoding("absmax", 4)}, window=128,
                   progress=False, kv="spike4")
    assert [(r.encoding, r.kv) for r in rows] == [("absmax4", "spike4")]
    with pytest.raises(ValueError, match="kv"):
        compare(model, tokens, {}, progress=False, kv="int8")
    out = generate(model, encode_text("def f1(x):\n"), 5, kv="spike4")
    assert out.shape == (5,)
    with pytest.raises(ValueError, match="kv"):
        generate(model, encode_text("def "), 2, kv="spike")


def test_eval_and_generate_take_kv(checkpoint, tmp_path, capsys):
    import json

    from spikeops.cli import main
    out = tmp_path / "rows.json"
    assert main(["eval", str(checkpoint / "q"), "--text", str(checkpoint / "text.txt"),
                 "--encodings", "absmax4", "--max-tokens", "300", "--window", "128",
                 "--kv", "spike8", "--json", str(out)]) == 0
    assert [r["kv"] for r in json.loads(out.read_text())] == ["spike8", "spike8"]
    assert main(["generate", str(checkpoint / "q"), "--prompt", "def f", "--encoding", "absmax4",
                 "--max-new-tokens", "4", "--kv", "spike4"]) == 0
    assert capsys.readouterr().out.count("def f") >= 1


def test_generate_head_dtype_flag(checkpoint, monkeypatch):
    """spikeops generate --head-dtype: auto by default (the Runner's fast head), model (the
    module as it is), float16, bfloat16."""
    import spikeops.evaluate as evaluate
    from spikeops.cli import main
    seen, real = [], evaluate.generate
    monkeypatch.setattr(evaluate, "generate",
                        lambda *a, **k: seen.append(k["head_dtype"]) or real(*a, **k))
    flags = [[], ["--head-dtype", "model"], ["--head-dtype", "float16"],
             ["--head-dtype", "bfloat16"]]
    for flag in flags:
        assert main(["generate", str(checkpoint / "q"), "--prompt", "def f", "--encoding",
                     "absmax4", "--max-new-tokens", "2", *flag]) == 0
    assert seen == ["auto", None, torch.float16, torch.bfloat16]
