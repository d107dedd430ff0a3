"""The data of the local lm_eval tasks of bench/lm_eval_smollm2.py, made from the license texts
under /usr/share/common-licenses (English prose every Debian-family system has; nothing is
downloaded). lm_eval calls these functions through the YAMLs beside this file
(``custom_dataset: !function licenses.NAME``).

- ``licenses_mc``: 100 multiple-choice items "which sentence follows this one": the context is a
  sentence of a license, the choices its true next sentence and 3 sentences of licenses of
  other families (GPL and LGPL are one family, GFDL-1.2 and 1.3 another, ...: their versions
  share sentences, which would make a distractor the true answer), the true one at a seeded
  random place.
- ``licenses_ppl``: rolling log-likelihood (perplexity) of MPL-2.0, one document per section.

Held out: GPL-3 is the calibration text of the cached SmolLM2 checkpoint (spikeops demo: GPTQ and
the seed methods' calibration), so neither task reads it, nor the texts that are or extend it
(GPL, LGPL-3); MPL-2.0 is only in the perplexity task.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import datasets

LICENSES = Path("/usr/share/common-licenses")
PPL_TEXT = "MPL-2.0"
HELD_OUT = {"GPL", "GPL-3", "LGPL-3", PPL_TEXT}
ITEMS, DISTRACTORS, SEED = 100, 3, 0


def sentences(text: str) -> list:
    """The prose sentences of a license: whitespace joined, split after . ; or ? followed by
    a capital letter, kept when 40-240 characters and mostly letters (not a heading, a list
    marker or a code line)."""
    flat = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.?])\s+(?=[A-Z])", flat)
    return [p.strip() for p in parts
            if 40 <= len(p.strip()) <= 240 and sum(c.isalpha() for c in p) > 0.7 * len(p)]


def family(name: str) -> str:
    """A license's family: its name before the version, with LGPL counted as GPL."""
    return re.sub(r"^L(?=GPL)", "", name.split("-")[0])


def mc_items() -> list:
    """The multiple-choice items, the same on every call (seeded)."""
    texts = {}
    for path in sorted(LICENSES.iterdir()):
        real = path.resolve()
        if path.name in HELD_OUT or real.name in HELD_OUT or not real.is_file() or \
                real in texts:
            continue
        texts[real] = sentences(real.read_text(encoding="utf-8", errors="replace"))
    rng = random.Random(SEED)
    pairs = [(source, i) for source, sents in texts.items() for i in range(len(sents) - 1)]
    if len(pairs) < ITEMS:
        raise ValueError(f"licenses_mc: {LICENSES} holds {len(pairs)} sentence pairs outside "
                         f"{sorted(HELD_OUT)}, {ITEMS} are needed")
    items = []
    for source, i in rng.sample(pairs, ITEMS):
        others = [s for other, sents in texts.items()
                  if family(other.name) != family(source.name) for s in sents]
        choices = rng.sample(others, DISTRACTORS)
        answer = rng.randrange(DISTRACTORS + 1)
        choices.insert(answer, texts[source][i + 1])
        items.append({"context": texts[source][i], "choices": choices, "answer": answer,
                      "source": source.name})
    return items


def ppl_docs() -> list:
    """MPL-2.0 split at its numbered section headings ("1. Definitions", ...)."""
    text = (LICENSES / PPL_TEXT).read_text(encoding="utf-8")
    parts = re.split(r"\n(?=\d+\. [A-Z])", text)
    return [{"text": p.strip()} for p in parts if p.strip()]


def multiple_choice(**_metadata) -> dict:
    """lm_eval's custom_dataset of licenses_mc (it passes the task metadata and model_args,
    which the data do not depend on)."""
    return {"test": datasets.Dataset.from_list(mc_items())}


def perplexity(**_metadata) -> dict:
    """lm_eval's custom_dataset of licenses_ppl (see multiple_choice)."""
    return {"test": datasets.Dataset.from_list(ppl_docs())}


if __name__ == "__main__":
    mc, docs = mc_items(), ppl_docs()
    print(f"licenses_mc: {len(mc)} items from {sorted({m['source'] for m in mc})}; first:")
    print(mc[0])
    print(f"licenses_ppl: {len(docs)} documents of {PPL_TEXT}, "
          f"{sum(len(d['text']) for d in docs)} characters")
