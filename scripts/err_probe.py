#!/usr/bin/env python3
"""The error path of the C++ checks: an error message holding a number, on each device.

On the GPU image of 2026-11-28 every such message crashed the process (SIGSEGV in
std::ostream::_M_insert<long> resolved inside _C.so; scripts/check_runtime.py), on the CPU as on
the GPU. Prints "ok: <message>" per device when the op raises with the number in its message and
exits 1 otherwise; a crash shows as the exit code (139 under a shell: SIGSEGV).

Usage: python3 scripts/err_probe.py [DEVICE ...]   (default: cpu cuda; cuda skips without a GPU)
"""

import sys

import torch

import spikeops  # noqa: F401  (registers the ops)


def probe(device: str) -> bool:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(f"skip: no CUDA device for {device}")
        return True
    x = torch.randn(2, 8, device=device)
    mask = torch.ones(9, dtype=torch.bool, device=device)  # K = 8: the wrong length
    empty = torch.empty(0, device=device)
    try:
        # The op itself, not spikeops.encode, so that the C++ shape check (check_encode) raises;
        # it streams both lengths into the message as int64.
        torch.ops.spikeops.gif_encode(x, "minmax", 4, 1.0, mask, 8, empty,
                                      empty.to(torch.int32), 0.0, 0.0)
    except (RuntimeError, ValueError) as e:
        if "9" in str(e):
            print(f"ok: {e}")
            return True
        print(f"FAIL on {device}: the message lacks the number 9: {e}")
        return False
    print(f"FAIL on {device}: no error raised for a salient_mask of 9 channels, K = 8")
    return False


if __name__ == "__main__":
    results = [probe(d) for d in sys.argv[1:] or ["cpu", "cuda"]]
    sys.exit(0 if all(results) else 1)
