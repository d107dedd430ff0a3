"""Files and links (docs/checkpoints.md, "Files and links"): a folder always holds one model,
nothing is read through a link that leaves the folder (a Hugging Face cache's own tree
excepted), nothing is written through a link or inside the package, a failed write leaves
what was there, and the temporary folders of killed writers are cleaned up."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import spikeops
from spikeops import files
from spikeops.cli import main
from spikeops.calibrate import Calibration
from spikeops.checkpoint import CALIBRATION_FILE as JSON_FILE
from test_checkpoints import ENC, calib, tiny_model
from test_floatmodel import tiny_gguf  # noqa: F401  (a fixture)


def logits(folder):
    with torch.no_grad():
        return spikeops.load_gptq(folder, ENC)(calib()).logits


def checkpoint_of(seed, folder):
    model = tiny_model(seed)
    spikeops.save_gptq(model, spikeops.quantize(model, calib(), bits=4, group_size=32), folder)
    return folder


def siblings(folder: Path):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    """A failure between the weights and the config (a full disk) must not leave the new
    weights under the old config: the folder keeps the old model, whole."""
    folder = checkpoint_of(0, tmp_path / "q")
    before = logits(folder)
    model = tiny_model(1)
    weights = spikeops.quantize(model, calib(), bits=4, group_size=32)
    real = Path.write_text

    def full_disk(path, *args, **kwargs):
        if path.name == "config.json":
            raise OSError(28, "No space left on device")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        spikeops.save_gptq(model, weights, folder)
    monkeypatch.undo()
    assert torch.equal(logits(folder), before)
    assert siblings(folder) == []


def test_safetensors_write_failure_is_an_oserror(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    def too_large(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: IoError(File too large)")
    monkeypatch.setattr(safetensors.torch, "save_file", too_large)
    model = tiny_model()
    weights = spikeops.quantize(model, calib(), bits=4, group_size=32)
    with pytest.raises(OSError, match=f"save_gptq: writing {tmp_path / 'q'} failed"):
        spikeops.save_gptq(model, weights, tmp_path / "q")
    assert not (tmp_path / "q").exists() and siblings(tmp_path / "q") == []


def test_save_replaces_a_model_folder_whole(tmp_path):
    folder = checkpoint_of(0, tmp_path / "q")
    (folder / JSON_FILE).write_text("{}")             # an old calibration
    (folder / "tokenizer.json").write_text("{}")      # an old model's tokenizer
    checkpoint_of(1, folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model.safetensors", "quantize_config.json"]
    assert torch.equal(logits(folder), logits(checkpoint_of(1, tmp_path / "fresh")))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="no config.json; refusing to replace"):
        checkpoint_of(0, tmp_path / "notes")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep"


def quantize_cli(model_dir, out, text, *extra):
    return main(["quantize", str(model_dir), str(out), "--text", str(text), "--samples", "2",
                 "--seq-len", "64", *extra])


def test_quantize_into_an_existing_folder_keeps_nothing_old(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(checkpoint / "q", out)
    Calibration({}, {"old": True}).save(out)
    (out / "tokenizer.json").write_text("{}")
    assert quantize_cli(checkpoint / "fp", out, checkpoint / "text.txt") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "quantize_config.json"]
    assert quantize_cli(checkpoint / "fp", checkpoint / "fp", checkpoint / "text.txt") == 2
    assert "must not be the float model's" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    assert quantize_cli(checkpoint / "fp", tmp_path / "notes", checkpoint / "text.txt") == 2
    assert "refusing to replace" in capsys.readouterr().err


def test_quantize_refuses_a_gptq_folder(checkpoint, capsys):
    assert quantize_cli(checkpoint / "q", checkpoint / "never", checkpoint / "text.txt") == 2
    assert "is a quantized checkpoint" in capsys.readouterr().err
    assert not (checkpoint / "never").exists()


def test_nothing_is_written_inside_the_package(tmp_path, capsys):
    """calibrate without a folder means the embedded model, inside the installed package."""
    shipped = (files.PACKAGE / "data" / "default_model" / JSON_FILE).read_bytes()
    assert main(["calibrate", "--samples", "1", "--seq-len", "16"]) == 2
    assert "inside the installed spikeops package" in capsys.readouterr().err
    assert (files.PACKAGE / "data" / "default_model" / JSON_FILE).read_bytes() == shipped
    with pytest.raises(ValueError, match="inside the installed spikeops package"):
        Calibration({}, {}).save(files.PACKAGE / "data")
    assert main(["calibrate", "--samples", "1", "--seq-len", "16", "--max-tokens", "16",
                 "--out", str(tmp_path / "cal")]) == 0
    assert Calibration.load(tmp_path / "cal").layers


def test_no_write_through_planted_links(checkpoint, tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("precious")
    out = tmp_path / "out"
    shutil.copytree(checkpoint / "q", out)
    for name in ("config.json", "quantize_config.json", "tokenizer.json"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside)
    assert quantize_cli(checkpoint / "fp", out, checkpoint / "text.txt") == 0
    assert outside.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir())
    # A calibration is not saved over links planted under its names.
    for name in (JSON_FILE, "spikeops_calibration.safetensors"):
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(outside)
        with pytest.raises(ValueError, match=f"{name} is a symbolic link"):
            Calibration({}, {"x": 1}).save(out)
        (out / name).unlink()
    assert outside.read_text() == "precious"
    link = tmp_path / "link-out"
    link.symlink_to(out)
    with pytest.raises(ValueError, match="symbolic link"):
        spikeops.save_gptq(tiny_model(), spikeops.quantize(tiny_model(), calib(), bits=4,
                                                           group_size=32), link)


def test_links_out_of_the_folder_are_refused(checkpoint, tmp_path, capsys):
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ 'not the model's template' }}")
    src = tmp_path / "fp"
    shutil.copytree(checkpoint / "fp", src)
    (src / "chat_template.jinja").symlink_to(secret)
    assert quantize_cli(src, tmp_path / "out", checkpoint / "text.txt") == 2
    assert "chat_template.jinja is a link to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    q = tmp_path / "q"
    shutil.copytree(checkpoint / "q", q)
    os.replace(q / "config.json", tmp_path / "config.json")
    (q / "config.json").symlink_to(tmp_path / "config.json")
    with pytest.raises(ValueError, match="config.json is a link to .*outside"):
        spikeops.load_gptq(q, ENC)


def test_hugging_face_cache_layout_is_read(checkpoint, tmp_path):
    """snapshots/<rev>/* are links into ../../blobs/: inside the model's cache tree."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted((checkpoint / "q").iterdir())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    assert torch.equal(logits(snapshot), logits(checkpoint / "q"))
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(checkpoint / "q" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is a link to .*outside"):
        spikeops.load_gptq(snapshot, ENC)


def test_stale_temporary_folders_are_removed(tmp_path):
    out = tmp_path / "model"
    dead = tmp_path / ".model.tmp-999999999-abc"      # its writer was killed
    mine = tmp_path / f".model.tmp-{os.getpid()}-xyz"  # a writer still running
    other = tmp_path / ".modelx.tmp-999999999-abc"    # another folder's
    young = tmp_path / ".model.tmp-999999998-new"    # a dead pid, but just made: may be a
    for d in (dead, mine, other, young):               # live writer of another pid space
        d.mkdir()
    for d in (dead, mine, other):
        os.utime(d, (0, 0))
    checkpoint_of(0, out)
    assert not dead.exists() and mine.is_dir() and other.is_dir() and young.is_dir()
    # A swap killed between its two renames: the old model goes back where it was.
    old = tmp_path / ".model.old-999999999-abc"
    os.replace(out, old)
    os.utime(old, (0, 0))
    files.remove_stale(out)
    assert (out / "config.json").is_file() and not old.exists()


def test_a_failed_swap_keeps_the_old_folder_and_modes_follow_the_umask(tmp_path, monkeypatch):
    folder = checkpoint_of(0, tmp_path / "q")
    mask = os.umask(0o022)
    try:
        checkpoint_of(1, tmp_path / "fresh")
        (tmp_path / "out.json").write_text("")
        files.write_file("t", tmp_path / "made.json", lambda tmp: tmp.write_text("{}"))
    finally:
        os.umask(mask)
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "made.json").stat().st_mode & 0o777 == 0o644
    before = logits(folder)
    real, calls = os.replace, []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(OSError, match="Input/output error"):
        checkpoint_of(1, folder)
    monkeypatch.undo()
    assert torch.equal(logits(folder), before) and siblings(folder) == []


def test_messages_name_the_final_folder(tiny_gguf, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def fail(_tokenizer, folder, *args, **kwargs):
        raise OSError(f"cannot write {Path(folder) / 'tokenizer.json'}")
    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", fail)
    out = tmp_path / "float"
    with pytest.raises(OSError, match=f"cannot write {out / 'tokenizer.json'}$"):
        spikeops.floatmodel.import_gguf(tiny_gguf[1], out)
    assert list(tmp_path.iterdir()) == []


def test_generate_is_bounded_by_the_context(checkpoint, capsys):
    model = spikeops.load_gptq(checkpoint / "q", ENC)
    with pytest.raises(ValueError, match="context of 512 tokens"):
        spikeops.evaluate.generate(model, torch.zeros(10, dtype=torch.int64), 1_000_000)
    assert main(["generate", str(checkpoint / "q"), "--max-new-tokens", "1000000"]) == 2
    assert "context of 512 tokens" in capsys.readouterr().err


def test_unknown_cpu_isa_is_refused(monkeypatch):
    from spikeops import _C
    st = spikeops.encode(torch.randn(2, 256), spikeops.Encoding("minmax", 4))
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", "avx3")
    with pytest.raises(ValueError, match="SPIKEOPS_CPU_ISA must be .* got 'avx3'"):
        _C.cpu_isa()
    w = spikeops.GPTQWeight(*[t for t in _w4()], bits=4, group_size=128, sym=False)
    with pytest.raises(ValueError, match="SPIKEOPS_CPU_ISA"):
        spikeops.spike_linear(st, w, backend="int")
    monkeypatch.setenv("SPIKEOPS_CPU_ISA", "avx2")
    spikeops.spike_linear(st, w, backend="int")


def _w4():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (256, 64), generator=gen)
    z = torch.randint(1, 16, (2, 64), generator=gen)
    return (spikeops.pack(q, 4, 0), spikeops.pack(z - 1, 4, 1),
            (torch.rand(2, 64, generator=gen) * 0.01).half(), None)


def test_float_activation_layer_refuses_another_device(checkpoint):
    model = spikeops.load_gptq(checkpoint / "q", ENC)
    layer = model.model.layers[0].mlp.down_proj
    layer.set_encoding(None)
    layer.to("meta")
    with pytest.raises(ValueError, match="x is on cpu, the layer on meta"):
        layer(torch.randn(1, layer.in_features))
