"""What the slot launchers (store, dequantize) share: argument checks, raised before a launch, and where
the fields of a row live."""

from __future__ import annotations

import os

import torch
import triton

from tq_core.formats import KVFormat
from tq_kernels._format import kernel_format

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SLOT_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(t).removeprefix("torch.") for t in dtypes)


def check_format(fmt: object, layer: object) -> KVFormat:
    """A KVFormat the kernels support (``kernel_format`` says why not) and a layer index."""
    if not isinstance(fmt, KVFormat):
        raise ValueError(f"fmt must be a tq_core KVFormat, got {type(fmt).__name__}")
    kernel_format(fmt)
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
    """A paged cache `[num_blocks, num_kv_heads, block_size, slot_bytes]` whose (block, head) regions
    are contiguous (the first two dims may have any strides)."""
    cache = check_tensor(cache, "cache", (torch.uint8,))
    if cache.dim() != 4:
        raise ValueError(
            f"cache must be [num_blocks, num_kv_heads, block_size, slot_bytes], got shape {tuple(cache.shape)}"
        )
    if cache.shape[-1] != fmt.slot_bytes:
        raise ValueError(
            f"cache has {cache.shape[-1]} bytes per slot but format {fmt.name or '(unnamed)'} "
            f"needs slot_bytes={fmt.slot_bytes}; was the cache allocated for another format?"
        )
    if (cache.shape[2] > 1 and cache.stride(2) != fmt.slot_bytes) or cache.stride(3) != 1:
        raise ValueError(
            "each (block, head) region of the cache must be contiguous: cache must be [num_blocks, "
            f"num_kv_heads, block_size, slot_bytes] with strides [..., ..., {fmt.slot_bytes}, 1], got "
            f"strides {tuple(cache.stride())}"
        )
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


def field_constexprs(fmt: KVFormat, block_size: int | None) -> dict[str, int]:
    """Kernel constexprs saying where the fields of a row live: ``region + FIELD_OFF + offset * FIELD_ROW``.

    ``block_size`` given: a paged cache, whose (block, head) regions hold arrays of fields
    (:meth:`tq_core.formats.KVFormat.region_offsets`) and then each row's ``PAD_ROW`` unused bytes.
    ``None``: contiguous slots (one per "block" of one token), fields at their offsets in the slot and
    the unused bytes in up to three gaps of it.
    """
    d = fmt.head_dim
    kc, vc = fmt.key.code_bytes(d), fmt.value.code_bytes(d)
    kn, vn = fmt.key.norm_bytes, fmt.value.norm_bytes
    if block_size is None:
        offsets = (fmt.key_code_offset, fmt.value_code_offset, fmt.key_norm_offset, fmt.value_norm_offset)
        gaps = (
            (kc + vc, fmt.key_norm_offset),
            (fmt.key_norm_offset + kn, fmt.value_norm_offset),
            (fmt.used_bytes, fmt.slot_bytes),
        )
        pad_off, pad_row = 0, fmt.slot_bytes
    else:
        offsets = fmt.region_offsets(block_size)
        npad = fmt.slot_bytes - kc - vc - kn - vn
        gaps = ((0, npad), (0, 0), (0, 0))
        pad_off, pad_row = offsets[3] + block_size * vn, npad
    out = {
        "K_CODE_OFF": offsets[0],
        "K_CODE_ROW": kc,
        "K_NORM_OFF": offsets[2],
        "K_NORM_ROW": kn,
        "V_CODE_OFF": offsets[1],
        "V_CODE_ROW": vc,
        "V_NORM_OFF": offsets[3],
        "V_NORM_ROW": vn,
    }
    pad = {
        "HAS_PAD": any(b > a for a, b in gaps),
        "PAD_OFF": pad_off,
        "PAD_ROW": pad_row,
        "BLOCK_S": triton.next_power_of_2(max(b for _, b in gaps)),
    }
    for i, (a, b) in enumerate(gaps):
        pad |= {f"G{2 * i}": a, f"G{2 * i + 1}": b}
    return out | pad
