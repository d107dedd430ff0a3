"""How far one perplexity ratio of the 4-bit KV cache can be trusted: kv=spike4 against
kv=float (``bench/kv_cache.py``'s ratio) with the 4-bit keys' clip moved by a few thousandths
of the range around ``attention.KEY_ENCODINGS[4]``'s (README, "Attention on spikes").

    python bench/kv_spread.py [--model DIR] [--text FILE ...] [--clips G ...]

Such a move changes no code by more than one step and the accuracy of the cache by nothing
measurable on float activations; on 4-bit spikes every later code can flip with it, so the
spread of the ratio over the clips is the uncertainty of any one of them. Perplexity as
``bench/kv_cache.py`` measures it (``spikeops.evaluate.compare``: windows of --window tokens,
stride half of it, on the tokens of the --text files one after another), kv=float once per
encoding, then kv=spike4 once per clip; each row under ``--encodings``. Writes OUT.md and
OUT.json, named by the CPU (bench/machine.py).
"""

from __future__ import annotations

import statistics

import torch
from spikeops.attention import KEY_ENCODINGS

from kv_cache import model_and_tokens, parser, write_record
from machine import cpu_name, cpu_slug

ENCODINGS = ("float", "absmax4")
RECORD = "kv-spread-smollm2"  # bench/results/RECORD-CPU.md and .json


def main(argv=None) -> int:
    p = parser(__doc__, RECORD)
    clip = KEY_ENCODINGS[4].gamma  # the cache's own, and a few thousandths about it
    p.add_argument("--clips", type=float, nargs="+",
                   default=[round(clip + d, 4) for d in
                            (-0.002, -0.001, -0.0005, 0, 0.0005, 0.001, 0.002)],
                   help="4-bit key clips (Encoding gamma), one kv=spike4 run each")
    p.add_argument("--encodings", nargs="+", choices=ENCODINGS, default=["absmax4"],
                   help="activations: GPTQ weights on float activations, absmax4 spikes")
    args = p.parse_args(argv)
    for g in args.clips:
        if not 0.0 < g <= 1.0:
            p.error(f"--clips must lie in (0, 1], got {g}")

    from spikeops import Encoding, attention
    from spikeops.evaluate import compare
    cpu = cpu_name()
    model, tokens = model_and_tokens(args)
    tokens = tokens[:args.max_tokens]
    encodings = {e: None if e == "float" else Encoding("absmax", 4) for e in args.encodings}
    base = {r.encoding: r.perplexity for r in compare(model, tokens, encodings,
                                                      window=args.window, kv="float")}
    shipped = attention.KEY_ENCODINGS[4]
    ratios = {e: [] for e in encodings}
    try:
        for g in args.clips:
            # The one place the clip is read: SpikeKV takes KEY_ENCODINGS when a Runner is made.
            attention.KEY_ENCODINGS[4] = Encoding("minmax", 4, gamma=g)
            print(f"kv=spike4, key clip {g}", flush=True)
            for r in compare(model, tokens, encodings, window=args.window, kv="spike4"):
                ratios[r.encoding].append(r.perplexity / base[r.encoding])
    finally:
        attention.KEY_ENCODINGS[4] = shipped

    lines = [f"# Spread of the kv=spike4 perplexity ratio over the 4-bit key clip: SmolLM2-135M-"
             f"Instruct (W4 g128, rotate), {cpu}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; model "
             f"`{args.model}`; text {', '.join(f'`{t}`' for t in args.text)}, {tokens.numel()} "
             f"tokens, windows of {args.window}, stride {args.window // 2}; the shipped clip is "
             f"{shipped.gamma}.", "",
             "| activations | kv=float perplexity | "
             + " | ".join(f"clip {g}" for g in args.clips) + " | mean | sd |",
             "|---|---|" + "---|" * (len(args.clips) + 2)]
    for e, rs in ratios.items():
        sd = f"{statistics.stdev(rs):.4f}" if len(rs) > 1 else "-"
        lines.append(f"| {'absmax4 spikes' if e == 'absmax4' else 'float'} | {base[e]:.3f} | "
                     + " | ".join(f"{r:.4f}" for r in rs)
                     + f" | {statistics.fmean(rs):.4f} | {sd} |")
    write_record(args.out, f"{RECORD}-{cpu_slug(cpu)}", lines, {
        "cpu": cpu, "model": args.model, "text": args.text, "tokens": tokens.numel(),
        "window": args.window, "shipped_clip": shipped.gamma, "clips": args.clips,
        "kv_float_perplexity": base, "ratio_spike4_over_float": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
