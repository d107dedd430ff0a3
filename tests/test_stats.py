"""spikeops.track: spike statistics against a Python bit-counting reference, energy arithmetic,
no effect on outputs, nesting, and the `spikeops report` CLI."""

import json

import pytest
import torch

import spikeops
from spikeops.stats import PRESETS, LayerStats

from helpers import make_layer


def bits_of(word: int) -> int:
    return bin(word & 0xFFFFFFFF).count("1")


def reference(st, K):
    """Per-plane spikes, negative spikes, silent channels and zero words by Python loops."""
    P, M, W = st.planes.shape
    planes = st.planes.tolist()
    sign = st.sign.tolist() if st.sign is not None else None
    spikes, negative = [0] * P, [0] * P
    silent = zero_words = 0
    for m in range(M):
        for w in range(W):
            ored = 0
            for p in range(P):
                word = planes[p][m][w] & 0xFFFFFFFF
                ored |= word
                spikes[p] += bits_of(word)
                if sign is not None:
                    negative[p] += bits_of(word & sign[m][w])
            zero_words += ored == 0
            silent += min(32, K - 32 * w) - bits_of(ored)
    return spikes, negative, silent, zero_words


def crafted_x():
    K = 96
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, K, generator=gen)
    x[0, 32:64] = 0.0          # one whole zero word in token 0 (signed encodings)
    x[1] = 0.0                 # a token with no spike at all
    x[2, ::3] = 0.0            # scattered silent channels
    x[3, 5] = 40.0             # an outlier: most other channels round to 0 under absmax
    return x


@pytest.mark.parametrize("enc", [spikeops.Encoding("absmax", 4), spikeops.Encoding("minmax", 4),
                                 spikeops.Encoding("absmax", 5, gamma=0.5)])
def test_counts_silent_and_zero_words_match_reference(enc):
    x = crafted_x()
    K, N = x.shape[1], 8
    w = make_layer(K, N, 4, 32)[0]
    layer = spikeops.SpikeLinear(w, enc)
    model = torch.nn.Sequential(layer)
    st = spikeops.encode(x, enc)
    spikes, negative, silent, zero_words = reference(st, K)
    with spikeops.track(model) as t:
        model(x)
        model(x)  # accumulates over calls
    (r,) = t.layers()
    assert isinstance(r, LayerStats)
    assert (r.calls, r.tokens, r.K, r.N, r.P) == (2, 8, K, N, st.num_planes)
    assert r.spikes_per_plane == [2 * s for s in spikes]
    if st.sign is not None:
        assert r.negative_per_plane == [2 * s for s in negative]
        assert r.negative > 0
    else:
        assert r.negative_per_plane is None
    assert r.silent_channels == 2 * silent
    assert r.zero_words == 2 * zero_words
    assert r.words == 2 * 4 * 3
    assert r.firing_rate == pytest.approx(sum(spikes) / (4 * K * st.num_planes))
    assert r.sops == 2 * sum(spikes) * N and r.macs == 8 * K * N
    assert r.planes == enc.bits  # bits counts a signed encoding's sign
    if enc.mode == "absmax" and enc.gamma == 1.0:
        assert zero_words >= 3 + 1  # token 1 (3 words) and token 0 word 1
        assert silent >= K + 32


def test_encoding_changed_while_tracking():
    """Calls with different plane counts (and signed and unsigned calls) add up per plane."""
    x = crafted_x()
    K, N = x.shape[1], 8
    layer = spikeops.SpikeLinear(make_layer(K, N, 4, 32)[0], spikeops.Encoding("minmax", 4))
    model = torch.nn.Sequential(layer)
    enc6 = spikeops.Encoding("absmax", 7)
    st4, st6 = spikeops.encode(x, layer.enc), spikeops.encode(x, enc6)
    s4, _, silent4, zw4 = reference(st4, K)
    s6, n6, silent6, zw6 = reference(st6, K)
    with spikeops.track(model) as t:
        model(x)
        layer.set_encoding(enc6)
        model(x)
    (r,) = t.layers()
    assert r.P == 6 and r.calls == 2 and r.tokens == 8
    assert r.spikes_per_plane == [a + b for a, b in zip(s4 + [0, 0], s6)]
    assert r.negative_per_plane == n6
    assert r.silent_channels == silent4 + silent6 and r.zero_words == zw4 + zw6
    assert r.planes == (4 + 7) / 2  # minmax4 then absmax7, over as many tokens


def test_energy_arithmetic_by_hand():
    r = LayerStats("model.layers.0.mlp.up_proj", "up", calls=1, tokens=10, K=256, N=512, P=4,
                   groups=2, ranges=1, spikes_per_plane=[100, 200, 300, 400],
                   negative_per_plane=None, silent_channels=0, zero_words=0, words=80,
                   slots=10 * 256 * 4, encodings=["minmax4"], bits=10 * 256 * 4)
    sops, macs = 1000 * 512, 10 * 256 * 512
    shifts, mults = 10 * 512 * 2 * 4, 10 * 512 * 2 * 1
    assert r.sops == sops and r.macs == macs
    assert r.shifts() == shifts and r.epilogue_mults() == mults
    assert r.spike_energy_pj("45nm") == pytest.approx(sops * 0.9 + shifts * 0.9 + mults * 3.7)
    assert r.dense_energy_pj("45nm") == pytest.approx(macs * 4.6)
    assert r.spike_energy_pj("int8") == pytest.approx(sops * 0.03 + shifts * 0.03 + mults * 3.7)
    assert r.dense_energy_pj("int8") == pytest.approx(macs * 0.23)
    assert PRESETS["45nm"].mac_pj == pytest.approx(3.7 + 0.9)
    assert PRESETS["int8"].mac_pj == pytest.approx(0.2 + 0.03)
    custom = spikeops.EnergyModel("x", mac_pj=1.0, ac_pj=2.0, shift_pj=3.0, mult_pj=4.0)
    assert r.spike_energy_pj(custom) == sops * 2 + shifts * 3 + mults * 4
    with pytest.raises(ValueError, match="energy model"):
        r.spike_energy_pj("7nm")


@pytest.fixture(scope="module")
def embedded():
    from spikeops.commands import DEFAULT_MODEL, DEFAULT_TEXT
    from spikeops.evaluate import encode_text
    if not DEFAULT_MODEL.is_dir():
        pytest.skip("embedded model not present")
    model = spikeops.load_gptq(DEFAULT_MODEL, spikeops.Encoding("absmax", 4))
    ids = encode_text(DEFAULT_TEXT.read_text(encoding="utf-8"))[:64].unsqueeze(0)
    return model, ids


def test_tracking_does_not_change_outputs(embedded):
    model, ids = embedded
    with torch.no_grad():
        y0 = model(input_ids=ids).logits
        with spikeops.track(model) as t:
            y1 = model(input_ids=ids).logits
        y2 = model(input_ids=ids).logits
    assert torch.equal(y0, y1) and torch.equal(y0, y2)
    rows = t.layers()
    assert len(rows) == 28 and all(r.tokens == 64 for r in rows)
    assert all(m.observer is None for m in spikeops.stats.Tracker(model)._layers.values())
    data = json.loads(t.to_json())
    assert set(data) == {"energy_models", "encoding", "totals", "whole_model", "by_type",
                         "layers"}
    assert set(data["by_type"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert 0 < data["totals"]["firing_rate"] < 1
    assert "firing rate" in t.table()


def test_nesting_refused_and_observer_removed_on_error(embedded):
    model, ids = embedded
    with spikeops.track(model):
        with pytest.raises(RuntimeError, match="nested"):
            with spikeops.track(model):
                pass
    with pytest.raises(KeyError):
        with spikeops.track(model):
            raise KeyError("boom")
    layers = spikeops.stats.Tracker(model)._layers.values()
    assert all(m.observer is None for m in layers)
    with spikeops.track(model):  # usable again
        pass


def test_report_cli_writes_files(tmp_path):
    from spikeops.cli import main
    from spikeops.commands import DEFAULT_MODEL
    if not DEFAULT_MODEL.is_dir():
        pytest.skip("embedded model not present")
    out = tmp_path / "rep"
    assert main(["report", "--max-tokens", "48", "--encoding", "absmax4", "--out", str(out)]) == 0
    for name in ("report.txt", "report.json", "firing_rate.png", "planes.png", "energy.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "firing_rate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "report.json").read_text())
    assert len(data["layers"]) == 28 and data["layers"][0]["tokens"] == 48


def test_spiking_attention_counts_its_sops(model):
    """With kv="spike8" the Runner's QK^T reports its synaptic operations: per attended
    query-key pair and channel, query spikes x key spikes (recounted here from the bits), and
    the QK MACs leave dense_macs["attention"]."""
    from spikeops import attention
    from spikeops.runner import Runner
    ids = torch.randint(0, 256, (1, 6))  # conftest's model: 2 layers, 4 heads of 16, 2 kv heads
    class Seen(list):
        def add(self, sops, macs):
            self.append((sops, macs))
    seen = Seen()
    with spikeops.track(model) as dense_t:
        Runner(model, 8)(ids)
    with spikeops.track(model) as t:
        attention.observe(model, seen.add)
        try:
            Runner(model, 8, kv="spike8")(ids)
        finally:
            attention.unobserve(seen.add)
    whole, dense = t.whole_model(), dense_t.whole_model()
    pairs = 6 * 7 // 2
    head_dim = 16
    assert [m for _, m in seen] == [4 * pairs * head_dim] * 2  # one per layer
    assert whole["attention_sops"] == sum(s for s, _ in seen) > 0
    assert dense["attention_sops"] == 0
    assert whole["dense_macs"]["attention"] == \
        dense["dense_macs"]["attention"] - 2 * 4 * pairs * head_dim


def test_attention_observers_are_the_models_own(model):
    """A tracker counts the spiking attention of its own model's Runners only, and one never
    exited (as SpikeopsLM keeps one for its life) stops observing when it is collected: it
    neither counts nor slows the Runners of other models."""
    import copy
    import gc
    import weakref

    from spikeops import attention
    from spikeops.runner import Runner
    ids = torch.randint(0, 256, (1, 6))
    own = copy.deepcopy(model)  # an LM's own model
    kept = spikeops.track(own).__enter__()  # never exited
    with spikeops.track(model) as t:
        Runner(model, 8, kv="spike8")(ids)
    assert kept.whole_model()["attention_sops"] == 0 < t.whole_model()["attention_sops"]
    assert attention.observers(own) == [kept._count_attention]
    assert attention.observers(model) == []
    gone = weakref.ref(kept)
    del kept, own
    gc.collect()
    assert gone() is None
    assert attention.observers(model) == [] and attention._OBSERVERS == []  # the dead dropped


def test_qk_sops_are_coincidences_of_spikes():
    from spikeops.attention import QUERY_ENCODING, SpikeKV
    from spikeops.reference import unpack_bits
    kv = SpikeKV("test", "spike4", False, "float", 1, 1, 4, 40, torch.float32, "cpu")
    kv.write(torch.randn(1, 1, 3, 40), torch.randn(1, 1, 3, 40), 0)
    q = spikeops.encode(torch.randn(1, 2, 2, 40), QUERY_ENCODING)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    sops, macs = kv._qk_events(q, 3, mask)
    fq = unpack_bits(q.planes, 40).sum(0).reshape(2, 2, 40)       # spikes per element
    fk = unpack_bits(kv.keys.fields(3)[0], 40).sum(0)             # [3, 40]
    expect = sum(int((fq[h, i] * fk[j]).sum()) for h in range(2) for i in range(2)
                 for j in range(3) if mask[i, j])
    assert (sops, macs) == (expect, 2 * 5 * 40)
