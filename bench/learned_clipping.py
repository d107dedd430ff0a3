"""Learned clipping against the grid search: the per-layer clipping ratio gamma of absmax spikes,
learned with the straight-through gradient (spikeops.autograd.learn_clipping), against
spikeops.calibrate's SDLLM grid search, on the embedded model (docs/ops.md, "Gradients").

    python bench/learned_clipping.py [--bits 4] [--steps 40] [--json OUT.json]

Calibration text (default): the CPython 3.11 standard-library files difflib.py, genericpath.py
and imaplib.py of this interpreter, held out from the embedded model's training like the files
of heldout.txt, and not in heldout.txt; --samples windows of --seq-len tokens at even offsets,
the same tokens for every method. Evaluation text: python/spikeops/data/heldout.txt without its
one-line header (perplexity per byte, windows of 256, stride 128). Rows:

1. GPTQ weights on float activations (the teacher of "distill");
2. absmax without clipping (gamma 1);
3. gamma per layer from the grid (calibrate, method "sdllm": each layer's output error
   ||(x_hat - x) W^T||^2 on its float-activation inputs, grid --grid-step .. 1);
4. gamma per layer learned with Adam on that same objective, from gamma 1 (objective "layer");
5. all gammas learned jointly, from the grid's, on the KL divergence from row 1's
   next-token distributions (objective "distill");
6. likewise on the next-token cross-entropy of the calibration text (objective "loss").

Each row prints its perplexity as it finishes; the markdown table is printed at the end.
About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import time
import warnings
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "python" / "spikeops" / "data"
CALIB_FILES = ("difflib.py", "genericpath.py", "imaplib.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(DATA / "default_model"),
                   help="GPTQ LLaMA folder (byte-level vocabulary: the embedded model)")
    p.add_argument("--calib-text", nargs="+", default=None,
                   help="calibration text files (default: the standard-library files "
                        f"{', '.join(CALIB_FILES)} of this Python)")
    p.add_argument("--eval-text", default=str(DATA / "heldout.txt"),
                   help="evaluation text (its first line is skipped: heldout.txt's header)")
    p.add_argument("--mode", default="absmax", choices=("absmax", "absmean"))
    p.add_argument("--bits", type=int, default=4, help="spike bits, the sign included")
    p.add_argument("--samples", type=int, default=16, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    p.add_argument("--batch", type=int, default=4, help="windows per step of the loss objective")
    p.add_argument("--steps", type=int, default=40, help="Adam steps (per layer for 'layer')")
    p.add_argument("--lr-layer", type=float, default=0.02,
                   help="Adam learning rate on gamma, objective 'layer'")
    p.add_argument("--lr-model", type=float, default=0.005,
                   help="Adam learning rate on gamma, objectives 'distill' and 'loss'")
    p.add_argument("--grid-step", type=float, default=0.1,
                   help="gamma grid spacing (0.1 is calibrate's default grid 0.1 .. 1.0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    return p.parse_args(argv)


def calibration_text(files) -> tuple:
    if files is None:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        files = [stdlib / name for name in CALIB_FILES]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            sys.exit(f"learned_clipping: {missing} not found; pass --calib-text FILE...")
    files = [Path(f) for f in files]
    return "".join(f.read_text(encoding="utf-8") for f in files), [f.name for f in files]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import spikeops
    from spikeops import Encoding, SpikeLinear
    from spikeops.autograd import learn_clipping
    from spikeops.calibrate import calibrate
    from spikeops.evaluate import encode_text, perplexity

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    calib, calib_names = calibration_text(args.calib_text)
    eval_text = Path(args.eval_text).read_text(encoding="utf-8").split("\n", 1)[1]
    calib_ids = encode_text(calib)
    eval_ids = encode_text(eval_text)
    T = args.seq_len
    span = calib_ids.shape[0] - T
    if span < 0:
        sys.exit(f"learned_clipping: the calibration text has {calib_ids.shape[0]} tokens, "
                 f"fewer than --seq-len {T}")
    starts = [span * i // max(1, args.samples - 1) for i in range(args.samples)]
    windows = torch.stack([calib_ids[s:s + T] for s in starts])        # [samples, T]
    batches = list(windows.split(args.batch))
    tokens = windows.numel()
    print(f"calibration: {', '.join(calib_names)} ({calib_ids.shape[0]:,} bytes), "
          f"{args.samples} windows of {T} tokens at even offsets = {tokens:,} tokens")
    print(f"evaluation: {Path(args.eval_text).name} without its header line "
          f"({eval_ids.shape[0]:,} bytes), windows of 256, stride 128")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the checkpoint's own calibration is not used here
        model = spikeops.load_gptq(args.model, Encoding("minmax", 4))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SpikeLinear)}

    def set_gamma(gammas):
        for name, m in layers.items():
            m.set_encoding(None if gammas is None else
                           Encoding(args.mode, args.bits, gamma=float(gammas[name])))

    rows = []

    def evaluate(label, gammas, seconds):
        set_gamma(gammas)
        t = time.perf_counter()
        ppl = perplexity(model, eval_ids, progress=False)
        g = list(gammas.values()) if gammas else []
        row = {"row": label, "perplexity": ppl,
               "gamma_mean": statistics.fmean(g) if g else None,
               "gamma_min": min(g) if g else None, "gamma_max": max(g) if g else None,
               "fit_s": seconds, "gammas": gammas}
        rows.append(row)
        gtxt = (f"gamma mean {row['gamma_mean']:.3f} [{row['gamma_min']:.3f}, "
                f"{row['gamma_max']:.3f}]" if g else "")
        print(f"  {label:<44s} perplexity {ppl:7.4f}  {gtxt}  (fit {seconds:.1f} s, eval "
              f"{time.perf_counter() - t:.1f} s)", flush=True)

    name = f"{args.mode}{args.bits}"
    print("[1/6] GPTQ W4, float activations", flush=True)
    evaluate("GPTQ W4, float activations", None, 0.0)
    print(f"[2/6] {name}, gamma 1 (no clipping)", flush=True)
    ones = {n: 1.0 for n in layers}
    evaluate(f"{name}, gamma 1 (no clipping)", ones, 0.0)

    n_grid = round(1 / args.grid_step)
    grid = tuple(round(args.grid_step * i, 6) for i in range(1, n_grid + 1))
    print(f"[3/6] {name}, grid search: calibrate(methods=['sdllm'], gamma_grid={grid[0]} .. "
          f"{grid[-1]} step {args.grid_step})", flush=True)
    set_gamma(ones)
    t = time.perf_counter()
    cal = calibrate(model, batches, methods=("sdllm",), bits=args.bits, max_tokens=tokens,
                    gamma_grid=grid)
    grid_gammas = {n: cal.layers[n].gamma[args.mode] for n in layers}
    evaluate(f"{name}, grid search (layer output error)", grid_gammas,
             time.perf_counter() - t)

    runs = (("layer", "learned (layer output error), from 1", ones, args.lr_layer),
            ("distill", "learned (distillation), from grid", grid_gammas, args.lr_model),
            ("loss", "learned (next-token loss), from grid", grid_gammas, args.lr_model))
    for i, (objective, what, start, lr) in enumerate(runs):
        print(f"[{4 + i}/6] {name}, {what}: learn_clipping(objective={objective!r}, "
              f"steps={args.steps}, lr={lr})", flush=True)
        set_gamma(start)
        t = time.perf_counter()
        learned = learn_clipping(model, batches, steps=args.steps, lr=lr, objective=objective,
                                 max_tokens=tokens, progress=True)
        evaluate(f"{name}, {what}", learned, time.perf_counter() - t)

    print()
    print(f"| {name} on {Path(args.model).name} | perplexity | gamma mean [min, max] | fit s |")
    print("|---|---|---|---|")
    for r in rows:
        g = (f"{r['gamma_mean']:.3f} [{r['gamma_min']:.2f}, {r['gamma_max']:.2f}]"
             if r["gamma_mean"] is not None else "-")
        print(f"| {r['row']} | {r['perplexity']:.3f} | {g} | {r['fit_s']:.0f} |")
    print(f"\ncalibration: {', '.join(calib_names)}, {tokens:,} tokens; evaluation: "
          f"{Path(args.eval_text).name} ({eval_ids.shape[0]:,} tokens); total "
          f"{time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "calibration": calib_names,
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
