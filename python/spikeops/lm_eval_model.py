"""lm-evaluation-harness on spiking models: the ``spikeops`` model type of lm_eval
(docs/integrations.md, "lm-evaluation-harness").

``SpikeopsLM`` is lm_eval's ``HFLM`` holding the model ``load_gptq`` builds from a checkpoint
folder on the given encoding (the command line's ``--encoding`` grammar) and the folder's
calibration, read with the folder's tokenizer; so loglikelihood, rolling loglikelihood
(perplexity) and generation tasks all run as lm_eval runs any transformers model, batched.
Importing this module imports lm_eval (slow) and registers the model type; ``import spikeops``
does neither. ``spikeops lm-eval ARGS`` (commands.cmd_lm_eval) and ``python -m
spikeops.lm_eval_model ARGS`` are lm_eval's own command line with the model type registered
(every lm_eval option), e.g. ``--model spikeops --model_args pretrained=DIR,encoding=absmax4
--tasks ...``; lm_eval 0.4.13 has no plugin discovery, so the plain ``lm_eval`` command does not
know it.
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from . import _checks
from .checkpoint import SPIKEOPS_METHOD, recorded_encoding
from .commands import DEFAULT_MODEL, DTYPES, load_calibration, model_tokenizer
from .hf_quantizer import CALIBRATIONS, encoding_of
from .models import load_gptq
from .stats import track

FN = "SpikeopsLM"
MODEL_TYPE = "spikeops"  # lm_eval's --model name of SpikeopsLM
RECORDED = object()  # SpikeopsLM's default encoding: the one the checkpoint's config records


@register_model(MODEL_TYPE)
class SpikeopsLM(HFLM):
    """lm_eval's HFLM on ``load_gptq(pretrained, encoding)``.

    pretrained: a GPTQ checkpoint folder (default: the embedded model).
    encoding: the spike encoding in the command line's ``--encoding`` grammar (``"absmax4"``,
        ``"down_proj=minmax8;*=absmax4"``), or None / ``"none"`` for float activations (lm_eval
        turns ``encoding=none`` into None); not given: the encoding the checkpoint's
        ``config.json`` records (``quantization_config.encoding``), refused when it records none.
    calibration: ``"saved"`` (the folder's, none if absent) or ``"none"``.
    dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or a torch dtype; None: load_gptq's
        (float32 on the CPU, the checkpoint's on a GPU).
    device: where the model runs (default ``"cpu"``; lm_eval passes its ``--device``).
    tokenizer: None: the folder's (a byte-level model without one reads UTF-8 bytes, as
        every spikeops command does).
    prefix_token_id: the token a text's first token is predicted from (rolling loglikelihood,
        empty contexts); None: the tokenizer's BOS, else its EOS. A model with neither (the
        embedded byte-level model) needs it, e.g. 10 (a newline).
    Other keyword arguments are HFLM's (batch_size, max_length, ...).
    """

    def __init__(self, pretrained=str(DEFAULT_MODEL), encoding=RECORDED, calibration="saved",
                 dtype=None, device="cpu", tokenizer=None, prefix_token_id=None, **kwargs):
        if not isinstance(pretrained, (str, Path)):
            raise TypeError(f"{FN}: pretrained must be a checkpoint folder path, got "
                            f"{type(pretrained).__name__}")
        folder = Path(pretrained)
        if not folder.is_dir():
            raise ValueError(f"{FN}: pretrained must be a checkpoint folder, got {str(folder)!r}")
        _checks.choice(FN, "calibration", calibration, CALIBRATIONS)
        if isinstance(dtype, str):
            _checks.choice(FN, "dtype", dtype, tuple(DTYPES))
            dtype = DTYPES[dtype]
        cal = load_calibration(folder) if calibration == "saved" else None
        if encoding is RECORDED:
            encoding = recorded_encoding(FN, folder)
            if encoding is None:
                raise ValueError(f"{FN}: {folder}/config.json records no spike encoding "
                                 f"(quantization_config.encoding of quant_method "
                                 f"{SPIKEOPS_METHOD!r}); give encoding, e.g. encoding=absmax4, "
                                 f"or encoding=none for float activations")
        enc = None if encoding is None else encoding_of(FN, encoding, cal, "model_args")
        model = load_gptq(folder, enc, device=device or "cpu", dtype=dtype, calibration=cal)
        if tokenizer is None:
            tokenizer = model_tokenizer(folder) or byte_tokenizer()
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal",
                         prefix_token_id=prefix_token_id, **kwargs)
        if self.prefix_token_id is None:
            raise ValueError(f"{FN}: {folder}'s tokenizer has no BOS or EOS token to predict a "
                             f"text's first token from; give prefix_token_id (e.g. 10, a "
                             f"newline, for a byte-level model)")
        self.encoding = "none" if encoding is None else encoding
        self.calibration = calibration
        # The spike statistics of every forward this LM runs, for get_model_info: the model is
        # this LM's own, so its observers stay for the LM's life (spikeops.track, docs/energy.md).
        self.tracker = track(model).__enter__() if enc is not None else None

    def get_model_info(self) -> dict:
        """HFLM's, plus ``spikeops``: the encoding, the calibration and, on spikes, the firing
        rate and synaptic operations per MAC of everything run so far (lm_eval puts this into
        its results' ``config`` at the end of an evaluation)."""
        info = {"encoding": self.encoding, "calibration": self.calibration}
        if self.tracker is not None:
            totals = self.tracker.totals()
            info.update(firing_rate=totals["firing_rate"],
                        sops_per_mac=totals["sops"] / totals["macs"] if totals["macs"] else 0.0)
        return {**super().get_model_info(), "spikeops": info}

    def tok_decode(self, tokens, skip_special_tokens: bool = True):
        """HFLM's, except for a model without an end-of-text token (``eot_token_id`` None, the
        byte-level model): it has no end-of-text string, so generation stops at the task's
        ``until`` strings or its token limit (lm_eval's ``handle_stop_sequences`` takes None)."""
        if tokens is None:
            return None
        return super().tok_decode(tokens, skip_special_tokens=skip_special_tokens)


def byte_tokenizer():
    """A transformers tokenizer of UTF-8 bytes (token id = byte value, vocabulary 256, what
    ``spikeops.evaluate.encode_text`` does without a tokenizer), which HFLM needs for a
    byte-level model. Byte 0 pads (padding is never scored); there is no BOS or EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    chars = bytes_to_unicode()
    tok = Tokenizer(models.BPE({chars[b]: b for b in range(256)}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=chars[0])


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()
