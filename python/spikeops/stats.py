"""Spike statistics and energy accounting (docs/ops.md).

``spikeops.track(model)`` is a context manager that, through the ``observer`` hook of every
``SpikeLinear``, accumulates per layer (as device tensors; nothing syncs until the results are
read):

- spikes per plane ``[P]`` and, for signed encodings, negative spikes per plane;
- tokens M, in/out features K and N, planes P, weight groups G and ranges R (or, for spikes
  with activation groups, their count per token A);
- silent channels: per token, the channels whose train is empty in every plane (K minus the
  popcount of the OR of the plane words), summed over tokens;
- zero words: 32-channel spike words whose OR over planes is 0 (the ``"spike"`` kernel skips them),
  out of M * W words.

All four come from one fused pass over the spike words per layer call (``SpikeTensor.stats()``,
op ``spike_stats``), added in place into the layer's accumulator: two small ops per call, which
keeps tracking cheap at decode, where every call carries one token.

Derived: firing rate = spikes / spike slots, where each element counts its own plane count
(M * K * P for one plane count; salient channels have ``salient_bits - bits`` planes more than
the others); SOPs (synaptic operations, one addition of an integer weight per spike and output)
= spikes * N; dense-equivalent MACs = M * K * N.

Scope: all of this covers the SpikeLinear projections (seven per decoder layer). ``whole_model``
adds what a LLaMA-architecture model computes densely in either case, counted through hooks on
its rotary embedding and ``lm_head``: attention (2 * heads * head_dim MACs per causal
query-key pair and layer: scores and weighted values) and ``lm_head`` (tokens * hidden *
vocabulary). Norms, SiLU, rotary and the online rotation are elementwise or small and not
counted. With a spiking key-value cache (``Runner(kv="spike4" | "spike8")``) QK^T runs on
spikes: ``whole_model`` counts its synaptic operations (``attention_sops``: per attended
query-key pair and channel, query spikes x key spikes, each an addition) at the preset's
accumulate energy instead of its heads * head_dim MACs per pair, which leave
``dense_macs["attention"]`` (PV stays dense); the dense model's energy counts them all.

Energy model (``EnergyModel``, per-operation energies in pJ). Per layer:

    E_spike = SOPs * ac + M * N * G * P * shift + M * N * G * R * mult
    E_dense = MACs * mac

- SOPs * ac: every spike adds (or subtracts) one weight per output (docs/ops.md, "spike" backend).
- shifts: the per-plane partial sums are combined by shifting; we charge P shifts per output,
  per token and per weight group (the integer sums are kept per group), each costing ``shift``.
- epilogue: one float32 multiply per group and range per output and token (docs/ops.md), ``mult``.
  The zero-point correction (zero * B) and the per-token scale are folded into this count.
- with activation groups the integer sums are kept per activation group (each inside one weight
  group): A replaces G in the shift term and G * R in the epilogue term.
- E_dense: the same layer run densely, one multiply-accumulate per (token, input, output).

Presets (Horowitz, "Computing's energy problem", ISSCC 2014, 45 nm, 0.9 V):

- ``"45nm"``: float32 MAC = mult 3.7 + add 0.9 = 4.6 pJ; AC = float32 add 0.9 pJ; shift charged
  as an add (0.9 pJ); epilogue float32 multiply 3.7 pJ. The classic SNN-vs-ANN comparison.
- ``"int8"``: int8 MAC = mult 0.2 + add 0.03 = 0.23 pJ; AC = int8 add 0.03 pJ; shift 0.03 pJ;
  epilogue still a float32 multiply (3.7 pJ). The fair comparison against a quantized integer
  accelerator: the spiking adds are integer adds of weight codes too.

Reports compare: spiking run under ``45nm`` and ``int8`` vs dense float (``45nm`` MAC) and dense
int8 (``int8`` MAC).

Caveat. These figures count arithmetic only: no memory traffic (weight and spike reads usually
dominate), no control logic for sparse event routing, no multi-time-step state. Dampfhoffer et al.
("Are SNNs really more energy-efficient than ANNs? An in-depth hardware-aware study", IEEE TETCI
2023) show that with memory accesses and addressing included, SNNs beat ANNs only at low firing
rates (well below ~1 spike per neuron, and lower for multi-step trains). Here each activation has
P spike slots, so SOPs / MACs = P * firing rate: with ``int8`` constants a spiking layer only wins
when SOPs * 0.03 < MACs * 0.23, i.e. P * rate < ~7.7 before the shift and epilogue costs.
See docs/energy.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch

from . import attention
from .nn import SpikeLinear
from .spikes import spike_slots

__all__ = ["EnergyModel", "PRESETS", "LayerStats", "Tracker", "track"]


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in picojoules."""

    name: str
    mac_pj: float    # one multiply-accumulate of the dense layer
    ac_pj: float     # one accumulate (a synaptic operation: add a weight for a spike)
    shift_pj: float  # one shift of a per-plane partial sum
    mult_pj: float   # one float32 multiply of the epilogue (per group and range)


PRESETS: Dict[str, EnergyModel] = {
    "45nm": EnergyModel("45nm", mac_pj=4.6, ac_pj=0.9, shift_pj=0.9, mult_pj=3.7),
    "int8": EnergyModel("int8", mac_pj=0.23, ac_pj=0.03, shift_pj=0.03, mult_pj=3.7),
}


def energy_model(preset) -> EnergyModel:
    if isinstance(preset, EnergyModel):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"energy model must be an EnergyModel or one of {sorted(PRESETS)}, "
                         f"got {preset!r}")
    return PRESETS[preset]


def _block(name: str) -> str:
    """The decoder layer of a layer name ("model.layers.7.mlp.up_proj" -> "layer 7")."""
    parts = name.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts):
        return f"layer {parts[parts.index('layers') + 1]}"
    return name.rsplit(".", 1)[0] or name


def layer_type(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``q``; other names keep their last part."""
    last = name.rsplit(".", 1)[-1]
    return last[:-5] if last.endswith("_proj") else last


@dataclass
class LayerStats:
    """Statistics of one SpikeLinear over everything it ran while tracked (host values)."""

    name: str
    type: str
    calls: int
    tokens: int
    K: int
    N: int
    P: int
    groups: int
    ranges: int
    spikes_per_plane: List[int]
    negative_per_plane: Optional[List[int]]
    silent_channels: int
    zero_words: int
    words: int
    slots: int       # spike slots: over tokens and channels, each element's own plane count
    encodings: List[str]  # labels of the encodings it ran (Encoding.label)
    bits: int        # stored bits: the spike slots plus a sign and a range bit per element
                     # where the encoding has them
    act_groups: int = 0  # activation groups per token (spikes with per-group thresholds), or 0

    @property
    def planes(self) -> float:
        """Bit planes per activation element, its sign and range bits included (docs/research.md,
        "Planes"): what an encoding costs, so that a mixed policy is never read as 4-bit."""
        elements = self.tokens * self.K
        return self.bits / elements if elements else 0.0

    @property
    def spikes(self) -> int:
        return sum(self.spikes_per_plane)

    @property
    def negative(self) -> Optional[int]:
        return None if self.negative_per_plane is None else sum(self.negative_per_plane)

    @property
    def firing_rate(self) -> float:
        """Spikes / spike slots (each element counting its own planes)."""
        return self.spikes / self.slots if self.slots else 0.0

    @property
    def silent_fraction(self) -> float:
        slots = self.tokens * self.K
        return self.silent_channels / slots if slots else 0.0

    @property
    def zero_word_fraction(self) -> float:
        return self.zero_words / self.words if self.words else 0.0

    @property
    def sops(self) -> int:
        return self.spikes * self.N

    @property
    def macs(self) -> int:
        return self.tokens * self.K * self.N

    def shifts(self) -> int:
        return self.tokens * self.N * (self.act_groups or self.groups) * self.P

    def epilogue_mults(self) -> int:
        return self.tokens * self.N * (self.act_groups or self.groups * self.ranges)

    def spike_energy_pj(self, preset="45nm") -> float:
        """``SOPs * ac + M*N*G*P * shift + M*N*G*R * mult`` (module docstring)."""
        e = energy_model(preset)
        return self.sops * e.ac_pj + self.shifts() * e.shift_pj + \
            self.epilogue_mults() * e.mult_pj

    def dense_energy_pj(self, preset="45nm") -> float:
        """``MACs * mac``: the dense layer under ``preset`` (45nm: float32, int8: int8)."""
        return self.macs * energy_model(preset).mac_pj

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(spikes=self.spikes, negative=self.negative, firing_rate=self.firing_rate,
                 silent_fraction=self.silent_fraction,
                 zero_word_fraction=self.zero_word_fraction, sops=self.sops, macs=self.macs,
                 shifts=self.shifts(), epilogue_mults=self.epilogue_mults(),
                 energy_pj={"spike_45nm": self.spike_energy_pj("45nm"),
                            "spike_int8": self.spike_energy_pj("int8"),
                            "dense_float_45nm": self.dense_energy_pj("45nm"),
                            "dense_int8": self.dense_energy_pj("int8")})
        return d


class _Acc:
    """Device-side accumulators of one layer: one ``spike_stats`` result per plane count P
    (P only changes if the encoding is changed while tracking), added in place."""

    __slots__ = ("calls", "tokens", "words", "K", "N", "groups", "ranges", "act_groups",
                 "signed", "stats", "slots", "bits", "encodings", "_seen")

    def __init__(self, layer: SpikeLinear):
        self.calls = self.tokens = self.words = self.ranges = self.slots = self.bits = 0
        self.act_groups = 0
        self.K, self.N = layer.in_features, layer.out_features
        self.groups = layer.gptq.scales.shape[0]
        self.signed = False
        self.stats: Dict[int, torch.Tensor] = {}
        self.encodings: List[str] = []
        # (encoding, salient mask, spike slots per token) of the last call: recomputed, with
        # one sync for a mask's channel count, only when the layer's encoding changes.
        self._seen = (None, None, 0)

    def observe(self, layer: SpikeLinear, st) -> None:
        # The per-call cost matters at decode (one token per call): one fused op and one add.
        P, M, W = st.planes.shape
        self.calls += 1
        self.tokens += M
        self.words += M * W
        if st.group:  # the scale columns are activation groups, not ranges
            self.ranges = max(self.ranges, 1)
            self.act_groups = max(self.act_groups, st.scale.shape[1])
        else:
            self.ranges = max(self.ranges, st.scale.shape[1])
        self.signed |= st.sign is not None
        enc, mask = layer.enc, layer.salient_mask
        if self._seen[0] is not enc or self._seen[1] is not mask:
            salient = int(mask.sum()) if mask is not None else 0
            self._seen = (enc, mask, spike_slots(enc, P, self.K, salient))
            if enc.label not in self.encodings:
                self.encodings.append(enc.label)
        self.slots += M * self._seen[2]
        self.bits += M * (self._seen[2] + self.K * ((st.sign is not None) + (st.hi is not None)))
        value = st.stats()
        acc = self.stats.get(P)
        if acc is None:
            self.stats[P] = value
        else:
            acc.add_(value)

    def result(self, name: str) -> LayerStats:
        P = max(self.stats, default=0)
        spikes, negative = [0] * P, [0] * P
        fired = zero_words = 0
        for p, acc in self.stats.items():
            v = acc.tolist()
            for i in range(p):
                spikes[i] += v[i]
                negative[i] += v[p + i]
            fired += v[2 * p]
            zero_words += v[2 * p + 1]
        return LayerStats(name, layer_type(name), self.calls, self.tokens, self.K, self.N, P,
                          self.groups, self.ranges, spikes, negative if self.signed else None,
                          self.tokens * self.K - fired, zero_words, self.words, self.slots,
                          list(self.encodings), self.bits, self.act_groups)


class Tracker:
    """Collects spike statistics of every SpikeLinear of ``model`` while entered (``with``).
    Read the results after (or during) tracking: ``layers()``, ``totals()``, ``by_type()``,
    ``table()``, ``to_json()``, ``plot(folder)``."""

    def __init__(self, model: torch.nn.Module):
        from .nn import spike_layers
        self.model = model
        self._layers = spike_layers(model)
        self._acc: Dict[str, _Acc] = {}
        self._active = False
        self._dense = _dense_parts(model)
        self._handles: list = []
        self._pairs: Optional[torch.Tensor] = None  # causal query-key pairs, on the device
        self._head_rows = 0                          # tokens through lm_head
        self._attention = [0, 0]  # spiking QK^T: synaptic operations, dense MACs replaced

    def __enter__(self) -> "Tracker":
        busy = [n for n, m in self._layers.items() if m.observer is not None]
        if busy:
            raise RuntimeError(f"spikeops.track: layer {busy[0]!r} already has an observer "
                               f"(another track() is active on this model); "
                               f"nested tracking is not supported")
        self._acc = {name: _Acc(layer) for name, layer in self._layers.items()}
        for name, layer in self._layers.items():
            layer.observer = self._acc[name].observe
        self._pairs, self._head_rows, self._attention = None, 0, [0, 0]
        attention.observe(self.model, self._count_attention)
        if self._dense is not None:
            rotary, lm_head, _ = self._dense
            self._handles = [rotary.register_forward_pre_hook(self._count_pairs, with_kwargs=True),
                             lm_head.register_forward_pre_hook(self._count_head)]
        self._active = True
        return self

    def __exit__(self, *exc) -> bool:
        for layer in self._layers.values():
            layer.observer = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        attention.unobserve(self._count_attention)
        self._active = False
        return False

    def _count_pairs(self, _module, args, kwargs) -> None:
        # Called once per forward with the positions of its queries (transformers' forward and
        # the Runner alike): a query at position p attends to p + 1 keys. transformers passes
        # one row of positions for the whole batch.
        x = args[0] if args else kwargs["x"]
        positions = args[1] if len(args) > 1 else kwargs["position_ids"]
        pairs = (positions + 1).sum() * (x.shape[0] // positions.shape[0])
        self._pairs = pairs if self._pairs is None else self._pairs + pairs

    def _count_attention(self, sops: int, macs: int) -> None:
        self._attention[0] += sops
        self._attention[1] += macs

    def _count_head(self, _module, args) -> None:
        self._head_rows += args[0].numel() // args[0].shape[-1]

    # ---- results (these synchronize with the device) ----

    def layers(self) -> List[LayerStats]:
        """Per-layer statistics of the layers that ran on spikes, in module order."""
        return [acc.result(name) for name, acc in self._acc.items() if acc.calls]

    @staticmethod
    def _sum(rows: List[LayerStats], label: str) -> dict:
        spikes = sum(r.spikes for r in rows)
        slots = sum(r.slots for r in rows)
        elements = sum(r.tokens * r.K for r in rows)
        out = {"name": label, "layers": len(rows), "spikes": spikes,
               "firing_rate": spikes / slots if slots else 0.0,
               "planes": sum(r.bits for r in rows) / elements if elements else 0.0,
               "silent_fraction": (sum(r.silent_channels for r in rows) /
                                   max(1, sum(r.tokens * r.K for r in rows))),
               "zero_word_fraction": (sum(r.zero_words for r in rows) /
                                      max(1, sum(r.words for r in rows))),
               "sops": sum(r.sops for r in rows), "macs": sum(r.macs for r in rows)}
        out["energy_pj"] = {k: sum(r.as_dict()["energy_pj"][k] for r in rows)
                            for k in ("spike_45nm", "spike_int8", "dense_float_45nm",
                                      "dense_int8")}
        return out

    def totals(self) -> dict:
        """Sums over the SpikeLinear projections that ran on spikes (not the whole model:
        ``whole_model``)."""
        return self._sum(self.layers(), "all")

    def whole_model(self) -> Optional[dict]:
        """The projections' energy plus what the model computes densely in either case
        (module docstring): ``{"dense_macs": {"attention": ..., "lm_head": ...}, "energy_pj":
        {...}}``, each energy the projections' one plus these MACs at the preset's MAC energy
        (45nm keys: float32 MACs, int8 keys: int8 MACs). None for a model that is not a
        LLaMA-architecture causal LM (no attention or lm_head to count)."""
        if self._dense is None:
            return None
        _, lm_head, per_pair = self._dense
        sops, replaced = self._attention
        macs = {"attention": int(self._pairs if self._pairs is not None else 0) * per_pair,
                "lm_head": self._head_rows * lm_head.in_features * lm_head.out_features}
        dense = sum(macs.values())
        projections = self.totals()["energy_pj"]
        energy = {}
        # Each key ends in its preset: spike_45nm, dense_float_45nm, spike_int8, dense_int8.
        # The spiking model's QK^T on a spiking cache costs its synaptic operations instead of
        # the MACs it replaced; the dense model computes them all.
        for key in projections:
            preset = PRESETS[key.rsplit("_", 1)[1]]
            spiking = key.startswith("spike")
            energy[key] = projections[key] + (dense - replaced * spiking) * preset.mac_pj + \
                sops * spiking * preset.ac_pj
        macs["attention"] -= replaced
        return {"dense_macs": macs, "attention_sops": sops, "energy_pj": energy}

    def energy(self) -> dict:
        """Energy in pJ of what was tracked: ``projections`` (the SpikeLinear layers),
        ``model`` (``whole_model``'s, None when not available) and its ``dense_macs``."""
        whole = self.whole_model()
        return {"projections": self.totals()["energy_pj"],
                "model": whole["energy_pj"] if whole else None,
                "dense_macs": whole["dense_macs"] if whole else None}

    def encoding_label(self) -> str:
        """The encodings the layers ran (``Encoding.label``): ``absmax4``, or per layer type,
        e.g. ``down: minmax8; q, k, v, o, gate, up: absmax4``."""
        labels: Dict[str, List[str]] = {}
        for r in self.layers():
            kept = labels.setdefault(r.type, [])
            kept += [e for e in r.encodings if e not in kept]
        names = {t: "/".join(v) for t, v in labels.items()}
        distinct = list(dict.fromkeys(names.values()))
        if len(distinct) == 1:
            return distinct[0]
        return "; ".join(", ".join(t for t in names if names[t] == d) + f": {d}"
                         for d in distinct)

    def by_type(self) -> Dict[str, dict]:
        """Sums per layer type (q, k, v, o, gate, up, down, ...)."""
        rows = self.layers()
        types = list(dict.fromkeys(r.type for r in rows))
        return {t: self._sum([r for r in rows if r.type == t], t) for t in types}

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps({"energy_models": {k: asdict(v) for k, v in PRESETS.items()},
                           "encoding": self.encoding_label(), "totals": self.totals(),
                           "whole_model": self.whole_model(), "by_type": self.by_type(),
                           "layers": [r.as_dict() for r in self.layers()]}, indent=indent)

    def summary(self) -> str:
        """Firing rate, SOPs/MACs and the energies of the projections, then of the whole model
        when it can be counted, each line saying what it covers."""
        t = self.totals()
        ratio = t["sops"] / t["macs"] if t["macs"] else 0.0
        whole = self.whole_model()
        lines = [f"{t['layers']} projections (SpikeLinear) on {self.encoding_label()}: firing "
                 f"rate {t['firing_rate']:.4f}, SOPs/MACs {ratio:.3f}; energy (arithmetic only, "
                 f"docs/energy.md) {_energies(t['energy_pj'])}"]
        if whole is None:
            lines.append("(attention and lm_head not counted: not a LLaMA-architecture model)")
        else:
            lines.append(f"whole model (+ attention and lm_head as dense MACs, "
                         f"{sum(whole['dense_macs'].values()) / 1e6:.1f}M): "
                         f"{_energies(whole['energy_pj'])}")
        return "\n".join(lines)

    def table(self) -> str:
        """Per-layer table, per-type summary and totals as text."""
        head = (f"{'layer':36} {'type':>5} {'tok':>6} {'K':>5} {'N':>5} {'P':>2} {'rate':>7} "
                f"{'neg':>6} {'silent':>7} {'0words':>7} {'SOPs/MAC':>8} {'E spk45':>9} "
                f"{'E fp32':>9} {'E spk8':>9} {'E int8':>9}")
        lines = [head, "-" * len(head)]

        def energy(d):
            e = d["energy_pj"]
            return (f"{e['spike_45nm'] / 1e6:>9.3f} {e['dense_float_45nm'] / 1e6:>9.3f} "
                    f"{e['spike_int8'] / 1e6:>9.3f} {e['dense_int8'] / 1e6:>9.3f}")

        for r in self.layers():
            d = r.as_dict()
            neg = f"{r.negative / r.spikes:.3f}" if r.negative is not None and r.spikes else "-"
            lines.append(f"{r.name:36} {r.type:>5} {r.tokens:>6} {r.K:>5} {r.N:>5} {r.P:>2} "
                         f"{r.firing_rate:>7.4f} {neg:>6} {r.silent_fraction:>7.3f} "
                         f"{r.zero_word_fraction:>7.3f} {r.sops / max(1, r.macs):>8.3f} "
                         f"{energy(d)}")
        lines += ["", f"{'type':8} {'layers':>6} {'rate':>7} {'silent':>7} {'0words':>7} "
                      f"{'SOPs/MAC':>8} {'E spk45':>9} {'E fp32':>9} {'E spk8':>9} {'E int8':>9}"]
        for d in list(self.by_type().values()) + [self.totals()]:
            lines.append(f"{d['name']:8} {d['layers']:>6} {d['firing_rate']:>7.4f} "
                         f"{d['silent_fraction']:>7.3f} {d['zero_word_fraction']:>7.3f} "
                         f"{d['sops'] / max(1, d['macs']):>8.3f} {energy(d)}")
        lines += ["", "rate = spikes / spike slots (tokens*K*P; salient channels count their own "
                      "planes); neg = negative share of spikes; silent = "
                      "channels with no spike in any plane, per token; 0words = 32-channel spike "
                      "words with no spike (skipped);",
                  "energies in uJ of the projections (arithmetic only, see docs/energy.md): "
                  "E spk45 / E spk8 = spiking run with 45nm / int8 constants, E fp32 = dense "
                  "float32 MACs, E int8 = dense int8 MACs; the whole model is below.", "",
                  self.summary()]
        return "\n".join(lines)

    def plot(self, folder) -> List[str]:
        """Write firing_rate.png, planes.png and energy.png into ``folder``; returns the paths."""
        import os
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        os.makedirs(folder, exist_ok=True)
        rows = self.layers()
        label = self.encoding_label()
        paths = []

        def save(fig, ax, name, legend=True):
            if legend:
                ax.legend(fontsize=8)
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            paths.append(os.path.join(folder, name))
            fig.savefig(paths[-1], dpi=110)
            plt.close(fig)

        # Decoder layer x projection type: one cell per layer, readable for hundreds of layers.
        types = list(dict.fromkeys(r.type for r in rows))
        blocks = list(dict.fromkeys(_block(r.name) for r in rows))
        grid = [[float("nan")] * len(types) for _ in blocks]
        for r in rows:
            grid[blocks.index(_block(r.name))][types.index(r.type)] = r.firing_rate
        fig, ax = plt.subplots(figsize=(1.1 * len(types) + 3, min(40, 0.22 * len(blocks) + 2)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(types)), types)
        step = max(1, len(blocks) // 40)
        ax.set_yticks(range(0, len(blocks), step), blocks[::step], fontsize=7)
        ax.set_xlabel("projection")
        ax.set_ylabel("decoder layer")
        ax.set_title(f"{label}: firing rate = spikes / spike slots")
        fig.colorbar(image, ax=ax)
        ax.grid(False)
        fig.tight_layout()
        paths.append(os.path.join(folder, "firing_rate.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        by_type: Dict[str, List[int]] = {}
        for r in rows:
            acc = by_type.setdefault(r.type, [0] * r.P)
            acc += [0] * (r.P - len(acc))
            for p, c in enumerate(r.spikes_per_plane):
                acc[p] += c
        P = max((len(v) for v in by_type.values()), default=0)
        width = 0.8 / max(1, len(by_type))
        for i, (t, counts) in enumerate(by_type.items()):
            counts = counts + [0] * (P - len(counts))
            ax.bar([p + i * width for p in range(P)], counts, width, label=t)
        ax.set_xticks([p + 0.4 - width / 2 for p in range(P)], [f"p={p} (2^{p})" for p in range(P)])
        ax.set_ylabel("spikes")
        ax.set_title(f"{label}: spikes per plane, by layer type")
        save(fig, ax, "planes.png")

        fig, ax = plt.subplots(figsize=(9, 4.5))
        groups = list(self.by_type().values()) + [self.totals()]
        keys = [("spike_45nm", "spiking (45nm: fp32 add)"), ("dense_float_45nm", "dense fp32 MAC"),
                ("spike_int8", "spiking (int8 add)"), ("dense_int8", "dense int8 MAC")]
        width = 0.2
        for i, (k, name) in enumerate(keys):
            ax.bar([g + i * width for g in range(len(groups))],
                   [d["energy_pj"][k] / 1e6 for d in groups], width, label=name)
        ax.set_xticks([g + 1.5 * width for g in range(len(groups))], [d["name"] for d in groups])
        ax.set_yscale("log")
        ax.set_ylabel("energy (uJ, arithmetic only, log scale)")
        ax.set_title(f"{label}: energy of the projections, spiking vs dense float vs int8")
        save(fig, ax, "energy.png")
        return paths


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def _energies(e: dict) -> str:
    fp32, int8 = _ratio(e["dense_float_45nm"], e["spike_45nm"]), _ratio(e["dense_int8"],
                                                                        e["spike_int8"])
    return (f"spiking {e['spike_45nm'] / 1e6:.3f} uJ vs dense float "
            f"{e['dense_float_45nm'] / 1e6:.3f} uJ (45nm, x{fp32}); spiking "
            f"{e['spike_int8'] / 1e6:.3f} uJ vs dense int8 {e['dense_int8'] / 1e6:.3f} uJ "
            f"(int8, x{int8})")


def _dense_parts(model: torch.nn.Module):
    """``(rotary embedding, lm_head, attention MACs per causal query-key pair over all layers)``
    of a LLaMA-architecture causal LM, whose forwards ``whole_model`` counts; else None."""
    from .architecture import decoder_layers, head_dim_of
    try:
        layers = decoder_layers("track", model)
    except ValueError:
        return None
    rotary = getattr(model.model, "rotary_emb", None)
    lm_head = getattr(model, "lm_head", None)
    if rotary is None or not isinstance(lm_head, torch.nn.Linear):
        return None
    config = model.config
    return rotary, lm_head, len(layers) * 2 * config.num_attention_heads * head_dim_of(config)


def track(model: torch.nn.Module) -> Tracker:
    """``with spikeops.track(model) as t: model(...)``: spike statistics of every SpikeLinear
    (module docstring). The observers are removed on exit, also on exceptions; nesting raises
    RuntimeError. Not tracking costs nothing (observer is None)."""
    return Tracker(model)
