"""Real models in: GGUF import (on a tiny LLaMA GGUF this test writes with the gguf package),
the tokenizer rules of every command, and the command-line options around them."""

import json
import shutil

import numpy as np
import pytest
import torch

import spikeops
from spikeops import cli
from spikeops.evaluate import encode_text
from spikeops.floatmodel import import_gguf, load_float_model, load_tokenizer

gguf = pytest.importorskip("gguf")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokens():
    """GPT-2's byte-level alphabet: one printable character per byte."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert script reorders the rows of q and k for its rotary layout."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def write_gguf(model, path) -> None:
    """A LLaMA or Qwen2 model as llama.cpp's converter writes it: LLaMA's q/k rows permuted to
    its rotary layout, Qwen2's not, and Qwen2's q/k/v biases."""
    cfg = model.config
    qwen2 = cfg.model_type == "qwen2"
    w = gguf.GGUFWriter(str(path), cfg.model_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    tokens = byte_tokens() + ["Ġt"] + SPECIALS
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3] * 3)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(CHAT_TEMPLATE)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
        for g, h in names.items():
            w.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        for g, h, n in (("attn_q", "q_proj", heads), ("attn_k", "k_proj", kv)):
            weight = sd[f"{p}self_attn.{h}.weight"]
            w.add_tensor(f"blk.{i}.{g}.weight", weight if qwen2 else llama_cpp_permute(weight, n))
        for g, h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")):
            if qwen2:
                w.add_tensor(f"blk.{i}.{g}.bias", sd[f"{p}self_attn.{h}.bias"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# The tiny models written as GGUF files: a vocabulary of the tokens write_gguf lists.
GGUF_SIZES = dict(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**GGUF_SIZES)).eval()
    root = tmp_path_factory.mktemp("gguf")
    write_gguf(model, root / "tiny.gguf")
    return model, root / "tiny.gguf"


def test_import_gguf_round_trip(tiny_gguf, tmp_path):
    """The imported folder holds the same model (logits), its tokenizer and chat template."""
    model, file = tiny_gguf
    out = import_gguf(file, tmp_path / "float")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".partial")) for n in names)
    loaded, tok = load_float_model(out)
    ids = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    text, templated = spikeops.floatmodel.chat_prompt(tok, "hi")
    assert templated and text.endswith("<|im_start|>assistant\n")
    assert encode_text("hello there", tok).tolist() == tok("hello there")["input_ids"]
    (out / "stale.txt").write_text("from an earlier import")
    import_gguf(file, out)  # a model folder is replaced whole
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("not a model")
    with pytest.raises(ValueError, match="no config.json; refusing to replace"):
        import_gguf(file, tmp_path / "notes")
    with pytest.raises(ValueError, match=".gguf"):
        import_gguf(out / "config.json", tmp_path / "x")


def test_quantize_a_gguf_copies_the_tokenizer(tiny_gguf, tmp_path):
    """quantize takes the GGUF directly; the checkpoint carries the tokenizer, its dense tensors
    are float16, and eval reads the text with that tokenizer."""
    _, file = tiny_gguf
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "q"
    assert cli.main(["quantize", str(file), str(out), "--text", str(text), "--samples", "4",
                     "--seq-len", "64", "--group-size", "32"]) == 0
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file() or \
        "chat_template" in (out / "tokenizer_config.json").read_text()
    from safetensors.torch import load_file
    assert load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == \
        torch.float16
    report = tmp_path / "rows.json"
    assert cli.main(["eval", str(out), "--text", str(text), "--encodings", "minmax4,absmax8",
                     "--dense", str(file), "--max-tokens", "200", "--json", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert [r["encoding"] for r in rows] == ["dense", "float", "minmax4", "absmax8"]
    assert all(set(r) == {"encoding", "perplexity", "firing_rate", "sops_per_mac", "tokens",
                          "perplexity_low", "perplexity_high", "energy", "planes", "kv"}
               for r in rows)
    assert all(r["kv"] == "float" for r in rows)
    assert [r["planes"] for r in rows] == [None, None, 4.0, 8.0]
    assert rows[0]["firing_rate"] is None and rows[2]["sops_per_mac"] > 0
    assert all(r["tokens"] == rows[0]["tokens"] for r in rows)


def test_tokenizer_rules(checkpoint, tiny_gguf, tmp_path, capsys):
    """Byte-level models read bytes; any other vocabulary without a tokenizer is refused; a
    --dense model whose tokenizer reads the text differently is refused."""
    assert load_tokenizer("t", checkpoint / "q", 256) is None
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer("t", checkpoint / "q", 49152)
    folder = tmp_path / "q"
    shutil.copytree(checkpoint / "q", folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 300
    (folder / "config.json").write_text(json.dumps(config))
    text = str(checkpoint / "text.txt")
    assert cli.main(["eval", str(folder), "--text", text, "--encodings", "minmax4"]) == 2
    assert "no tokenizer" in capsys.readouterr().err
    spaced = tmp_path / "spaced.txt"  # " t" is one token of the GGUF's vocabulary, two bytes
    spaced.write_text("a tiny test of the tokenizer " * 20)
    assert cli.main(["eval", str(checkpoint / "q"), "--text", str(spaced), "--encodings",
                     "minmax4", "--dense", str(tiny_gguf[1])]) == 2
    assert "tokenizer reads the text differently" in capsys.readouterr().err


def test_generate_options(checkpoint, capsys):
    """--encoding none (float activations), --dense (the float model) and --chat without a
    template (refused)."""
    q, fp = str(checkpoint / "q"), str(checkpoint / "fp")
    for extra in (["--encoding", "none"], ["--dense", fp]):
        assert cli.main(["generate", q, "--prompt", "def ", "--max-new-tokens", "4"] + extra) == 0
        assert capsys.readouterr().out.startswith("def ")
    assert cli.main(["generate", q, "--chat", "--max-new-tokens", "4"]) == 2
    assert "chat template" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["demo", "import-gguf", "quantize", "calibrate", "eval",
                                     "generate", "report"])
def test_every_help_shows_its_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert "(default:" in out or command == "import-gguf"


@pytest.mark.parametrize("argv", [["calibrate", "--samples", "0"], ["calibrate", "--seq-len", "0"],
                                  ["eval", "--max-tokens", "0"], ["quantize", "nowhere", "out",
                                                                  "--text", "x"]])
def test_bad_options_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "error" in capsys.readouterr().err


def test_import_qwen2_gguf(tmp_path):
    """A Qwen2 GGUF (q/k/v biases, no rotary permutation) imports as the same model."""
    from test_architecture import qwen2
    model = qwen2(**GGUF_SIZES, pad_token_id=None)
    write_gguf(model, tmp_path / "qwen2.gguf")
    loaded, _ = load_float_model(import_gguf(tmp_path / "qwen2.gguf", tmp_path / "float"))
    assert loaded.config.model_type == "qwen2"
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
