"""GGUF files transformers would misread, refused by name before it reads them
(spikeops.gguf_file): missing or extra tensors, another architecture, broken headers and
tokenizers; and a chat template jinja2's sandbox refuses."""

import re
import struct

import pytest
import torch

from spikeops import cli
from spikeops.floatmodel import chat_prompt, import_gguf, load_float_model

gguf = pytest.importorskip("gguf")
from spikeops.gguf_file import check_gguf  # noqa: E402
from test_floatmodel import write_gguf  # noqa: E402  (tests/ is on sys.path)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)).eval()


@pytest.fixture
def write(llama, tmp_path, monkeypatch):
    """``write(drop=(), meta={})``: write_gguf's file of ``llama`` as tmp_path/model.gguf,
    without the metadata keys and tensors in ``drop`` and with ``meta``'s values for its keys."""
    def edited(drop=(), meta=None):
        meta = meta or {}

        class Edited(gguf.GGUFWriter):
            def add_key_value(self, key, val, vtype, sub_type=None):
                if key not in drop:
                    super().add_key_value(key, meta.get(key, val), vtype, sub_type)

            def add_tensor(self, name, tensor, *args, **kwargs):
                if name not in drop:
                    super().add_tensor(name, tensor, *args, **kwargs)
        with monkeypatch.context() as m:
            m.setattr(gguf, "GGUFWriter", Edited)
            write_gguf(llama, tmp_path / "model.gguf")
        return tmp_path / "model.gguf"
    return edited


def test_a_valid_file_passes(write):
    check_gguf("t", write())


@pytest.mark.parametrize("drop, meta, match", [
    (["blk.1.ffn_down.weight"], {}, "must hold tensor blk.1.ffn_down.weight .*missing"),
    (["output_norm.weight"], {}, "must hold tensor output_norm.weight .*missing"),
    ([], {"llama.block_count": 3}, "must hold tensor blk.2.attn_norm.weight"),
    ([], {"llama.block_count": 1}, "block_count 1, got 9 others such as blk.1.attn_k.weight"),
    (["llama.block_count"], {}, "llama.block_count must be a positive integer, got nothing"),
    (["llama.attention.head_count_kv"], {}, "llama.attention.head_count_kv must be a positive"),
    ([], {"llama.feed_forward_length": 128},
     r"blk.0.ffn_gate.weight must have shape \[64, 128\].*got \[64, 96\]"),
    ([], {"general.architecture": "gpt2"},
     "general.architecture must be one of .'llama', 'qwen2'. .only LLaMA-architecture GGUF "
     "files are supported., got 'gpt2'"),
    ([], {"tokenizer.ggml.tokens": ["a"] * 200},
     "tokenizer.ggml.tokens must list 260 tokens, one per row of token_embd.weight, got a list "
     "of 200"),
    (["tokenizer.ggml.merges"], {}, "tokenizer.ggml.merges must list the merges of "
     "tokenizer.ggml.model 'gpt2', got nothing"),
    ([], {"tokenizer.ggml.merges": ["zz qq"]}, "got 'zz qq'"),
    ([], {"tokenizer.ggml.merges": ["Ġ a"]}, "left\\+right being tokens, got 'Ġ a'"),
    (["tokenizer.ggml.merges"], {"tokenizer.ggml.model": "llama"},
     "tokenizer.ggml.scores must list 260 scores, one per token, for tokenizer.ggml.model "
     "'llama' without tokenizer.ggml.merges, got nothing"),
    ([], {"tokenizer.ggml.bos_token_id": 9999},
     r"bos_token_id must be a token id in \[0, 260\), got 9999"),
], ids=["no ffn_down", "no output_norm", "block_count beyond the tensors", "extra layer",
        "no block_count", "no head_count_kv", "wrong shape", "gpt2", "short token list",
        "no merges", "unknown merge", "merge into no token", "no scores", "bos id"])
def test_metadata_and_tensors(write, tmp_path, drop, meta, match):
    """Each is refused by import_gguf before anything is written (transformers loads the first
    five with random or dropped weights and fails on the others with tracebacks)."""
    file, out = write(drop, meta), tmp_path / "out"
    with pytest.raises(ValueError, match=f"^load_float_model: {re.escape(str(file))}: .*{match}"):
        import_gguf(file, out)
    assert sorted(tmp_path.iterdir()) == [file]  # no output folder, no temporary one


def tensor_info(data: bytes, name: bytes) -> int:
    """Where the tensor info of ``name`` starts: its name's u64 length, the name, the u32
    dimension count, the u64 dimensions, the u32 ggml type and the u64 data offset."""
    return data.index(struct.pack("<Q", len(name)) + name)


@pytest.mark.parametrize("where", ["header", "metadata", "tensor infos", "tensor data",
                                   "tensor_count", "kv_count", "integer tensor"])
def test_broken_files(write, where):
    """Truncated at several points, a count of 2**40 (the v3 header is magic, u32 version, u64
    tensor_count, u64 kv_count) or an int32 tensor: a ValueError naming the file."""
    file = write()
    data = file.read_bytes()
    infos = tensor_info(data, b"token_embd.weight")  # the first tensor info, after the metadata
    cut = {"header": 12, "metadata": infos // 2, "tensor infos": infos + 10,
           "tensor data": len(data) - 1000}
    if where in cut:
        data = data[:cut[where]]
    elif where.endswith("count"):
        at = 8 if where == "tensor_count" else 16
        data = data[:at] + struct.pack("<Q", 2 ** 40) + data[at + 8:]
    else:  # output_norm.weight's F32 relabelled I32, the same bytes
        name = b"output_norm.weight"
        at = tensor_info(data, name) + 8 + len(name)
        at += 4 + 8 * struct.unpack_from("<I", data, at)[0]
        data = data[:at] + struct.pack("<I", gguf.GGMLQuantizationType.I32) + data[at + 4:]
    file.write_bytes(data)
    match = ("every tensor must be stored as floats or in a quantization transformers can "
             "dequantize, got: Dequantization for I32" if where == "integer tensor" else
             "must be a complete GGUF file .*truncated or corrupt")
    with pytest.raises(ValueError, match=f"^load_float_model: {re.escape(str(file))}: {match}"):
        load_float_model(file)


@pytest.mark.parametrize("command", ["import-gguf", "quantize"])
def test_cli_refuses_with_one_line(write, tmp_path, capsys, command):
    file, out = write(drop=["blk.1.ffn_down.weight"]), tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("some calibration text " * 20)
    extra = ["--text", str(text)] if command == "quantize" else []
    assert cli.main([command, str(file), str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spikeops {command}: error: load_float_model: {file}: a llama file "
                          f"must hold tensor blk.1.ffn_down.weight") and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("template, cause", [
    ("{{ ''.__class__.__mro__ }}", "SecurityError: access to attribute '__class__'"),
    ("{{ cycler.__init__.__globals__ }}", "SecurityError: access to attribute '__init__'"),
    ("{% for i in range(10 ** 9) %}{% endfor %}", "OverflowError: Range too big"),
])
def test_hostile_chat_template(write, template, cause):
    _, tokenizer = load_float_model(write(meta={"tokenizer.chat_template": template}))
    with pytest.raises(ValueError, match=f"^chat_prompt: the model's chat template could not be "
                                         f"applied: {cause}"):
        chat_prompt(tokenizer, "hi")
