"""Float models in, and their tokenizers: ``import_gguf`` turns a LLaMA-architecture GGUF file
into a float Hugging Face folder (config, safetensors, tokenizer, chat template),
``load_float_model`` reads such a folder or a GGUF file, and the tokenizer rules every command
shares (docs/checkpoints.md, "Tokenizers")."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .transforms import CONFIG_KEY as TRANSFORM_KEY, restore_online

PathLike = Union[str, Path]
# What a model folder's tokenizer consists of; every file present is copied beside a checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
BYTE_VOCAB = 256  # a model without a tokenizer reads UTF-8 bytes (the embedded model)


def is_gguf(path: PathLike) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def _regular_file(fn: str, name: str, path: Path) -> Path:
    # Only regular files are opened: a FIFO or device would block or stream forever.
    if not path.is_file():
        raise ValueError(f"{fn}: {name} must be a regular file, got {str(path)!r}")
    return path


def load_float_model(path: PathLike, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a float causal LM: a Hugging Face folder (safetensors only,
    never pickle) or a GGUF file (dequantized by transformers, which needs the ``gguf``
    package). The tokenizer is None for a folder without one (byte-level models)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fn = "load_float_model"
    path = Path(path)
    if is_gguf(path):
        _regular_file(fn, "path", path)
        try:
            import gguf  # noqa: F401  (transformers reads GGUF through it)
        except ImportError as e:
            raise ValueError(f"{fn}: reading {path.name} needs the 'gguf' package "
                             f"(pip install gguf)") from e
        kw = dict(gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
        # The weights are dequantized floats now; the GGUF quantization config only stops
        # save_pretrained.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    elif path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=dtype)
        tokenizer = load_tokenizer(fn, path, model.config.vocab_size)
        restore_online(model, getattr(model.config, TRANSFORM_KEY, None))
    else:
        raise ValueError(f"{fn}: path must be a model folder or a .gguf file, got {str(path)!r}")
    return model.eval(), tokenizer


def import_gguf(file: PathLike, out: PathLike) -> Path:
    """Write the float Hugging Face folder of a LLaMA-architecture GGUF file to ``out`` (a new
    or empty folder): ``config.json``, ``model.safetensors`` (float32: the dequantized GGUF
    weights, the dense reference), the tokenizer with its chat template, and
    ``generation_config.json``. The folder appears whole or not at all."""
    from .checkpoint import decoder_layers
    fn = "import_gguf"
    file, out = Path(file), Path(out)
    if not is_gguf(file):
        raise ValueError(f"{fn}: file must be a .gguf file, got {str(file)!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{fn}: out must be a new or empty folder, got {str(out)!r}")
    model, tokenizer = load_float_model(file)
    decoder_layers(fn, model)  # LLaMA-style: model.model.layers with the seven projections

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return write_new_folder(out, save)


def write_new_folder(out: PathLike, make) -> Path:
    """``out`` (absent or empty) filled by ``make(tmp)`` in a temporary sibling folder that is
    then renamed into place: the folder appears whole or not at all."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        make(tmp)
        os.replace(tmp, out)  # rename(2) replaces an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_tokenizer(fn: str, folder: PathLike, vocab_size: int):
    """The tokenizer of a model folder, or None for a byte-level model (vocabulary 256) without
    one. Any other model without a tokenizer is refused: reading its text as bytes would give
    meaningless ids (and perplexities) without a warning."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder))
    if vocab_size != BYTE_VOCAB:
        raise ValueError(f"{fn}: {folder} has no tokenizer (tokenizer.json) and its vocabulary "
                         f"has {vocab_size} entries, not the {BYTE_VOCAB} of a byte-level model; "
                         f"copy the float model's tokenizer files there (spikeops quantize does)")
    return None


def copy_tokenizer(tokenizer, src: Optional[PathLike], out: PathLike) -> None:
    """Put the tokenizer beside a checkpoint in ``out``: the files of folder ``src`` when it has
    them, else the loaded ``tokenizer`` (a GGUF's) saved there. Nothing for byte-level models."""
    out = Path(out)
    copied = False
    if src is not None and Path(src).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(src) / name).is_file():
                shutil.copyfile(Path(src) / name, out / name)
                copied = True
    if not copied and tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def same_tokenizer(tok_a, tok_b, text: str) -> bool:
    """Whether two tokenizers (None = bytes) give the same ids for ``text``."""
    from .evaluate import encode_text
    return torch.equal(encode_text(text, tok_a), encode_text(text, tok_b))


def chat_prompt(tokenizer, message: str) -> Tuple[str, bool]:
    """``(text, templated)``: ``message`` as one user turn of the tokenizer's chat template with
    the assistant's turn opened, or the message itself when there is no template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return message, False
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    return text, True
