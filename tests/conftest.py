"""Shared fixtures: seeded randomness and the device list (CUDA cases skip, with the reason,
where no GPU is present)."""

import pytest
import torch

import spikeops  # noqa: F401  (registers the ops)

CUDA_REASON = "no CUDA device (or spikeops built without CUDA): CUDA case not run"


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "spikeops::spike_linear", "CUDA")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not _cuda_ready(), reason=CUDA_REASON)),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
