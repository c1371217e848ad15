"""``tq_dequantize_paged`` / ``tq_dequantize``: TurboQuant slots back to dense K and V.

Both are ``torch.library`` custom ops (``tq::dequantize_paged``, ``tq::dequantize``) returning new
tensors, with fake implementations so torch.compile sees their shapes.
"""

from __future__ import annotations

import torch
import triton

from tq_core.formats import KVFormat
from tq_kernels._format import kernel_format, rotation_for
from tq_kernels._kernels.dequant import _tq_dequant_kernel
from tq_kernels.ops._registry import format_key, lookup_format
from tq_kernels.ops._slot_checks import (
    FLOAT_DTYPES,
    check_cache,
    check_devices,
    check_format,
    check_last_dim_contiguous,
    check_slot_mapping,
    check_tensor,
    field_constexprs,
)
from tq_kernels.tuning import rotation_dot_precision

__all__ = ["tq_dequantize_paged", "tq_dequantize"]

_BLOCK_N = 16  # (token, head) rows per program; tl.dot's smallest M
_NUM_WARPS = 4


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(t) for t in FLOAT_DTYPES)
        raise ValueError(f"dtype must be one of {names}, got {dtype!r}")
    return dtype


def _launch(
    cache: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    num_tokens: int,
    fmt: KVFormat,
    layer: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode into new `[num_tokens, num_kv_heads, head_dim]` tensors from a paged cache `[num_blocks,
    num_kv_heads, block_size, slot_bytes]`, or without ``slot_mapping`` from contiguous slots viewed as
    `[num_tokens, 1, 1, slot_bytes]`."""
    num_heads = cache.shape[1]
    shape = (num_tokens, num_heads, fmt.head_dim)
    key = torch.empty(shape, dtype=dtype, device=cache.device)
    value = torch.empty(shape, dtype=dtype, device=cache.device)
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return key, value
    kf = kernel_format(fmt)
    k_lut, v_lut = kf.centroids(cache.device)
    block_size = cache.shape[2]
    fields = field_constexprs(fmt, block_size if slot_mapping is not None else None)
    _tq_dequant_kernel[(triton.cdiv(num_rows, _BLOCK_N), 2)](
        cache,
        slot_mapping if slot_mapping is not None else cache,
        rotation_for(fmt, layer, cache.device),
        k_lut,
        v_lut,
        key,
        value,
        num_rows,
        num_heads,
        cache.shape[0] * block_size,
        block_size,
        cache.stride(0),
        cache.stride(1),
        HAS_SLOT_MAPPING=slot_mapping is not None,
        HEAD_DIM=kf.head_dim,
        BLOCK_D=max(16, kf.block_d),
        BLOCK_N=_BLOCK_N,
        K_BITS=kf.key.bits,
        K_NORM=kf.key.norm_code,
        V_BITS=kf.value.bits,
        V_NORM=kf.value.norm_code,
        DOT_PRECISION=rotation_dot_precision(cache.device),
        num_warps=_NUM_WARPS,
        **{k: v for k, v in fields.items() if k.startswith(("K_", "V_"))},
    )
    return key, value


# -- custom ops -------------------------------------------------------------------------------------
@torch.library.custom_op("tq::dequantize_paged", mutates_args=())
def _dequantize_paged_op(
    cache: torch.Tensor, slot_mapping: torch.Tensor, fmt_key: str, layer: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(cache, slot_mapping, slot_mapping.shape[0], lookup_format(fmt_key), layer, dtype)


@_dequantize_paged_op.register_fake
def _(
    cache: torch.Tensor, slot_mapping: torch.Tensor, fmt_key: str, layer: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (slot_mapping.shape[0], cache.shape[1], lookup_format(fmt_key).head_dim)
    return cache.new_empty(shape, dtype=dtype), cache.new_empty(shape, dtype=dtype)


@torch.library.custom_op("tq::dequantize", mutates_args=())
def _dequantize_op(
    slots: torch.Tensor, fmt_key: str, layer: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = lookup_format(fmt_key)
    flat = slots.reshape(-1, 1, 1, fmt.slot_bytes)  # every slot its own block of one token and one head
    key, value = _launch(flat, None, flat.shape[0], fmt, layer, dtype)
    shape = (*slots.shape[:-1], fmt.head_dim)
    return key.view(shape), value.view(shape)


@_dequantize_op.register_fake
def _(slots: torch.Tensor, fmt_key: str, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*slots.shape[:-1], lookup_format(fmt_key).head_dim)
    return slots.new_empty(shape, dtype=dtype), slots.new_empty(shape, dtype=dtype)


# -- public API -------------------------------------------------------------------------------------
def tq_dequantize_paged(
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: KVFormat,
    *,
    layer: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the K and V of ``slot_mapping``'s slots from a paged TurboQuant cache.

    ``x = gamma * R^T c[codes]``, as ``fmt.decode`` (the tq_core reference) computes it.

    Args:
        cache: uint8 `[num_blocks, num_kv_heads, block_size, slot_bytes]` (``fmt.cache_shape``), any
            strides on the first two dims, each (block, head) region contiguous and laid out as
            :meth:`~tq_core.formats.KVFormat.region_offsets` says.
        slot_mapping: int32/int64 `[num_tokens]` slots ``block * block_size + offset``; ``-1`` (or
            anything outside the cache) gives zeros.
        fmt: the cache's :class:`~tq_core.formats.KVFormat`.
        layer: selects the layer's rotation.
        dtype: float16, bfloat16 or float32 output.

    Returns:
        (key, value), each `[num_tokens, num_kv_heads, head_dim]` of ``dtype``, contiguous.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_4bit_nc", 128)
        >>> cache = fmt.allocate_cache(num_blocks=4, block_size=16, num_kv_heads=2)
        >>> k, v = tq_dequantize_paged(cache, torch.tensor([0, 17, -1]), fmt)  # doctest: +SKIP
        >>> k.shape  # doctest: +SKIP
        torch.Size([3, 2, 128])
    """
    fmt = check_format(fmt, layer)
    cache = check_cache(cache, fmt)
    slot_mapping = check_slot_mapping(slot_mapping)
    dtype = _check_dtype(dtype)
    check_devices(cache=cache, slot_mapping=slot_mapping)
    return _dequantize_paged_op(cache, slot_mapping, format_key(fmt), layer, dtype)


def tq_dequantize(
    slots: torch.Tensor, fmt: KVFormat, *, layer: int = 0, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode contiguous slots `[..., slot_bytes]` into (key, value) `[..., head_dim]` of ``dtype``.

    Equals ``fmt.decode(slots, layer=layer)`` up to float32 rounding and the cast to ``dtype``.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_k3v4_nc", 128)
        >>> slots = fmt.encode(torch.randn(5, 128), torch.randn(5, 128))
        >>> k, v = tq_dequantize(slots, fmt, dtype=torch.float32)  # doctest: +SKIP
        >>> k.shape  # doctest: +SKIP
        torch.Size([5, 128])
    """
    fmt = check_format(fmt, layer)
    slots = check_tensor(slots, "slots", (torch.uint8,))
    if slots.dim() < 1 or slots.shape[-1] != fmt.slot_bytes:
        raise ValueError(
            f"slots must be uint8 [..., slot_bytes={fmt.slot_bytes}] for format "
            f"{fmt.name or '(unnamed)'}, got shape {tuple(slots.shape)}"
        )
    check_last_dim_contiguous(slots, "slots")
    dtype = _check_dtype(dtype)
    check_devices(slots=slots)
    return _dequantize_op(slots, format_key(fmt), layer, dtype)
