"""The real-model table: a LLaMA-architecture GGUF model under every outlier transform and
every spiking encoding, W4 g128 GPTQ, calibrated on one text and evaluated on another.

    python bench/real_model.py MODEL.gguf CALIB.txt EVAL.txt --out bench/results/smollm2
        [--transforms none,smooth,rotate] [--max-tokens 2048] [--cache DIR] [--seed 0]
        [--speed absmax4,minmax4,none]

Every step (import, transform + GPTQ, calibration, evaluation) is cached in --cache, as for
``spikeops demo``; the script writes OUT.json (the rows of every transform) and OUT.md (one
table: perplexity, its ratio to the dense model, firing rate and SOPs per MAC) and prints the
markdown. ``--speed`` adds tokens/s of a 256-token prefill and of one-token decode steps after
it, for HF fp32 and bf16 and the last transform's model under the given encodings (``none``:
float activations), measured in this process, one after the other. docs/transforms.md shows
the committed result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from spikeops.cli import HelpFormatter
from spikeops.demo import REAL_ENCODINGS, prepare_real_model, real_model_rows
from spikeops.transforms import TRANSFORMS


def outliers(q_dir: Path, eval_text: str) -> dict:
    """input_outliers of the GPTQ model on float activations, first 256 evaluation tokens."""
    import torch
    from spikeops import Encoding, load_gptq
    from spikeops.commands import model_tokenizer
    from spikeops.calibrate import set_encoding
    from spikeops.evaluate import encode_text
    from spikeops.transforms import input_outliers
    model = load_gptq(q_dir, Encoding("minmax", 4), dtype=torch.float32)
    set_encoding(model, None)
    ids = encode_text(Path(eval_text).read_text(encoding="utf-8"), model_tokenizer(q_dir))
    return input_outliers(model, ids[None, :256])


def llama_cpp_speed(gguf: Path, ids, steps: int, runs: int):
    """``(prefill tokens/s, decode tokens/s)`` of llama.cpp (llama-cpp-python) on the GGUF file
    itself, timed as ``speed`` times the Runner (the same 256 prompt tokens, then ``runs`` of
    ``steps`` one-token steps after one untimed run; torch's thread count), or None when
    llama-cpp-python is not installed: it is not a dependency, only the issue's next bar
    (docs/performance.md, "Whole model on the CPU")."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import torch
    from spikeops.timing import median_ms
    tokens = ids[0].tolist()
    llm = Llama(str(gguf), n_ctx=256 + steps * (runs + 1), n_batch=256, verbose=False,
                n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads())

    def prefill():
        llm.reset()
        llm.eval(tokens[:256])
    rate = 256e3 / median_ms(prefill, 3)
    prefill()
    step_ms = median_ms(lambda: [llm.eval(tokens[256:257]) for _ in range(steps)], runs)
    return rate, steps * 1e3 / step_ms


def speed(float_dir: Path, q_dir: Path, eval_text: str, encodings: str,
          gguf: Path = None) -> list:
    """``[(system, prefill tokens/s, decode tokens/s)]``: median of 3 prefills of 256 tokens
    (logits of the last token only, as generation needs), then the median of 7 runs of 8 decode
    steps after them.
    HF rows run transformers' forward; the spikeops rows, and the float model once more (with
    its float32 ``lm_head``), run ``spikeops.runner.Runner``, the lean forward ``generate``
    uses, with its default settings; each spiking encoding also with the model's own float32
    ``lm_head`` (``Runner(head_dtype=None)``) beside the default's float16 copy; given the
    ``gguf`` file, llama.cpp on it last (``llama_cpp_speed``)."""
    import torch
    from spikeops import Encoding, load_gptq
    from spikeops.calibrate import parse_encoding
    from spikeops.commands import load_calibration
    from spikeops.calibrate import set_encoding
    from spikeops.evaluate import encode_text, forward_step
    from spikeops.floatmodel import load_float_model
    from spikeops.runner import Runner
    from spikeops.timing import median_ms
    fp32, tok = load_float_model(float_dir)
    ids = encode_text(Path(eval_text).read_text(encoding="utf-8"), tok)[None, :257]
    steps, runs, rows = 8, 7, []

    def measure(name, model, lean, head_dtype="auto"):
        with torch.no_grad():
            if lean:
                runner = Runner(model, 256 + steps * (runs + 1), head_dtype=head_dtype)

                def prefill():
                    runner.reset()
                    return runner(ids[:, :256], last_only=True)
                rate = 256e3 / median_ms(prefill, 3)
                prefill()
                step_ms = median_ms(lambda: [runner(ids[:, 256:]) for _ in range(steps)], runs)
            else:
                rate = 256e3 / median_ms(lambda: model(input_ids=ids[:, :256], logits_to_keep=1), 3)
                cache = forward_step(model, ids[:, :256], None)[1]
                step_ms = median_ms(
                    lambda: [forward_step(model, ids[:, 256:], cache) for _ in range(steps)], runs)
        rows.append((name, rate, steps * 1e3 / step_ms))

    measure("HF fp32", fp32, lean=False)
    measure("HF bf16", load_float_model(float_dir, torch.bfloat16)[0], lean=False)
    measure("fp32, spikeops Runner", fp32, lean=True, head_dtype=None)
    calibration = load_calibration(q_dir)
    model = load_gptq(q_dir, Encoding("minmax", 4), dtype=torch.float32)
    for spec in encodings.split(","):
        set_encoding(model, parse_encoding(spec, calibration), calibration)
        label = spec if spec != "none" else "float activations"
        measure(f"spikeops W4 {label}, Runner", model, lean=True)
        if spec != "none":
            measure(f"spikeops W4 {label}, Runner, float32 lm_head", model, lean=True,
                    head_dtype=None)
    if gguf is not None:
        llama = llama_cpp_speed(gguf, ids, steps, runs)
        if llama is None:
            print("speed: no llama.cpp row: llama-cpp-python is not installed")
        else:
            rows.append((f"llama.cpp, {Path(gguf).name}", *llama))
    return rows


def markdown(table: dict, spread: dict, args) -> str:
    dense = next(r for rows in table.values() for r in rows if r.encoding == "dense")
    lines = [f"`{Path(args.gguf).name}`: GPTQ W4 g128 (64 x 256 tokens of "
             f"`{Path(args.calib_text).name}`), seed-method calibration on the same text, "
             f"perplexity on the first {dense.tokens} tokens of `{Path(args.eval_text).name}` "
             f"(windows of 256, stride 128). x dense = perplexity / dense perplexity "
             f"({dense.perplexity:.2f}).", "",
             "| transform | encoding | perplexity | x dense | firing rate | SOPs/MAC |",
             "|---|---|---|---|---|---|",
             f"| - | dense float | {dense.perplexity:.2f} | 1.00 | - | - |"]
    for kind, rows in table.items():
        for r in rows:
            if r.encoding == "dense":
                continue
            label = "GPTQ, float activations" if r.encoding == "float" else r.encoding
            rate = f"{r.firing_rate:.3f}" if r.firing_rate is not None else "-"
            sops = f"{r.sops_per_mac:.3f}" if r.sops_per_mac is not None else "-"
            lines.append(f"| {kind} | {label} | {r.perplexity:.2f} | "
                         f"{r.perplexity / dense.perplexity:.2f} | {rate} | {sops} |")
    lines += ["", "Projection inputs on float activations (first 256 evaluation tokens, all "
              "layers): largest |x| of the first token, median over the other tokens of their largest "
              "|x|, and median of (largest |x| / mean |x|) per token.", "",
              "| transform | input | first token max | other tokens' max (median) | "
              "max / mean (median) |", "|---|---|---|---|---|"]
    for kind, kinds in spread.items():
        for name, v in kinds.items():
            lines.append(f"| {kind} | {name} | {v['first_token_max']:.1f} | "
                         f"{v['other_tokens_max_median']:.2f} | {v['max_over_mean_median']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("gguf", help="LLaMA-architecture GGUF file")
    p.add_argument("calib_text", help="calibration text (GPTQ and the seed methods)")
    p.add_argument("eval_text", help="held-out evaluation text (not the calibration text)")
    p.add_argument("--out", required=True, help="output path without suffix (.json, .md)")
    p.add_argument("--transforms", default=",".join(TRANSFORMS), help="comma list")
    p.add_argument("--encodings", default=REAL_ENCODINGS, help="comma list")
    p.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "spikeops"),
                   help="folder for the cached steps")
    p.add_argument("--seed", type=int, default=0, help="random seed (windows, rotation)")
    p.add_argument("--speed", default="", help="comma list of encodings (none: float "
                   "activations) whose whole-model tokens/s to measure; empty: none")
    args = p.parse_args(argv)
    for name in ("gguf", "calib_text", "eval_text"):
        if not Path(getattr(args, name)).is_file():
            p.error(f"{name} {getattr(args, name)!r} is not a file")
    if Path(args.calib_text).resolve() == Path(args.eval_text).resolve():
        p.error("the evaluation text must differ from the calibration text")
    kinds = args.transforms.split(",")
    for kind in kinds:
        if kind not in TRANSFORMS:
            p.error(f"--transforms: {kind!r} is not one of {TRANSFORMS}")
    table, spread = {}, {}
    for kind in kinds:
        float_dir, q_dir = prepare_real_model(args.gguf, args.cache, kind, args.calib_text,
                                              args.seed)
        table[kind] = real_model_rows(float_dir, q_dir, args.eval_text, args.max_tokens,
                                      args.encodings)
        spread[kind] = outliers(q_dir, args.eval_text)
    speeds = speed(float_dir, q_dir, args.eval_text, args.speed, args.gguf) if args.speed else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"gguf": Path(args.gguf).name, "calib_text": Path(args.calib_text).name,
         "eval_text": Path(args.eval_text).name,
         "rows": {k: [dataclasses.asdict(r) for r in rows] for k, rows in table.items()},
         "input_outliers": spread, "speed": [
             {"system": n, "prefill_tokens_per_s": a, "decode_tokens_per_s": b}
             for n, a, b in speeds]},
        indent=1))
    text = markdown(table, spread, args)
    if speeds:
        import torch
        text += (f"\nWhole model, {torch.get_num_threads()} CPU threads, transform {kinds[-1]}: "
                 f"tokens/s of a 256-token prefill and of decode steps after it.\n\n"
                 "| system | prefill | decode |\n|---|---|---|\n" +
                 "".join(f"| {n} | {a:.0f} | {b:.1f} |\n" for n, a, b in speeds))
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
