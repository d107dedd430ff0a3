"""The ``spikeops`` command line (also ``python -m spikeops``).

``spikeops demo``: a GPTQ-shaped layer made in code (LLaMA-2-7B gate projection, 4096 -> 11008,
W4 g128) runs on spikes of LLM-like activations (a few outlier channels) under several
encodings: its output is compared with the dense float64 layer, and its firing rate, synaptic
operations and speed against float32 ``F.linear`` are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import Encoding, GPTQWeight, encode, pack, spike_linear

DEMO_ENCODINGS = [
    ("minmax 4-bit (SpikeLLM)", Encoding("minmax", 4), False),
    ("minmax 4-bit + 10% salient at 6 bits (OBS)", Encoding("minmax", 4, salient_bits=6), True),
    ("absmax 4-bit, gamma 0.5 (SDLLM)", Encoding("absmax", 4, gamma=0.5), False),
    ("absmean 4-bit (adaptive threshold)", Encoding("absmean", 4), False),
    ("oat 8 planes (LAS)", Encoding("oat", theta=(1.0, 8.0), planes=8), False),
]


def median_ms(fn: Callable[[], object], rounds: int = 15) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


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


def demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    K, N = args.in_features, args.out_features
    print(f"spikeops demo: GPTQ W4 g128 layer {K} -> {N}, {args.tokens} token(s), "
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
        bound = 1e-5 * (x_hat.abs() @ W64.abs()) + torch.finfo(torch.float32).eps * y_ref.abs()
        spec_ok = bool(((y.double() - y_ref).abs() <= bound).all())
        rel_err = float((y.double() - y_dense).norm() / y_dense.norm())
        spikes = int(st.counts().sum())
        sops_per_mac = spikes * N / (args.tokens * K * N)
        ms = median_ms(lambda: spike_linear(st, w, out_dtype=torch.float32))
        print(f"{name:46} {st.num_planes:>6} {st.firing_rate():>6.3f} {sops_per_mac:>9.3f} "
              f"{rel_err:>12.4f} {'yes' if spec_ok else 'NO':>7} {ms:>6.2f} {dense_ms / ms:>5.2f}x")
        if not spec_ok:
            print("error: spike_linear left the SPEC tolerance of the float64 reference",
                  file=sys.stderr)
            return 1
    print("\nrate = spikes / (tokens * K * planes); SOPs/MACs = synaptic additions per "
          "multiply-accumulate of the dense layer;\nrel.err = ||y - x @ W|| / ||x @ W|| "
          "(quantization of x); 'spec ok' = within SPEC.md 3.2 of x_hat @ W_hat in float64.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="spikeops", description="Exact, fast spiking LLM kernels for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run a GPTQ layer on spikes under several encodings and "
                                    "compare it with the dense layer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1, help="tokens M (default 1: decode)")
    p.add_argument("--in-features", type=int, default=4096, help="K (multiple of 128)")
    p.add_argument("--out-features", type=int, default=11008, help="N")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=demo)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.tokens < 1 or args.in_features < 128 or args.in_features % 128 or \
                args.out_features < 1:
            parser.error("demo needs --tokens >= 1, --in-features a positive multiple of 128, "
                         "--out-features >= 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
