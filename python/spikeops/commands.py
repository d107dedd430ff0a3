"""What the ``spikeops`` commands do (python/spikeops/cli.py parses their arguments): one
``cmd_*`` function per command, taking the parsed arguments, and the pieces they share: the
encoding grammar of ``--encoding``/``--encodings``, the embedded model and text, how a folder's
tokenizer and calibration are read, and the evaluation table."""

from __future__ import annotations

from pathlib import Path

import torch

from . import Encoding
from .calibrate import ANY_CALIBRATION, parse_encoding
from .checkpoint import (CALIBRATION_FILE, DEFAULT_ENCODING, record_encoding,
                         recorded_encoding)
from .files import check_folder_target, check_output, has_file, write_file, write_folder
from .runner import HEAD_AUTO

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "default_model"
DEFAULT_DENSE = DATA / "default_model_dense"
DEFAULT_TEXT = DATA / "heldout.txt"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DTYPE_CHOICES = {HEAD_AUTO: HEAD_AUTO, "model": None, "float16": torch.float16,
                      "bfloat16": torch.bfloat16}


def read_text(path) -> str:
    path = Path(path) if path else DEFAULT_TEXT
    return path.read_text(encoding="utf-8")


def model_tokenizer(folder):
    """The tokenizer a GPTQ or float folder's text is read with (docs/checkpoints.md,
    "Tokenizers"): its own, or bytes for a byte-level model; refused otherwise."""
    from .checkpoint import read_json
    from .floatmodel import load_tokenizer
    config = read_json("spikeops", Path(folder) / "config.json")
    return load_tokenizer("spikeops", folder, config.get("vocab_size"))


def load_calibration(folder):
    """The calibration saved in ``folder``, or None."""
    from .calibrate import Calibration
    return Calibration.load(folder) if has_file("spikeops", folder, CALIBRATION_FILE) else None


def text_batches(tokens, samples: int, seq_len: int, seed: int):
    """``samples`` windows of ``seq_len`` tokens at random offsets of ``tokens``, int64
    ``[samples, seq_len]``."""
    gen = torch.Generator().manual_seed(seed)
    if tokens.shape[0] <= seq_len:
        raise ValueError(f"the calibration text must be longer than --seq-len = {seq_len} "
                         f"tokens, got {tokens.shape[0]}")
    starts = torch.randint(0, tokens.shape[0] - seq_len, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def cmd_import_gguf(args) -> int:
    from .floatmodel import import_gguf
    out = import_gguf(args.file, args.out)
    print(f"wrote the float model of {args.file} to {out}")
    return 0


def cmd_quantize(args) -> int:
    from .checkpoint import save_gptq
    from .evaluate import encode_text
    from .floatmodel import copy_tokenizer, load_float_model
    from .quantization import quantize
    from .transforms import transform
    fn = "quantize"
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"{fn}: the output folder must not be the float model's, got "
                         f"{args.out!r} for both")
    check_folder_target(fn, args.out)  # before minutes of work
    parse_encoding(args.encoding, None)  # one needing a calibration: calibrate --encoding
    model, tokenizer = load_float_model(args.model)
    ids = text_batches(encode_text(read_text(args.text), tokenizer), args.samples, args.seq_len,
                       args.seed)
    record = transform(model, args.transform, ids.split(8), seed=args.seed)
    weights = quantize(model, ids, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                       desc_act=args.act_order)

    def write(tmp: Path) -> None:
        # The dense tensors (embeddings, norms, lm_head) are stored in --dtype.
        save_gptq(model.to(DTYPES[args.dtype]), weights, tmp)
        record_encoding(fn, tmp, args.encoding)
        copy_tokenizer(tokenizer, args.model if Path(args.model).is_dir() else None, tmp)
    # One folder, one model: a previous model's calibration or tokenizer never stays in OUT.
    write_folder(fn, args.out, write)
    print(f"wrote a {args.bits}-bit GPTQ checkpoint of {len(weights)} layers (transform "
          f"{record['kind']}, dense tensors {args.dtype}, encoding {args.encoding}) to "
          f"{args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate, set_encoding
    from .evaluate import encode_text
    from .models import load_gptq
    # Checked before the work: the embedded model lies inside the package, which is never
    # written, so calibrating it needs --out.
    fn = "calibrate"
    check_output(fn, args.out or args.model)
    try:
        groups = [int(v) for v in args.groups.split(",")]
    except ValueError:
        raise ValueError(f"{fn}: --groups must be a comma list of integers (channels per "
                         f"activation group, 0: per token), got {args.groups!r}") from None
    if args.encoding is not None:
        # The encoding is recorded in the model's config.json, beside the calibration it needs.
        if args.out is not None and Path(args.out).resolve() != Path(args.model).resolve():
            raise ValueError(f"{fn}: --encoding records the encoding in the model's config.json "
                             f"beside the calibration, so the calibration must go to the model "
                             f"folder; got --out {args.out!r}")
        if recorded_encoding(fn, args.model) is None:
            raise ValueError(f"{fn}: --encoding needs a checkpoint whose config.json names "
                             f"spikeops' quant_method (written by spikeops quantize); "
                             f"{args.model} records none")
        parse_encoding(args.encoding, ANY_CALIBRATION)  # the grammar, before the work
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=torch.float32)
    ids = text_batches(encode_text(read_text(args.text), model_tokenizer(args.model)),
                       args.samples, args.seq_len, args.seed)
    grid = [float(g) for g in args.gamma_grid.split(",")]
    cal = calibrate(model, ids.split(4), methods=args.methods.split(","), bits=args.bits,
                    salient_fraction=args.salient_fraction, max_tokens=args.max_tokens,
                    gamma_grid=grid, groups=groups)
    if args.encoding is not None:
        # Every layer must be able to run it with this calibration (salient masks, thresholds).
        set_encoding(model, parse_encoding(args.encoding, cal), cal)
    cal.save(args.out or args.model)
    if args.encoding is not None:
        record_encoding(fn, args.model, args.encoding)
    print(f"calibrated {len(cal.layers)} layers ({args.methods}, {cal.settings['tokens']} tokens "
          f"per layer); saved to {args.out or args.model}"
          + (f"; recorded encoding {args.encoding}" if args.encoding is not None else ""))
    return 0


def evaluate_rows(args):
    """The rows of ``spikeops eval``: dense (with --dense), float activations and every
    encoding of --encodings."""
    from .evaluate import compare, encode_text
    from .floatmodel import load_float_model, same_tokenizer
    from .models import load_gptq
    calibration = load_calibration(args.model)
    encodings = {"float": None}
    encodings.update({spec: parse_encoding(spec, calibration) for spec in args.encodings.split(",")
                      if spec})
    text = read_text(args.text)
    tokenizer = model_tokenizer(args.model)
    dense = None
    if args.dense:
        dense, dense_tok = load_float_model(args.dense, DTYPES[args.dtype])
        if not same_tokenizer(tokenizer, dense_tok, text):
            raise ValueError(f"--dense {args.dense}: its tokenizer reads the text differently "
                             f"from {args.model}'s; compare models of one tokenizer")
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype],
                      calibration=calibration)
    tokens = encode_text(text, tokenizer)[: args.max_tokens]
    return compare(model, tokens, encodings, calibration, dense, window=args.window, kv=args.kv)


def cmd_eval(args) -> int:
    import dataclasses
    import json
    rows = evaluate_rows(args)
    print_table(rows)
    if args.json:
        text = json.dumps([dataclasses.asdict(r) for r in rows], indent=1)
        write_file("eval", args.json, lambda tmp: tmp.write_text(text))
        print(f"wrote {args.json}")
    return 0


ROW_LABELS = {"dense": "dense float", "float": "GPTQ, float activations"}


def print_table(rows) -> None:
    print(f"\n{'model / encoding':32} {'perplexity':>10} {'95% interval':>19} {'firing rate':>11} "
          f"{'planes':>6} {'SOPs/MAC':>9} {'E/E dense':>9}   ({rows[0].tokens if rows else 0} "
          f"tokens, kv cache {rows[0].kv if rows else 'float'})")
    for r in rows:
        rate = f"{r.firing_rate:.4f}" if r.firing_rate is not None else "-"
        sops = f"{r.sops_per_mac:.3f}" if r.sops_per_mac is not None else "-"
        planes = f"{r.planes:.2f}" if r.planes is not None else "-"
        interval = "-" if r.perplexity_low is None else \
            f"[{r.perplexity_low:.3f}, {r.perplexity_high:.3f}]"
        whole = r.energy["model"] if r.energy is not None else None
        energy = "-" if whole is None else f"{whole['spike_45nm'] / whole['dense_float_45nm']:.3f}"
        print(f"{ROW_LABELS.get(r.encoding, r.encoding):32} {r.perplexity:>10.3f} {interval:>19} "
              f"{rate:>11} {planes:>6} {sops:>9} {energy:>9}")
    print("95% interval: bootstrap over the perplexity windows; firing rate = spikes / spike "
          "slots; planes = bit planes per activation\nelement, sign and range bits included; "
          "E/E dense: arithmetic energy of the whole model (attention and lm_head dense in\n"
          "both), spiking / dense float32, 45 nm (docs/research.md, docs/energy.md)")


def cmd_generate(args) -> int:
    from .calibrate import set_encoding
    from .evaluate import decode_tokens, encode_text, generate
    from .floatmodel import chat_prompt, load_float_model
    from .models import load_gptq
    if args.dense:
        model, tokenizer = load_float_model(args.dense, DTYPES[args.dtype])
    else:
        calibration = load_calibration(args.model)
        enc = parse_encoding(model_encoding(args), calibration)
        model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype],
                          calibration=calibration)
        set_encoding(model, enc, calibration)
        tokenizer = model_tokenizer(args.model)
    prompt, templated = chat_prompt(tokenizer, args.prompt) if args.chat else (args.prompt, False)
    if args.chat and not templated:
        raise ValueError("--chat needs a tokenizer with a chat template; this model has none")
    out = generate(model, encode_text(prompt, tokenizer), args.max_new_tokens, args.temperature,
                   args.top_k, args.seed, stop=stop_tokens(tokenizer) if args.chat else (),
                   head_dtype=HEAD_DTYPE_CHOICES[args.head_dtype], kv=args.kv)
    text = decode_tokens(out, tokenizer)
    print(text if args.chat else args.prompt + text)
    return 0


def model_encoding(args) -> str:
    """--encoding as given, else the one the checkpoint records (spikeops quantize / calibrate
    --encoding), else DEFAULT_ENCODING."""
    if args.encoding is not None:
        return args.encoding
    return recorded_encoding("spikeops", args.model) or DEFAULT_ENCODING


def stop_tokens(tokenizer):
    """The end-of-text token ids a chat answer stops at."""
    ids = {tokenizer.eos_token_id} if tokenizer is not None else set()
    return tuple(i for i in ids if i is not None)


REPORT_MARKER = "report.json"  # a folder holding it is a report that --out may replace


def cmd_report(args) -> int:
    """Spike statistics and energy estimate of one encoding on a text: report.txt, report.json
    and the plots firing_rate.png, planes.png, energy.png in --out."""
    from .calibrate import set_encoding
    from .evaluate import encode_text
    from .models import load_gptq
    from .stats import track
    calibration = load_calibration(args.model)
    enc = parse_encoding(model_encoding(args), calibration)
    if enc is None:
        raise ValueError("report needs a spiking encoding, got 'none'")
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype],
                      calibration=calibration)
    set_encoding(model, enc, calibration)
    tokens = encode_text(read_text(args.text), model_tokenizer(args.model))[: args.max_tokens]
    if tokens.shape[0] < 1:
        raise ValueError("the text gives no tokens")
    out = check_folder_target("report", args.out, REPORT_MARKER)
    with track(model) as tracker, torch.no_grad():
        for chunk in tokens.split(args.window):
            model(input_ids=chunk.unsqueeze(0))
    header = (f"spikeops report: {args.model}, encoding {args.encoding}, {tokens.shape[0]} tokens "
              f"in windows of {args.window}\n\n")

    def write(tmp: Path) -> None:
        (tmp / "report.txt").write_text(header + tracker.table() + "\n", encoding="utf-8")
        (tmp / REPORT_MARKER).write_text(tracker.to_json(), encoding="utf-8")
        tracker.plot(tmp)
    write_folder("report", out, write, REPORT_MARKER)
    print(header + tracker.table())
    print(f"\nwrote report.txt, report.json, firing_rate.png, planes.png, energy.png to {out}")
    return 0


def cmd_lm_eval(args) -> int:
    """lm_eval's own command line on ``args.lm_eval_args`` with the ``spikeops`` model type
    registered (docs/integrations.md, "lm-evaluation-harness"); returns lm_eval's exit status."""
    import sys
    rest = list(args.lm_eval_args)
    own = rest[:rest.index("--")] if "--" in rest else rest
    if not rest or "-h" in own or "--help" in own:
        print(args.lm_eval_help())
        return 0
    if "--" in rest:
        rest.remove("--")  # lm_eval's parser would take what follows it as positionals
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise ValueError(f"needs the lm_eval package: pip install 'spikeops[eval]' (or "
                         f"'lm_eval>=0.4.13'): {e}") from e
    from . import lm_eval_model  # noqa: F401  (registers the model type "spikeops")
    # lm_eval 0.4.13's subcommands; without one, lm_eval itself runs "run".
    if rest[0] not in ("ls", "validate"):
        rest = rest[1:] if rest[0] == "run" else rest
        given = lambda *names: any(a == n or a.startswith(n + "=") or  # noqa: E731
                                   (len(n) == 2 and a.startswith(n)) for a in rest for n in names)
        # A --config file may name the model and device itself: nothing is added over it.
        if not given("--config", "-C"):
            rest += [] if given("--model", "-M") else ["--model", lm_eval_model.MODEL_TYPE]
            if not given("--device") and not torch.cuda.is_available():
                rest += ["--device", "cpu"]
        rest = ["run"] + rest
    # cli_evaluate reads sys.argv (it takes no arguments in lm_eval 0.4.13).
    argv = sys.argv
    sys.argv = ["lm-eval"] + rest
    try:
        cli_evaluate()
    except SystemExit as e:  # lm_eval's argparse: --help (0), a refused argument (2)
        if e.code is not None and not isinstance(e.code, int):
            raise
        return e.code or 0
    finally:
        sys.argv = argv
    return 0
