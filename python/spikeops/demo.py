"""``spikeops demo`` (what scripts/demo.sh runs, with SmolLM2-135M-Instruct): the GGUF model is
imported, transformed (--transform), GPTQ-quantized to W4 g128 and calibrated on --calib-text,
each step cached in --cache; then the perplexity, firing rate and SOPs per MAC of the dense
model, of the GPTQ weights on float activations and of every encoding at 4 and 8 bits on
--eval-text, chat answers (--chat) on spikes of the best encoding within 4 and within 8 bit
planes per element, with their energy estimates. Without --gguf the embedded byte-level LLaMA
(a few million parameters, W4 GPTQ, with its seed-method calibration) is evaluated on its
held-out text instead, and generates a sample.
Then a GPTQ-shaped layer made in code (LLaMA-2-7B gate projection, 4096 -> 11008, W4 g128) runs
on spikes of LLM-like activations under five encodings: its output is compared with the dense
float64 layer, and its firing rate, synaptic operations and speed against float32
``F.linear`` are printed.

The real-model pipeline (``prepare_real_model``, ``real_model_rows``) is also what
bench/real_model.py runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import Encoding, GPTQWeight, encode, pack, spike_linear
from .calibrate import parse_encoding
from .checkpoint import CALIBRATION_FILE
from .commands import (DEFAULT_DENSE, DEFAULT_MODEL, DEFAULT_TEXT, cmd_calibrate,
                       cmd_import_gguf, cmd_quantize, evaluate_rows, load_calibration,
                       model_tokenizer, print_table, stop_tokens)
from .files import has_file, write_file
from .reference import tolerance
from .timing import median_ms

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
    model = load_gptq(DEFAULT_MODEL, Encoding("minmax", 4), calibration=calibration)
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


REAL_ENCODINGS = "minmax4,minmax4+s6,absmax4,absmax4g64,absmean4,oat8,minmax8,absmax8"
DEMO_TRANSFORM = "rotate"
# The activation groupings the demo's calibration searches clips for: per token and the groups
# of 64 channels of absmax4g64 (docs/research.md).
DEMO_GROUPS = "0,64"
# Raised whenever what an encoding computes changes, so that evaluation rows cached by an
# earlier version are measured again. 2: minmax's calibrated gamma; 8-bit encodings unclipped.
# 3: clips per activation grouping.
EVAL_CACHE_VERSION = 3


def _args(command: str, *argv) -> argparse.Namespace:
    """A command's arguments as its command line parses ``argv``, defaults included, so that
    the pipeline never drifts from the commands it runs."""
    from .cli import build_parser  # the command line imports this module
    return build_parser().parse_args([command, *map(str, argv)])


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
    cache = Path(cache) / Path(gguf).stem
    float_dir = cache / "float"
    q_dir = cache / f"w4g128-{transform}-seed{seed}-{Path(calib_text).name}"
    # Each command writes its folder whole (files.write_folder), so what is in the cache is
    # complete; the calibration, written last, marks a finished quantize + calibrate.
    if not float_dir.is_dir():
        _step("import GGUF", lambda: cmd_import_gguf(_args("import-gguf", gguf, float_dir)))
    calibrated = has_file("demo", q_dir, CALIBRATION_FILE)
    if not calibrated:
        _step(f"transform {transform} + GPTQ W4 g128", lambda: cmd_quantize(_args(
            "quantize", float_dir, q_dir, "--text", calib_text, "--transform", transform,
            "--bits", 4, "--group-size", 128, "--samples", 64, "--seq-len", 256,
            "--dtype", "float16", "--seed", seed)))
    # A cache calibrated by an earlier version lacks the clips of DEMO_GROUPS or the query
    # moments of the spiking key cache (method kv): calibrated again.
    settings = load_calibration(q_dir).settings if calibrated else {}
    if settings.get("groups") != [int(g) for g in DEMO_GROUPS.split(",")] or \
            "kv" not in settings.get("methods", []):
        _step("calibrate", lambda: cmd_calibrate(_args(
            "calibrate", q_dir, "--text", calib_text, "--methods", "obs,sdllm,las,kv",
            "--bits", 4, "--groups", DEMO_GROUPS, "--seed", seed)))
    return float_dir, q_dir


def real_model_rows(float_dir, q_dir, eval_text, max_tokens: int, encodings=REAL_ENCODINGS):
    """The evaluation rows of a prepared model on ``eval_text`` (cached in ``q_dir``)."""
    import dataclasses
    import json
    from .evaluate import Row
    # EVAL_CACHE_VERSION names the encodings' semantics the cached rows were measured with.
    results = q_dir / (f"eval{EVAL_CACHE_VERSION}-{Path(eval_text).name}-{max_tokens}-"
                       f"{encodings}.json")
    if results.is_file():
        print(f"== evaluation (cached: {results})")
        return [Row(**r) for r in json.loads(results.read_text())]
    holder = []
    _step("evaluate", lambda: holder.append(evaluate_rows(_args(
        "eval", q_dir, "--text", eval_text, "--encodings", encodings, "--dense", float_dir,
        "--window", 256, "--max-tokens", max_tokens, "--dtype", "float32"))))
    text = json.dumps([dataclasses.asdict(r) for r in holder[0]], indent=1)
    write_file("demo", results, lambda tmp: tmp.write_text(text))
    return holder[0]


def real_model_demo(args) -> None:
    """A real LLaMA from a GGUF file: import, transform + GPTQ W4 g128, calibrate (each step
    cached in --cache), the table of every encoding on held-out text, chat answers with the
    best encoding within 4 and within 8 bit planes per element and their energy summaries."""
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
    calibration = load_calibration(q_dir)
    model = load_gptq(q_dir, Encoding("minmax", 4), dtype=torch.float32,
                      calibration=calibration)
    tokenizer = model_tokenizer(q_dir)
    prompt, _ = chat_prompt(tokenizer, args.chat)
    print(f"\nchat on spikes, user: {args.chat}")
    # The best encoding within 4 and within 8 bit planes per element (sign and range bits
    # included: a salient or two-range encoding is not a 4-bit one): 4-bit answers vary with
    # float rounding far below any tolerance (docs/transforms.md), 8-bit ones track the float
    # model.
    for bits in (4, 8):
        best = min((r for r in spiking if r.planes <= bits), key=lambda r: r.perplexity)
        set_encoding(model, parse_encoding(best.encoding, calibration), calibration)
        with track(model) as tracker:
            answer = generate(model, encode_text(prompt, tokenizer), 80,
                              stop=stop_tokens(tokenizer))
        reply = (decode_tokens(answer, tokenizer).strip()
                 or "(none: its first token was end of text)")
        print(f"\n  assistant on {best.encoding} (the best encoding within {bits} planes per "
              f"element): {reply}")
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
    header = (f"{'encoding':46} {'P':>6} {'rate':>6} {'SOPs/MACs':>9} "
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
    print("\nP = magnitude planes of the spike tensor (the sign is a word of its own); "
          "rate = spikes / spike slots (tokens * K * P,\nsalient channels with their own "
          "planes); SOPs/MACs = synaptic additions per "
          "multiply-accumulate of the dense layer;\nrel.err = ||y - x @ W|| / ||x @ W|| "
          "(quantization of x); 'spec ok' = within the tolerance of docs/ops.md of x_hat @ W_hat "
          "in float64.")
    return 0


