"""``tq_store_paged`` / ``tq_store``: encode K and V into TurboQuant slots in one fused launch.

Both are ``torch.library`` custom ops (``tq::store_paged``, ``tq::store``) that mutate their cache, so
torch.compile and CUDA graphs treat them as opaque, shape-preserving writes.
"""

from __future__ import annotations

import torch
import triton

from tq_core.formats import KVFormat
from tq_core.quantizers import GAIN_GRID
from tq_kernels._format import gain_table, kernel_format, rotation_for
from tq_kernels._kernels.store import _tq_store_kernel
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
from tq_kernels.tuning import LaunchConfig, launch_key, lookup_launch, rotation_dot_precision, store_config

__all__ = ["tq_store_paged", "tq_store"]

# input coordinates per rotation product: a [32, 128] float32 tile is 32 registers a thread at 4 warps
_K_CHUNK = 32


def _check_kv(key: object, value: object, fmt: KVFormat) -> tuple[torch.Tensor, torch.Tensor]:
    key = check_tensor(key, "key", FLOAT_DTYPES)
    value = check_tensor(value, "value", FLOAT_DTYPES)
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key.dim() < 1 or key.shape[-1] != fmt.head_dim:
        raise ValueError(
            f"key and value must have last dimension head_dim={fmt.head_dim} of format "
            f"{fmt.name or '(unnamed)'}, got shape {tuple(key.shape)}"
        )
    check_last_dim_contiguous(key, "key")
    check_last_dim_contiguous(value, "value")
    return key, value


def _check_store_config(config: object) -> LaunchConfig:
    if not isinstance(config, LaunchConfig):
        raise ValueError(
            f"config must be a tq_kernels.tuning.LaunchConfig or None, got {type(config).__name__}"
        )
    if config.block_n < 16 or config.block_n & (config.block_n - 1):  # rows of a tl.dot tile
        raise ValueError(f"config.block_n must be a power of two >= 16, got {config.block_n}")
    if config.num_warps < 1 or config.num_stages < 1:
        raise ValueError(
            f"config.num_warps and num_stages must be >= 1, got {config.num_warps}, {config.num_stages}"
        )
    return config


def _launch(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor | None,
    fmt: KVFormat,
    layer: int,
    config: LaunchConfig | None = None,
) -> None:
    """Launch on key/value `[T, H, D]` and a paged cache `[num_blocks, H, block_size, slot_bytes]`, or
    without ``slot_mapping`` on contiguous slots viewed as `[T, 1, 1, slot_bytes]`.  ``config``
    overrides :func:`tq_kernels.tuning.store_config`."""
    num_tokens, num_heads, _ = key.shape
    num_rows = num_tokens * num_heads
    if num_rows == 0:
        return
    kf = kernel_format(fmt)
    device = key.device
    k_bnd, v_bnd = kf.boundaries(device)
    k_lut, v_lut = kf.centroids(device)
    block_size = cache.shape[2]
    cfg = config or store_config(num_rows, device)
    block_d = max(16, kf.block_d)
    _tq_store_kernel[(triton.cdiv(num_rows, cfg.block_n), 2)](
        key,
        value,
        cache,
        slot_mapping if slot_mapping is not None else cache,
        rotation_for(fmt, layer, device),
        k_bnd,
        v_bnd,
        k_lut,
        v_lut,
        gain_table(device),
        num_rows,
        num_heads,
        cache.shape[0] * block_size,
        block_size,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cache.stride(0),
        cache.stride(1),
        HAS_SLOT_MAPPING=slot_mapping is not None,
        HEAD_DIM=kf.head_dim,
        BLOCK_D=block_d,
        BLOCK_N=cfg.block_n,
        K_CHUNK=min(_K_CHUNK, block_d),
        K_BITS=kf.key.bits,
        K_NORM=kf.key.norm_code,
        K_NC=fmt.key.norm_correction,
        K_GS=fmt.key.gain_search,
        V_BITS=kf.value.bits,
        V_NORM=kf.value.norm_code,
        V_NC=fmt.value.norm_correction,
        V_GS=fmt.value.gain_search,
        NUM_GAINS=len(GAIN_GRID),
        DOT_PRECISION=rotation_dot_precision(key.device),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **field_constexprs(fmt, block_size if slot_mapping is not None else None),
    )


# -- custom ops -------------------------------------------------------------------------------------
@torch.library.custom_op("tq::store_paged", mutates_args=("cache",))
def _store_paged_op(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt_key: str,
    layer: int,
    launch: str = "",
) -> None:
    """``launch``: the :func:`~tq_kernels.tuning.launch_key` of a configuration, "" for the tuned one."""
    config = lookup_launch(launch) if launch else None
    _launch(key, value, cache, slot_mapping, lookup_format(fmt_key), layer, config)


@_store_paged_op.register_fake
def _(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt_key: str,
    layer: int,
    launch: str = "",
) -> None:
    return None


@torch.library.custom_op("tq::store", mutates_args=("out",))
def _store_op(key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, fmt_key: str, layer: int) -> None:
    fmt = lookup_format(fmt_key)
    d, s = fmt.head_dim, fmt.slot_bytes
    # Every vector is its own slot: a cache of N blocks of one token and one head, no slot mapping.
    _launch(key.reshape(-1, 1, d), value.reshape(-1, 1, d), out.view(-1, 1, 1, s), None, fmt, layer)


@_store_op.register_fake
def _(key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, fmt_key: str, layer: int) -> None:
    return None


# -- public API -------------------------------------------------------------------------------------
def tq_store_paged(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: KVFormat,
    *,
    layer: int = 0,
    config: LaunchConfig | None = None,
) -> None:
    """Encode K and V of new tokens and write them into a paged TurboQuant cache, in place.

    Matches ``fmt.store_paged(cache, key, value, slot_mapping, layer=layer)`` (the tq_core reference,
    ``nonfinite="propagate"``): a vector holding NaN/Inf is stored with codes 0 and a NaN scale, and
    no other slot changes.

    Args:
        key: `[num_tokens, num_kv_heads, head_dim]` float16/bfloat16/float32, contiguous in the last
            dimension (any strides on the others, e.g. a slice of a fused QKV output).
        value: like ``key`` (same shape; dtype and strides may differ).
        cache: uint8 `[num_blocks, num_kv_heads, block_size, slot_bytes]` (``fmt.cache_shape``), any
            strides on the first two dims, each (block, head) region contiguous and laid out as
            :meth:`~tq_core.formats.KVFormat.region_offsets` says.
        slot_mapping: int32/int64 `[num_tokens]`, slot ``block * block_size + offset`` of every token;
            ``-1`` (and anything outside the cache) is skipped and nothing is written for it.
        fmt: the cache's :class:`~tq_core.formats.KVFormat`.
        layer: selects the layer's rotation.
        config: rows per program (``block_n``, a power of two >= 16), warps and stages to launch with
            instead of :func:`tq_kernels.tuning.store_config`'s (for tuning sweeps; the slots written
            are the same).

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_4bit_nc", 128)
        >>> cache = fmt.allocate_cache(num_blocks=4, block_size=16, num_kv_heads=2)
        >>> k, v = torch.randn(3, 2, 128), torch.randn(3, 2, 128)
        >>> tq_store_paged(k, v, cache, torch.tensor([0, 17, -1]), fmt)  # doctest: +SKIP
    """
    fmt = check_format(fmt, layer)
    key, value = _check_kv(key, value, fmt)
    cache = check_cache(cache, fmt)
    if key.dim() != 3 or key.shape[1] != cache.shape[1]:
        raise ValueError(
            f"key and value must be [num_tokens, num_kv_heads={cache.shape[1]}, {fmt.head_dim}] "
            f"to match the cache, got {tuple(key.shape)}"
        )
    slot_mapping = check_slot_mapping(slot_mapping, key.shape[0])
    check_devices(key=key, value=value, cache=cache, slot_mapping=slot_mapping)
    launch = "" if config is None else launch_key(_check_store_config(config))
    _store_paged_op(key, value, cache, slot_mapping, format_key(fmt), layer, launch)


def tq_store(
    key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, fmt: KVFormat, *, layer: int = 0
) -> torch.Tensor:
    """Encode K and V `[..., head_dim]` into contiguous slots ``out`` `[..., slot_bytes]`, in place.

    The same kernel as :func:`tq_store_paged` (every vector its own slot); equals ``fmt.encode(key,
    value, layer=layer, nonfinite="propagate")``.

    Args:
        key: `[..., head_dim]` float16/bfloat16/float32.
        value: like ``key``.
        out: uint8 `[..., slot_bytes]` (``key``'s leading dims), contiguous.
        fmt: the :class:`~tq_core.formats.KVFormat`.
        layer: selects the layer's rotation.

    Returns:
        ``out``.

    Example:
        >>> from tq_core import named_format
        >>> fmt = named_format("turboquant_3bit_nc", 64)
        >>> k, v = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
        >>> out = torch.empty(2, 4, fmt.slot_bytes, dtype=torch.uint8)
        >>> tq_store(k, v, out, fmt).shape  # doctest: +SKIP
        torch.Size([2, 4, 54])
    """
    fmt = check_format(fmt, layer)
    key, value = _check_kv(key, value, fmt)
    out = check_tensor(out, "out", (torch.uint8,))
    want = (*key.shape[:-1], fmt.slot_bytes)
    if tuple(out.shape) != want:
        raise ValueError(
            f"out must be uint8 {want} (key's leading dims, slot_bytes={fmt.slot_bytes}), "
            f"got {tuple(out.shape)}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    check_devices(key=key, value=value, out=out)
    _store_op(key, value, out, format_key(fmt), layer)
    return out
