"""Benchmark machine facts recorded in the pytest-benchmark JSON (read by bench/report.py)."""

import platform
import subprocess

import torch


def _gpu_clocks() -> str:
    """Current and maximum SM / memory clocks from nvidia-smi, if it can be run."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,"
                              "clocks.max.mem", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "not readable"
    sm, sm_max, mem, mem_max = (v.strip() for v in out.split(","))
    return f"SM {sm} (max {sm_max}), memory {mem} (max {mem_max})"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["platform"] = platform.platform()
    try:
        import transformers
        machine_info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        machine_info["gpu_clocks"] = _gpu_clocks()
