"""Cost of ``spikeops.track`` on the embedded model: a forward with and without tracking, for a
256-token prefill and a one-token decode step (KV cache of 255 tokens), minmax-4 and absmax-4.
The ratio tracked / untracked is the tracking overhead (issue 5). Tracking runs one fused
``spike_stats`` op and one in-place add per layer call.

Run: ``pytest bench/test_tracking.py --benchmark-json out.json``; CI runs it once per entry with
``--benchmark-disable``.
"""

import contextlib

import pytest
import torch

import spikeops
from spikeops.commands import DEFAULT_MODEL, DEFAULT_TEXT
from spikeops.evaluate import encode_text, forward_step

ENCODINGS = {"minmax4": spikeops.Encoding("minmax", 4), "absmax4": spikeops.Encoding("absmax", 4)}


@pytest.fixture(scope="module", params=list(ENCODINGS))
def model(request):
    model = spikeops.load_gptq(DEFAULT_MODEL, ENCODINGS[request.param])
    ids = encode_text(DEFAULT_TEXT.read_text(encoding="utf-8"))[:256].unsqueeze(0)
    return request.param, model, ids


def forward(model, ids, step):
    """A prefill of all ``ids``, or (``decode``) one token after a cache of the others."""
    if step == "prefill":
        return lambda: model(input_ids=ids)
    cache = forward_step(model, ids[:, :-1], None)[1]

    def decode():
        forward_step(model, ids[:, -1:], cache)
        cache.crop(-1)  # back to the same cache length for the next round
    return decode


@pytest.mark.parametrize("tracked", [False, True], ids=["untracked", "tracked"])
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_forward(benchmark, model, step, tracked):
    name, model, ids = model
    benchmark.group = f"track-embedded-{name}-{step}"
    benchmark.name = "spikeops-tracked" if tracked else "untracked"
    with torch.no_grad():
        f = forward(model, ids, step)
        tracker = spikeops.track(model) if tracked else contextlib.nullcontext()
        with tracker:
            benchmark.pedantic(f, rounds=100 if step == "decode" else 20, warmup_rounds=3,
                               iterations=1)
    if tracked:
        assert tracker.layers() and tracker.layers()[0].tokens > 0
