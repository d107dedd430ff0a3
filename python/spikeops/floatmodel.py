"""Float models in, and their tokenizers: ``import_gguf`` turns a LLaMA-architecture GGUF file
into a float Hugging Face folder (config, safetensors, tokenizer, chat template),
``load_float_model`` reads such a folder or a GGUF file, and the tokenizer rules every command
shares (docs/checkpoints.md, "Tokenizers")."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from .architecture import check_supported
from .files import check_folder_target, has_file, write_folder
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
    package). The tokenizer is None for a folder without one (byte-level models). The model
    (not the pair) is what ``spikeops.evaluate.compare(dense_model=...)`` takes."""
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
        from .gguf_file import check_gguf
        check_gguf(fn, path)  # what transformers would misread (random weights) or trip on
        kw = dict(gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kw)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=dtype, **kw)
        except NotImplementedError as e:  # gguf's dequantize, for an integer tensor
            raise ValueError(f"{fn}: {path}: every tensor must be stored as floats or in a "
                             f"quantization transformers can dequantize, got: {e}") from e
        # The weights are dequantized floats now; the GGUF quantization config only stops
        # save_pretrained.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    elif path.is_dir():
        _check_float_folder(fn, path)
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, dtype=dtype)
        tokenizer = load_tokenizer(fn, path, model.config.vocab_size)
        restore_online(model, getattr(model.config, TRANSFORM_KEY, None), fn)
    else:
        raise ValueError(f"{fn}: path must be a model folder or a .gguf file, got {str(path)!r}")
    return model.eval(), tokenizer


def _check_float_folder(fn: str, folder: Path) -> None:
    """What transformers would read of a float model folder, checked first: its config (a
    supported architecture, no quantization), its weight files, and the tokenizer and
    generation files it opens by itself (files.input_file's rules: no link out, no FIFO)."""
    from .checkpoint import QUANT_CONFIG_FILES, read_json, weight_files
    config = read_json(fn, folder / "config.json")
    check_supported(fn, config.get("model_type") if isinstance(config, dict) else None)
    quantized = [name for name in QUANT_CONFIG_FILES if has_file(fn, folder, name)]
    if "quantization_config" in config or quantized:
        raise ValueError(f"{fn}: {folder} is a quantized checkpoint "
                         f"({', '.join(quantized) or 'config.json quantization_config'}); a float "
                         f"model folder is expected (spikeops.load_gptq reads GPTQ folders)")
    weight_files(fn, folder)
    for name in TOKENIZER_FILES:
        has_file(fn, folder, name)


def import_gguf(file: PathLike, out: PathLike) -> Path:
    """Write the float Hugging Face folder of a LLaMA-architecture GGUF file to ``out``:
    ``config.json``, ``model.safetensors`` (float32: the dequantized GGUF weights, the dense
    reference), the tokenizer with its chat template, and ``generation_config.json``. ``out`` is
    new, empty or a model folder that is replaced whole (files.write_folder); it appears whole
    or not at all."""
    from .architecture import decoder_layers
    fn = "import_gguf"
    file, out = Path(file), Path(out)
    if not is_gguf(file):
        raise ValueError(f"{fn}: file must be a .gguf file, got {str(file)!r}")
    check_folder_target(fn, out)
    model, tokenizer = load_float_model(file)
    decoder_layers(fn, model)  # LLaMA-style: model.model.layers with the seven projections

    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return write_folder(fn, out, save)


def load_tokenizer(fn: str, folder: PathLike, vocab_size: int):
    """The tokenizer of a model folder, or None for a byte-level model (vocabulary 256) without
    one. Any other model without a tokenizer is refused: reading its text as bytes would give
    meaningless ids (and perplexities) without a warning."""
    folder = Path(folder)
    present = [name for name in TOKENIZER_FILES if has_file(fn, folder, name)]
    if "tokenizer.json" in present or "tokenizer_config.json" in present:
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
            if has_file("copy_tokenizer", src, name):  # a link out of src is refused
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
    import jinja2  # transformers renders chat templates with it
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             tokenize=False, add_generation_prompt=True)
    # A template comes with the model: jinja2's sandbox refuses unsafe attribute access
    # (SecurityError, a TemplateError) and ranges over 100000 items (OverflowError).
    except (jinja2.TemplateError, OverflowError) as e:
        raise ValueError(f"chat_prompt: the model's chat template could not be applied: "
                         f"{type(e).__name__}: {e}") from e
    return text, True
