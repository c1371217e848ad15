"""Argument checks shared by every public entry point (one place for the messages)."""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 1, 8
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_bits(bits: object, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


def check_int(value: object, name: str, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return value


def check_head_dim(d: object, name: str = "d") -> int:
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"{name} must be an integer >= 2, got {d!r}")
    return d


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        allowed = ", ".join(str(t).removeprefix("torch.") for t in _FLOAT_DTYPES)
        raise ValueError(f"{name} must have a floating dtype ({allowed}), got {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    # One reduction instead of a boolean pass: NaN and Inf survive a sum.  A finite tensor whose sum
    # overflows falls through to the exact check.
    if bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{name} contains {bad} non-finite value(s) (NaN or Inf); clean the input, or pass "
            f"nonfinite='propagate' to store a NaN norm for the affected vectors only"
        )


def check_last_dim(x: torch.Tensor, d: int, name: str) -> None:
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"{name} must have last dimension {d} (head_dim), got shape {tuple(x.shape)}")
