"""The pieces every benchmark suite shares: the device, the LLaMA projection shapes, random GPTQ
layers, and one timing rule (``measure``) that fills pytest-benchmark's record.

Timing (docs/performance.md, "How to measure"):

- GPU: the callable is captured once in a CUDA graph (eager if capture fails or the entry asks
  for eager calls, ``capture=False``: a callable that brings its own graphs or whose launch cost
  is what it measures; ``extra_info`` says which), every round first overwrites a 256 MiB buffer
  (flushing the 50 MB L2 of an H100/H200, outside the timed region; an eager call then waits
  for the flush, so that its launches do not hide behind it), then CUDA events time one graph
  replay or call. The events feed
  pytest-benchmark through a clock that advances by the event time, so its statistics are GPU
  times. 50 rounds after 5 warm-up rounds; an entry slower than 20 ms per call runs at least 10
  rounds and at most about 2 s.
- CPU: ``time.perf_counter`` around each call, up to 30 rounds and about 2 s per entry.

``extra_info`` of every entry: the problem (M, K, N, bits...), the bytes it must move and the
operations it performs (both from the formulas in each suite), hence GB/s and TOPS, the graph
flag and, where the group has one, the ratio to its reference baseline (cuBLAS fp16 on GPU,
fp32 ``F.linear`` on CPU) measured in the same run. ``bench/report.py`` turns the JSON into
tables.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import spikeops
from spikeops.timing import seconds

ON_GPU = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
    "spikeops::spike_linear", "CUDA")
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# The dense activation dtype of the baselines: fp16 on GPU (cuBLAS), fp32 on CPU (the CPU has no
# fast fp16 GEMM; fp32 is what a CPU user runs).
DENSE_DTYPE = torch.float16 if ON_GPU else torch.float32

# (K, N) of the projections of LLaMA-2-7B, LLaMA-3-8B and LLaMA-2-70B (docs/performance.md).
# LLaMA-3-8B q/o equal LLaMA-2-7B's 4096 x 4096 and are measured once.
SHAPES: Dict[str, tuple] = {
    "7B-qkvo": (4096, 4096), "7B-gate_up": (4096, 11008), "7B-down": (11008, 4096),
    "8B-kv": (4096, 1024), "8B-gate_up": (4096, 14336), "8B-down": (14336, 4096),
    "70B-qo": (8192, 8192), "70B-kv": (8192, 1024), "70B-gate_up": (8192, 28672),
    "70B-down": (28672, 8192),
}
TOKENS = (1, 4, 16, 64, 256, 2048)

# The spike encodings of the suites; minmax4 is also the rate code of the simulation baseline.
ENCODINGS = {"minmax4": spikeops.Encoding("minmax", 4), "absmax4": spikeops.Encoding("absmax", 4),
             "minmax8": spikeops.Encoding("minmax", 8)}

GROUP_SIZE = 128


def gptq_layer(K: int, N: int, bits: int, seed: int = 0) -> spikeops.GPTQWeight:
    """A random symmetric GPTQ layer (v1 zeros, group size 128) on DEVICE. Uniform random words
    are uniform random codes, so qweight is drawn directly as int32 words."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rows, G = (K * bits + 31) // 32, -(-K // GROUP_SIZE)
    qweight = torch.randint(-2**31, 2**31 - 1, (rows, N), dtype=torch.int32, device=DEVICE,
                            generator=gen)
    zeros = torch.full((G, N), (1 << (bits - 1)) - 1, dtype=torch.int32, device=DEVICE)
    scales = (torch.rand(G, N, device=DEVICE, generator=gen) * 0.02 + 0.001).half()
    return spikeops.GPTQWeight(qweight, spikeops.pack(zeros, bits, 1), scales, None, bits,
                               GROUP_SIZE, sym=True, checkpoint_format="gptq")


def activations(M: int, K: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(M, K, device=DEVICE, generator=gen).to(DENSE_DTYPE)


def nbytes(*tensors) -> int:
    """Bytes of the given tensors (None ignored): what an entry reads or writes."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def int_mm_rows(a8: torch.Tensor, b8: torch.Tensor, info: dict) -> torch.Tensor:
    """``a8`` as ``torch._int_mm(a8, b8)`` accepts it: CUDA builds of torch may refuse M <= 16
    rows, and then 32 zero-padded rows are timed (recorded in ``info``)."""
    try:
        torch._int_mm(a8, b8)
        return a8
    except RuntimeError as e:
        info["int_mm_padded_rows"] = 32
        info["int_mm_note"] = str(e).splitlines()[0][:200]
        return torch.cat([a8, a8.new_zeros(32 - a8.shape[0], a8.shape[1])])


_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE) if ON_GPU else None


def _graph(fn: Callable[[], object]):
    """``fn`` captured in a CUDA graph (replay runs it), or None if capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph (lazy init, workspaces)
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph
    except RuntimeError:
        torch.cuda.synchronize()
        return None


class _EventClock:
    """A clock for pytest-benchmark that advances by the CUDA-event time of each timed call."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def measure(benchmark, fn: Callable[[], object], group: str, name: str, *,
            bytes_moved: float = 0.0, ops: float = 0.0, extra: Optional[dict] = None,
            reference: Optional[Dict[str, float]] = None, capture: bool = True):
    """Time ``fn`` under ``benchmark`` as entry ``name`` of ``group`` (module docstring).

    bytes_moved / ops: what one call must read + write and its operations (2 per multiply-add),
    for GB/s and TOPS. reference: a dict shared by the entries of one suite; an entry whose name
    is ``reference["__name__"]`` stores its median there, later entries of the group get
    ``x_vs_reference``. capture: False times eager calls on the GPU too (module docstring).
    Returns the median in seconds (None with --benchmark-disable).
    """
    benchmark.group = group
    benchmark.name = name
    info = dict(extra or {}, device=str(DEVICE), bytes=bytes_moved, ops=ops)
    if benchmark.disabled:  # smoke test (--benchmark-disable): pedantic makes one plain call
        benchmark.pedantic(fn)
        benchmark.extra_info.update(info)
        return None
    if ON_GPU:
        graph = _graph(fn) if capture else None
        run = graph.replay if graph is not None else fn
        info["cuda_graph"] = graph is not None
        clock = _EventClock()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def flush():
            _FLUSH.zero_()
            if graph is None:
                torch.cuda.synchronize()

        def timed():
            start.record()
            run()
            end.record()
            end.synchronize()
            clock.now += start.elapsed_time(end) * 1e-3

        flush(), timed()  # one call to size the rounds
        single = clock.now
        rounds = 50 if single < 0.02 else max(10, min(50, int(2.0 / single)))
        # pytest-benchmark reads its clock through this attribute (pytest-benchmark 4/5).
        assert hasattr(benchmark, "_timer"), "pytest-benchmark changed: no _timer to replace"
        benchmark._timer = clock
        benchmark.pedantic(timed, setup=flush, rounds=rounds, warmup_rounds=5, iterations=1)
    else:
        single = seconds(fn)
        rounds = max(5, min(30, int(2.0 / max(single, 1e-6))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    info.update(rounds=rounds, gb_per_s=bytes_moved / median / 1e9 if bytes_moved else None,
                tops=ops / median / 1e12 if ops else None)
    if reference is not None:
        if name == reference["__name__"]:
            reference[group] = median
        elif group in reference:
            info["x_vs_reference"] = reference[group] / median
            info["reference"] = reference["__name__"]
    benchmark.extra_info.update(info)
    return median
