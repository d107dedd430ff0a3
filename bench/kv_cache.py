"""The KV-cache table of issue 24: perplexity, cache memory and decode speed of a GPTQ model
with a float key-value cache against the bit-plane caches (``Runner(kv="spike4" | "spike8")``,
attention on spikes; README, "Attention on spikes").

    python bench/kv_cache.py [--model DIR] [--text FILE ...] [--out bench/results/kv-smollm2-CPU]

Perplexity (``spikeops.evaluate.compare`` with ``kv=``: windows of --window tokens, stride
half of it, with the 95% bootstrap interval) under GPTQ weights on float activations and on
absmax4 spikes (the folder's calibration), on the tokens of the --text files one after another
(windows may span two texts); cache bytes per token of each cache against a
float16 cache; decode tokens/s at a --context-token context with kv=float and kv=spike4, both
prefilled once and then timed step by step, interleaved in one process (median of --steps
steps each). Writes OUT.md and OUT.json, named by the CPU (bench/machine.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from spikeops.cli import HelpFormatter

from machine import cpu_name, cpu_slug

CACHE = Path.home() / ".cache" / "spikeops" / "SmolLM2-135M-Instruct.Q4_1"
DEFAULT_MODEL = CACHE / "w4g128-rotate-seed0-GPL-3"
DEFAULT_TEXT = Path("/usr/share/common-licenses/MPL-2.0")
KVS = ("float", "spike4", "spike8")
RECORD = "kv-smollm2"  # bench/results/RECORD-CPU.md and .json


def parser(doc: str, record: str) -> argparse.ArgumentParser:
    """The options of this script and bench/kv_spread.py: the model, the evaluation text and
    the output (``record``: the name of the default output, write_record's)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    p.add_argument("--out", default=None,
                   help=f"output path without suffix (default: bench/results/{record}-CPU)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="GPTQ folder (with calibration)")
    p.add_argument("--text", nargs="+", default=[str(DEFAULT_TEXT)],
                   help="held-out evaluation texts, read one after another")
    p.add_argument("--max-tokens", type=int, default=4096, help="evaluate at most this many")
    p.add_argument("--window", type=int, default=256, help="perplexity window (tokens)")
    return p


def model_and_tokens(args):
    """The GPTQ model of --model (float32) and the tokens of the --text files, one after
    another (all of them: the caller cuts --max-tokens)."""
    from spikeops import Encoding, load_gptq
    from spikeops.commands import model_tokenizer
    from spikeops.evaluate import encode_text
    model = load_gptq(args.model, Encoding("absmax", 4), dtype=torch.float32)
    tokenizer = model_tokenizer(args.model)
    return model, torch.cat([encode_text(Path(t).read_text(encoding="utf-8"), tokenizer)
                             for t in args.text])


def write_record(out, name: str, lines: list, record: dict) -> None:
    """OUT.md (``lines``) and OUT.json (``record`` with torch and its threads); OUT is --out, or
    bench/results/``name``."""
    out = Path(out) if out else Path(__file__).parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        dict(record, torch=torch.__version__, threads=torch.get_num_threads()), indent=1))
    print("\n".join(lines))
    print(f"wrote {out.with_suffix('.md')} and .json")


def perplexities(model, tokens, window: int) -> list:
    from spikeops import Encoding
    from spikeops.evaluate import compare
    rows = []
    for kv in KVS:
        print(f"perplexity, kv={kv}", flush=True)
        rows += compare(model, tokens, {"float": None, "absmax4": Encoding("absmax", 4)},
                        window=window, kv=kv)
    return rows


def decode_speed(model, tokens, context: int, steps: int) -> dict:
    """tokens/s of one-token decode steps after a ``context``-token prefill, kv float against
    spike4, the steps interleaved (median of ``steps`` each)."""
    from spikeops.runner import Runner
    runners = {kv: Runner(model, context + steps + 1, kv=kv) for kv in ("float", "spike4")}
    for kv, runner in runners.items():
        print(f"prefill {context} tokens, kv={kv}", flush=True)
        runner(tokens[None, :context], last_only=True)
    times = {kv: [] for kv in runners}
    for t in range(steps):
        for kv, runner in runners.items():
            ids = tokens[None, context + t:context + t + 1]
            start = time.perf_counter()
            runner(ids, last_only=True)
            times[kv].append(time.perf_counter() - start)
        print(f"decode step {t + 1}/{steps}", flush=True)
    return {kv: 1.0 / sorted(ts)[len(ts) // 2] for kv, ts in times.items()}


def main(argv=None) -> int:
    p = parser(__doc__, RECORD)
    p.add_argument("--context", type=int, default=2048, help="decode context (tokens)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per cache")
    args = p.parse_args(argv)

    from spikeops import Encoding
    from spikeops.calibrate import set_encoding
    from spikeops.runner import Runner
    cpu = cpu_name()
    model, all_tokens = model_and_tokens(args)
    rows = perplexities(model, all_tokens[:args.max_tokens], args.window)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    fp16 = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    sizes = {kv: Runner(model, 1, kv=kv).cache_bytes_per_token() for kv in KVS}
    set_encoding(model, Encoding("absmax", 4))
    speed = decode_speed(model, all_tokens, args.context, args.steps)

    base = {r.encoding: r.perplexity for r in rows if r.kv == "float"}
    lines = [f"# KV cache on spikes: SmolLM2-135M-Instruct (W4 g128, rotate), {cpu}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads; model "
             f"`{args.model}`; text {', '.join(f'`{t}`' for t in args.text)}, "
             f"{rows[0].tokens} tokens, windows of "
             f"{args.window}, stride {args.window // 2}.", "",
             "| activations | kv | perplexity | 95% interval | x kv=float | cache bytes/token "
             "| x float16 cache |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'absmax4 spikes' if r.encoding == 'absmax4' else 'float'} | {r.kv} | "
                     f"{r.perplexity:.3f} | [{r.perplexity_low:.3f}, {r.perplexity_high:.3f}] | "
                     f"{r.perplexity / base[r.encoding]:.4f} | {sizes[r.kv]} | "
                     f"{sizes[r.kv] / fp16:.3f} |")
    lines += ["", f"float16 cache: {fp16} bytes per token. The float cache of these runs is the "
              f"model's float32 ({sizes['float']} bytes).", "",
              f"Decode at a {args.context}-token context, absmax4 spikes, one process, "
              f"{args.steps} steps each, interleaved (median): kv=float "
              f"{speed['float']:.2f} tokens/s, kv=spike4 {speed['spike4']:.2f} tokens/s "
              f"({speed['spike4'] / speed['float']:.2f}x)."]
    write_record(args.out, f"{RECORD}-{cpu_slug(cpu)}", lines, {
        "cpu": cpu, "model": args.model, "text": args.text, "window": args.window,
        "rows": [dataclasses.asdict(r) for r in rows], "cache_bytes_per_token": sizes,
        "float16_cache_bytes_per_token": fp16, "context": args.context,
        "decode_tokens_per_s": speed})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
