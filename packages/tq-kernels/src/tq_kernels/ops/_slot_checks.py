"""Argument checks of the slot launchers (store, dequantize): one place for the messages, raised before a launch."""

from __future__ import annotations

import os

import torch

from tq_core.formats import KVFormat

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOT_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in dtypes)


def check_format(fmt: object, layer: object) -> KVFormat:
    if not isinstance(fmt, KVFormat):
        raise ValueError(f"fmt must be a tq_core KVFormat, got {type(fmt).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be an integer >= 0, got {layer!r}")
    return fmt


def check_tensor(x: object, name: str, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {_dtype_names(dtypes)}, got {x.dtype}")
    return x


def check_devices(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and one Triton can run on (CUDA, or the CPU under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if first.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing "
            "triton); move the tensors to a CUDA device to run the compiled kernels"
        )
    if first.type not in ("cpu", "cuda"):
        raise ValueError(
            f"tensors must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), got {first}"
        )
    return first


def check_last_dim_contiguous(x: torch.Tensor, name: str) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(x.stride())}")


def check_cache(cache: object, fmt: KVFormat) -> torch.Tensor:
    cache = check_tensor(cache, "cache", (torch.uint8,))
    if cache.dim() != 4:
        raise ValueError(
            f"cache must be [num_blocks, block_size, num_kv_heads, slot_bytes], got shape {tuple(cache.shape)}"
        )
    if cache.shape[-1] != fmt.slot_bytes:
        raise ValueError(
            f"cache has {cache.shape[-1]} bytes per slot but format {fmt.name or '(unnamed)'} "
            f"needs slot_bytes={fmt.slot_bytes}; was the cache allocated for another format?"
        )
    check_last_dim_contiguous(cache, "cache")
    return cache


def check_slot_mapping(slot_mapping: object, num_tokens: int | None = None) -> torch.Tensor:
    """A 1-D int32/int64 mapping, of ``num_tokens`` entries when given."""
    sm = check_tensor(slot_mapping, "slot_mapping", SLOT_DTYPES)
    if num_tokens is None and sm.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-D [num_tokens], got shape {tuple(sm.shape)}")
    if num_tokens is not None and (sm.dim() != 1 or sm.shape[0] != num_tokens):
        raise ValueError(
            f"slot_mapping must be 1-D [num_tokens={num_tokens}] (one slot per token of key), "
            f"got shape {tuple(sm.shape)}"
        )
    return sm
