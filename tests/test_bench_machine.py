"""bench/machine.py: the CPU's name in the benchmark records, which must tell apart machines
that lscpu names alike (Zen 3 and Zen 4 EPYCs are both "AMD EPYC" on cloud machines)."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import machine  # noqa: E402


def lscpu(name: str, family: str, model: str) -> str:
    return (f"Architecture:   x86_64\nModel name:     {name}\nCPU family:     {family}\n"
            f"Model:          {model}\nStepping:       1\n")


@pytest.mark.parametrize("name, family, model, full, slug", [
    ("AMD EPYC", "25", "1", "AMD EPYC (family 25, model 1)", "amd-epyc-family-25-model-1"),
    ("AMD EPYC", "25", "17", "AMD EPYC (family 25, model 17)", "amd-epyc-family-25-model-17"),
    ("Intel(R) Xeon(R) Platinum 8480+", "6", "143", "Intel(R) Xeon(R) Platinum 8480+",
     "intel-xeon-platinum-8480"),
])
def test_cpu_name_tells_apart_what_lscpu_names_alike(monkeypatch, name, family, model, full,
                                                     slug):
    def run(argv, **kwargs):
        assert argv == ["lscpu"]
        return subprocess.CompletedProcess(argv, 0, stdout=lscpu(name, family, model))
    monkeypatch.setattr(machine.subprocess, "run", run)
    assert machine.cpu_name() == full
    assert machine.cpu_slug(machine.cpu_name()) == slug


def test_cpu_name_without_lscpu(monkeypatch):
    def run(argv, **kwargs):
        raise FileNotFoundError(argv[0])
    monkeypatch.setattr(machine.subprocess, "run", run)
    monkeypatch.setattr(machine.platform, "processor", lambda: "x86_64")
    assert machine.cpu_name() == "x86_64"
