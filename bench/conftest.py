"""Benchmark machine facts recorded in the pytest-benchmark JSON (read by bench/report.py)."""

import platform

import torch


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["platform"] = platform.platform()
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
