"""Shared fixtures: seeded randomness, the device list (CUDA cases skip, with the reason,
where no GPU is present) and a tiny GPTQ LLaMA written in a temporary folder."""

import shutil

import pytest
import torch

import spikeops
from helpers import CUDA_REASON, TEXT, cuda_ready, tiny_batches

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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random LLaMA: its float folder ``fp``, its W4 g32 GPTQ folder ``q`` and the text
    ``text.txt`` (Python source) both were built from."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikeops.evaluate import encode_text
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512)
    dense = LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("tiny")
    dense.save_pretrained(root / "fp")
    (root / "text.txt").write_text(TEXT)
    ids = encode_text(TEXT)[:1024].reshape(4, 256)
    spikeops.save_gptq(dense, spikeops.quantize(dense, ids, bits=4, group_size=32), root / "q")
    return root


@pytest.fixture
def model(checkpoint):
    return spikeops.load_gptq(checkpoint / "q", spikeops.Encoding("minmax", 4))


@pytest.fixture(scope="session")
def calibration(checkpoint):
    from spikeops.calibrate import calibrate
    model = spikeops.load_gptq(checkpoint / "q", spikeops.Encoding("minmax", 4))
    return calibrate(model, tiny_batches(), salient_fraction=0.1)


@pytest.fixture
def folder(checkpoint, tmp_path):
    """A copy of the session checkpoint's GPTQ folder that a test may damage."""
    dst = tmp_path / "q"
    shutil.copytree(checkpoint / "q", dst)
    return dst
