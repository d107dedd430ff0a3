"""The ``spikeops`` command line (also ``python -m spikeops``): argument parsing only. What each
command does is a ``cmd_*`` function of python/spikeops/commands.py; ``spikeops demo`` is
python/spikeops/demo.py."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Sequence

from . import __version__
from .attention import KV_MODES
from .calibrate import GAMMA_GRID
from .calibrate import ENCODING_HELP
from .checkpoint import DEFAULT_ENCODING
from .commands import (DEFAULT_MODEL, DTYPES, HEAD_DTYPE_CHOICES, cmd_calibrate,
                       cmd_eval, cmd_generate, cmd_import_gguf, cmd_lm_eval, cmd_quantize,
                       cmd_report)
from .demo import DEMO_TRANSFORM, LICENSES, demo
from .demo import __doc__ as DEMO_DOC
from .transforms import TRANSFORMS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every --help shows the defaults and keeps the description's line breaks."""

    def _get_help_string(self, action):
        # A help that says its default in words (one read from the model) is not followed by
        # argparse's "(default: None)".
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeops", formatter_class=HelpFormatter,
        description="Exact, fast spiking LLM kernels for PyTorch. Commands take a GPTQ "
        "checkpoint folder (default: the embedded byte-level model) and a text file (default: "
        "its held-out sample).\n\nStart with 'spikeops demo'. With a model of your own, in "
        "this order: import-gguf (a .gguf file), quantize, calibrate, eval, generate, report, "
        "lm-eval; 'spikeops COMMAND --help' for each.", epilog=ENCODING_HELP)
    parser.add_argument("--version", action="version", version=f"spikeops {__version__}")
    # Listed in the order a newcomer uses them; no command prints this help.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name, help_text, run, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=HelpFormatter, epilog=ENCODING_HELP)
        p.set_defaults(run=run)
        return p

    def model_and_text(p, text_help="UTF-8 text file"):
        p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                       help="GPTQ checkpoint folder (default: the embedded model)")
        p.add_argument("--text", help=f"{text_help} (default: the embedded held-out sample)")
        p.add_argument("--seed", type=int, default=0, help="random seed")

    def dtype_arg(p, default="float32", what="activations and dense layers"):
        p.add_argument("--dtype", default=default, choices=tuple(DTYPES), help=what)

    def kv_and_dtype_args(p):
        p.add_argument("--kv", default="float", choices=KV_MODES,
                       help="key-value cache: float, or bit-plane spikes of 4 or 8 bits with "
                       "attention on spikes (spikeops.Runner; README, 'Attention on spikes')")
        dtype_arg(p)

    p = command("demo", "the main job: a real or the embedded model on spikes, then one large "
                "GPTQ layer on spikes against the dense layer", demo, description=DEMO_DOC)
    p.add_argument("--gguf", help="a LLaMA-architecture GGUF file (scripts/demo.sh fetches "
                   "SmolLM2-135M-Instruct); without it, the embedded byte-level model")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "spikeops"),
                   help="folder for the imported, quantized and calibrated model and results")
    p.add_argument("--calib-text", default=str(LICENSES / "GPL-3"),
                   help="calibration text of the real model")
    p.add_argument("--eval-text", default=str(LICENSES / "MPL-2.0"),
                   help="held-out evaluation text of the real model (not the calibration text)")
    p.add_argument("--transform", default=DEMO_TRANSFORM, choices=TRANSFORMS,
                   help="outlier transform before GPTQ (docs/transforms.md)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens (bytes for the "
                   "embedded model) the evaluation reads")
    p.add_argument("--chat", default="What is a neuron? Answer in two sentences.",
                   help="chat message the best encodings within 4 and 8 planes answer")
    p.add_argument("--tokens", type=int, default=1, help="tokens M of the kernel part "
                   "(1: decode)")
    p.add_argument("--in-features", type=int, default=4096, help="K of the kernel part "
                   "(multiple of 128)")
    p.add_argument("--out-features", type=int, default=11008, help="N of the kernel part")
    p.add_argument("--seed", type=int, default=0, help="random seed")

    p = command("import-gguf", "write the float Hugging Face folder (config, safetensors, "
                "tokenizer, chat template) of a LLaMA-architecture GGUF file", cmd_import_gguf)
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out", help="output folder (new or empty)")

    p = command("quantize", "GPTQ-quantize a float LLaMA (folder or .gguf) on a calibration "
                "text, optionally after an outlier transform, and write a GPTQ checkpoint with "
                "the tokenizer", cmd_quantize)
    p.add_argument("model", help="float model folder (config.json + safetensors) or .gguf file")
    p.add_argument("out", help="output folder")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--transform", default="none", choices=TRANSFORMS,
                   help="equivalent outlier transform applied first (docs/transforms.md)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits")
    p.add_argument("--group-size", type=int, default=128, help="-1: one group per row")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points")
    p.add_argument("--act-order", action="store_true", help="desc_act: quantize columns by "
                   "decreasing Hessian diagonal")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    dtype_arg(p, "float16", "dtype of the stored dense tensors (embeddings, norms, lm_head)")
    p.add_argument("--seed", type=int, default=0, help="random seed (windows, rotation)")
    p.add_argument("--encoding", default=DEFAULT_ENCODING, help="the encoding or per-layer-type "
                   "policy recorded in the checkpoint, which generate and report run by default "
                   "(one needing a calibration: calibrate --encoding)")

    p = command("calibrate", "calibrate the seed methods per layer (OBS salient channels, SDLLM "
                "gamma, LAS thresholds) and the spiking key cache (query moments) and save them "
                "beside the checkpoint", cmd_calibrate)
    model_and_text(p, "calibration text file")
    p.add_argument("--out", help="folder for the calibration files (default: the model's)")
    p.add_argument("--methods", default="obs,sdllm,las,kv",
                   help="comma list of obs, sdllm, las, kv")
    p.add_argument("--bits", type=int, default=4, help="spike bits for the SDLLM gamma search")
    p.add_argument("--groups", default="0", help="activation groupings the SDLLM gamma is "
                   "searched for, comma list of channels per threshold (0: per token; 64: for "
                   "absmax4g64 and the like); one gamma per mode and grouping")
    p.add_argument("--salient-fraction", type=float, default=0.1,
                   help="share of channels OBS makes salient")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="input rows per layer the methods use")
    p.add_argument("--gamma-grid", default=",".join(map(str, GAMMA_GRID)),
                   help="SDLLM gamma candidates, comma list in (0, 1]")
    p.add_argument("--encoding", help="also record this encoding or per-layer-type policy in the "
                   "checkpoint (default: keep the recorded one)")

    p = command("eval", "perplexity, firing rate and SOPs per MAC of a GPTQ model on float "
                "activations and under spiking encodings", cmd_eval)
    model_and_text(p)
    p.add_argument("--encodings", default="minmax4,minmax4+s6,absmax4,absmean4,oat8",
                   help="comma list (see the encodings below)")
    p.add_argument("--dense", help="float model folder or .gguf for the dense baseline row")
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate at most this many")
    p.add_argument("--json", help="also write the rows to this JSON file")
    kv_and_dtype_args(p)

    p = command("generate", "generate text with a spiking GPTQ model, on float activations "
                "(--encoding none) or with a dense model (--dense)", cmd_generate)
    model_and_text(p)
    p.add_argument("--prompt", default="def ", help="text to continue, or with --chat the "
                   "user's message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's "
                   "chat template and stop at its end-of-turn token")
    p.add_argument("--encoding", help="one encoding or policy (see below), or none (default: "
                   "the checkpoint's recorded encoding, else " + DEFAULT_ENCODING + ")")
    p.add_argument("--dense", help="generate with this float model folder or .gguf instead")
    p.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    p.add_argument("--head-dtype", default="auto", choices=tuple(HEAD_DTYPE_CHOICES),
                   help="dtype of lm_head: auto (a float32 head in float16 where float16 holds "
                   "it, else bfloat16: several times faster on the CPU, other rounding), the "
                   "model's own (transformers' logits), float16 or bfloat16 "
                   "(spikeops.runner.Runner)")
    kv_and_dtype_args(p)

    p = command("report", "per-layer spike statistics and an energy estimate (text, JSON and "
                "PNG plots; see docs/energy.md)", cmd_report)
    model_and_text(p)
    p.add_argument("--encoding", help="one encoding or policy (see below) (default: the "
                   "checkpoint's recorded encoding, else " + DEFAULT_ENCODING + ")")
    p.add_argument("--max-tokens", type=int, default=1024, help="evaluate at most this many")
    p.add_argument("--window", type=int, default=256, help="tokens per forward")
    p.add_argument("--out", default="spikeops-report", help="output folder")
    dtype_arg(p)

    # Every argument after "lm-eval" is lm_eval's (docs/integrations.md, "lm-evaluation-harness"):
    # a NUL byte, which no command-line argument can hold, as the only option prefix makes
    # argparse take lm_eval's options as plain arguments instead of refusing them as unknown;
    # cmd_lm_eval shows this help for -h/--help before any "--", without importing lm_eval.
    p = sub.add_parser(
        "lm-eval", prefix_chars="\0", add_help=False, formatter_class=HelpFormatter,
        help="lm-evaluation-harness tasks (loglikelihood, perplexity, generation) on a spiking "
        "GPTQ model: lm_eval's command line with the spikeops model type",
        usage="spikeops lm-eval [-h] [--] LM_EVAL_ARGUMENT ...", epilog=ENCODING_HELP,
        description="\n\n".join(textwrap.fill(text, 92) for text in (
            "Run lm_eval's own command line (lm-evaluation-harness, the lm_eval package: pip "
            "install 'spikeops[eval]') with the model type 'spikeops' registered. Every argument "
            "passes through to lm_eval ('lm_eval run' unless the first is 'ls' or 'validate'). "
            "spikeops adds '--model spikeops' when no --model/-M is given, and '--device cpu' "
            "when no --device is given and CUDA is unavailable (lm_eval's default is cuda:0); "
            "with --config FILE nothing is added. The run's firing rate and SOPs per MAC are in "
            "lm_eval's results (--output_path) under config.spikeops.",
            "model_args of the spikeops model: pretrained=FOLDER (default: the embedded model), "
            "encoding=ENC (the encodings below, or none for float activations; default: the one "
            "the checkpoint's config.json records), calibration=saved|none, dtype, tokenizer, "
            "prefix_token_id (needed by a model without BOS/EOS, e.g. 10 for the byte-level "
            "embedded model), and those of lm_eval's hf model (batch_size, max_length, ...).",
            "-h/--help before any '--' shows this help; after '--' every argument is lm_eval's: "
            "'spikeops lm-eval -- --help' shows lm_eval's options. docs/integrations.md has the "
            "details.")) + "\n\nexamples:\n"
        "  spikeops lm-eval --model_args pretrained=q4/,encoding=absmax4 --tasks arc_easy\n"
        "  spikeops lm-eval --model_args pretrained=q4/ --tasks my_task --include_path tasks/ \\\n"
        "      --limit 100 --output_path out/\n"
        "  spikeops lm-eval --model hf --model_args pretrained=float/ --tasks arc_easy\n"
        "  spikeops lm-eval ls tasks --include_path tasks/")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, metavar="LM_EVAL_ARGUMENT",
                   help="an argument of lm_eval's command line")
    p.set_defaults(run=cmd_lm_eval, lm_eval_help=p.format_help)
    return parser


def check_args(parser, args) -> None:
    """What argparse's types cannot say, refused with a one-line usage error (exit 2)."""
    for name in ("samples", "seq_len", "max_tokens", "window", "tokens", "max_new_tokens"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.command == "demo" and (args.in_features < 128 or args.in_features % 128 or
                                   args.out_features < 1):
        parser.error("demo needs --in-features a positive multiple of 128, --out-features >= 1")
    model = getattr(args, "model", None)
    if args.command == "quantize":
        from .floatmodel import is_gguf
        if not (Path(model).is_dir() or (is_gguf(model) and Path(model).is_file())):
            parser.error(f"{model!r} is neither a model folder nor a .gguf file")
    elif model is not None and not Path(model).is_dir():
        parser.error(f"{model!r} is not a folder (a model checkpoint folder is expected)")
    names = ("gguf", "calib_text", "eval_text") if getattr(args, "gguf", None) else ("text", "file")
    for name in names:
        value = getattr(args, name, None)
        if value and not Path(value).is_file():
            parser.error(f"--{name.replace('_', '-')} {value!r} is not a file")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    check_args(parser, args)
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"spikeops {args.command}: error: {e}", file=sys.stderr)
        return 2
