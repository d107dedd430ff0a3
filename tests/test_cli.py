"""The command line (quantize, calibrate, eval, generate) on the tiny GPTQ LLaMA of
conftest.py, and the README's main job (demo) on the embedded model."""

import shutil

import pytest

import spikeops
from spikeops import cli, commands


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


def test_encoding_recorded_in_the_checkpoint(checkpoint, tmp_path, capsys, monkeypatch):
    """quantize --encoding and calibrate --encoding record an encoding or policy in config.json;
    generate and report run it when --encoding is not given (docs/checkpoints.md)."""
    from spikeops.checkpoint import recorded_encoding
    text = str(checkpoint / "text.txt")
    out = tmp_path / "q4"
    small = ["--samples", "2", "--seq-len", "128"]
    # An encoding needing a calibration cannot be recorded before there is one.
    assert cli.main(["quantize", str(checkpoint / "fp"), str(out), "--text", text,
                     "--encoding", "oat8", *small]) == 2
    assert "calibration" in capsys.readouterr().err and not out.exists()
    assert cli.main(["quantize", str(checkpoint / "fp"), str(out), "--text", text,
                     "--encoding", "absmax4", *small]) == 0
    assert recorded_encoding("test", out) == "absmax4"
    policy = "down_proj=absmax8;*=minmax4+s6"
    assert cli.main(["calibrate", str(out), "--text", text, "--encoding", policy,
                     "--out", str(tmp_path / "elsewhere"), *small]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["calibrate", str(out), "--text", text, "--methods", "sdllm",
                     "--encoding", policy, *small]) == 2  # +s6 needs OBS masks
    assert recorded_encoding("test", out) == "absmax4"  # nothing recorded on a refusal
    assert cli.main(["calibrate", str(out), "--text", text, "--encoding", policy, *small]) == 0
    assert recorded_encoding("test", out) == policy
    assert cli.main(["calibrate", str(out), "--text", text, *small]) == 0  # keeps it
    assert recorded_encoding("test", out) == policy
    ran = []
    real = commands.parse_encoding
    monkeypatch.setattr(commands, "parse_encoding", lambda spec, cal: ran.append(spec) or
                        real(spec, cal))
    assert cli.main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "2"]) == 0
    assert cli.main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "2",
                     "--encoding", "minmax4"]) == 0
    assert ran == [policy, "minmax4"]


def test_demo_on_the_embedded_model(capsys):
    """The README's main command, smaller: the shipped checkpoint loads, with its calibration,
    and every encoding stays close to the dense model's perplexity but absmean (docs)."""
    assert commands.DEFAULT_MODEL.is_dir() and commands.DEFAULT_DENSE.is_dir() and commands.DEFAULT_TEXT.is_file()
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


def test_no_command_lists_the_commands_in_order_and_version(capsys):
    """A newcomer's first two calls: the commands in the order they are used, and --version."""
    from spikeops.cli import main
    assert main([]) == 0
    out = capsys.readouterr().out
    order = ["demo", "import-gguf", "quantize", "calibrate", "eval", "generate", "report",
             "lm-eval"]
    listed = [line.split()[0] for line in out.split("commands:")[1].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == order and "Start with 'spikeops demo'" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == (
        f"spikeops {spikeops.__version__}")
    # The installed distribution takes its version from there (pyproject.toml: dynamic).
    from importlib.metadata import version
    assert version("spikeops") == spikeops.__version__


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
