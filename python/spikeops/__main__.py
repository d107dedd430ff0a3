"""The ``spikeops`` command line (also ``python -m spikeops``).

``spikeops demo``: first the embedded byte-level LLaMA (a few million parameters, W4 GPTQ, with
its seed-method calibration) is evaluated on its held-out text: perplexity of the dense model,
of the GPTQ weights on float activations and of each spiking encoding, with firing rates; it
generates a sample and prints per-layer firing rates. Then a GPTQ-shaped layer made in code
(LLaMA-2-7B gate projection, 4096 -> 11008, W4 g128) runs on spikes of LLM-like activations
under the same encodings: its output is compared with the dense float64 layer, and its firing
rate, synaptic operations and speed against float32 ``F.linear`` are printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import Encoding, GPTQWeight, encode, pack, spike_linear
from .reference import tolerance
from .timing import median_ms

DATA = Path(__file__).parent / "data"
DEFAULT_MODEL = DATA / "default_model"
DEFAULT_DENSE = DATA / "default_model_dense"
DEFAULT_TEXT = DATA / "heldout.txt"

DEMO_ENCODINGS = [
    ("minmax 4-bit (SpikeLLM)", Encoding("minmax", 4), False),
    ("minmax 4-bit + 10% salient at 6 bits (OBS)", Encoding("minmax", 4, salient_bits=6), True),
    ("absmax 4-bit, gamma 0.5 (SDLLM)", Encoding("absmax", 4, gamma=0.5), False),
    ("absmean 4-bit (adaptive threshold)", Encoding("absmean", 4), False),
    ("oat 8 planes (LAS)", Encoding("oat", theta=(1.0, 8.0), planes=8), False),
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
    encodings = {"GPTQ, float activations": None}
    encodings.update({spec: parse_encoding(spec, calibration)
                      for spec in MODEL_DEMO_ENCODINGS.split(",")})
    print_table(compare(model, tokens, encodings, calibration, dense, progress=False),
                tokens.shape[0])
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
    print("-" * 60 + "\nfiring rate per layer while generating (spikes / (tokens * K * planes)):")
    for row in generating.layers():
        print(f"  {row.name:36} {row.firing_rate:.4f}")
    print(f"\nminmax4 on {min(256, tokens.shape[0])} held-out bytes (spikeops report for more): "
          f"{tracker.summary()}")


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if DEFAULT_MODEL.is_dir():
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
        print(f"{name:46} {st.num_planes:>6} {st.firing_rate():>6.3f} {sops_per_mac:>9.3f} "
              f"{rel_err:>12.4f} {'yes' if spec_ok else 'NO':>7} {ms:>6.2f} {dense_ms / ms:>5.2f}x")
        if not spec_ok:
            print("error: spike_linear left the documented tolerance of the float64 reference",
                  file=sys.stderr)
            return 1
    print("\nrate = spikes / (tokens * K * planes); SOPs/MACs = synaptic additions per "
          "multiply-accumulate of the dense layer;\nrel.err = ||y - x @ W|| / ||x @ W|| "
          "(quantization of x); 'spec ok' = within the tolerance of docs/ops.md of x_hat @ W_hat "
          "in float64.")
    return 0


ENCODING_HELP = ("encodings: minmaxB, absmaxB, absmeanB (B bits), oatP (P planes), and "
                 "'+sS' for salient channels at S bits, e.g. minmax4+s6; absmax/absmean take "
                 "their gamma, oat its thresholds and salient channels their masks from the "
                 "model's calibration (spikeops calibrate)")


def parse_encoding(spec: str, calibration) -> Encoding:
    """An Encoding from a CLI spec such as ``minmax4``, ``absmax4+s6`` or ``oat8``."""
    import re
    match = re.fullmatch(r"(minmax|absmax|absmean|oat)(\d+)(?:\+s(\d+))?", spec)
    if match is None:
        raise ValueError(f"unknown encoding {spec!r}; {ENCODING_HELP}")
    mode, n, salient = match.group(1), int(match.group(2)), match.group(3)
    if (mode == "oat" or salient) and calibration is None:
        raise ValueError(f"encoding {spec!r} needs a calibration (run spikeops calibrate first)")
    if mode == "oat":
        # Every layer's thresholds come from the calibration; these only satisfy Encoding.
        return Encoding("oat", planes=n, theta=(1.0, 2.0))
    return Encoding(mode, n, salient_bits=int(salient) if salient else None)


def _tokens(args, folder):
    from .evaluate import encode_text
    text = Path(args.text).read_text(encoding="utf-8") if args.text else DEFAULT_TEXT.read_text(
        encoding="utf-8")
    return encode_text(text, _tokenizer(folder))


def _tokenizer(folder):
    """The checkpoint's tokenizer if it ships one, else None (byte-level tokens)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(folder))
    return None


def _calibration(folder):
    from .calibrate import JSON_FILE, Calibration
    return Calibration.load(folder) if (Path(folder) / JSON_FILE).exists() else None


def _batches(tokens, samples: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if tokens.shape[0] <= seq_len:
        raise ValueError(f"the calibration text must be longer than --seq-len = {seq_len} "
                         f"tokens, got {tokens.shape[0]}")
    starts = torch.randint(0, tokens.shape[0] - seq_len, (samples,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def cmd_quantize(args) -> int:
    from transformers import AutoModelForCausalLM
    from .checkpoint import save_gptq
    from .quantization import quantize
    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True,
                                                 dtype=torch.float32)
    ids = _batches(_tokens(args, args.model), args.samples, args.seq_len, args.seed)
    weights = quantize(model, ids, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                       desc_act=args.act_order)
    save_gptq(model, weights, args.out)
    print(f"wrote a {args.bits}-bit GPTQ checkpoint of {len(weights)} layers to {args.out}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .models import load_gptq
    model = load_gptq(args.model, Encoding("minmax", 4))
    ids = _batches(_tokens(args, args.model), args.samples, args.seq_len, args.seed)
    cal = calibrate(model, ids.split(4), methods=args.methods.split(","), bits=args.bits,
                    salient_fraction=args.salient_fraction)
    cal.save(args.out or args.model)
    print(f"calibrated {len(cal.layers)} layers ({args.methods}); saved to {args.out or args.model}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import compare
    from .models import load_gptq
    calibration = _calibration(args.model)
    encodings = {"GPTQ, float activations": None}
    encodings.update({spec: parse_encoding(spec, calibration) for spec in args.encodings.split(",")})
    model = load_gptq(args.model, Encoding("minmax", 4))
    dense = None
    if args.dense:
        from transformers import AutoModelForCausalLM
        dense = AutoModelForCausalLM.from_pretrained(args.dense, use_safetensors=True).eval()
    tokens = _tokens(args, args.model)[: args.max_tokens]
    rows = compare(model, tokens, encodings, calibration, dense, window=args.window)
    print_table(rows, tokens.shape[0])
    return 0


def print_table(rows, count) -> None:
    print(f"\n{'model / encoding':32} {'perplexity':>10} {'firing rate':>11}   ({count} tokens)")
    for label, ppl, rate in rows:
        print(f"{label:32} {ppl:>10.3f} {('%.4f' % rate) if rate is not None else '-':>11}")


def cmd_generate(args) -> int:
    from .calibrate import set_encoding
    from .evaluate import decode_tokens, encode_text, generate
    from .models import load_gptq
    calibration = _calibration(args.model)
    model = load_gptq(args.model, Encoding("minmax", 4))
    set_encoding(model, parse_encoding(args.encoding, calibration), calibration)
    tok = _tokenizer(args.model)
    out = generate(model, encode_text(args.prompt, tok), args.max_new_tokens, args.temperature,
                   args.top_k, args.seed)
    print(args.prompt + decode_tokens(out, tok))
    return 0


def cmd_report(args) -> int:
    """Spike statistics and energy estimate of one encoding on a text: report.txt, report.json
    and the plots firing_rate.png, planes.png, energy.png in --out."""
    from .calibrate import set_encoding
    from .models import load_gptq
    from .stats import track
    calibration = _calibration(args.model)
    enc = parse_encoding(args.encoding, calibration)
    model = load_gptq(args.model, Encoding("minmax", 4))
    set_encoding(model, enc, calibration)
    tokens = _tokens(args, args.model)[: args.max_tokens]
    if tokens.shape[0] < 1:
        raise ValueError("the text gives no tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with track(model) as tracker, torch.no_grad():
        for chunk in tokens.split(args.window):
            model(input_ids=chunk.unsqueeze(0))
    header = (f"spikeops report: {args.model}, encoding {args.encoding}, {tokens.shape[0]} tokens "
              f"in windows of {args.window}\n\n")
    (out / "report.txt").write_text(header + tracker.table() + "\n", encoding="utf-8")
    (out / "report.json").write_text(tracker.to_json(), encoding="utf-8")
    tracker.plot(out)
    print(header + tracker.table())
    print(f"\nwrote report.txt, report.json, firing_rate.png, planes.png, energy.png to {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spikeops", description="Exact, fast spiking LLM kernels for PyTorch. Commands "
        "take a GPTQ checkpoint folder (default: the embedded byte-level model) and a text file "
        "(default: its held-out sample).", epilog=ENCODING_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_and_text(p, model_help="GPTQ checkpoint folder"):
        p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                       help=f"{model_help} (default: the embedded model)")
        p.add_argument("--text", help="UTF-8 text file (default: the embedded held-out sample)")
        p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("demo", help="run a GPTQ layer on spikes under several encodings and "
                                    "compare it with the dense layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=2048,
                   help="held-out bytes the model part evaluates")
    p.add_argument("--tokens", type=int, default=1, help="tokens M of the kernel part "
                                                         "(default 1: decode)")
    p.add_argument("--in-features", type=int, default=4096, help="K (multiple of 128)")
    p.add_argument("--out-features", type=int, default=11008, help="N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)

    p = sub.add_parser("quantize", help="GPTQ-quantize a float LLaMA folder (safetensors) on a "
                                        "calibration text and write a GPTQ checkpoint")
    p.add_argument("model", help="float model folder (config.json + safetensors)")
    p.add_argument("out", help="output folder")
    p.add_argument("--text", required=True, help="calibration text file (UTF-8)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128, help="-1: one group per row")
    p.add_argument("--asym", action="store_true", help="asymmetric zero points")
    p.add_argument("--act-order", action="store_true", help="desc_act: quantize columns by "
                                                            "decreasing Hessian diagonal")
    p.add_argument("--samples", type=int, default=64, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_quantize)

    p = sub.add_parser("calibrate", help="calibrate the seed methods per layer (OBS salient "
                                         "channels, SDLLM gamma, LAS thresholds) and save them "
                                         "beside the checkpoint")
    model_and_text(p)
    p.add_argument("--out", help="folder for the calibration files (default: the model's)")
    p.add_argument("--methods", default="obs,sdllm,las", help="comma list of obs, sdllm, las")
    p.add_argument("--bits", type=int, default=4, help="spike bits for the SDLLM gamma search")
    p.add_argument("--salient-fraction", type=float, default=0.1)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.set_defaults(run=cmd_calibrate)

    p = sub.add_parser("eval", help="perplexity and firing rate of a GPTQ model on float "
                                    "activations and under spiking encodings")
    model_and_text(p)
    p.add_argument("--encodings", default="minmax4,minmax4+s6,absmax4,absmean4,oat8",
                   help="comma list (see the encodings below)")
    p.add_argument("--dense", help="float model folder for the dense baseline row")
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    p.add_argument("--max-tokens", type=int, default=16384, help="evaluate at most this many")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("generate", help="generate text with a spiking GPTQ model")
    model_and_text(p)
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--encoding", default="minmax4", help="one encoding (see below)")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("report", help="per-layer spike statistics and an energy estimate "
                                      "(text, JSON and PNG plots; see docs/energy.md)")
    model_and_text(p)
    p.add_argument("--encoding", default="minmax4", help="one encoding (see below)")
    p.add_argument("--max-tokens", type=int, default=1024, help="evaluate at most this many")
    p.add_argument("--window", type=int, default=256, help="tokens per forward")
    p.add_argument("--out", default="spikeops-report", help="output folder")
    p.set_defaults(run=cmd_report)

    args = parser.parse_args(argv)
    if args.command == "report" and (args.max_tokens < 1 or args.window < 1):
        parser.error("report needs --max-tokens >= 1 and --window >= 1")
    if args.command == "demo":
        if args.tokens < 1 or args.in_features < 128 or args.in_features % 128 or \
                args.out_features < 1:
            parser.error("demo needs --tokens >= 1, --in-features a positive multiple of 128, "
                         "--out-features >= 1")
    model = getattr(args, "model", None)
    if model is not None and not Path(model).is_dir():
        parser.error(f"{model!r} is not a folder (a model checkpoint folder is expected)")
    if getattr(args, "text", None) and not Path(args.text).is_file():
        parser.error(f"--text {args.text!r} is not a file")
    try:
        return args.run(args)
    except (ValueError, TypeError) as e:
        print(f"spikeops {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
