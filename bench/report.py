"""pytest-benchmark JSON -> markdown report. Usage:
``python bench/report.py bench.json [more.json ...] [--headline] [> report.md]``; several JSON
files (the stages of one GPU session, scripts/gpu_check.sh) are merged, machine facts from the
first.

Sections: the machine (GPU, clocks, torch, CUDA, the measured copy bandwidth), the targets of
docs/performance.md with the measured ratio and met / missed (by how much), a headline table (the
README shows it; ``--headline`` prints only that), and one table per group: every entry's
median, GB/s, TOPS, share of the copy bandwidth and its speedup over each baseline of the group
(entries not named ``spikeops-*``), all from the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from typing import Dict, List, Optional


def fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def _num(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _times(v: Optional[float]) -> str:
    """A speedup cell: ``1.23x``, or ``-`` when either side was not measured."""
    return "-" if v is None else f"{v:.2f}x"


class Run:
    """The benchmarks of one JSON, indexed by group and entry name."""

    def __init__(self, data: dict):
        self.data = data
        self.info = data.get("machine_info", {})
        self.groups: Dict[str, Dict[str, dict]] = {}
        for b in data["benchmarks"]:
            self.groups.setdefault(b["group"], {})[b["name"]] = b
        copy = self.groups.get("copy-roofline", {}).get("copy")
        self.copy_gbps = copy["extra_info"].get("gb_per_s") if copy and copy.get("stats") else None

    @staticmethod
    def median(entry: Optional[dict]) -> Optional[float]:
        return entry["stats"]["median"] if entry and entry.get("stats") else None

    def ratio(self, group: str, baseline: str, entry: str) -> Optional[float]:
        """Speedup of ``entry`` over ``baseline`` in ``group`` (baseline time / entry time)."""
        g = self.groups.get(group, {})
        a, b = self.median(g.get(baseline)), self.median(g.get(entry))
        return a / b if a and b else None

    def fastest(self, group: str, names) -> Optional[str]:
        """The fastest of the entries ``names`` measured in ``group``."""
        g = self.groups.get(group, {})
        timed = [n for n in names if self.median(g.get(n))]
        return min(timed, key=lambda n: self.median(g[n])) if timed else None

    def copy_share(self, groups: List[str], entry: str) -> List[float]:
        """GB/s of ``entry`` in each of ``groups`` over the copy bandwidth of this run."""
        if not self.copy_gbps:
            return []
        return [self.groups[g][entry]["extra_info"]["gb_per_s"] / self.copy_gbps
                for g in groups if self.median(self.groups[g].get(entry))]

    def linear_groups(self, M: int, bits: int = 4) -> List[str]:
        pattern = re.compile(rf"^spike_linear \S+ \d+x\d+ M={M} W{bits}g")
        return [g for g in self.groups if pattern.match(g)]


def _facts(run: Run) -> List[str]:
    info = run.info
    facts = [("GPU", info.get("gpu")), ("GPU clocks", info.get("gpu_clocks")),
             ("CPU", info.get("cpu", {}).get("brand_raw")), ("CPU threads", info.get("cpu_threads")),
             ("torch", info.get("torch")), ("CUDA (torch)", info.get("torch_cuda")),
             ("transformers", info.get("transformers")), ("Python", info.get("python_version")),
             ("date", run.data.get("datetime")),
             ("device-to-device copy", f"{run.copy_gbps:.0f} GB/s (read + write, measured in "
                                       f"this run)" if run.copy_gbps else None)]
    return [f"- {k}: {v}" for k, v in facts if v is not None]


def _worst(values: List[Optional[float]]):
    vals = [v for v in values if v is not None]
    return (min(vals), statistics.median(vals), len(vals)) if vals else None


def targets(run: Run) -> List[str]:
    """docs/performance.md targets, each with its measured ratio (worst and median over shapes)."""
    on_gpu = bool(run.info.get("gpu"))
    ref = "cublas-fp16" if on_gpu else "torch-fp32-F.linear"
    auto = "spikeops-auto-minmax4"
    rows = []

    def add(name, goal, values, unit="x"):
        w = _worst(values)
        if w is None:
            rows.append(f"| {name} | {goal}{unit} | not measured in this run | - |")
            return
        worst, med, n = w
        verdict = "met" if worst >= goal else f"missed by {100 * (1 - worst / goal):.0f}%"
        rows.append(f"| {name} | {goal}{unit} | {worst:.2f}{unit} (median {med:.2f}{unit}, "
                    f"{n} cases) | {verdict} |")

    def over(M, baseline, entry=auto, bits=4):
        return [run.ratio(g, baseline, entry) for g in run.linear_groups(M, bits)]

    if on_gpu:
        add(f"M=1 auto vs {ref}", 3.0, over(1, ref))
        add("M=1 auto, share of copy bandwidth", 0.8, run.copy_share(run.linear_groups(1), auto),
            "")
        add("M=1 auto vs torch int4 tinygemm", 1.5, over(1, "torch-int4-tinygemm"))
        add(f"M=1 spike backend vs {ref}", 2.0, over(1, ref, "spikeops-spike-minmax4"))
        add(f"M=16 auto vs {ref}", 2.5, over(16, ref))
        add(f"M=2048 auto vs {ref}", 1.3, over(2048, ref))
        add("M=2048 auto vs torch._int_mm", 0.8, over(2048, "torch-int8-_int_mm"))
        encode = [g for g in run.groups if g.startswith("gif_encode") and g.endswith(" M=2048")]
        add("encode (minmax4, M=2048), share of copy bandwidth", 0.7,
            run.copy_share(encode, "spikeops-minmax4"), "")
        # The spiking model in transformers' forward (captured by the harness) and in the
        # Runner with its own CUDA graphs (bench/test_model.py).
        for entry, how in (("spikeops-W4-minmax4", ""),
                           ("spikeops-W4-minmax4-runner-graphs", ", Runner with CUDA graphs")):
            decode = [run.ratio(f"model decode-batch{b}", "hf-fp16", entry) for b in (1, 16)]
            add(f"whole-model decode{how} vs fp16 HF", 2.0, decode)
        sim = [run.ratio(f"model decode-batch{b}", "timestep-sim-T15", "spikeops-W4-minmax4")
               for b in (1, 16)]
        add("whole-model decode vs T-step simulation", 100.0, sim)
    else:
        # SpikeLinear including the encode, against each baseline at M tokens (4096 -> 11008).
        lin = "spikeops-SpikeLinear-minmax4"

        def cpu(M, baseline):
            groups = [g for g in run.linear_groups(M) if "4096x11008" in g]
            return [run.ratio(g, baseline(g) if callable(baseline) else baseline, lin)
                    for g in groups]

        def dense(g):
            return run.fastest(g, CPU_DENSE)
        add("CPU M=1 SpikeLinear vs torch int4", 1.3, cpu(1, "torch-int4-tinygemm"))
        add("CPU M=1 SpikeLinear vs fastest dense F.linear", 3.5, cpu(1, dense))
        add("CPU M=16 SpikeLinear vs torch int4", 1.2, cpu(16, "torch-int4-tinygemm"))
        add("CPU M=16 SpikeLinear vs torch._int_mm", 1.0, cpu(16, "torch-int8-_int_mm"))
        add("CPU M=256 SpikeLinear vs torch._int_mm", 1.0, cpu(256, "torch-int8-_int_mm"))
        add("CPU M=256 SpikeLinear vs fastest dense F.linear", 1.3, cpu(256, dense))
        add("CPU M=1 SpikeLinear vs T-step simulation", 20.0, cpu(1, "timestep-sim-T15"))
        sparse = [g for g in run.linear_groups(1) if "4096x11008" in g]
        add("CPU M=1 sparse input (rate <= 5%) vs minmax4, SpikeLinear", 2.0,
            [run.ratio(g, lin, "spikeops-SpikeLinear-sparse") for g in sparse
             if (run.groups[g].get("spikeops-SpikeLinear-sparse", {}).get("extra_info", {})
                 .get("firing_rate", 1.0)) <= 0.05])
    return ["| target | goal | measured (worst case) | verdict |", "|---|---|---|---|",
            *rows]


CPU_DENSE = ("torch-fp32-F.linear", "torch-bf16-F.linear", "torch-fp16-F.linear")


def headline(run: Run) -> List[str]:
    """spikeops auto (minmax4) per shape and M: speedup over the reference, int4, int8, the
    simulation; then the whole-model rows."""
    on_gpu = bool(run.info.get("gpu"))
    ref = "cublas-fp16" if on_gpu else "torch-fp32-F.linear"
    auto = "spikeops-auto-minmax4"
    dense = "fastest dense" if not on_gpu else ref
    lines = [f"| layer (W4 g128, minmax4 spikes) | M | auto | vs {dense} | vs int4 tinygemm | "
             f"vs _int_mm | vs T=15 simulation | GB/s |", "|---|---|---|---|---|---|---|---|"]
    for g, es in run.groups.items():
        m = re.match(r"^spike_linear (\S+ \d+x\d+) M=(\d+) W4g", g)
        if not m or auto not in es or not es[auto].get("stats"):
            continue
        e = es[auto]
        fastest = ref if on_gpu else (run.fastest(g, CPU_DENSE) or ref)
        cells = [_times(run.ratio(g, b, auto))
                 for b in (fastest, "torch-int4-tinygemm", "torch-int8-_int_mm",
                           "timestep-sim-T15")]
        if not on_gpu:
            cells[0] += f" ({fastest.split('-')[1]})"
        lines.append(f"| {m.group(1)} | {m.group(2)} | {fmt_time(run.median(e))} | "
                     f"{' | '.join(cells)} | {_num(e['extra_info'].get('gb_per_s'), '.0f')} |")
    model = [g for g in run.groups if g.startswith("model ")]
    if model:
        lines += ["", "| whole model | hf (tokens/s) | spikeops (tokens/s) | vs hf | vs simulation | "
                      "peak GiB (hf / spikeops) |", "|---|---|---|---|---|---|"]
        for g in model:
            es = run.groups[g]

            def tps(name):
                e = es.get(name)
                return e["extra_info"].get("tokens_per_s") if e and e.get("stats") else None

            def peak(name):
                e = es.get(name)
                return _num(e["extra_info"].get("peak_gib") if e else None, ".1f")

            sp = "spikeops-W4-minmax4"
            lines.append(f"| {g[len('model '):]} | {_num(tps('hf-fp16'), '.1f')} | "
                         f"{_num(tps(sp), '.1f')} | {_times(run.ratio(g, 'hf-fp16', sp))} | "
                         f"{_times(run.ratio(g, 'timestep-sim-T15', sp))} | "
                         f"{peak('hf-fp16')} / {peak(sp)} |")
    return lines


def group_tables(run: Run) -> List[str]:
    lines = []
    for group, entries in run.groups.items():
        timed = {n: e for n, e in entries.items() if e.get("stats")}
        baselines = [n for n in timed if not n.startswith("spikeops")]
        lines += ["", f"### {group}", "",
                  "| entry | median | GB/s | TOPS | of copy BW | " +
                  " | ".join(f"x vs {b}" for b in baselines) + " |",
                  "|---|---|---|---|---|" + "---|" * len(baselines)]
        for name, e in sorted(timed.items(), key=lambda kv: kv[1]["stats"]["median"]):
            x = e["extra_info"]
            gbps = x.get("gb_per_s")
            share = f"{100 * gbps / run.copy_gbps:.0f}%" if gbps and run.copy_gbps else "-"
            ratios = " | ".join(_times(run.ratio(group, b, name)) for b in baselines)
            note = " (int_mm padded to 32 rows)" if x.get("int_mm_padded_rows") else ""
            note += "" if x.get("cuda_graph", True) else " (eager: graph capture failed)"
            lines.append(f"| {name}{note} | {fmt_time(e['stats']['median'])} | "
                         f"{_num(gbps, '.1f')} | {_num(x.get('tops'), '.3f')} | {share} | "
                         f"{ratios} |")
    return lines


def merge(paths: List[str]) -> dict:
    """The benchmarks of several JSON files in one record (machine facts of the first)."""
    merged = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data["benchmarks"]
    return merged


def report(data: dict, only_headline: bool = False) -> str:
    run = Run(data)
    if only_headline:
        return "\n".join(headline(run)) + "\n"
    lines = ["# spikeops benchmark report", "", *_facts(run), "",
             "Ratios are speedups (baseline time / entry time) from the same run; GB/s and "
             "TOPS count what each entry must move and compute (bench/*.py docstrings).",
             "", "## Targets (docs/performance.md)", "", *targets(run),
             "", "## Headline", "", *headline(run), "", "## All groups", *group_tables(run)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--headline", action="store_true", help="print only the headline table")
    args = parser.parse_args()
    print(report(merge(args.json), args.headline), end="")
