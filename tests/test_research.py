"""Issue 21, the research workflow: calibration made explicit, oat's bits, metrics that say what
they count (firing rate per plane present, energy scope, whole model), perplexity intervals,
per-layer-type encodings, from_spikes' dtype, the visible online rotation and batched
generation; on the tiny GPTQ LLaMA of conftest.py. New names are imported inside the tests, so
that each test fails on its own on code without them."""

import json
import shutil

import pytest
import torch

import spikeops
from helpers import TEXT, make_layer
from spikeops import Encoding
from spikeops.calibrate import set_encoding
from spikeops.nn import spike_layers
from spikeops.evaluate import compare, encode_text, generate, perplexity


@pytest.fixture
def calibrated(checkpoint, calibration, tmp_path):
    """The tiny GPTQ checkpoint with its calibration saved beside it."""
    folder = tmp_path / "q"
    shutil.copytree(checkpoint / "q", folder)
    calibration.save(folder)
    return folder


def gammas(model):
    return {name: layer.enc.gamma for name, layer in spike_layers(model).items()}


# ------------------------------------------------------------------ 1. explicit calibration
def test_load_gptq_takes_calibration_explicitly(checkpoint, calibrated, calibration):
    from spikeops.calibrate import encodings
    calibrated_gamma = {n: c.gamma["absmax"] for n, c in calibration.layers.items()}
    # Default "saved": the folder's calibration fills the gamma the Encoding leaves open.
    model = spikeops.load_gptq(calibrated, Encoding("absmax", 4))
    assert {n: e.gamma for n, e in encodings(model).items()} == calibrated_gamma
    # A gamma given is used, never replaced; that the calibration's is not used is announced.
    with pytest.warns(UserWarning, match="gamma"):
        model = spikeops.load_gptq(calibrated, Encoding("absmax", 4, gamma=0.5))
    assert set(gammas(model).values()) == {0.5}
    # None: no calibration, the documented default gamma 1.0.
    model = spikeops.load_gptq(calibrated, Encoding("absmax", 4), calibration=None)
    assert set(gammas(model).values()) == {1.0}
    # A Calibration object applies to a folder that has none.
    model = spikeops.load_gptq(checkpoint / "q", Encoding("oat", 8), calibration=calibration)
    assert all(layer.enc.theta == calibration.layers[n].theta
               for n, layer in spike_layers(model).items())
    with pytest.raises(TypeError, match="calibration"):
        spikeops.load_gptq(calibrated, Encoding("absmax", 4), calibration=True)
    with pytest.raises(ValueError, match="calibration"):
        spikeops.load_gptq(calibrated, Encoding("absmax", 4), calibration="folder")


def test_calibration_stays_with_the_model_until_dropped(calibrated, calibration):
    model = spikeops.load_gptq(calibrated, Encoding("minmax", 4))
    salient = Encoding("minmax", 4, salient_bits=6)
    set_encoding(model, Encoding("absmax", 4))  # no calibration=: the model's own
    assert gammas(model) == {n: c.gamma["absmax"] for n, c in calibration.layers.items()}
    set_encoding(model, salient)
    assert all(torch.equal(layer.salient_mask, calibration.layers[n].salient)
               for n, layer in spike_layers(model).items())
    tokens = encode_text(TEXT)[:300]
    kept = compare(model, tokens, {"s": salient}, window=128, progress=False)
    given = compare(model, tokens, {"s": salient}, calibration=calibration, window=128,
                    progress=False)
    assert kept[0].perplexity == given[0].perplexity
    # salient_bits without a mask is refused, not run as plain minmax4.
    with pytest.raises(ValueError, match="salient"):
        set_encoding(model, salient, calibration=None)
    with pytest.raises(ValueError, match="salient"):
        compare(model, tokens, {"s": salient}, calibration=None, window=128, progress=False)
    set_encoding(model, Encoding("absmax", 4), calibration=None)  # dropped, explicitly
    assert set(gammas(model).values()) == {1.0}
    set_encoding(model, Encoding("absmax", 4))
    assert set(gammas(model).values()) == {1.0}


def test_salient_bits_without_a_mask_are_refused():
    w = make_layer(64, 8, 4, 32)[0]
    enc = Encoding("minmax", 4, salient_bits=6)
    with pytest.raises(ValueError, match="salient_mask"):
        spikeops.SpikeLinear(w, enc)
    with pytest.raises(ValueError, match="salient_mask"):
        spikeops.encode(torch.randn(2, 64), enc)
    with pytest.raises(ValueError, match="gamma"):  # oat has no clipping ratio to ignore
        Encoding("oat", 4, gamma=0.5)


# ------------------------------------------------------------------ 2. oat: bits = planes
def test_oat_bits_are_its_planes(calibrated, calibration):
    from spikeops.calibrate import parse_encoding
    x = torch.randn(3, 64)
    assert spikeops.encode(x, Encoding("oat", 8, theta=(0.5, 2.0))).num_planes == 8
    assert spikeops.encode(x, Encoding("oat", theta=(0.5, 2.0))).num_planes == 4  # bits=4
    with pytest.raises(TypeError, match="planes"):
        Encoding("oat", 8, theta=(0.5, 2.0), planes=8)
    assert Encoding("oat", 8).theta is None  # a calibration supplies it
    with pytest.raises(ValueError, match="theta"):
        spikeops.encode(x, Encoding("oat", 8))
    with pytest.raises(ValueError, match="theta"):
        spikeops.SpikeLinear(make_layer(64, 8, 4, 32)[0], Encoding("oat", 8))
    assert parse_encoding("oat8", calibration) == Encoding("oat", 8)
    model = spikeops.load_gptq(calibrated, Encoding("oat", 8))
    with spikeops.track(model) as t:
        model(input_ids=encode_text(TEXT)[:20][None])
    assert {r.P for r in t.layers()} == {8}


# ------------------------------------------------------------------ 4. metrics
@pytest.mark.parametrize("mode,planes,salient_planes", [("minmax", 4, 6), ("absmax", 3, 5)])
def test_firing_rate_counts_each_elements_own_planes(mode, planes, salient_planes):
    K, M = 64, 5
    mask = torch.arange(K) % 8 == 0  # 8 salient channels
    enc = Encoding(mode, 4, salient_bits=6)
    x = torch.randn(M, K)
    st = spikeops.encode(x, enc, salient_mask=mask)
    slots = M * ((K - 8) * planes + 8 * salient_planes)
    spikes = int(st.counts().sum())
    model = torch.nn.Sequential(spikeops.SpikeLinear(make_layer(K, 8, 4, 32)[0], enc,
                                                     salient_mask=mask))
    with spikeops.track(model) as t:
        model(x)
    (row,) = t.layers()
    assert row.slots == slots and row.firing_rate == spikes / slots
    assert t.totals()["firing_rate"] == spikes / slots
    assert st.firing_rate(enc) == spikes / slots
    with pytest.raises(ValueError, match="enc"):
        st.firing_rate()  # two ranges: the plane count of each element depends on enc


def test_energy_names_its_scope_and_offers_the_whole_model(model):
    from spikeops.architecture import head_dim_of
    from spikeops.runner import Runner
    set_encoding(model, Encoding("absmax", 4), calibration=None)
    T, c = 48, model.config
    ids = encode_text(TEXT)[:T][None]
    attention = c.num_hidden_layers * 2 * c.num_attention_heads * head_dim_of(c) * T * (T + 1) // 2
    lm_head = T * c.hidden_size * c.vocab_size
    with spikeops.track(model) as t:
        model(input_ids=ids)
    whole = t.whole_model()
    assert whole["dense_macs"] == {"attention": attention, "lm_head": lm_head}
    projections = t.totals()["energy_pj"]
    for key, mac in (("spike_45nm", 4.6), ("dense_float_45nm", 4.6), ("spike_int8", 0.23),
                     ("dense_int8", 0.23)):
        assert whole["energy_pj"][key] == pytest.approx(projections[key] +
                                                        (attention + lm_head) * mac)
    summary = t.summary()
    assert "14 projections" in summary and "whole model" in summary
    with spikeops.track(model) as t:  # the lean forward of generate counts the same
        Runner(model, T)(ids)
    assert t.whole_model()["dense_macs"] == {"attention": attention, "lm_head": lm_head}
    assert spikeops.track(torch.nn.Sequential(spike_layers(model)["model.layers.0.mlp.up_proj"])
                          ).whole_model() is None  # no attention nor lm_head to count


def test_plots_and_rows_name_the_encoding_and_rows_carry_energy(model, tmp_path, monkeypatch):
    import matplotlib.axes
    titles = []
    real = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda self, label, *a, **k: titles.append(label) or real(self, label))
    set_encoding(model, Encoding("minmax", 4, salient_bits=6),
                 calibration=spikeops.calibrate.Calibration(
                     {n: spikeops.calibrate.LayerCalibration(torch.arange(l.in_features) < 3)
                      for n, l in spike_layers(model).items()}, {}))
    with spikeops.track(model) as t:
        model(input_ids=encode_text(TEXT)[:20][None])
    t.plot(tmp_path)
    assert len(titles) == 3 and all("minmax4+s6" in title for title in titles)
    rows = compare(model, encode_text(TEXT)[:300],
                   {"float": None, "minmax4": Encoding("minmax", 4)}, window=128, progress=False)
    assert rows[0].energy is None
    energy = rows[1].energy
    assert set(energy) == {"projections", "model", "dense_macs"}
    assert energy["model"]["spike_45nm"] > energy["projections"]["spike_45nm"] > 0


# ------------------------------------------------------------------ 5. intervals
def test_perplexity_interval_is_a_documented_bootstrap(model):
    from spikeops.evaluate import perplexity_interval
    set_encoding(model, None, calibration=None)  # float activations: no spike flips by batching
    tokens = encode_text(TEXT)[:600]
    p = perplexity_interval(model, tokens, window=128, progress=False)
    assert p.value == perplexity(model, tokens, window=128, progress=False)
    assert p.low < p.value < p.high and p.windows == 9
    assert perplexity_interval(model, tokens, window=128, progress=False) == p  # fixed seed
    # The procedure of docs/research.md, by hand: per-window NLL sums and scored tokens, 1000
    # resamples of the windows (torch.Generator seeded 0), exp(sum NLL / sum tokens) each,
    # the 2.5% and 97.5% quantiles.
    nll, count = [], []
    with torch.no_grad():
        for start in range(0, 600 - 1, 64):
            end = min(start + 128, 600)
            first = 1 if start == 0 else start + 64
            logp = torch.log_softmax(model(input_ids=tokens[None, start:end]).logits[0].float(), -1)
            picked = logp[:-1].gather(-1, tokens[start + 1:end, None])[:, 0].double()
            nll.append(-float(picked[first - start - 1:].sum()))
            count.append(end - first)
            if end == 600:
                break
    nll, count = torch.tensor(nll, dtype=torch.float64), torch.tensor(count, dtype=torch.float64)
    idx = torch.randint(0, 9, (1000, 9), generator=torch.Generator().manual_seed(0))
    ppl = torch.exp(nll[idx].sum(1) / count[idx].sum(1))
    low, high = torch.quantile(ppl, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    assert p.low == pytest.approx(low, rel=1e-6) and p.high == pytest.approx(high, rel=1e-6)
    (row,) = compare(model, tokens, {"float": None}, window=128, progress=False)
    assert (row.perplexity, row.perplexity_low, row.perplexity_high) == (p.value, p.low, p.high)


def test_eval_prints_and_writes_intervals(checkpoint, tmp_path, capsys):
    from spikeops.cli import main
    out = tmp_path / "rows.json"
    assert main(["eval", str(checkpoint / "q"), "--text", str(checkpoint / "text.txt"),
                 "--encodings", "minmax4", "--max-tokens", "400", "--window", "128",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "95% interval" in table
    rows = json.loads(out.read_text())
    for r in rows:
        assert r["perplexity_low"] <= r["perplexity"] <= r["perplexity_high"]
    assert rows[1]["energy"]["model"]["spike_45nm"] > 0


# ------------------------------------------------------------------ 6. the Python API
def test_compare_takes_the_float_model_not_the_tuple(model, checkpoint):
    from spikeops.floatmodel import load_float_model
    loaded = load_float_model(checkpoint / "fp")
    tokens = encode_text(TEXT)[:300]
    with pytest.raises(TypeError, match="dense_model.*load_float_model"):
        compare(model, tokens, {}, dense_model=loaded, progress=False)
    (row,) = compare(model, tokens, {}, dense_model=loaded[0], window=128, progress=False)
    assert row.encoding == "dense" and row.perplexity_low <= row.perplexity <= row.perplexity_high
    with pytest.raises(TypeError, match="encodings"):
        compare(model, tokens, [Encoding("minmax", 4)], progress=False)


def test_per_layer_type_encodings(calibrated, calibration, capsys):
    from spikeops.cli import main
    from spikeops.calibrate import parse_encoding
    from spikeops.calibrate import encodings
    by_type = {"down_proj": Encoding("minmax", 8), "*": Encoding("absmax", 4)}
    model = spikeops.load_gptq(calibrated, by_type)
    for name, enc in encodings(model).items():
        if name.endswith("down_proj"):  # searched at 4 bits: 8-bit codes run unclipped
            assert enc == Encoding("minmax", 8, gamma=1.0)
        else:
            assert (enc.mode, enc.bits, enc.gamma) == ("absmax", 4,
                                                       calibration.layers[name].gamma["absmax"])
    set_encoding(model, {"o_proj": None, "*": Encoding("minmax", 4)})
    assert all((enc is None) == name.endswith("o_proj") for name, enc in encodings(model).items())
    with pytest.raises(ValueError, match="qkv_proj"):
        set_encoding(model, {"qkv_proj": Encoding("minmax", 8), "*": Encoding("absmax", 4)})
    with pytest.raises(ValueError, match=r"'\*'"):
        set_encoding(model, {"down_proj": Encoding("minmax", 8)})
    assert parse_encoding("down_proj=minmax8;*=absmax4", calibration) == by_type
    with pytest.raises(ValueError, match="qkv_proj"):
        parse_encoding("qkv_proj=minmax8;*=absmax4", calibration)
    assert main(["generate", str(calibrated), "--encoding", "down_proj=minmax8;*=absmax4",
                 "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(calibrated), "--encodings", "minmax4,down_proj=none;*=absmax4",
                 "--max-tokens", "300", "--window", "128"]) == 0
    assert "down_proj=none;*=absmax4" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_from_spikes_returns_what_forward_returns(dtype):
    layer = spikeops.SpikeLinear(make_layer(64, 16, 4, 32)[0], Encoding("absmax", 4))
    x = torch.randn(3, 5, 64).to(dtype)
    st = spikeops.encode(x, layer.enc)
    y, z = layer(x), layer.from_spikes(st, x.dtype)
    assert y.dtype == z.dtype == dtype and torch.equal(y, z)
    with pytest.raises(TypeError, match="out_dtype"):
        layer.from_spikes(st)  # the spikes do not know x's dtype: it is asked for


def test_online_rotation_is_visible_and_can_be_skipped(model):
    from spikeops.transforms import online_rotation, restore_online
    restore_online(model, {"kind": "rotate", "down_proj": {"width": 128, "mix": None}})
    down = model.model.layers[0].mlp.down_proj
    assert "online_rotation=OnlineRotation(width=128" in repr(down)
    captured = []
    down.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    x = torch.randn(2, 128)
    y = down(x)
    # The captured input is rotated already: forward() runs the projection without the hooks.
    assert torch.equal(captured[0], online_rotation(down).rotate(x))
    assert torch.equal(down.forward(captured[0]), y)
    assert online_rotation(model.model.layers[0].mlp.up_proj) is None


def prompts():
    return [encode_text(s) for s in ("def f1(x):\n", "def f10", "    return x * 3 + 1\n\ndef ")]


@pytest.mark.parametrize("enc", [None, Encoding("absmax", 4)])
def test_generate_batch_equals_single_prompts(model, enc):
    set_encoding(model, enc, calibration=None)
    single = [generate(model, p, 10) for p in prompts()]
    assert [t.tolist() for t in generate(model, prompts(), 10)] == [t.tolist() for t in single]
    # A left-padded [B, T] tensor with each row's length.
    lengths = [p.shape[0] for p in prompts()]
    ids = torch.full((3, max(lengths)), 7)
    for row, p in zip(ids, prompts()):
        row[row.shape[0] - p.shape[0]:] = p
    batch = generate(model, ids, 10, lengths=lengths)
    assert [t.tolist() for t in batch] == [t.tolist() for t in single]
    # A stop token ends each row on its own.
    stop = (int(single[0][3]),)
    expect = [generate(model, p, 10, stop=stop).tolist() for p in prompts()]
    assert [t.tolist() for t in generate(model, prompts(), 10, stop=stop)] == expect
    with pytest.raises(ValueError, match="lengths"):
        generate(model, ids, 10, lengths=[1, 2])
    with pytest.raises(ValueError, match="lengths"):
        generate(model, prompts()[0], 10, lengths=[3])


def test_runner_pad_is_checked(model):
    from spikeops.runner import Runner
    runner = Runner(model, 16, batch=2)
    ids = torch.zeros(2, 4, dtype=torch.int64)
    for pad in ([0, 4], [-1, 0], [0, 1, 2]):  # a row of padding only, negative, not one per row
        with pytest.raises(ValueError, match="pad"):
            runner(ids, pad=torch.tensor(pad))
    runner(ids, pad=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pad"):  # the padding belongs to the prompt
        runner(ids[:, :1], pad=torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="pad"):
        Runner(model, 16, batch=2)(ids, pad=torch.tensor([0.0, 1.0]))
