"""The CPU's name in the benchmark scripts' records (``bench/kv_cache.py``, ``kv_spread.py``,
``lm_eval_smollm2.py``): lscpu's model name, with the CPU family and model where the name
carries no model number. Cloud machines report AMD's Zen 3 and Zen 4 EPYCs both as ``AMD EPYC``
(family 25, models 1 and 17): without the family and model their records would take one file
name and the later run would overwrite the earlier machine's."""

from __future__ import annotations

import platform
import re
import subprocess


def cpu_name() -> str:
    """``Intel(R) Xeon(R) Platinum 8480+``, or ``AMD EPYC (family 25, model 1)`` where lscpu's
    model name has no digit; platform.processor() where lscpu is missing."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    if not re.search(r"\d", name) and "CPU family" in fields and "Model" in fields:
        name += f" (family {fields['CPU family']}, model {fields['Model']})"
    return name


def cpu_slug(cpu: str) -> str:
    """A file-name form of cpu_name(): ``Intel(R) Xeon(R) Platinum 8480+`` ->
    ``intel-xeon-platinum-8480``, ``AMD EPYC (family 25, model 1)`` ->
    ``amd-epyc-family-25-model-1``."""
    words = re.sub(r"\((R|TM)\)", "", cpu).lower()
    return "-".join(re.findall(r"[a-z0-9]+", words)) or "cpu"
