"""lm-evaluation-harness on SmolLM2-135M-Instruct (the closing note of issue 25): one
``spikeops lm-eval`` run per row on the local tasks of bench/lm_eval_tasks (licenses_mc: which
sentence follows, 100 items; licenses_ppl: perplexity of MPL-2.0, held out of the calibration):

- dense: the float model, lm_eval's own ``hf`` model (``--model hf``);
- float activations: the GPTQ checkpoint, ``encoding=none`` (the ``spikeops`` model);
- the best 4-bit encoding (``absmax4``, its gamma from the checkpoint's saved calibration).

The models are the ones ``spikeops demo --gguf SmolLM2-135M-Instruct.Q4_1.gguf`` caches (float
folder, rotated W4 g128 GPTQ on GPL-3 with the seed methods' calibration). Writes
bench/results/lm-eval-smollm2-<cpu>.md and .json: the table and the machine (bench/machine.py's
cpu_name). Each row's lm_eval output (progress bars, lm_eval's table) is shown as it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name, cpu_slug

HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "spikeops" / "SmolLM2-135M-Instruct.Q4_1"
TASKS = ("licenses_mc", "licenses_ppl")


def rows(args) -> list:
    """(label, lm_eval arguments) of the three rows."""
    common = ["--batch_size", str(args.batch_size)]
    spiking = f"pretrained={args.gptq},encoding="
    return [("dense float", ["--model", "hf", "--model_args",
                             f"pretrained={args.float},dtype=float32"] + common),
            ("GPTQ, float activations", ["--model_args", spiking + "none"] + common),
            (args.encoding, ["--model_args", spiking + args.encoding] + common)]


def run_row(label: str, lm_args: list, args, work: Path) -> dict:
    out = work / re.sub(r"\W+", "-", label)
    argv = [sys.executable, "-m", "spikeops", "lm-eval", *lm_args, "--tasks", ",".join(TASKS),
            "--include_path", str(HERE / "lm_eval_tasks"), "--limit", str(args.limit),
            "--output_path", str(out)]
    print(f"\n=== {label}: {' '.join(argv[2:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    seconds = time.perf_counter() - start
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    mc, ppl = result["results"]["licenses_mc"], result["results"]["licenses_ppl"]
    spikes = result["config"].get("spikeops", {})
    return {"row": label, "acc": mc["acc,none"], "acc_stderr": mc["acc_stderr,none"],
            "acc_norm": mc["acc_norm,none"], "acc_norm_stderr": mc["acc_norm_stderr,none"],
            "word_perplexity": ppl["word_perplexity,none"],
            "bits_per_byte": ppl["bits_per_byte,none"],
            "firing_rate": spikes.get("firing_rate"), "sops_per_mac": spikes.get("sops_per_mac"),
            "samples": {t: result["n-samples"][t]["effective"] for t in TASKS},
            "seconds": round(seconds, 1)}


def table(results: list) -> str:
    num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| row | licenses_mc acc | acc_norm | licenses_ppl word perplexity | bits per byte "
             "| firing rate | SOPs/MAC | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['row']} | {r['acc']:.2f} ± {r['acc_stderr']:.2f} | "
                     f"{r['acc_norm']:.2f} ± {r['acc_norm_stderr']:.2f} | "
                     f"{r['word_perplexity']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{num(r['firing_rate'], '.3f')} | {num(r['sops_per_mac'], '.3f')} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float", type=Path, default=CACHE / "float",
                        help="the float model folder (default: %(default)s)")
    parser.add_argument("--gptq", type=Path, default=CACHE / "w4g128-rotate-seed0-GPL-3",
                        help="the GPTQ checkpoint with its calibration (default: %(default)s)")
    parser.add_argument("--encoding", default="absmax4",
                        help="the spiking row's encoding (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=20,
                        help="documents per task, the first ones (default: %(default)s: 20 "
                        "items and all 9 sections: 10 to 15 minutes on 2 shared, busy CPU "
                        "cores; 100 runs every item)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="requests per forward (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder of the .md and .json (default: %(default)s)")
    args = parser.parse_args()
    for name in ("float", "gptq"):
        if not (getattr(args, name) / "config.json").is_file():
            parser.error(f"--{name} {getattr(args, name)} is not a model folder "
                         f"(run spikeops demo --gguf SmolLM2-135M-Instruct.Q4_1.gguf first)")
    if args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    cpu = cpu_name()
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for i, (label, lm_args) in enumerate(rows(args), 1):
            print(f"\n[{i}/3] {label}", flush=True)
            results.append(run_row(label, lm_args, args, Path(work)))
    text = (f"lm-evaluation-harness 0.4.13 via `spikeops lm-eval` on SmolLM2-135M-Instruct "
            f"(`{args.float.name}`, `{args.gptq.name}`), local tasks of bench/lm_eval_tasks: "
            f"licenses_mc (which sentence follows, 4 choices; acc ± stderr) and licenses_ppl "
            f"(MPL-2.0, held out of the GPL-3 calibration). "
            f"The first {args.limit} documents of each task (`--limit {args.limit}`: "
            f"{results[0]['samples']['licenses_mc']} items, "
            f"{results[0]['samples']['licenses_ppl']} sections), batch size {args.batch_size}, "
            f"CPU, float32 dense parts. Machine: {cpu}, {os.cpu_count()} CPUs; the whole run "
            f"took {time.perf_counter() - started:.0f} s (seconds per row: lm_eval's start, "
            f"the model's loading and the requests).\n\n{table(results)}\n")
    slug = cpu_slug(cpu)
    args.out.mkdir(parents=True, exist_ok=True)
    md, js = args.out / f"lm-eval-smollm2-{slug}.md", args.out / f"lm-eval-smollm2-{slug}.json"
    md.write_text(text)
    js.write_text(json.dumps({"machine": cpu, "cpus": os.cpu_count(), "limit": args.limit, "batch_size": args.batch_size,
                              "rows": results}, indent=1))
    print(f"\n{text}\nwrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
