"""What a GGUF file must hold before transformers reads it (docs/checkpoints.md, "GGUF files").
transformers fills a missing tensor with random weights, drops one it has no place for, falls
back to LlamaConfig's defaults for absent sizes, and fails with a traceback on a broken header or
tokenizer; ``check_gguf`` refuses each such file first, naming what is wrong."""

from __future__ import annotations

import reprlib
from pathlib import Path

import gguf

# general.architecture values spikeops imports (llama.cpp's names for the families of
# architecture.SUPPORTED), each with the per-block tensors beyond LLaMA's it must hold: Qwen2's
# q/k/v biases.
TENSOR = gguf.MODEL_TENSOR
ARCHITECTURES = {gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]: (),
                 gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]: (TENSOR.ATTN_Q, TENSOR.ATTN_K,
                                                               TENSOR.ATTN_V)}
# The sizes the tensor shapes follow from, each a positive int under "llama.". Without one,
# transformers takes LlamaConfig's default (32 layers, width 4096), and without head_count_kv it
# also leaves q and k in llama.cpp's row order.
SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv")
OPTIONAL = {TENSOR.OUTPUT}  # absent: the output projection is the token embedding (tied)
TOKENS, MODEL = gguf.Keys.Tokenizer.LIST, gguf.Keys.Tokenizer.MODEL
MERGES, SCORES = gguf.Keys.Tokenizer.MERGES, gguf.Keys.Tokenizer.SCORES
SPECIAL_IDS = (gguf.Keys.Tokenizer.BOS_ID, gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.UNK_ID,
               gguf.Keys.Tokenizer.PAD_ID)


def check_gguf(fn: str, path) -> None:
    """Refuse with a ValueError, naming ``path``, what was expected and what was found, a file
    that is not a readable LLaMA-architecture GGUF holding every tensor of its ``block_count``
    layers (shapes from its sizes; no others) and the tokenizer transformers builds from it."""
    path = Path(path)
    where = f"{fn}: {path}:"
    meta, shapes = _read(where, path)
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where} general.architecture must be one of {tuple(ARCHITECTURES)} "
                         f"(only LLaMA-architecture GGUF files are supported), got "
                         f"{_found(arch)}")
    size = {key: _positive_int(where, meta, f"{arch}.{key}") for key in SIZE_KEYS}
    rope_key = f"{arch}.rope.dimension_count"  # transformers' head_dim
    head_dim = (_positive_int(where, meta, rope_key) if rope_key in meta
                else size["embedding_length"] // size["attention.head_count"])
    # The vocabulary is the embedding's row count (its last ggml dimension); the shape check
    # below refuses an embedding of another rank.
    n_vocab = (shapes.get(_name(TENSOR.TOKEN_EMBD)) or (0,))[-1]
    expected = set()
    for kind, name, shape in _tensors(size, head_dim, n_vocab, ARCHITECTURES[arch]):
        expected.add(name)
        if name not in shapes:
            if kind in OPTIONAL:
                continue
            raise ValueError(f"{where} a {arch} file must hold tensor {name} ({arch}"
                             f".block_count is {size['block_count']}), it is missing")
        if shapes[name] != shape:
            raise ValueError(f"{where} tensor {name} must have shape {list(shape)} (ggml order, "
                             f"from the {arch}.* sizes), got {list(shapes[name])}")
    # transformers ignores a tensor it has no place for (a layer beyond block_count, a bias,
    # rope_freqs): the model would silently differ from the file's.
    extra = sorted(set(shapes) - expected)
    if extra:
        raise ValueError(f"{where} must hold only the tensors of a {arch} model with "
                         f"{arch}.block_count {size['block_count']}, got {len(extra)} "
                         f"others such as {extra[0]} (transformers would ignore them)")
    _check_tokenizer(where, meta, n_vocab, arch)


def _read(where: str, path: Path):
    """``(metadata, {tensor name: ggml shape})``. The reader maps the file and reads no tensor
    data; whatever a truncated or corrupt file makes it raise becomes a ValueError."""
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()}
        shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    # What truncated, patched and fuzzed files made it raise: ValueError (bad magic or version,
    # a short read reinterpreted, tensor data shorter than its shape, invalid UTF-8), IndexError
    # (a read past the end, as a count of 2**40 does) and KeyError (a duplicate key).
    except (ValueError, IndexError, KeyError) as e:
        raise ValueError(f"{where} must be a complete GGUF file (version 2 or 3: header, "
                         f"metadata, tensor infos, data), but reading it failed (truncated or "
                         f"corrupt?): {type(e).__name__}: {e}") from e
    return meta, shapes


def _positive_int(where: str, meta: dict, key: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} {key} must be a positive integer, got {_found(value)}")
    return value


def _name(kind, block=None, leaf: str = "weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=block) + "." + leaf


def _tensors(size: dict, head_dim: int, n_vocab: int, biased=()):
    """``(kind, name, ggml shape)`` of every tensor a LLaMA-architecture GGUF may hold, with a
    bias for the kinds in ``biased``, lazily: a hostile block_count fails on its first missing
    layer rather than building every name."""
    e, ff = size["embedding_length"], size["feed_forward_length"]
    q, kv = size["attention.head_count"] * head_dim, size["attention.head_count_kv"] * head_dim
    for kind, shape in ((TENSOR.TOKEN_EMBD, (e, n_vocab)), (TENSOR.OUTPUT_NORM, (e,)),
                        (TENSOR.OUTPUT, (e, n_vocab))):
        yield kind, _name(kind), shape
    layer = {TENSOR.ATTN_NORM: (e,), TENSOR.ATTN_Q: (e, q), TENSOR.ATTN_K: (e, kv),
             TENSOR.ATTN_V: (e, kv), TENSOR.ATTN_OUT: (q, e), TENSOR.FFN_NORM: (e,),
             TENSOR.FFN_GATE: (e, ff), TENSOR.FFN_UP: (e, ff), TENSOR.FFN_DOWN: (ff, e)}
    for block in range(size["block_count"]):
        for kind, shape in layer.items():
            yield kind, _name(kind, block), shape
            if kind in biased:
                yield kind, _name(kind, block, "bias"), shape[-1:]


def _check_tokenizer(where: str, meta: dict, n_vocab: int, arch: str) -> None:
    """What transformers' GGUF tokenizer conversion reads, which indexes and zips it without a
    check: one token per embedding row, the merges (which tokenizer.ggml.model "llama" may
    replace by one score per token), and special token ids within the vocabulary."""
    tokens = meta.get(TOKENS)
    if not _strings(tokens) or len(tokens) != n_vocab:
        raise ValueError(f"{where} {TOKENS} must list {n_vocab} tokens, one per row of "
                         f"{_name(TENSOR.TOKEN_EMBD)}, got {_found(tokens)}")
    vocab_key = f"{arch}.vocab_size"  # transformers' vocab_size where present
    if meta.get(vocab_key, n_vocab) != n_vocab:
        raise ValueError(f"{where} {vocab_key} must be {n_vocab} (the rows of "
                         f"{_name(TENSOR.TOKEN_EMBD)}), got {_found(meta[vocab_key])}")
    model, merges = meta.get(MODEL), meta.get(MERGES)
    if model not in ("gpt2", "llama"):
        raise ValueError(f"{where} {MODEL} must be 'gpt2' (byte-level BPE) or 'llama' "
                         f"(SentencePiece), got {_found(model)}")
    if model == "llama" and merges is None:  # transformers derives the merges from the scores
        scores = meta.get(SCORES)
        if not isinstance(scores, list) or len(scores) != n_vocab:
            raise ValueError(f"{where} {SCORES} must list {n_vocab} scores, one per token, for "
                             f"{MODEL} 'llama' without {MERGES}, got {_found(scores)}")
    elif not _strings(merges):
        raise ValueError(f"{where} {MERGES} must list the merges of {MODEL} {model!r}, got "
                         f"{_found(merges)}")
    else:
        # A merge must join two tokens into a third: on any other, the tokenizers library fails
        # with a bare Exception ("Token `Ġa` out of vocabulary").
        vocab = set(tokens)
        bad = next((m for m in merges if _bad_merge(m, vocab)), None)
        if bad is not None:
            raise ValueError(f"{where} each of {MERGES} must be 'left right', left, right and "
                             f"left+right being tokens, got {bad!r}")
    for key in SPECIAL_IDS:
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
            raise ValueError(f"{where} {key} must be a token id in [0, {n_vocab}), "
                             f"got {_found(value)}")


def _bad_merge(merge: str, vocab: set) -> bool:
    parts = merge.split(" ")
    return len(parts) != 2 or not {parts[0], parts[1], "".join(parts)} <= vocab


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _found(value) -> str:
    """A metadata value in a message: absent, a list's length or a short repr."""
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    return reprlib.repr(value)
