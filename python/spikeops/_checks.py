"""Boundary checks of the Python API: every message names the function, the argument, what was
expected and what was given. TypeError for wrong types and dtypes, ValueError for wrong values."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def tensor(fn: str, name: str, value, dtypes: Optional[Iterable[torch.dtype]] = None,
           dim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            want = " or ".join(str(d) for d in dtypes)
            raise TypeError(f"{fn}: {name} must have dtype {want}, got {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{fn}: {name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    return value


def shape(fn: str, name: str, value: torch.Tensor, want: Sequence[int]) -> None:
    if tuple(value.shape) != tuple(want):
        raise ValueError(f"{fn}: {name} must have shape {list(want)}, got {list(value.shape)}")


def integer(fn: str, name: str, value, lo: Optional[int] = None,
            hi: Optional[int] = None) -> int:
    """``value``, an int (not a bool) in ``[lo, hi]`` where those are given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if lo is not None and not lo <= value <= hi:
        raise ValueError(f"{fn}: {name} must be in [{lo}, {hi}], got {value}")
    return value


def choice(fn: str, name: str, value, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{fn}: {name} must be one of {tuple(options)}, got {value!r}")


def dtype(fn: str, name: str, value, options: Sequence[torch.dtype]) -> None:
    if value not in options:
        want = " or ".join(str(d) for d in options)
        raise TypeError(f"{fn}: {name} must be {want}, got {value!r}")


def same_device(fn: str, tensors: dict) -> None:
    """All named tensors (None entries skipped) on one device."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{fn}: {n} must be on the device of {first_name} ({first.device}), "
                             f"got {t.device}")


def token_batches(fn: str, name: str, batches, vocab_size: int) -> list:
    """Batches of token ids: one int64 ``[B, T]`` tensor or an iterable of them, every id in
    ``[0, vocab_size)``. Returns the list of batches."""
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    elif isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"{fn}: {name} must be an int64 [B, T] tensor of token ids or an "
                        f"iterable of them, got {type(batches).__name__}")
    out = list(batches)
    if not out:
        raise ValueError(f"{fn}: {name} must hold at least one batch, got none")
    for i, b in enumerate(out):
        tensor(fn, f"{name}[{i}]", b, (torch.int64,), dim=2)
        if b.numel() and (int(b.min()) < 0 or int(b.max()) >= vocab_size):
            raise ValueError(f"{fn}: {name}[{i}] must hold token ids in [0, {vocab_size}), got "
                             f"values in [{int(b.min())}, {int(b.max())}]")
    return out
