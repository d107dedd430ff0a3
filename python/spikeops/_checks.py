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


def integer(fn: str, name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
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
