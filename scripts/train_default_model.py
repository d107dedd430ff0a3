#!/usr/bin/env python3
"""Train spikeops' embedded default model: a tiny byte-level LLaMA on CPython stdlib source.

The model is a ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` written out in
this file (hidden 256, MLP 768, 4 layers, 4 heads, 4 KV heads, 512 positions, untied
embeddings, float32).  Every projection's input size (256 or 768) is a multiple of 128, the
GPTQ group size, so spikeops' GPTQ writer can quantize it without padding.

Tokens are raw UTF-8 bytes: token id == byte value, ``vocab_size`` 256, no tokenizer files.
There are no special tokens: bos/eos/pad are *not used* (``bos_token_id``, ``eos_token_id``
and ``pad_token_id`` are None in the config), so generation only stops at ``max_new_tokens``.
Encode text with ``list(text.encode("utf-8"))`` and decode with
``bytes(ids).decode("utf-8", errors="replace")``.

Data (fixed and documented, so it is reproducible on any CPython 3.11 machine):
  * the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]`` (no sub-packages),
    sorted by file name;
  * held out for validation: every 10th file of that sorted list, i.e. indices 9, 19, 29, ...
    (``index % 10 == 9``); all other files are the training text;
  * each split is the byte concatenation of its files' raw contents, in sorted order.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on the matrices / embeddings, none on the
RMSNorm weights), lr 2e-3 with 100 linear warm-up steps then cosine decay to 10% of the peak,
gradient clipping at 1.0, batch 16 random windows of 256 bytes drawn from the training text by
a seeded ``torch.Generator``, ``torch.set_num_threads(2)``.  Validation loss is the mean
cross-entropy over all non-overlapping 256-byte windows of the held-out text; since a token is
a byte, bits per byte = loss / ln 2.  The unigram baseline is the cross-entropy of the
held-out bytes under the training text's byte frequencies (add-one smoothed).

Outputs (``--out``): ``config.json``, ``generation_config.json``, ``model.safetensors``
(``save_pretrained(..., safe_serialization=True)``) and ``train_log.json``.  With
``--heldout-out`` (default: ``python/spikeops/data/heldout.txt`` in this checkout) it also
writes the first ~64 KB of the held-out text with a one-line ``#`` header.

Example::

    python scripts/train_default_model.py --steps 600 --out /tmp/spikeops-default-fp32

    # evaluate a saved model on a text file and greedy-generate from a prompt
    python scripts/train_default_model.py --eval-model /tmp/spikeops-default-fp32 \\
        --eval-text python/spikeops/data/heldout.txt --prompt "def "
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEFAULT_HELDOUT = REPO / "python" / "spikeops" / "data" / "heldout.txt"
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- data

def stdlib_files() -> List[Path]:
    """Top-level *.py files of the running interpreter's stdlib, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not files:
        raise SystemExit(f"no *.py files found in {root}")
    return files


def split_files(files: Sequence[Path], holdout_every: int) -> Tuple[List[Path], List[Path]]:
    """Every ``holdout_every``-th file (index % n == n - 1) is held out; the rest train."""
    train = [p for i, p in enumerate(files) if i % holdout_every != holdout_every - 1]
    held = [p for i, p in enumerate(files) if i % holdout_every == holdout_every - 1]
    return train, held


def concat_bytes(files: Sequence[Path]) -> bytes:
    return b"".join(p.read_bytes() for p in files)


def write_heldout(path: Path, held: Sequence[Path], text: bytes, limit: int) -> int:
    """First ~``limit`` bytes of the held-out text (cut at a line end), with a header line."""
    cut = text[:limit]
    nl = cut.rfind(b"\n")
    if nl > 0:
        cut = cut[: nl + 1]
    body = cut.decode("utf-8")  # stdlib sources are UTF-8; a line cut keeps it valid
    used, n = [], 0
    for p in held:  # the files that actually contribute to the sample
        used.append(p.name)
        n += p.stat().st_size
        if n >= len(cut):
            break
    header = (f"# spikeops held-out validation text: the first {len(cut)} bytes of the "
              f"concatenated CPython {platform.python_version()} standard-library files "
              f"{', '.join(used)} (Lib/*.py, PSF license)\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body, encoding="utf-8", newline="\n")
    return len(cut)


def unigram_bpb(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy (bits/byte) of ``val`` under add-one smoothed byte frequencies of ``train``."""
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0
    logp = torch.log2(counts / counts.sum())
    return float(-logp[val.long()].mean())


# --------------------------------------------------------------------------- model

def build_config():
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=256,              # one token per byte
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,           # no special tokens: bos/eos/pad are not used
        eos_token_id=None,
        pad_token_id=None,
        dtype="float32",
    )


@torch.no_grad()
def eval_bpb(model, data: torch.Tensor, seq_len: int, batch_size: int,
             max_windows: int = 0) -> float:
    """Mean bits/byte over non-overlapping ``seq_len``-byte windows (next-byte prediction)."""
    was_training = model.training
    model.eval()
    n = (len(data) - 1) // seq_len
    if max_windows:
        n = min(n, max_windows)
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        idx = torch.arange(b, min(b + batch_size, n)) * seq_len
        x = torch.stack([data[i:i + seq_len] for i in idx.tolist()]).long()
        y = torch.stack([data[i + 1:i + 1 + seq_len] for i in idx.tolist()]).long()
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += y.numel()
    model.train(was_training)
    return total / count / LN2


@torch.no_grad()
def eval_windows_bpb(model, data: torch.Tensor, starts: torch.Tensor, seq_len: int,
                     batch_size: int) -> float:
    """Mean bits/byte over the given window starts (used for a fixed sample of training text)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        s = starts[b:b + batch_size].tolist()
        x = torch.stack([data[i:i + seq_len] for i in s]).long()
        y = torch.stack([data[i + 1:i + 1 + seq_len] for i in s]).long()
        logits = model(input_ids=x).logits
        total += float(F.cross_entropy(logits.reshape(-1, 256).float(), y.reshape(-1),
                                       reduction="sum"))
        count += y.numel()
    model.train(was_training)
    return total / count / LN2


@torch.no_grad()
def greedy(model, prompt: str, n: int) -> str:
    """Greedy-decode ``n`` bytes after ``prompt`` (sliding the context at max positions)."""
    model.eval()
    ids = list(prompt.encode("utf-8"))
    ctx = model.config.max_position_embeddings
    for _ in range(n):
        x = torch.tensor([ids[-ctx:]], dtype=torch.long)
        ids.append(int(model(input_ids=x).logits[0, -1].argmax()))
    return bytes(ids).decode("utf-8", errors="replace")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Train spikeops' tiny default byte-level LLaMA (vocab 256, no "
                    "bos/eos/pad) on the CPython stdlib's top-level *.py files; or, with "
                    "--eval-model, evaluate a saved model.",
        epilog="Data: top-level *.py of sysconfig.get_paths()['stdlib'], sorted by name; every "
               "--holdout-every-th file (index %% n == n-1) is the validation text. Bits per "
               "byte = cross-entropy in nats / ln 2 (one token per byte).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="/tmp/spikeops-default-fp32",
                    help="output directory for save_pretrained() and train_log.json")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0, help="seed for init and batch sampling")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256, help="window length in bytes")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1,
                    help="cosine decays to lr * this at the last step")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--holdout-every", type=int, default=10,
                    help="hold out every n-th file of the sorted list for validation")
    ap.add_argument("--log-every", type=int, default=10, help="progress line interval")
    ap.add_argument("--eval-every", type=int, default=100,
                    help="interval for a quick validation estimate (0 = only at the end)")
    ap.add_argument("--eval-windows", type=int, default=64,
                    help="validation windows for the quick estimate (final eval uses all)")
    ap.add_argument("--heldout-out", default=str(DEFAULT_HELDOUT),
                    help="where to write the ~64 KB held-out sample ('' = don't write)")
    ap.add_argument("--heldout-bytes", type=int, default=65536)
    ap.add_argument("--eval-model", default=None,
                    help="evaluate this saved model directory instead of training")
    ap.add_argument("--eval-text", default=str(DEFAULT_HELDOUT),
                    help="with --eval-model: text file to score (a leading '#' header line "
                         "is skipped)")
    ap.add_argument("--prompt", default="def ", help="with --eval-model: generation prompt")
    ap.add_argument("--gen-bytes", type=int, default=200, help="greedy bytes to generate")
    return ap.parse_args(argv)


def evaluate_saved(args) -> None:
    from transformers import LlamaForCausalLM
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM.from_pretrained(args.eval_model, dtype=torch.float32)
    text = Path(args.eval_text).read_bytes()
    if text.startswith(b"#"):
        text = text[text.index(b"\n") + 1:]
    data = torch.tensor(list(text), dtype=torch.uint8)
    t0 = time.time()
    bpb = eval_bpb(model, data, args.seq_len, args.batch_size)
    n_scored = ((len(data) - 1) // args.seq_len) * args.seq_len
    print(f"eval {args.eval_text}: {n_scored} bytes scored in {args.seq_len}-byte windows, "
          f"bits/byte {bpb:.4f}, per-byte perplexity {2 ** bpb:.3f} "
          f"({time.time() - t0:.1f}s)")
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}")
    print(f"greedy {args.gen_bytes} bytes after {args.prompt!r}:")
    print(greedy(model, args.prompt, args.gen_bytes))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.eval_model:
        evaluate_saved(args)
        return

    import transformers
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    files = stdlib_files()
    train_files, held_files = split_files(files, args.holdout_every)
    train_bytes, val_bytes = concat_bytes(train_files), concat_bytes(held_files)
    train = torch.tensor(list(train_bytes), dtype=torch.uint8)
    val = torch.tensor(list(val_bytes), dtype=torch.uint8)
    uni = unigram_bpb(train, val)
    print(f"data: {sysconfig.get_paths()['stdlib']} (Python {platform.python_version()}): "
          f"{len(train_files)} train files / {len(train)} bytes, {len(held_files)} held-out "
          f"files / {len(val)} bytes; unigram baseline {uni:.4f} bits/byte", flush=True)

    if args.heldout_out:
        n = write_heldout(Path(args.heldout_out), held_files, val_bytes, args.heldout_bytes)
        print(f"wrote {args.heldout_out} ({n} bytes of held-out text + header)", flush=True)

    config = build_config()
    model = LlamaForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator().manual_seed(args.seed)
    fixed_train = torch.randint(0, len(train) - args.seq_len - 1, (256,),
                                generator=torch.Generator().manual_seed(args.seed + 1))
    offs = torch.arange(args.seq_len + 1)
    history = []
    t0 = time.time()
    run_loss, run_n = 0.0, 0
    for step in range(args.steps):
        lr = lr_at(step, args.steps, args.lr, args.warmup, args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq_len - 1, (args.batch_size,),
                               generator=gen)
        chunk = train[starts[:, None] + offs].long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip))
        opt.step()
        run_loss += loss.item()
        run_n += 1
        last = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or last or step == 0:
            avg = run_loss / run_n
            el = time.time() - t0
            line = (f"step {step + 1:5d}/{args.steps}  loss {avg:.4f}  bpb {avg / LN2:.4f}  "
                    f"lr {lr:.2e}  gnorm {gnorm:.2f}  elapsed {el:7.1f}s  "
                    f"({el / (step + 1):.2f}s/step)")
            rec = {"step": step + 1, "train_loss": avg, "train_bpb": avg / LN2,
                   "lr": lr, "elapsed_s": el}
            if args.eval_every and ((step + 1) % args.eval_every == 0) and not last:
                vb = eval_bpb(model, val, args.seq_len, args.batch_size, args.eval_windows)
                line += f"  val_bpb~ {vb:.4f} ({args.eval_windows} windows)"
                rec["val_bpb_estimate"] = vb
            print(line, flush=True)
            history.append(rec)
            run_loss, run_n = 0.0, 0
    train_time = time.time() - t0

    print("final evaluation ...", flush=True)
    final_train = eval_windows_bpb(model, train, fixed_train, args.seq_len, args.batch_size)
    final_val = eval_bpb(model, val, args.seq_len, args.batch_size)
    sample = greedy(model, args.prompt, args.gen_bytes)
    wall = time.time() - t_start
    print(f"final: train bpb {final_train:.4f} (256 fixed windows), val bpb {final_val:.4f} "
          f"(all {(len(val) - 1) // args.seq_len} held-out windows), unigram {uni:.4f}, "
          f"val per-byte perplexity {2 ** final_val:.3f}; training {train_time:.1f}s, "
          f"wall {wall:.1f}s", flush=True)
    print(f"greedy sample after {args.prompt!r}:\n{sample}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes "dtype"; also write "torch_dtype" for transformers 4 readers.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.setdefault("torch_dtype", "float32")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    log = {
        "args": vars(args),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "config": cfg,
        "parameters": n_params,
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "tokenization": "one token per UTF-8 byte (id = byte value), vocab 256; "
                        "bos/eos/pad not used",
        "final_train_bpb": final_train,
        "final_val_bpb": final_val,
        "val_perplexity_per_byte": 2 ** final_val,
        "unigram_baseline_val_bpb": uni,
        "train_time_s": train_time,
        "wall_time_s": wall,
        "greedy_sample": {"prompt": args.prompt, "text": sample},
        "history": history,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "data": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "selection": f"top-level *.py sorted by name; index % {args.holdout_every} == "
                         f"{args.holdout_every - 1} held out",
            "train_bytes": len(train), "heldout_bytes": len(val),
            "train_files": [p.name for p in train_files],
            "heldout_files": [p.name for p in held_files],
        },
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved model and train_log.json to {out}", flush=True)


if __name__ == "__main__":
    main()
