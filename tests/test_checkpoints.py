"""GPTQ checkpoints and whole models (spikeops.checkpoint, .quantization, .models): quantize ->
save -> load_gptq round trips, checkpoints written by an independent AutoGPTQ-style packer,
whole-model logits against a float64 fake-quant reference, strict refusal of corrupt
checkpoints, patch on a fake QuantLinear and load_gptq's device_map. Every model is a tiny
LLaMA built from a config in code; nothing is downloaded."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import spikeops  # noqa: E402
from helpers import TEXT, assert_within_spec, exact_weight, tiny_batches  # noqa: E402
from spikeops.calibrate import calibrate  # noqa: E402
from spikeops.checkpoint import (CALIBRATION_FILE, CALIBRATION_MASK_FILE,  # noqa: E402
                                 PROJECTIONS)
from spikeops.evaluate import encode_text, generate  # noqa: E402

MINMAX4 = spikeops.Encoding("minmax", 4)

ENC = spikeops.Encoding("minmax", bits=8)
LAYERS = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: intra-op threads only add OpenMP spin-waiting, which on a busy
    2-core machine made this file ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                       tie_word_embeddings=tie, dtype="float32")


def tiny_model(seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tie)).eval()


def calib(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))


def names():
    return [f"model.layers.{i}.{p}" for i in range(LAYERS) for p in PROJECTIONS]


def dequantized(lin: spikeops.SpikeLinear) -> torch.Tensor:
    """fp16 [N, K] of a loaded SpikeLinear's buffers."""
    return lin.dequantize()


def exact(lin: spikeops.SpikeLinear) -> torch.Tensor:
    """float64 [K, N] scale * (q - z) of a loaded SpikeLinear, unrounded (what docs/ops.md's
    kernels compute with)."""
    w, state = lin.gptq, lin.state_dict()
    q = spikeops.unpack(state["qweight"], w.kernel_bits, lin.in_features, dim=0)
    z = spikeops.unpack(state["qzeros"], w.kernel_bits, lin.out_features, dim=1) + w.zero_offset
    return exact_weight(q, z, state["scales"], state["g_idx"].long())


# ---- (a) quantize -> save -> load_gptq ------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_round_trip(tmp_path, bits, group_size, sym, desc_act):
    model = tiny_model()
    weights = spikeops.quantize(model, calib(), bits=bits, group_size=group_size, sym=sym,
                                desc_act=desc_act, path=tmp_path)
    qc = json.loads((tmp_path / "quantize_config.json").read_text())
    # desc_act is read from the g_idx written: with one group act-order leaves it trivial
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == \
        (bits, group_size, sym, desc_act and group_size != -1)
    loaded = spikeops.load_gptq(tmp_path, ENC)
    assert loaded.dtype == torch.float32
    assert list(weights) == names()
    for name in names():
        lin = loaded.get_submodule(name)
        assert isinstance(lin, spikeops.SpikeLinear) and lin.bits == bits
        # quantize left its own W_hat (exact in float32) in the float model
        W_hat = model.get_submodule(name).weight
        assert torch.equal(exact(lin).t(), W_hat.double()), name
        assert torch.equal(dequantized(lin), W_hat.half()), name
    dense = {k: v for k, v in model.state_dict().items() if not k.endswith("proj.weight")}
    got = loaded.state_dict()
    for key, t in dense.items():
        assert torch.equal(got[key], t), key


def test_float16_model(tmp_path):
    model = tiny_model().half()
    spikeops.quantize(model, calib(), bits=4, group_size=32, path=tmp_path)
    loaded = spikeops.load_gptq(tmp_path, ENC, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    for name in names():
        assert torch.equal(dequantized(loaded.get_submodule(name)),
                           model.get_submodule(name).weight), name
    with torch.no_grad():
        assert loaded(calib()).logits.isfinite().all()


def test_default_dtype_is_fast_on_the_device(tmp_path):
    """Without dtype a float16 checkpoint runs in float32 on the CPU (float16 matrix products
    are about 10x slower there) and in its own dtype on a GPU."""
    from spikeops.checkpoint import read_configs
    from spikeops.models import _default_dtype
    spikeops.quantize(tiny_model().half(), calib(), bits=4, group_size=32, path=tmp_path)
    loaded = spikeops.load_gptq(tmp_path, ENC)
    assert loaded.dtype == torch.float32
    same = spikeops.load_gptq(tmp_path, ENC, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(loaded(calib()).logits, same(calib()).logits)
    config, _ = read_configs("t", tmp_path)
    assert _default_dtype("t", torch.device("cuda"), config) == torch.float16


def test_gptq_beats_round_to_nearest():
    """The error feedback must lower the layer's output error ||X (W - W_hat)^T|| on the
    calibration inputs below round-to-nearest with the same grid (layer 0 sees the same X)."""
    model = tiny_model()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    attn = model.model.layers[0].self_attn.q_proj
    W = attn.weight.detach().clone()
    X = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids)).reshape(-1, 64)
    weights = spikeops.quantize(model, ids, bits=3, group_size=32, sym=True)
    w = weights["model.layers.0.self_attn.q_proj"]
    scales = w.scales.float()[w.g_idx.long()].t()                     # [N, K]
    rtn = torch.clamp(torch.round(W / scales) + 4, 0, 7)
    W_rtn = (scales * (rtn - 4)).half().float()
    with torch.no_grad():
        err_gptq = (X @ (W - attn.weight).t()).norm()
        err_rtn = (X @ (W - W_rtn).t()).norm()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


# ---- (b) an independent writer -------------------------------------------------------------

def pack_autogptq(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes [count, C]`` along dim 0 word by word as AutoGPTQ's QuantLinear.pack does
    (docs/checkpoints.md: 3-bit values 10 and 21 straddle words 0/1 and 1/2 of every 3-word run)."""
    c = codes.to(torch.int64) & 0xFFFFFFFF
    count = c.shape[0]
    rows = []
    i = 0
    while i < count:
        if bits != 3:
            word = torch.zeros_like(c[0])
            for j in range(32 // bits):
                word |= c[i + j] << (bits * j)
            rows.append(word)
            i += 32 // bits
            continue
        w0, w1, w2 = (torch.zeros_like(c[0]) for _ in range(3))
        for j in range(10):
            w0 |= c[i + j] << (3 * j)
        w0 |= (c[i + 10] << 30) & 0xFFFFFFFF
        w1 |= (c[i + 10] >> 2) & 1
        for j in range(10):
            w1 |= c[i + 11 + j] << (3 * j + 1)
        w1 |= (c[i + 21] << 31) & 0xFFFFFFFF
        w2 |= (c[i + 21] >> 1) & 3
        for j in range(10):
            w2 |= c[i + 22 + j] << (3 * j + 2)
        rows += [w0, w1, w2]
        i += 32
    out = torch.stack(rows)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def write_by_hand(folder, model, bits, group_size, sym, fmt, act_order, shards,
                  zero_bias=False, config_in="quantize_config.json", seed=0):
    """A GPTQ checkpoint of ``model``'s dense tensors and random codes written from docs/checkpoints.md
    alone. Returns ``{name: W_hat fp16 [N, K]}`` computed exactly from the codes."""
    gen = torch.Generator().manual_seed(seed)
    maxq = (1 << bits) - 1
    tensors, expected = {}, {}
    for name in names():
        N, K = model.get_submodule(name).weight.shape
        gs = K if group_size == -1 else group_size
        G = K // gs
        q = torch.randint(0, maxq + 1, (K, N), generator=gen)
        # v1 stores z - 1, so its true zeros start at 1 (see test_v1_true_zero_0)
        z = torch.full((G, N), 1 << (bits - 1)) if sym else \
            torch.randint(int(fmt == "gptq"), maxq + 1, (G, N), generator=gen)
        scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.001).half()
        g_idx = torch.arange(K) // gs
        if act_order:
            g_idx = g_idx[torch.randperm(K, generator=gen)]
        # AutoGPTQ's v1 readers add 1 and mask, so -1 is stored as the field maxq
        stored = (z - 1) & maxq if fmt == "gptq" else z
        tensors.update({f"{name}.qweight": pack_autogptq(q, bits),
                        f"{name}.qzeros": pack_autogptq(stored.t(), bits).t().contiguous(),
                        f"{name}.scales": scales, f"{name}.g_idx": g_idx.to(torch.int32)})
        if zero_bias:
            tensors[f"{name}.bias"] = torch.zeros(N, dtype=torch.float16)
        expected[name] = exact_weight(q, z, scales, g_idx).t().half()
    for key, t in model.state_dict().items():
        if not key.endswith("proj.weight") and not (key == "lm_head.weight" and
                                                    model.config.tie_word_embeddings):
            tensors[key] = t.half()
    folder.mkdir(exist_ok=True)
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "gptq_model-4bit-128g.safetensors"))
    else:
        weight_map = {}
        for s, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
            file = f"model-0000{s + 1}-of-00002.safetensors"
            save_file({k: tensors[k] for k in part}, str(folder / file))
            weight_map.update({k: file for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    qc = {"bits": bits, "group_size": group_size, "sym": sym, "desc_act": act_order,
          "quant_method": "gptq", "checkpoint_format": fmt}
    config = model.config.to_dict()
    config["dtype"] = "float16"
    if config_in == "config.json":
        config["quantization_config"] = qc
    else:
        (folder / config_in).write_text(json.dumps(qc))
    (folder / "config.json").write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [True, False])
def test_hand_written_sharded(tmp_path, bits, fmt, sym):
    model = tiny_model()
    expected = write_by_hand(tmp_path, model, bits, 32, sym, fmt, act_order=True, shards=2,
                             config_in="config.json")
    loaded = spikeops.load_gptq(tmp_path, ENC, dtype=torch.float16)
    assert loaded.dtype == torch.float16
    for name, W in expected.items():
        assert torch.equal(dequantized(loaded.get_submodule(name)), W), name
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.half())


def test_hand_written_autogptq_file_tied_zero_bias(tmp_path):
    """One old-named file, quant_config.json, all-zero biases, tied embeddings, dtype
    override; sym v1 zeros are detected from the data even under a v2 label."""
    model = tiny_model(tie=True)
    expected = write_by_hand(tmp_path, model, 4, -1, True, "gptq", act_order=False, shards=1,
                             zero_bias=True, config_in="quant_config.json")
    qc = json.loads((tmp_path / "quant_config.json").read_text())
    (tmp_path / "quant_config.json").write_text(json.dumps({**qc, "checkpoint_format":
                                                            "gptq_v2"}))
    loaded = spikeops.load_gptq(tmp_path, ENC, dtype=torch.float32)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    for name, W in expected.items():
        lin = loaded.get_submodule(name)
        assert torch.equal(dequantized(lin), W) and lin.gptq.zero_offset == 1
        assert lin.bias is not None and not lin.bias.any()
    assert loaded(calib()).logits.isfinite().all()


# ---- (c) whole-model logits against a float64 fake-quant reference ---------------------------

class FakeQuant(torch.nn.Module):
    """x -> encode(x).decode() @ W_hat^T in float64 (W_hat [N, K], exact)."""

    def __init__(self, W_hat: torch.Tensor, enc: spikeops.Encoding):
        super().__init__()
        self.W_hat, self.enc = W_hat.double(), enc

    def forward(self, x):
        return spikeops.encode(x, self.enc).decode().double() @ self.W_hat.t()


def test_logits_match_float64_fake_quant(tmp_path):
    model = tiny_model()
    ids = calib()
    spikeops.quantize(model, ids, bits=4, group_size=32, sym=False, desc_act=True,
                      path=tmp_path)
    spiking = spikeops.load_gptq(tmp_path, ENC)
    reference = copy.deepcopy(model).double()
    for name in names():
        parent, _, leaf = name.rpartition(".")
        setattr(reference.get_submodule(parent), leaf,
                FakeQuant(model.get_submodule(name).weight.detach(), ENC))

    # Every spiking layer is exact up to docs/ops.md on the inputs it actually saw.
    seen = []
    hooks = [spiking.get_submodule(n).register_forward_hook(
        lambda mod, args, out: seen.append((mod, args[0], out))) for n in names()]
    with torch.no_grad():
        logits = spiking(ids).logits
        expected = reference(ids).logits
    for h in hooks:
        h.remove()
    assert len(seen) == len(names())
    for mod, x, y in seen:
        assert_within_spec(y, spikeops.encode(x, ENC).decode(), exact(mod))
    # Whole model: float32 attention/norm/softmax against float64 ones accumulate in different
    # orders (relative error ~1e-6 per op); an activation landing on the other side of a
    # quantization boundary moves one 8-bit step (1/255 of its row range) in one channel, so
    # allow 1e-3 of the logits' scale.
    err = (logits.double() - expected).abs().max()
    scale = expected.abs().max()
    print(f"logits: max |diff| {err:.3e}, max |logit| {scale:.3e}")
    assert err <= 1e-3 * scale


# ---- (d) strict refusal --------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    spikeops.quantize(tiny_model(), calib(), bits=4, group_size=32, sym=False, desc_act=True,
                      path=folder)
    return folder


def corrupt_tensors(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def corrupt_json(src, dst, file, change):
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    change(data)
    (dst / file).write_text(json.dumps(data))
    return dst


Q = "model.layers.1.mlp.down_proj"


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, fn):
    return lambda t: t.__setitem__(key, fn(t[key]))


def _bad_g_idx(g):
    g = g.clone()
    g[3] = 4  # K = 128 in groups of 32: G = 4
    return g


@pytest.mark.parametrize("change, error, words", [
    (_drop(f"{Q}.scales"), ValueError, ["missing", f"{Q}.scales"]),
    (_drop("model.norm.weight"), ValueError, ["missing", "model.norm.weight"]),
    (lambda t: t.__setitem__(f"{Q}.extra", torch.zeros(1)), ValueError,
     ["unexpected", f"{Q}.extra"]),
    (_set(f"{Q}.scales", lambda s: s.float()), TypeError, [f"{Q}.scales", "torch.float16"]),
    (_set(f"{Q}.qweight", lambda q: q.to(torch.int64)), TypeError, [f"{Q}.qweight", "int32"]),
    (_set("model.embed_tokens.weight", lambda e: e.to(torch.int32)), TypeError,
     ["model.embed_tokens.weight"]),
    (_set(f"{Q}.qzeros", lambda z: z[:, :-1].contiguous()), ValueError,
     [f"{Q}.qzeros", "[4, 8]"]),
    (_set("model.norm.weight", lambda n: n[:-1].contiguous()), ValueError,
     ["model.norm.weight", "[64]"]),
    (_set(f"{Q}.g_idx", _bad_g_idx), ValueError, [Q, "g_idx", "[0, 4)"]),
    (lambda t: t.__setitem__(f"{Q}.bias", torch.ones(64, dtype=torch.float16)), ValueError,
     [f"{Q}.bias", "non-zero"]),
], ids=["missing-quant", "missing-dense", "unexpected", "scales-dtype", "qweight-dtype",
        "dense-dtype", "qzeros-shape", "dense-shape", "g_idx-range", "nonzero-bias"])
def test_corrupt_tensors_refused(good_checkpoint, tmp_path, change, error, words):
    folder = corrupt_tensors(good_checkpoint, tmp_path / "bad", change)
    with pytest.raises(error) as info:
        spikeops.load_gptq(folder, ENC)
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("file, change, error, words", [
    ("quantize_config.json", lambda c: c.update(bits=8), ValueError,
     ["model.layers.0.self_attn.q_proj.qweight", "[16, 64]"]),
    ("quantize_config.json", lambda c: c.update(bits=5), ValueError, ["bits", "5"]),
    ("quantize_config.json", lambda c: c.update(group_size=64), ValueError,
     ["model.layers.0.self_attn.q_proj.qzeros", "[1, 8]"]),
    ("quantize_config.json", lambda c: c.update(quant_method="awq"), ValueError,
     ["quant_method", "awq"]),
    ("quantize_config.json", lambda c: c.update(checkpoint_format="marlin"), ValueError,
     ["checkpoint_format", "marlin"]),
    ("quantize_config.json", lambda c: c.update(sym="yes"), TypeError, ["sym"]),
    ("config.json", lambda c: c.update(model_type="no-such-model"), ValueError,
     ["model_type", "no-such-model"]),
], ids=["bits-8", "bits-5", "group-size", "quant-method", "format", "sym-type", "model-type"])
def test_inconsistent_config_refused(good_checkpoint, tmp_path, file, change, error, words):
    """A config that does not describe the tensors (both copies of the quantization config
    changed alike) is refused with an error naming the tensor or field."""
    folder = corrupt_json(good_checkpoint, tmp_path / "bad", file, change)
    if file == "quantize_config.json":
        config = json.loads((folder / "config.json").read_text())
        change(config["quantization_config"])
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error) as info:
        spikeops.load_gptq(folder, ENC)
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("field, value", [("sym", True), ("checkpoint_format", "gptq_v2"),
                                          ("desc_act", False), ("bits", 8)])
def test_disagreeing_configs_refused(good_checkpoint, tmp_path, field, value):
    """quantize_config.json and config.json's quantization_config must agree: which one is
    right cannot be told from the tensors (an asymmetric v1 file read as v2 is off by one)."""
    folder = corrupt_json(good_checkpoint, tmp_path / "bad", "quantize_config.json",
                          lambda c: c.update({field: value}))
    with pytest.raises(ValueError, match=f"disagree on {field}"):
        spikeops.load_gptq(folder, ENC)


def test_missing_files_refused(good_checkpoint, tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(good_checkpoint, folder)
    (folder / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        spikeops.load_gptq(folder, ENC)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").unlink()
    with pytest.raises(ValueError, match="quantize_config.json or quant_config.json"):
        spikeops.load_gptq(folder, ENC)


def test_pickle_only_refused(good_checkpoint, tmp_path):
    folder = tmp_path / "p"
    shutil.copytree(good_checkpoint, folder)
    (folder / "model.safetensors").unlink()
    # Never unpickled, so the content does not matter (a real one would run code on load).
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match=r"pickle .*pytorch_model\.bin"):
        spikeops.load_gptq(folder, ENC)


def test_index_naming_absent_shard_refused(good_checkpoint, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(good_checkpoint, folder)
    keys = load_file(str(folder / "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in keys}
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors .*model.norm.weight"):
        spikeops.load_gptq(folder, ENC)


@pytest.mark.parametrize("enc, error", [("minmax", TypeError),
                                        (spikeops.Encoding("static"), ValueError)])
def test_bad_encoding_refused(good_checkpoint, enc, error):
    with pytest.raises(error, match="load_gptq: enc"):
        spikeops.load_gptq(good_checkpoint, enc)


# ---- (e) patch -------------------------------------------------------------------------------

class FakeQuantLinear(torch.nn.Module):
    """Stands in for an optimum/gptqmodel QuantLinear: the checkpoint buffers and attributes."""

    def __init__(self, tensors: dict, name: str, bits: int, group_size: int, N: int):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        for field in ("qweight", "qzeros", "scales", "g_idx"):
            self.register_buffer(field, tensors[f"{name}.{field}"].clone())
        self.register_buffer("bias", torch.zeros(N, dtype=torch.float16))


def fake_quantized_model(folder, bits=4, group_size=32):
    """A LLaMA holding FakeQuantLinear modules with the tensors of the single-file checkpoint
    in folder, as optimum/gptqmodel would leave it; the config keeps its quantization_config."""
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(str(file))
    config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = LlamaForCausalLM(config).eval()
    model.load_state_dict({k: v for k, v in tensors.items() if "proj." not in k}, strict=False)
    for name in names():
        parent, _, leaf = name.rpartition(".")
        N = model.get_submodule(name).out_features
        setattr(model.get_submodule(parent), leaf,
                FakeQuantLinear(tensors, name, bits, group_size, N))
    return model


def test_patch_matches_load_gptq(good_checkpoint):
    model = fake_quantized_model(good_checkpoint)
    s0 = model.model.layers[0].self_attn.q_proj.scales
    assert spikeops.patch(model, ENC) is model
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, spikeops.SpikeLinear)
    assert lin.gptq.scales.data_ptr() == s0.data_ptr()  # shares the tensors (not the codes:
    # on the CPU the CPU layout holds them)
    loaded = spikeops.load_gptq(good_checkpoint, ENC)
    with torch.no_grad():
        assert torch.equal(model(calib()).logits, loaded(calib()).logits)


def test_patch_v2_in_memory(tmp_path):
    """gptqmodel keeps v2 zeros in memory under a "gptq" label: sym is detected from the data,
    asym needs checkpoint_format="gptq_v2"."""
    for sym in (True, False):
        folder = tmp_path / f"sym{sym}"
        expected = write_by_hand(folder, tiny_model(), 4, 32, sym, "gptq_v2", act_order=False,
                                 shards=1, config_in="config.json")
        config = json.loads((folder / "config.json").read_text())
        config["quantization_config"]["checkpoint_format"] = "gptq"
        (folder / "config.json").write_text(json.dumps(config))
        model = fake_quantized_model(folder)
        spikeops.patch(model, ENC, checkpoint_format=None if sym else "gptq_v2")
        for name, W in expected.items():
            assert torch.equal(dequantized(model.get_submodule(name)), W), name


def test_patch_failure_leaves_model_untouched(good_checkpoint):
    model = fake_quantized_model(good_checkpoint)
    before = dict(model.named_modules())
    bad = model.model.layers[1].mlp.up_proj
    bad.g_idx[5] = 9
    with pytest.raises(ValueError, match=r"patch: module 'model.layers.1.mlp.up_proj'.*g_idx"):
        spikeops.patch(model, ENC)
    after = dict(model.named_modules())
    assert before.keys() == after.keys()
    assert all(before[k] is after[k] for k in before)
    assert not any(isinstance(m, spikeops.SpikeLinear) for m in model.modules())


def test_patch_refuses_bad_arguments(good_checkpoint):
    model = fake_quantized_model(good_checkpoint)
    with pytest.raises(TypeError, match="patch: enc"):
        spikeops.patch(model, "minmax")
    with pytest.raises(ValueError, match="patch: checkpoint_format"):
        spikeops.patch(model, ENC, checkpoint_format="v3")
    del model.model.layers[0].mlp.gate_proj.bits
    with pytest.raises(TypeError, match="gate_proj.*bits"):
        spikeops.patch(model, ENC)
    with pytest.raises(ValueError, match="patch: model must contain"):
        spikeops.patch(tiny_model(), ENC)


def test_quantize_and_load_refuse_bad_arguments(good_checkpoint):
    model = tiny_model()
    with pytest.raises(ValueError, match="quantize: bits"):
        spikeops.quantize(model, calib(), bits=5)
    with pytest.raises(ValueError, match="quantize: group_size"):
        spikeops.quantize(model, calib(), group_size=0)
    with pytest.raises(TypeError, match=r"quantize: calib_inputs\[0\] .*torch.int64"):
        spikeops.quantize(model, calib().float())
    with pytest.raises(ValueError, match="quantize: model must be a LLaMA-architecture"):
        spikeops.quantize(torch.nn.Linear(4, 4), calib())
    with pytest.raises(TypeError, match="load_gptq: dtype"):
        spikeops.load_gptq(good_checkpoint, ENC, dtype=torch.int8)
    with pytest.raises(ValueError, match="load_gptq: device"):
        spikeops.load_gptq(good_checkpoint, ENC, device="gpu:7")
    with pytest.raises(ValueError, match="load_gptq: path"):
        spikeops.load_gptq(good_checkpoint / "nowhere", ENC)


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
    assert split.model.layers[1].mlp.up_proj.gptq.qweight.is_cuda
    torch.testing.assert_close(split(input_ids=ids).logits.cpu(), cpu(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-4)
    assert generate(split, encode_text("def f1(x):\n"), 8).shape == (8,)


def test_patch_takes_what_load_gptq_takes(good_checkpoint):
    """An encoding map (and None) patches as load_gptq loads, layer type by layer type."""
    enc = {"down_proj": spikeops.Encoding("minmax", 8), "*": ENC}
    model = fake_quantized_model(good_checkpoint)
    spikeops.patch(model, enc)
    loaded = spikeops.load_gptq(good_checkpoint, enc)
    assert model.model.layers[0].mlp.down_proj.enc == spikeops.Encoding("minmax", 8)
    assert model.model.layers[0].self_attn.q_proj.enc == ENC
    with torch.no_grad():
        assert torch.equal(model(calib()).logits, loaded(calib()).logits)
    floats = spikeops.patch(fake_quantized_model(good_checkpoint), None)
    assert floats.model.layers[1].mlp.up_proj.enc is None
    with pytest.raises(ValueError, match="patch: .*no entry for layer"):
        spikeops.patch(fake_quantized_model(good_checkpoint), {"down_proj": ENC})


# ----------------------------------------------------------------------------- damaged and hostile folders
def _run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A case that could hang runs in its own process with a timeout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_save_over_an_older_sharded_checkpoint_loads_what_was_saved(checkpoint, folder):
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(folder / "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file({k: tensors[k] for k in keys[:half]}, str(folder / shards[0]))
    save_file({k: tensors[k] for k in keys[half:]}, str(folder / shards[1]))
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        k: shards[0 if i < half else 1] for i, k in enumerate(keys)}}))
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    ids = tiny_batches()[0]
    weights = spikeops.quantize(dense, ids, bits=8, group_size=32)  # other weights than before
    spikeops.save_gptq(dense, weights, folder)
    assert not (folder / "model.safetensors.index.json").exists()
    assert not list(folder.glob("model-0000*"))
    loaded = spikeops.load_gptq(folder, MINMAX4)
    assert loaded.model.layers[0].mlp.up_proj.bits == 8


def test_save_gptq_validates_before_writing(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM
    dense = AutoModelForCausalLM.from_pretrained(checkpoint / "fp").eval()
    weights = spikeops.quantize(dense, tiny_batches()[0], bits=4, group_size=32)
    name = "model.layers.0.mlp.up_proj"
    cases = [
        ({**weights, name: weights["model.layers.0.mlp.down_proj"]}, "same GPTQWeight|\\[N, K\\]"),
        ({k: w for k, w in weights.items() if k != name}, "missing model.layers.0.mlp.up_proj"),
        ({**weights, name: weights["model.layers.0.mlp.gate_proj"]}, "same GPTQWeight"),
    ]
    for bad, pattern in cases:
        out = tmp_path / "out"
        with pytest.raises(ValueError, match=pattern):
            spikeops.save_gptq(dense, bad, out)
        assert not out.exists() or not any(out.iterdir())


def test_shard_paths_stay_inside_the_folder(folder, tmp_path):
    outside = tmp_path / "other"
    outside.mkdir()
    shutil.copy(folder / "model.safetensors", outside / "x.safetensors")
    keys = list(json.loads(json.dumps(
        {k: 0 for k in spikeops.checkpoint.read_tensors("t", folder)})))
    for name in ("../other/x.safetensors", str(outside / "x.safetensors")):
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for k in keys}}))
        with pytest.raises(ValueError, match="inside"):
            spikeops.load_gptq(folder, MINMAX4)
    for bad in ([1, 2], {"weight_map": {keys[0]: 5}}):
        (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="weight_map|inside"):
            spikeops.load_gptq(folder, MINMAX4)


@pytest.mark.parametrize("name", ["model.safetensors", CALIBRATION_FILE])
def test_fifos_are_refused_at_once(folder, name):
    if name == "model.safetensors":
        (folder / name).unlink()
    os.mkfifo(folder / name)
    result = _run_isolated(f"""
        import spikeops
        try:
            spikeops.load_gptq({str(folder)!r}, spikeops.Encoding("minmax", 4))
        except ValueError as e:
            print("refused:", e)
        """, timeout=120)
    assert "refused" in result.stdout, result.stdout + result.stderr


def test_config_checked_against_the_tensors(folder):
    config = json.loads((folder / "config.json").read_text())
    for field, value, pattern in [("num_hidden_layers", 40000, "num_hidden_layers"),
                                  ("hidden_size", -256, "hidden_size"),
                                  ("hidden_size", "64", "hidden_size"),
                                  ("vocab_size", 2.5, "vocab_size"),
                                  ("torch_dtype", "float99", "torch_dtype")]:
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ValueError, match=pattern):
            spikeops.load_gptq(folder, MINMAX4)


def test_calibration_files_are_never_weights(folder, tmp_path):
    cal = calibrate(spikeops.load_gptq(folder, MINMAX4), tiny_batches(), methods=["obs"])
    cal.save(folder)
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.safetensors")
    assert spikeops.load_gptq(folder, spikeops.Encoding("minmax", 4, salient_bits=6)) is not None
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    for f in ("config.json", "quantize_config.json", CALIBRATION_FILE, CALIBRATION_MASK_FILE):
        shutil.copy(folder / f, only_bin / f)
    (only_bin / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        spikeops.load_gptq(only_bin, MINMAX4)
