"""Shared fixtures: seeded randomness and the device list (CUDA cases skip, with the reason,
where no GPU is present)."""

import pytest
import torch

from helpers import CUDA_REASON, cuda_ready

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not cuda_ready(), reason=CUDA_REASON)),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
