"""pytest-benchmark JSON -> markdown: one table per group, the median time of every entry and its
speedup over each baseline of the same group (entries not named ``spikeops-*``), measured in the
same run. Usage: ``python bench/report.py bench.json [> report.md]``."""

import json
import sys


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def report(data: dict) -> str:
    info = data.get("machine_info", {})
    lines = ["# spikeops benchmark report", ""]
    facts = [("CPU", info.get("cpu", {}).get("brand_raw")), ("threads", info.get("cpu_threads")),
             ("CPU capability", info.get("cpu_capability")), ("GPU", info.get("gpu")),
             ("torch", info.get("torch")), ("CUDA", info.get("torch_cuda")),
             ("Python", info.get("python_version")), ("date", data.get("datetime"))]
    lines += [f"- {k}: {v}" for k, v in facts if v is not None]
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b["group"], []).append(b)
    for group, entries in groups.items():
        baselines = [e for e in entries if not e["name"].startswith("spikeops")]
        lines += ["", f"## {group}", "",
                  "| entry | median | " + " | ".join(f"x vs {b['name']}" for b in baselines) + " |",
                  "|---|---|" + "---|" * len(baselines)]
        for e in sorted(entries, key=lambda e: e["stats"]["median"]):
            t = e["stats"]["median"]
            ratios = " | ".join(f"{b['stats']['median'] / t:.2f}x" for b in baselines)
            lines.append(f"| {e['name']} | {fmt_time(t)} | {ratios} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(report(json.load(f)), end="")
