"""The ``spikeops`` command line (also ``python -m spikeops``).

``spikeops demo --gguf FILE`` (what scripts/demo.sh runs, with SmolLM2-135M-Instruct): the GGUF
model is imported, transformed (--transform), GPTQ-quantized to W4 g128 and calibrated on
--calib-text, each step cached in --cache; then the perplexity, firing rate and SOPs per MAC of
the dense model, of the GPTQ weights on float activations and of every encoding at 4 and 8 bits
on --eval-text, chat answers (--chat) on spikes of the best 4-bit and the best 8-bit encoding
with their energy estimates. Without --gguf the embedded byte-level LLaMA (a few million
parameters, W4 GPTQ, with its seed-method calibration) is evaluated on its held-out text
instead, and generates a sample.
Then a GPTQ-shaped layer made in code (LLaMA-2-7B gate projection, 4096 -> 11008, W4 g128) runs
on spikes of LLM-like activations under five encodings: its output is compared with the dense
float64 layer, and its firing rate, synaptic operations and speed against float32
``F.linear`` are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import Encoding, GPTQWeight, __version__, encode, pack, spike_linear
from .calibrate import GAMMA_GRID, JSON_FILE as CALIBRATION_FILE
from .files import check_folder_target, check_output, has_file, write_file, write_folder
from .reference import tolerance
from .timing import median_ms
from .transforms import TRANSFORMS

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "default_model"
DEFAULT_DENSE = DATA / "default_model_dense"
DEFAULT_TEXT = DATA / "heldout.txt"
LICENSES = Path("/usr/share/common-licenses")  # English prose on Debian machines

DEMO_ENCODINGS = [
    ("minmax 4-bit (SpikeLLM)", Encoding("minmax", 4), False),
    ("minmax 4-bit + 10% salient at 6 bits (OBS)", Encoding("minmax", 4, salient_bits=6), True),
    ("absmax 4-bit, gamma 0.5 (SDLLM)", Encoding("absmax", 4, gamma=0.5), False),
    ("absmean 4-bit (adaptive threshold)", Encoding("absmean", 4), False),
    ("oat 8 planes (LAS)", Encoding("oat", 8, theta=(1.0, 8.0)), False),
]


def demo_layer(K: int, N: int, group: int, seed: int):
    """A random W4 g128 asymmetric GPTQ layer and its exact float64 dense twin [K, N]."""
    gen = torch.Generator().manual_seed(seed)
    G = K // group
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.randint(1, 16, (G, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.004 + 0.001).half()
    w = GPTQWeight(pack(q, 4, 0), pack(z - 1, 4, 1), scales, None, 4, group, sym=False)
    g = torch.arange(K) // group
    return w, scales.double()[g] * (q - z[g]).double()


MODEL_DEMO_ENCODINGS = "minmax4,minmax4+s6,absmax4,absmean4,oat8"


def model_demo(max_tokens: int) -> None:
    """The embedded model: perplexities (dense, GPTQ on float activations, each spiking
    encoding with its calibration), a generated sample and per-layer firing rates."""
    from transformers import AutoModelForCausalLM
    from .calibrate import Calibration, set_encoding
    from .evaluate import compare, decode_tokens, encode_text, generate
    from .models import load_gptq
    calibration = Calibration.load(DEFAULT_MODEL)
    model = load_gptq(DEFAULT_MODEL, Encoding("minmax", 4))
    dense = AutoModelForCausalLM.from_pretrained(DEFAULT_DENSE, use_safetensors=True,
                                                 dtype=torch.float32).eval()
    tokens = encode_text(DEFAULT_TEXT.read_text(encoding="utf-8"))[:max_tokens]
    print(f"spikeops demo: the embedded byte-level LLaMA ({DEFAULT_MODEL.name}, "
          f"{sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters, W4 GPTQ) on "
          f"{tokens.shape[0]} held-out bytes")
    encodings = {"float": None}
    encodings.update({spec: parse_encoding(spec, calibration)
                      for spec in MODEL_DEMO_ENCODINGS.split(",")})
    print_table(compare(model, tokens, encodings, calibration, dense, progress=False))
    enc = parse_encoding("absmax4", calibration)
    set_encoding(model, enc, calibration)
    prompt = "def "
    from .stats import track
    with track(model) as generating:
        sample = generate(model, encode_text(prompt), 96)
    set_encoding(model, parse_encoding("minmax4", calibration), calibration)
    with track(model) as tracker, torch.no_grad():
        model(input_ids=tokens[:256].unsqueeze(0))
    print(f"\nabsmax4 (SDLLM, calibrated gamma) continues {prompt!r}:\n" + "-" * 60)
    print(prompt + decode_tokens(sample))
    print("-" * 60 + "\nfiring rate per layer while generating (spikes / spike slots):")
    for row in generating.layers():
        print(f"  {row.name:36} {row.firing_rate:.4f}")
    print(f"\nminmax4 on {min(256, tokens.shape[0])} held-out bytes (spikeops report for more):\n"
          f"{tracker.summary()}")


REAL_ENCODINGS = "minmax4,minmax4+s6,absmax4,absmean4,oat8,minmax8,absmax8"
DEMO_TRANSFORM = "rotate"


def _step(name, fn):
    import time
    t = time.perf_counter()
    print(f"== {name}", flush=True)
    fn()
    print(f"   {name}: {time.perf_counter() - t:.0f} s", flush=True)


def prepare_real_model(gguf, cache, transform: str, calib_text, seed: int = 0):
    """``(float_dir, q_dir)`` of a GGUF model in ``cache``: the imported float folder, and the
    transformed W4 g128 GPTQ checkpoint with its calibration, each made once (on
    ``calib_text``) and then read from the cache."""
    from argparse import Namespace
    cache = Path(cache) / Path(gguf).stem
    float_dir = cache / "float"
    q_dir = cache / f"w4g128-{transform}-seed{seed}-{Path(calib_text).name}"
    # Each command writes its folder whole (files.write_folder), so what is in the cache is
    # complete; the calibration, written last, marks a finished quantize + calibrate.
    if not float_dir.is_dir():
        _step("import GGUF", lambda: cmd_import_gguf(Namespace(file=gguf, out=str(float_dir))))
    if not has_file("demo", q_dir, CALIBRATION_FILE):
        _step(f"transform {transform} + GPTQ W4 g128", lambda: cmd_quantize(Namespace(
            model=str(float_dir), out=str(q_dir), text=calib_text, transform=transform, bits=4,
            group_size=128, asym=False, act_order=False, samples=64, seq_len=256,
            dtype="float16", seed=seed)))
        _step("calibrate", lambda: cmd_calibrate(Namespace(
            model=str(q_dir), text=calib_text, out=None, methods="obs,sdllm,las", bits=4,
            salient_fraction=0.1, samples=8, seq_len=256, max_tokens=512,
            gamma_grid=",".join(map(str, GAMMA_GRID)), seed=seed)))
    return float_dir, q_dir


def real_model_rows(float_dir, q_dir, eval_text, max_tokens: int, encodings=REAL_ENCODINGS):
    """The evaluation rows of a prepared model on ``eval_text`` (cached in ``q_dir``)."""
    import dataclasses
    import json
    from argparse import Namespace
    from .evaluate import Row
    results = q_dir / f"eval-{Path(eval_text).name}-{max_tokens}-{encodings}.json"
    if results.is_file():
        print(f"== evaluation (cached: {results})")
        return [Row(**r) for r in json.loads(results.read_text())]
    holder = []
    _step("evaluate", lambda: holder.append(evaluate_rows(Namespace(
        model=str(q_dir), text=eval_text, encodings=encodings, dense=str(float_dir), window=256,
        max_tokens=max_tokens, dtype="float32"))))
    text = json.dumps([dataclasses.asdict(r) for r in holder[0]], indent=1)
    write_file("demo", results, lambda tmp: tmp.write_text(text))
    return holder[0]


def real_model_demo(args) -> None:
    """A real LLaMA from a GGUF file: import, transform + GPTQ W4 g128, calibrate (each step
    cached in --cache), the table of every encoding on held-out text, chat answers with the
    best 4-bit and the best 8-bit encoding and their energy summaries."""
    import time
    from .calibrate import set_encoding
    from .evaluate import decode_tokens, encode_text, generate
    from .floatmodel import chat_prompt
    from .models import load_gptq
    from .stats import track
    start = time.perf_counter()
    float_dir, q_dir = prepare_real_model(args.gguf, args.cache, args.transform,
                                          args.calib_text, args.seed)
    rows = real_model_rows(float_dir, q_dir, args.eval_text, args.max_tokens)
    print(f"\n{Path(args.gguf).name}, transform {args.transform}, GPTQ W4 g128; calibrated on "
          f"{Path(args.calib_text).name}, evaluated on {Path(args.eval_text).name}:")
    print_table(rows)
    spiking = [r for r in rows if r.firing_rate is not None]
    calibration = _calibration(q_dir)
    model = load_gptq(q_dir, Encoding("minmax", 4), dtype=torch.float32)
    tokenizer = model_tokenizer(q_dir)
    prompt, _ = chat_prompt(tokenizer, args.chat)
    print(f"\nchat on spikes, user: {args.chat}")
    # The best 4-bit and the best 8-bit encoding: 4-bit answers vary with float rounding far
    # below any tolerance (docs/transforms.md), 8-bit ones track the float model.
    for bits in ("4", "8"):
        best = min((r for r in spiking if bits in r.encoding), key=lambda r: r.perplexity)
        set_encoding(model, parse_encoding(best.encoding, calibration), calibration)
        with track(model) as tracker:
            answer = generate(model, encode_text(prompt, tokenizer), 80,
                              stop=_stop_tokens(tokenizer))
        reply = (decode_tokens(answer, tokenizer).strip()
                 or "(none: its first token was end of text)")
        print(f"\n  assistant on {best.encoding} (the best {bits}-bit encoding): {reply}")
        summary = tracker.summary().replace("\n", "\n    ")
        print(f"  while answering:\n    {summary}")
    print(f"\nreal model part: {time.perf_counter() - start:.0f} s")


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.gguf:
        real_model_demo(args)
        print()
    elif DEFAULT_MODEL.is_dir():
        model_demo(args.max_tokens)
        print()
    K, N = args.in_features, args.out_features
    print(f"spikeops demo, kernel: GPTQ W4 g128 layer {K} -> {N}, {args.tokens} token(s), "
          f"{torch.get_num_threads()} CPU threads")
    w, W64 = demo_layer(K, N, 128, args.seed)
    x = torch.randn(args.tokens, K)
    outliers = torch.randperm(K)[: K // 100]
    x[:, outliers] *= 20  # LLM activations: a few channels carry most of the magnitude
    salient = torch.zeros(K, dtype=torch.bool)
    salient[x.abs().mean(0).argsort(descending=True)[: K // 10]] = True
    W32 = W64.float().t().contiguous()
    dense_ms = median_ms(lambda: F.linear(x, W32))
    print(f"dense float32 F.linear: {dense_ms:.2f} ms\n")
    header = (f"{'encoding':46} {'planes':>6} {'rate':>6} {'SOPs/MACs':>9} "
              f"{'rel.err vs x':>12} {'spec ok':>7} {'ms':>6} {'x fp32':>6}")
    print(header)
    print("-" * len(header))
    y_dense = x.double() @ W64
    for name, enc, uses_salient in DEMO_ENCODINGS:
        mask = salient if uses_salient else None
        st = encode(x, enc, salient_mask=mask)
        y = spike_linear(st, w, out_dtype=torch.float32)
        x_hat = st.decode().double()
        y_ref = x_hat @ W64
        spec_ok = bool(((y.double() - y_ref).abs() <= tolerance(x_hat, W64, y_ref, y.dtype)).all())
        rel_err = float((y.double() - y_dense).norm() / y_dense.norm())
        spikes = int(st.counts().sum())
        sops_per_mac = spikes * N / (args.tokens * K * N)
        ms = median_ms(lambda: spike_linear(st, w, out_dtype=torch.float32))
        print(f"{name:46} {st.num_planes:>6} {st.firing_rate(enc):>6.3f} {sops_per_mac:>9.3f} "
              f"{rel_err:>12.4f} {'yes' if spec_ok else 'NO':>7} {ms:>6.2f} {dense_ms / ms:>5.2f}x")
        if not spec_ok:
            print("error: spike_linear left the documented tolerance of the float64 reference",
                  file=sys.stderr)
            return 1
    print("\nrate = spikes / spike slots (tokens * K * planes, salient channels with their own "
          "planes); SOPs/MACs = synaptic additions per "
          "multiply-accumulate of the dense layer;\nrel.err = ||y - x @ W|| / ||x @ W|| "
          "(quantization of x); 'spec ok' = within the tolerance of docs/ops.md of x_hat @ W_hat "
          "in float64.")
    return 0


ENCODING_HELP = ("encodings: minmaxB, absmaxB, absmeanB (B bits, the sign included), oatB (B "
                 "planes), '+sS' for salient channels at S bits, e.g. minmax4+s6, and none "
                 "(float activations); per layer type, TYPE=ENC entries joined by ';' with '*' "
                 "for every other type, e.g. 'down_proj=minmax8;*=absmax4' (TYPE: q_proj, "
                 "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). absmax/absmean take "
                 "their gamma, oat its thresholds and salient channels their masks from the "
                 "model's calibration (spikeops calibrate)")


def parse_encoding(spec: str, calibration):
    """What ``set_encoding`` takes, from a CLI spec: an Encoding (``minmax4``, ``absmax4+s6``,
    ``oat8``), None (``none``: float activations), or a per-layer-type map
    (``down_proj=minmax8;*=absmax4``). Specs that need a calibration are refused without one."""
    from .calibrate import ANY_TYPE, LAYER_TYPES
    if "=" not in spec:
        return _parse_one(spec, spec, calibration)
    by_type = {}
    for entry in spec.split(";"):
        kind, _, one = entry.partition("=")
        if kind not in LAYER_TYPES + (ANY_TYPE,) or kind in by_type:
            raise ValueError(f"encoding {spec!r}: each ';'-separated entry must be TYPE=ENC with "
                             f"TYPE one of {', '.join(LAYER_TYPES)} or '*' (every other type), "
                             f"each once, got {entry!r}")
        by_type[kind] = _parse_one(one, spec, calibration)
    return by_type


def _parse_one(one: str, spec: str, calibration) -> Optional[Encoding]:
    import re
    if one == "none":
        return None
    match = re.fullmatch(r"(minmax|absmax|absmean|oat)(\d+)(?:\+s(\d+))?", one)
    if match is None:
        raise ValueError(f"unknown encoding {one!r} in {spec!r}; {ENCODING_HELP}")
    mode, n, salient = match.group(1), int(match.group(2)), match.group(3)
    if (mode == "oat" or salient) and calibration is None:
        raise ValueError(f"encoding {one!r} needs a calibration (run spikeops calibrate first)")
    return Encoding(mode, n, salient_bits=int(salient) if salient else None)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HEAD_DTYPE_CHOICES = {"model": None, "bfloat16": torch.bfloat16}


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


def _calibration(folder):
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
    model, tokenizer = load_float_model(args.model)
    ids = text_batches(encode_text(read_text(args.text), tokenizer), args.samples, args.seq_len,
                       args.seed)
    record = transform(model, args.transform, ids.split(8), seed=args.seed)
    weights = quantize(model, ids, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                       desc_act=args.act_order)

    def write(tmp: Path) -> None:
        # The dense tensors (embeddings, norms, lm_head) are stored in --dtype.
        save_gptq(model.to(DTYPES[args.dtype]), weights, tmp)
        copy_tokenizer(tokenizer, args.model if Path(args.model).is_dir() else None, tmp)
    # One folder, one model: a previous model's calibration or tokenizer never stays in OUT.
    write_folder(fn, args.out, write)
    print(f"wrote a {args.bits}-bit GPTQ checkpoint of {len(weights)} layers (transform "
          f"{record['kind']}, dense tensors {args.dtype}) to {args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .evaluate import encode_text
    from .models import load_gptq
    # Checked before the work: the embedded model lies inside the package, which is never
    # written, so calibrating it needs --out.
    check_output("calibrate", args.out or args.model)
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=torch.float32)
    ids = text_batches(encode_text(read_text(args.text), model_tokenizer(args.model)),
                       args.samples, args.seq_len, args.seed)
    grid = [float(g) for g in args.gamma_grid.split(",")]
    cal = calibrate(model, ids.split(4), methods=args.methods.split(","), bits=args.bits,
                    salient_fraction=args.salient_fraction, max_tokens=args.max_tokens,
                    gamma_grid=grid)
    cal.save(args.out or args.model)
    print(f"calibrated {len(cal.layers)} layers ({args.methods}, {cal.settings['tokens']} tokens "
          f"per layer); saved to {args.out or args.model}")
    return 0


def evaluate_rows(args):
    """The rows of ``spikeops eval``: dense (with --dense), float activations and every
    encoding of --encodings."""
    from .evaluate import compare, encode_text
    from .floatmodel import load_float_model, same_tokenizer
    from .models import load_gptq
    calibration = _calibration(args.model)
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
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype])
    tokens = encode_text(text, tokenizer)[: args.max_tokens]
    return compare(model, tokens, encodings, calibration, dense, window=args.window)


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
          f"{'SOPs/MAC':>9} {'E/E dense':>9}   ({rows[0].tokens if rows else 0} tokens)")
    for r in rows:
        rate = f"{r.firing_rate:.4f}" if r.firing_rate is not None else "-"
        sops = f"{r.sops_per_mac:.3f}" if r.sops_per_mac is not None else "-"
        interval = "-" if r.perplexity_low is None else \
            f"[{r.perplexity_low:.3f}, {r.perplexity_high:.3f}]"
        whole = r.energy["model"] if r.energy is not None else None
        energy = "-" if whole is None else f"{whole['spike_45nm'] / whole['dense_float_45nm']:.3f}"
        print(f"{ROW_LABELS.get(r.encoding, r.encoding):32} {r.perplexity:>10.3f} {interval:>19} "
              f"{rate:>11} {sops:>9} {energy:>9}")
    print("95% interval: bootstrap over the perplexity windows; firing rate = spikes / spike "
          "slots; E/E dense: arithmetic energy\nof the whole model (attention and lm_head "
          "dense in both), spiking / dense float32, 45 nm (docs/research.md, docs/energy.md)")


def cmd_generate(args) -> int:
    from .calibrate import set_encoding
    from .evaluate import decode_tokens, encode_text, generate
    from .floatmodel import chat_prompt, load_float_model
    from .models import load_gptq
    if args.dense:
        model, tokenizer = load_float_model(args.dense, DTYPES[args.dtype])
    else:
        calibration = _calibration(args.model)
        model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype])
        set_encoding(model, parse_encoding(args.encoding, calibration), calibration)
        tokenizer = model_tokenizer(args.model)
    prompt, templated = chat_prompt(tokenizer, args.prompt) if args.chat else (args.prompt, False)
    if args.chat and not templated:
        raise ValueError("--chat needs a tokenizer with a chat template; this model has none")
    out = generate(model, encode_text(prompt, tokenizer), args.max_new_tokens, args.temperature,
                   args.top_k, args.seed, stop=_stop_tokens(tokenizer) if args.chat else (),
                   head_dtype=HEAD_DTYPE_CHOICES[args.head_dtype])
    text = decode_tokens(out, tokenizer)
    print(text if args.chat else args.prompt + text)
    return 0


def _stop_tokens(tokenizer):
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
    calibration = _calibration(args.model)
    enc = parse_encoding(args.encoding, calibration)
    if enc is None:
        raise ValueError("report needs a spiking encoding, got 'none'")
    model = load_gptq(args.model, Encoding("minmax", 4), dtype=DTYPES[args.dtype])
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


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every --help shows the defaults and keeps the description's line breaks."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spikeops", formatter_class=_Formatter,
        description="Exact, fast spiking LLM kernels for PyTorch. Commands take a GPTQ "
        "checkpoint folder (default: the embedded byte-level model) and a text file (default: "
        "its held-out sample).\n\nStart with 'spikeops demo'. With a model of your own, in "
        "this order: import-gguf (a .gguf file), quantize, calibrate, eval, generate, report; "
        "'spikeops COMMAND --help' for each.", epilog=ENCODING_HELP)
    parser.add_argument("--version", action="version", version=f"spikeops {__version__}")
    # Listed in the order a newcomer uses them; no command prints this help.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name, help_text, run, description=None):
        p = sub.add_parser(name, help=help_text, description=description or help_text,
                           formatter_class=_Formatter, epilog=ENCODING_HELP)
        p.set_defaults(run=run)
        return p

    def model_and_text(p, text_help="UTF-8 text file"):
        p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                       help="GPTQ checkpoint folder (default: the embedded model)")
        p.add_argument("--text", help=f"{text_help} (default: the embedded held-out sample)")
        p.add_argument("--seed", type=int, default=0, help="random seed")

    def dtype_arg(p, default="float32", what="activations and dense layers"):
        p.add_argument("--dtype", default=default, choices=tuple(DTYPES), help=what)

    p = command("demo", "the main job: a real or the embedded model on spikes, then one large "
                "GPTQ layer on spikes against the dense layer", demo, description=__doc__)
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
                   help="chat message the best 4-bit encoding answers")
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

    p = command("calibrate", "calibrate the seed methods per layer (OBS salient channels, SDLLM "
                "gamma, LAS thresholds) and save them beside the checkpoint", cmd_calibrate)
    model_and_text(p, "calibration text file")
    p.add_argument("--out", help="folder for the calibration files (default: the model's)")
    p.add_argument("--methods", default="obs,sdllm,las", help="comma list of obs, sdllm, las")
    p.add_argument("--bits", type=int, default=4, help="spike bits for the SDLLM gamma search")
    p.add_argument("--salient-fraction", type=float, default=0.1,
                   help="share of channels OBS makes salient")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="input rows per layer the methods use")
    p.add_argument("--gamma-grid", default=",".join(map(str, GAMMA_GRID)),
                   help="SDLLM gamma candidates, comma list in (0, 1]")

    p = command("eval", "perplexity, firing rate and SOPs per MAC of a GPTQ model on float "
                "activations and under spiking encodings", cmd_eval)
    model_and_text(p)
    p.add_argument("--encodings", default="minmax4,minmax4+s6,absmax4,absmean4,oat8",
                   help="comma list (see the encodings below)")
    p.add_argument("--dense", help="float model folder or .gguf for the dense baseline row")
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate at most this many")
    p.add_argument("--json", help="also write the rows to this JSON file")
    dtype_arg(p)

    p = command("generate", "generate text with a spiking GPTQ model, on float activations "
                "(--encoding none) or with a dense model (--dense)", cmd_generate)
    model_and_text(p)
    p.add_argument("--prompt", default="def ", help="text to continue, or with --chat the "
                   "user's message")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's "
                   "chat template and stop at its end-of-turn token")
    p.add_argument("--encoding", default="minmax4", help="one encoding (see below) or none")
    p.add_argument("--dense", help="generate with this float model folder or .gguf instead")
    p.add_argument("--max-new-tokens", type=int, default=120, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest")
    p.add_argument("--head-dtype", default="model", choices=tuple(HEAD_DTYPE_CHOICES),
                   help="dtype of lm_head: the model's own (transformers' logits), or bfloat16: "
                   "about 3x faster on the CPU, other rounding (spikeops.runner.Runner)")
    dtype_arg(p)

    p = command("report", "per-layer spike statistics and an energy estimate (text, JSON and "
                "PNG plots; see docs/energy.md)", cmd_report)
    model_and_text(p)
    p.add_argument("--encoding", default="minmax4", help="one encoding (see below)")
    p.add_argument("--max-tokens", type=int, default=1024, help="evaluate at most this many")
    p.add_argument("--window", type=int, default=256, help="tokens per forward")
    p.add_argument("--out", default="spikeops-report", help="output folder")
    dtype_arg(p)
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


if __name__ == "__main__":
    sys.exit(main())
