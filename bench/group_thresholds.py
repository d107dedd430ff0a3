"""Per-group thresholds and calibrated clipping, measured before they are built (issue 23, item 4):
the perplexity a real model would have with one spike threshold per token per group of channels,
with a clip ratio calibrated per layer, and with mixed per-projection policies, simulated exactly
with the existing ops.

    python bench/group_thresholds.py [--rows ROW,ROW,...] [--out bench/results/NAME]

How it simulates. A per-group encoding of ``x [M, K]`` (minmax, absmax: a scale, and a zero,
per token and group of g channels) is the per-token encoding of ``x`` cut into rows of g
channels: ``[M, K] -> [M * K/g, g]`` (groups follow the weight groups of ``spike_linear``:
channels [0, g), [g, 2g), ...; a last partial group, 576 = 4 x 128 + 64, is a group of its own).
So every projection input is encoded with ``spikeops.encode`` (the ``gif_encode`` op, the
kernels' bits) on those rows and decoded, and the layer computes ``x_hat @ W_hat^T`` with the
exact float32 weights ``scale * (q - z)`` in float64, rounded once to float32 (--matmul,
--weights): what ``spike_linear`` computes up to the rounding of its epilogue (within 1e-7,
checked). 4-bit perplexities still move by several percent with such rounding
(docs/transforms.md), so they match ``spikeops eval`` only to that spread. A forward pre-hook on each
projection does it, after the online rotation of ``down_proj``; the projections of one input
(q/k/v, gate/up) share one encoding when their specs agree, as ``ProjectionGroup`` does.
Clipped minmax (which ``gif_encode`` does not clip) is encoded as ``static`` with per-row
scale ``gamma * (max - min) / qmax`` and zero ``round(-gamma * min / scale)``; at gamma 1 that is
minmax bit for bit (checked).

Row specs: ``MODE BITS [g GROUP] [@ CLIP]``, e.g. ``absmax4``, ``minmax4g64@cal``; CLIP is ``1``
(the default: no clipping), a number in (0, 1], ``cal`` (per layer from --grid, by the layer's
output error ``||(x_hat - x) W_hat^T||^2`` on float-activation calibration inputs, as
``calibrate``'s SDLLM search; minmax clipped as above) or ``saved`` (absmax/absmean, no group:
the checkpoint's own calibrated gamma, i.e. what ``spikeops eval`` runs as ``absmax4``). Per
layer type: ``TYPE=SPEC`` entries joined by ``;``, ``*`` for the others (``none`` = float
activations). Also ``dense`` (the float model) and ``float`` (GPTQ weights, float activations).

``planes`` is eval's: bits per activation element, the sign included, averaged over every
projection input (q, k and v each count theirs). Thresholds are extra storage: one float32 scale
per token and group (32/g bits per element), and minmax's int32 zero (another 32/g); column
``+bits``. Perplexity on the first --max-tokens tokens of --eval-text, windows of --window, stride
half, with the 95% bootstrap interval of ``spikeops.evaluate.perplexity_interval``.
The model is the demo's (``spikeops.demo.prepare_real_model``: imported, rotated, GPTQ W4 g128,
calibrated on --calib-text; cached in --cache). Rows are written to OUT.json after each one;
--resume keeps rows already there.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DEFAULT_ROWS = ",".join([
    "dense", "float",
    "absmax4@saved", "minmax4",                       # spikeops eval's absmax4 and minmax4
    "absmax4", "minmax4@cal",
    "absmax4g128", "absmax4g128@cal", "minmax4g128", "minmax4g128@cal",
    "absmax4g64", "absmax4g64@cal", "minmax4g64", "minmax4g64@cal",
    "absmax4g32", "absmax4g32@cal", "minmax4g32", "minmax4g32@cal",
    "absmax5g64@cal",
    "gate_proj=absmax8g64@cal;up_proj=absmax8g64@cal;*=absmax4g64@cal",
    "gate_proj=absmax6g64@cal;up_proj=absmax6g64@cal;q_proj=absmax5g64@cal;"
    "k_proj=absmax5g64@cal;v_proj=absmax5g64@cal;o_proj=absmax5g64@cal;*=absmax4g64@cal",
])
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPEC = re.compile(r"(minmax|absmax|absmean)(\d+)(?:g(\d+))?(?:@(cal|saved|[0-9.]+))?")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--gguf", default=str(Path.home() / ".cache/spikeops/"
                                         "SmolLM2-135M-Instruct.Q4_1.gguf"),
                   help="the model (GGUF, as the demo fetches it)" + d)
    p.add_argument("--cache", default=str(Path.home() / ".cache/spikeops"),
                   help="the demo's cache of imported / quantized models" + d)
    p.add_argument("--transform", default="rotate", help="outlier transform" + d)
    p.add_argument("--calib-text", default=str(LICENSES / "GPL-3"),
                   help="calibration text (GPTQ, the checkpoint's calibration, clip search)" + d)
    p.add_argument("--eval-text", default=str(LICENSES / "MPL-2.0"), help="evaluation text" + d)
    p.add_argument("--max-tokens", type=int, default=2048, help="evaluation tokens" + d)
    p.add_argument("--window", type=int, default=256, help="perplexity window" + d)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="comma list of row specs" + d)
    p.add_argument("--grid", default="0.3:1.0:0.05",
                   help="clip ratios of '@cal': START:STOP:STEP or a comma list" + d)
    p.add_argument("--clip-scope", choices=("layer", "input"), default="layer",
                   help="'@cal' chooses one ratio per projection (layer), or one per input "
                        "(q/k/v and gate/up share it: one encoding per input)" + d)
    p.add_argument("--calib-samples", type=int, default=8,
                   help="calibration windows (spikeops calibrate's --samples)" + d)
    p.add_argument("--calib-tokens", type=int, default=512,
                   help="calibration input rows per layer for '@cal' (calibrate's "
                        "--max-tokens)" + d)
    p.add_argument("--seed", type=int, default=0, help="calibration windows' seed" + d)
    p.add_argument("--threads", type=int, default=2, help="torch threads" + d)
    p.add_argument("--weights", choices=("exact", "float16"), default="exact",
                   help="W_hat of the simulated layers: 'exact' = float32(scale) * (q - z), the "
                        "weights spike_linear folds (exact in float32); 'float16' = "
                        "SpikeLinear's float-activation path (gptq_dequantize, rounded once to "
                        "float16, what eval's 'float' row uses)" + d)
    p.add_argument("--matmul", choices=("float64", "float32"), default="float64",
                   help="the simulated layer's x_hat @ W_hat^T: 'float64' rounded once to "
                        "float32 (within about 1e-7 of spike_linear, whose integer sums are "
                        "exact), or float32 F.linear (about 3e-7 off)" + d)
    p.add_argument("--no-check", action="store_true",
                   help="skip the faithfulness checks (static minmax = minmax, the per-token "
                        "grid search = the saved gammas, simulated = spiking layer outputs)")
    p.add_argument("--out", default="bench/results/group-thresholds",
                   help="writes OUT.json (after each row) and OUT.md" + d)
    p.add_argument("--resume", action="store_true", help="keep the rows OUT.json already has")
    p.add_argument("--machine", default=None, help="machine named in OUT.md (default: "
                   "platform.processor() and the thread count)")
    return p.parse_args(argv)


def parse_grid(text):
    if ":" in text:
        start, stop, step = (float(v) for v in text.split(":"))
        n = int(round((stop - start) / step))
        return tuple(round(start + i * step, 6) for i in range(n + 1))
    return tuple(float(v) for v in text.split(","))


class Spec:
    """One projection's encoding: mode, bits, group (None: per token), clip (float, 'cal',
    'saved')."""

    def __init__(self, text):
        m = SPEC.fullmatch(text)
        if m is None:
            raise SystemExit(f"group_thresholds: bad spec {text!r} (MODE BITS [gGROUP] [@CLIP], "
                             f"e.g. absmax4g64@cal)")
        self.mode, self.bits = m.group(1), int(m.group(2))
        self.group = int(m.group(3)) if m.group(3) else None
        clip = m.group(4) or "1"
        self.clip = clip if clip in ("cal", "saved") else float(clip)
        if self.clip == "saved" and (self.mode == "minmax" or self.group):
            raise SystemExit(f"group_thresholds: {text!r}: '@saved' is the checkpoint's "
                             f"per-token absmax/absmean gamma")
        if isinstance(self.clip, float) and not 0 < self.clip <= 1:
            raise SystemExit(f"group_thresholds: {text!r}: the clip ratio must be in (0, 1]")
        self.text = text

    @property
    def key(self):  # what a clip search depends on
        return (self.mode, self.bits, self.group)

    def planes(self):  # magnitude planes of the spike tensor
        return self.bits - 1 if self.mode != "minmax" else self.bits


def parse_row(text):
    """None (float activations), 'dense', or {type: Spec or None}."""
    if text in ("dense", "float"):
        return text
    if "=" not in text:
        spec = Spec(text)
        return {t: spec for t in TYPES}
    given = {}
    for entry in text.split(";"):
        kind, _, one = entry.partition("=")
        if kind not in TYPES + ("*",) or kind in given:
            raise SystemExit(f"group_thresholds: bad entry {entry!r} in {text!r}")
        given[kind] = None if one == "none" else Spec(one)
    if "*" not in given and set(given) != set(TYPES):
        raise SystemExit(f"group_thresholds: {text!r} leaves types out and has no '*'")
    return {t: given.get(t, given.get("*")) for t in TYPES}


def group_rows(x, g):
    """``x [M, K]`` as rows of at most g channels: [(rows, slice)], the last partial group of
    K % g channels a group of its own."""
    M, K = x.shape
    if g is None or g >= K:
        return [(x, slice(0, K))]
    full = K - K % g
    parts = [(x[:, :full].reshape(-1, g), slice(0, full))]
    if full < K:
        parts.append((x[:, full:], slice(full, K)))
    return parts


def encode_part(rows, mode, bits, gamma):
    """SpikeTensor of ``rows [R, g]``, each row one token's group (the op's bits)."""
    import torch
    from spikeops import Encoding, encode
    if mode != "minmax":
        return encode(rows, Encoding(mode, bits, gamma=float(gamma)))
    if gamma == 1.0:
        return encode(rows, Encoding("minmax", bits))
    # Clipped minmax: static scale / zero per row, minmax's formula on [gamma min, gamma max].
    qmax = 2 ** bits - 1
    mn, mx = rows.amin(1), rows.amax(1)
    s = torch.clamp((mx - mn) / qmax * torch.tensor(gamma, dtype=torch.float32), 1e-5, 1e4)
    z = torch.round(torch.clamp(-(mn * gamma) / s, -1e4, 1e4)).to(torch.int32)
    return encode(rows, Encoding("static", bits), scale=s, zero=z)


def fake_quantize(x2, mode, bits, group, gamma):
    """``(x_hat [M, K], spikes)`` of x2 [M, K] float32: decode of its per-group spikes."""
    import torch
    parts, spikes = [], 0
    for rows, _ in group_rows(x2, group):
        st = encode_part(rows.contiguous(), mode, bits, gamma)
        parts.append(st.decode().reshape(x2.shape[0], -1))
        spikes += int(st.counts().sum())
    return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)), spikes


class Simulator:
    """Forward pre-hooks on every SpikeLinear (float activations) replacing its input by the
    decoded spikes of its spec; counts spikes, slots, SOPs, MACs and plane-elements."""

    def __init__(self, model, layers):
        self.layers = layers
        self.specs = {}           # layer name -> (mode, bits, group, gamma) or None
        self.cache = {}           # parent -> (x, spec, x_hat, spikes)
        self.reset_counts()
        self.handles = [m.register_forward_pre_hook(self._hook(name))
                        for name, m in layers.items()]

    def reset_counts(self):
        self.counts = dict(spikes=0, slots=0, sops=0, macs=0, elements=0, plane_elements=0,
                           extra_bits=0)

    def set(self, specs):
        self.specs = specs
        self.cache = {}

    def _hook(self, name):
        parent = name.rsplit(".", 1)[0]

        def hook(module, args):
            spec = self.specs.get(name)
            if spec is None:
                return None
            x = args[0]
            x2 = x.reshape(-1, x.shape[-1])
            c = self.cache.get(parent)
            if c is not None and c[0] is x and c[1] == spec:
                x_hat, spikes = c[2], c[3]
            else:
                x_hat, spikes = fake_quantize(x2.float(), *spec)
                self.cache[parent] = (x, spec, x_hat, spikes)
            mode, bits, group, _ = spec
            M, K = x2.shape
            N = module.out_features
            P = bits - 1 if mode != "minmax" else bits
            groups = math.ceil(K / group) if group else 1
            c = self.counts
            c["spikes"] += spikes
            c["slots"] += M * K * P
            c["sops"] += spikes * N
            c["macs"] += M * K * N
            c["elements"] += M * K
            c["plane_elements"] += M * K * bits
            c["extra_bits"] += M * groups * (64 if mode == "minmax" else 32)
            return (x_hat.reshape(x.shape).to(x.dtype),) + args[1:]
        return hook


def exact_weight(layer):
    """W_hat float32 [N, K] = float32(scale) * (q - z), exact (what spike_linear folds; the
    float16 of gptq_dequantize rounds it)."""
    import torch
    w = layer.gptq
    if w.g_idx is not None and not torch.equal(
            w.g_idx.cpu(), torch.arange(w.in_features) // w.group_size):
        raise SystemExit("group_thresholds: act-order checkpoints are not handled")
    q, z = w.codes()                                     # [K, N], [G, N]
    g = torch.arange(w.in_features) // w.group_size
    W = w.scales.float()[g] * (q - z[g]).float()         # [K, N]
    return W.t().contiguous()


def layer_errors(x, W, gram, spec_key, grid):
    """Output error ``||(x_hat - x) W^T||^2`` of each clip ratio of grid (calibrate's
    _best_gamma, per group)."""
    mode, bits, group = spec_key
    errs = {}
    for g in grid:
        d = fake_quantize(x, mode, bits, group, g)[0] - x
        errs[g] = float(((d.t() @ d) * gram).sum()) if gram is not None \
            else float((d @ W.t()).pow(2).sum())
    return errs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from spikeops import Encoding, load_gptq
    from spikeops.architecture import INPUTS
    from spikeops.calibrate import GAMMA_GRID, collect_inputs, set_encoding
    from spikeops.commands import load_calibration, model_tokenizer, text_batches
    from spikeops.demo import prepare_real_model
    from spikeops.evaluate import encode_text, perplexity_interval
    from spikeops.floatmodel import load_float_model
    from spikeops.nn import spike_layers

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_text = [r for r in args.rows.split(",") if r]
    plans = [(r, parse_row(r)) for r in rows_text]
    grid = parse_grid(args.grid)

    float_dir, q_dir = prepare_real_model(args.gguf, args.cache, args.transform, args.calib_text,
                                          args.seed)
    tokenizer = model_tokenizer(q_dir)
    tokens = encode_text(Path(args.eval_text).read_text(encoding="utf-8"),
                         tokenizer)[: args.max_tokens]
    calibration = load_calibration(q_dir)
    model = load_gptq(q_dir, Encoding("minmax", 4), dtype=torch.float32, calibration=calibration)
    set_encoding(model, None)
    layers = spike_layers(model)
    for m in layers.values():
        if m.bias is not None:
            raise SystemExit("group_thresholds: projections with a bias are not handled")
        W = exact_weight(m) if args.weights == "exact" else m.dequantize().float()
        if args.matmul == "float64":
            W64 = W.double()
            # The simulated layer: the instance's forward (hooks still run around it).
            m.forward = (lambda W64: lambda x: torch.nn.functional.linear(
                x.double(), W64).to(x.dtype))(W64)
        else:
            # SpikeLinear on float activations runs F.linear with its cached dense_weight
            # (made from gptq_dequantize when missing or of another dtype than x).
            m.dense_weight = W
    print(f"model {q_dir}: {len(layers)} projections; evaluation: first {tokens.shape[0]} tokens "
          f"of {Path(args.eval_text).name}, windows of {args.window}", flush=True)

    # Calibration inputs: spikeops calibrate's windows and rows (float activations).
    calib_ids = text_batches(encode_text(Path(args.calib_text).read_text(encoding="utf-8"),
                                         tokenizer), args.calib_samples, 256, args.seed)
    inputs = None
    weights = {}

    def calib_inputs():
        nonlocal inputs
        if inputs is None:
            t = time.perf_counter()
            inputs = collect_inputs(model, calib_ids.split(4), args.calib_tokens)
            print(f"  calibration inputs: {args.calib_tokens} rows per layer "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
        return inputs

    def weight(name):
        if name not in weights:
            W = exact_weight(layers[name]) if args.weights == "exact" else \
                layers[name].dequantize().float()
            weights[name] = (W, W.t() @ W if W.shape[1] < W.shape[0] else None)
        return weights[name]

    searched = {}  # spec key -> {layer: {gamma: error}}

    def errors_for(key, grid_used):
        if (key, grid_used) not in searched:
            t = time.perf_counter()
            xs = calib_inputs()
            errs = {}
            for i, name in enumerate(layers):
                W, gram = weight(name)
                errs[name] = layer_errors(xs[name], W, gram, key, grid_used)
                if (i + 1) % 70 == 0:
                    print(f"    clip search {key[0]}{key[1]}"
                          f"{'g%d' % key[2] if key[2] else ''}: {i + 1}/{len(layers)} layers",
                          flush=True)
            searched[(key, grid_used)] = errs
            print(f"  clip search {key} over {len(grid_used)} ratios: "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
        return searched[(key, grid_used)]

    def gammas_for(key, scope=args.clip_scope, grid_used=grid):
        errs = errors_for(key, grid_used)
        if scope == "layer":
            return {n: min(e, key=e.get) for n, e in errs.items()}
        chosen = {}
        for n in layers:  # one ratio per input: the sum of its projections' errors
            parent, proj = n.rsplit(".", 1)
            members = next(i.projections for i in INPUTS.values() if proj in i.projections)
            total = {g: sum(errs[f"{parent}.{p}"][g] for p in members) for g in grid_used}
            chosen[n] = min(total, key=total.get)
        return chosen

    def layer_specs(plan):
        """{layer: (mode, bits, group, gamma) or None} and {layer: gamma} of a plan."""
        specs, gammas = {}, {}
        for name in layers:
            spec = plan[name.rsplit(".", 1)[1]]
            if spec is None:
                specs[name] = None
                continue
            if spec.clip == "saved":
                g = calibration.layers[name].gamma[spec.mode]
            elif spec.clip == "cal":
                g = gammas_for(spec.key)[name]
            else:
                g = spec.clip
            specs[name] = (spec.mode, spec.bits, spec.group, float(g))
            gammas[name] = float(g)
        return specs, gammas

    checks = {}
    if not args.no_check:
        print("== checks", flush=True)
        xs = calib_inputs()
        x = xs["model.layers.0.mlp.gate_proj"]
        from spikeops import encode
        a = encode(x, Encoding("minmax", 4)).decode()
        qmax = 15
        mn, mx = x.amin(1), x.amax(1)
        s = torch.clamp((mx - mn) / qmax, 1e-5, 1e4)
        z = torch.round(torch.clamp(-mn / s, -1e4, 1e4)).to(torch.int32)
        b = encode(x, Encoding("static", 4), scale=s, zero=z).decode()
        checks["static_minmax_equals_minmax"] = bool(torch.equal(a, b))
        # Groups of 128 on K = 576: four groups of 128 channels and one of 64, each encoded
        # as a token of its own.
        hat = fake_quantize(x, "absmax", 4, 128, 0.8)[0]
        parts = [encode(x[:, i:i + 128].contiguous(), Encoding("absmax", 4, gamma=0.8)).decode()
                 for i in range(0, 576, 128)]
        checks["groups_are_tokens_of_their_own"] = bool(torch.equal(hat, torch.cat(parts, 1)))
        # The per-token SDLLM search on calibrate's grid and rows gives the saved gammas.
        saved_grid = tuple(GAMMA_GRID)
        found = gammas_for(("absmax", 4, None), "layer", saved_grid)
        same = sum(found[n] == calibration.layers[n].gamma["absmax"] for n in layers)
        checks["per_token_search_reproduces_saved_gamma"] = f"{same}/{len(layers)} layers"
        # Simulated layer output against the spiking layer, on real inputs.
        worst = 0.0
        for name in ("model.layers.0.self_attn.v_proj", "model.layers.15.mlp.up_proj",
                     "model.layers.29.mlp.down_proj"):
            layer, xin = layers[name], xs[name][:256]
            gamma = calibration.layers[name].gamma["absmax"]
            # Inputs captured after down_proj's online rotation: forward, not the module call.
            sim = layer.forward(fake_quantize(xin, "absmax", 4, None, gamma)[0])
            layer.set_encoding(Encoding("absmax", 4, gamma=gamma))
            spk = type(layer).forward(layer, xin)
            layer.set_encoding(None)
            worst = max(worst, float((sim - spk).abs().max() / spk.abs().max()))
        checks["simulated_vs_spike_linear_max_rel_diff"] = worst
        for k, v in checks.items():
            print(f"  {k}: {v}", flush=True)
        if not (checks["static_minmax_equals_minmax"] and checks["groups_are_tokens_of_their_own"]):
            print("error: a faithfulness check failed", file=sys.stderr)
            return 1

    sim = Simulator(model, layers)
    json_path, md_path = out.with_suffix(".json"), out.with_suffix(".md")
    done = {}
    if args.resume and json_path.is_file():
        done = {r["row"]: r for r in json.loads(json_path.read_text())["rows"]}
    results = []
    machine = args.machine or f"{platform.processor() or platform.machine()}, " \
                              f"{args.threads} threads"

    def write():
        doc = {"machine": machine, "model": str(q_dir), "gguf": Path(args.gguf).name,
               "calib_text": args.calib_text, "eval_text": args.eval_text,
               "tokens": int(tokens.shape[0]), "window": args.window, "grid": list(grid),
               "clip_scope": args.clip_scope, "calib_tokens": args.calib_tokens,
               "checks": checks, "rows": results}
        json_path.write_text(json.dumps(doc, indent=1))

    dense_model = None
    for i, (text, plan) in enumerate(plans):
        if text in done:
            results.append(done[text])
            print(f"[{i + 1}/{len(plans)}] {text}: kept from {json_path} "
                  f"({done[text]['perplexity']:.2f})", flush=True)
            continue
        print(f"[{i + 1}/{len(plans)}] {text}", flush=True)
        t = time.perf_counter()
        gammas = {}
        if plan == "dense":
            if dense_model is None:
                dense_model = load_float_model(float_dir)[0]
            p = perplexity_interval(dense_model, tokens, args.window, progress=False)
            dense_model = None
        else:
            specs, gammas = layer_specs(plan) if plan != "float" else ({}, {})
            sim.set(specs)
            sim.reset_counts()
            t = time.perf_counter()
            p = perplexity_interval(model, tokens, args.window, progress=False)
            sim.set({})
        c = sim.counts if plan not in ("dense", "float") else None
        row = {"row": text, "perplexity": p.value, "low": p.low, "high": p.high,
               "seconds": time.perf_counter() - t}
        if c and c["elements"]:
            row.update(planes=c["plane_elements"] / c["elements"],
                       extra_bits=c["extra_bits"] / c["elements"],
                       firing_rate=c["spikes"] / c["slots"], sops_per_mac=c["sops"] / c["macs"])
            g = list(gammas.values())
            row.update(gamma_mean=sum(g) / len(g), gamma_min=min(g), gamma_max=max(g),
                       gammas=gammas)
        results.append(row)
        write()
        extra = (f"  planes {row['planes']:.2f} (+{row['extra_bits']:.3f} bits) gamma "
                 f"{row['gamma_mean']:.3f} [{row['gamma_min']:.2f}, {row['gamma_max']:.2f}]"
                 if "planes" in row else "")
        print(f"    perplexity {p.value:.2f} [{p.low:.2f}, {p.high:.2f}]{extra}  "
              f"({row['seconds']:.0f} s)", flush=True)
    write()
    md = markdown(results)
    print("\n" + md)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    md_path.write_text(header(args, machine, q_dir, tokens, grid, checks) + md + "\n")
    return 0


def header(args, machine, q_dir, tokens, grid, checks) -> str:
    check_text = "; ".join(f"{k}: {v}" for k, v in checks.items()) or "not run"
    return (f"# Per-group thresholds and calibrated clipping, simulated (issue 23)\n\n"
            f"Machine: {machine}. Model: `{Path(args.gguf).name}`, `{args.transform}`, GPTQ W4 "
            f"g128, calibrated on `{Path(args.calib_text).name}` (`{q_dir.name}`); perplexity on "
            f"the first {tokens.shape[0]:,} tokens of `{Path(args.eval_text).name}`, windows of "
            f"{args.window}, stride {args.window // 2}. `bench/group_thresholds.py`: each "
            f"projection input encoded by `gif_encode` per token and group of g channels and "
            f"decoded, the GPTQ layer on it ({args.matmul} x_hat @ W_hat^T, {args.weights} "
            f"weights, rounded to float32). Clip `cal`: one ratio per "
            f"{args.clip_scope} from {grid[0]}..{grid[-1]} ({len(grid)} values) by the layer "
            f"output error on {args.calib_tokens} calibration rows; `saved`: the checkpoint's "
            f"SDLLM gamma (what `spikeops eval` runs as absmax4). planes: bits per element, sign "
            f"included; +bits: the thresholds (float32 scale per token and group, minmax's int32 "
            f"zero too). Checks: {check_text}.\n\n")


def markdown(results) -> str:
    dense = next((r["perplexity"] for r in results if r["row"] == "dense"), None)
    lines = ["| encoding / policy | planes | +bits (scales) | group | clip | perplexity | "
             "95% interval | x dense | firing rate | SOPs/MAC |",
             "|---|---:|---:|---|---|---:|---|---:|---:|---:|"]
    for r in results:
        label = {"dense": "dense float", "float": "GPTQ, float activations"}.get(r["row"],
                                                                               r["row"])
        plan = parse_row(r["row"])
        if isinstance(plan, dict):
            groups = sorted({str(s.group or "token") for s in plan.values() if s is not None})
            clips = sorted({str(s.clip) if s.clip != 1.0 else "none"
                            for s in plan.values() if s is not None})
            if r.get("gamma_mean") is not None and any(c != "none" for c in clips):
                clips = [f"{', '.join(clips)}: {r['gamma_mean']:.2f} "
                         f"[{r['gamma_min']:.2f}, {r['gamma_max']:.2f}]"]
        else:
            groups, clips = ["-"], ["-"]
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "-"
        planes = f"{r['planes']:.2f}" if r.get("planes") is not None else "-"
        extra = f"{r['extra_bits']:.3f}" if r.get("extra_bits") is not None else "-"
        rate = f"{r['firing_rate']:.3f}" if r.get("firing_rate") is not None else "-"
        sops = f"{r['sops_per_mac']:.3f}" if r.get("sops_per_mac") is not None else "-"
        lines.append(f"| {label} | {planes} | {extra} | {', '.join(groups)} | "
                     f"{', '.join(clips)} | {r['perplexity']:.2f} | "
                     f"[{r['low']:.2f}, {r['high']:.2f}] | {ratio} | {rate} | {sops} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
