"""Regression tests of a probe of bad inputs and faults: meta tensors, stale and traversing
checkpoint files, FIFOs (in subprocesses with a timeout), unbounded configs, interrupted saves,
malformed calibrations, wrong exception types; and a few hundred random configurations
against the reference across thread counts."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import spikeops
from helpers import kernel_args, make_layer, tiny_batches
from spikeops import Encoding, reference
from spikeops.calibrate import Calibration, calibrate
from spikeops.checkpoint import CALIBRATION_FILE as JSON_FILE, CALIBRATION_MASK_FILE as MASK_FILE

ENC = Encoding("minmax", 4)


# ----------------------------------------------------------------------------- meta tensors
def test_meta_tensors_raise_instead_of_returning_garbage():
    lin = spikeops.SpikeLinear(make_layer(64, 16, 4, 32)[0], ENC).to("meta")
    with pytest.raises(ValueError, match="device"):
        lin(torch.randn(2, 64))
    st = spikeops.encode(torch.randn(2, 64), ENC)
    with pytest.raises(ValueError, match="scale"):
        spikeops.ops.spike_decode(st.planes, None, None, st.scale.to("meta"), st.zero, 64,
                                  torch.float32)
    with pytest.raises(ValueError, match="bits"):  # fakes check what they can
        spikeops.ops.gif_encode(torch.randn(2, 64, device="meta"), "minmax", 99)


def test_bias_survives_double():
    lin = spikeops.SpikeLinear(make_layer(64, 16, 4, 32)[0], ENC, bias=torch.randn(16))
    lin.double()
    assert lin(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------- checkpoints
def _run_isolated(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A case that could hang runs in its own process with a timeout."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def folder(checkpoint, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(checkpoint / "q", dst)
    return dst


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
    loaded = spikeops.load_gptq(folder, ENC)
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
            spikeops.load_gptq(folder, ENC)
    for bad in ([1, 2], {"weight_map": {keys[0]: 5}}):
        (folder / "model.safetensors.index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="weight_map|inside"):
            spikeops.load_gptq(folder, ENC)


@pytest.mark.parametrize("name", ["model.safetensors", JSON_FILE])
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
            spikeops.load_gptq(folder, ENC)


def test_calibration_files_are_never_weights(folder, tmp_path):
    cal = calibrate(spikeops.load_gptq(folder, ENC), tiny_batches(), methods=["obs"])
    cal.save(folder)
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.safetensors")
    assert spikeops.load_gptq(folder, Encoding("minmax", 4, salient_bits=6)) is not None
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    for f in ("config.json", "quantize_config.json", JSON_FILE, MASK_FILE):
        shutil.copy(folder / f, only_bin / f)
    (only_bin / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        spikeops.load_gptq(only_bin, ENC)


# ----------------------------------------------------------------------------- calibration
def test_interrupted_calibration_save_never_mixes(folder):
    model = spikeops.load_gptq(folder, ENC)
    old = calibrate(model, tiny_batches(), methods=["obs"], salient_fraction=0.1)
    new = calibrate(model, tiny_batches(), methods=["obs"], salient_fraction=0.3)
    old.save(folder)
    json_before = (folder / JSON_FILE).read_text()
    new.save(folder)
    (folder / JSON_FILE).write_text(json_before)  # as if the new JSON had not landed
    with pytest.raises(ValueError, match="interrupted or mixed"):
        Calibration.load(folder)
    new.save(folder)
    loaded = Calibration.load(folder)
    name = next(iter(new.layers))
    assert torch.equal(loaded.layers[name].salient, new.layers[name].salient)


def test_malformed_calibrations_raise_value_error(folder):
    model = spikeops.load_gptq(folder, ENC)
    calibrate(model, tiny_batches(), methods=["obs", "las"]).save(folder)
    good_json, good_masks = (folder / JSON_FILE).read_text(), (folder / MASK_FILE).read_bytes()
    name = next(iter(json.loads(good_json)["layers"]))

    def layers_with(entry):
        raw = json.loads(good_json)
        raw["layers"][name] = entry
        raw.pop("masks_sha256")
        return json.dumps(raw)

    cases = [(JSON_FILE, layers_with(5)), (JSON_FILE, layers_with(None)),
             (JSON_FILE, layers_with({"theta": ["a", "b"]})),
             (JSON_FILE, b"\xff\xfe not utf-8"),
             (MASK_FILE, good_masks[: len(good_masks) // 2])]
    for file, content in cases:
        (folder / JSON_FILE).write_text(good_json)
        (folder / MASK_FILE).write_bytes(good_masks)
        if file == MASK_FILE:  # a damaged mask file under a JSON without its hash
            raw = json.loads(good_json)
            raw.pop("masks_sha256")
            (folder / JSON_FILE).write_text(json.dumps(raw))
        target = folder / file
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
        with pytest.raises(ValueError):
            Calibration.load(folder)
    from safetensors.torch import load_file, save_file
    (folder / JSON_FILE).write_text(json.dumps({**json.loads(good_json), "masks_sha256": None}))
    (folder / MASK_FILE).write_bytes(good_masks)
    masks = {k: v.float() * 0.5 for k, v in load_file(str(folder / MASK_FILE)).items()}
    save_file(masks, str(folder / MASK_FILE))
    with pytest.raises(ValueError, match="uint8"):
        Calibration.load(folder)


def test_calibrate_and_quantize_check_their_token_ids(checkpoint, folder):
    model = spikeops.load_gptq(folder, ENC)
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


# ----------------------------------------------------------------------------- values
def test_gptq_weight_arguments():
    t = make_layer(128, 16, 4, 32)[0].gptq_tensors()
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    for sym in ("no", None):
        with pytest.raises(TypeError, match="sym"):
            spikeops.GPTQWeight(qweight, qzeros, scales, sym=sym, group_size=32)
    short = torch.arange(127, dtype=torch.int32) // 32
    with pytest.raises(ValueError, match="g_idx.*in_features"):
        spikeops.GPTQWeight(qweight, qzeros, scales, short, group_size=32)
    ragged = spikeops.GPTQWeight(qweight, qzeros, scales, short, group_size=32,
                                 in_features=127)
    assert ragged.in_features == 127


def test_tiny_oat_thresholds_and_static_without_tokens():
    with pytest.raises(ValueError, match="normal float32"):
        Encoding("oat", 16, theta=(1e-44, 1e-43))
    for bits in (1, 4):
        st = spikeops.encode(torch.randn(0, 40), Encoding("static", bits), scale=0.1, zero=3)
        assert st.planes.shape == (bits, 0, 2) and st.sign is None


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    from spikeops import cli
    existing = tmp_path / "file"
    existing.write_text("x")
    assert cli.main(["report", str(checkpoint / "q"), "--text", str(checkpoint / "text.txt"),
                     "--max-tokens", "16", "--out", str(existing)]) == 2
    only_bin = tmp_path / "bin"
    only_bin.mkdir()
    shutil.copy(checkpoint / "fp" / "config.json", only_bin / "config.json")
    (only_bin / "pytorch_model.bin").write_bytes(b"x")
    assert cli.main(["quantize", str(only_bin), str(tmp_path / "o"), "--text",
                     str(checkpoint / "text.txt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("spikeops ") for line in err), err


# ----------------------------------------------------------------------------- random
def test_random_configurations_against_the_reference_and_thread_counts():
    """A few hundred random small problems: both backends and both thread counts give the
    reference's bits."""
    gen = torch.Generator().manual_seed(7)
    threads = torch.get_num_threads()
    modes = [Encoding("minmax", 4), Encoding("absmax", 3, gamma=0.7), Encoding("absmean", 5),
             Encoding("minmax", 2, salient_bits=5), Encoding("oat", 6, theta=(0.5, 3.0))]
    try:
        for case in range(240):
            K = int(torch.randint(1, 150, (), generator=gen))
            N = int(torch.randint(1, 40, (), generator=gen))
            M = int(torch.randint(0, 6, (), generator=gen))
            bits = (2, 3, 4, 8)[case % 4]
            gs = (-1, 8, 32, 64)[(case // 4) % 4]
            w = make_layer(K, N, bits, gs, act_order=case % 3 == 0, sym=case % 2 == 0,
                           seed=case)[0]
            enc = modes[case % len(modes)]
            mask = torch.rand(K, generator=gen) < 0.2 if enc.salient_bits else None
            x = torch.randn(M, K, generator=gen) * 3
            st = spikeops.encode(x, enc, salient_mask=mask)
            f = {k: v for k, v in st._asdict().items() if k != "shape"}
            ref = reference.spike_linear(**f, **kernel_args(w), bias=None,
                                         out_dtype=torch.float32)
            for n in (1, 2):
                torch.set_num_threads(n)
                for backend in ("int", "spike"):
                    y = spikeops.spike_linear(st, w, out_dtype=torch.float32, backend=backend)
                    assert torch.equal(y, ref), (case, n, backend)
    finally:
        torch.set_num_threads(threads)
