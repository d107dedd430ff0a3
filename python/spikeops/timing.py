"""The one wall-clock timer of the demo and the CPU benchmarks (docs/performance.md)."""

from __future__ import annotations

import time
from typing import Callable


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call of ``fn``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(fn: Callable[[], object], rounds: int = 15, warmup: int = 1) -> float:
    """Median milliseconds of ``rounds`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = sorted(seconds(fn) for _ in range(rounds))
    return times[len(times) // 2] * 1e3
