"""Input checks of the attention launchers: every problem is reported before a launch."""

from __future__ import annotations

import functools

import torch

from tq_core.formats import KVFormat
from tq_kernels import SUPPORTED_HEAD_DIMS

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_INT = (torch.int32, torch.int64)


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 on CPU, where the interpreter runs)."""
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_attention_common(
    q: torch.Tensor, cache: torch.Tensor, fmt: KVFormat, name: str
) -> tuple[int, int, int, int]:
    """Validate queries against the cache and format; returns (rows, num_heads, num_kv_heads, group)."""
    if not isinstance(fmt, KVFormat):
        raise ValueError(f"fmt must be a tq_core KVFormat, got {type(fmt).__name__}")
    if fmt.head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {fmt.head_dim} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{name} must be a [tokens, num_heads, head_dim] tensor")
    if q.dtype not in _FLOAT:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {q.dtype}")
    if q.shape[-1] != fmt.head_dim:
        raise ValueError(f"{name} head_dim {q.shape[-1]} does not match the format's {fmt.head_dim}")
    if not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8 or cache.dim() != 4:
        raise ValueError("cache must be a uint8 tensor [num_blocks, num_kv_heads, block_size, slot_bytes]")
    if cache.shape[-1] != fmt.slot_bytes or cache.stride(3) != 1 or cache.stride(2) != fmt.slot_bytes:
        raise ValueError(
            f"cache must be [num_blocks, num_kv_heads, block_size, {fmt.slot_bytes}] for "
            f"{fmt.name or 'this format'} with each (block, head) region contiguous, got shape "
            f"{tuple(cache.shape)} strides {cache.stride()}"
        )
    if cache.device != q.device:
        raise ValueError(f"{name} is on {q.device} but the cache is on {cache.device}")
    num_heads, num_kv_heads = q.shape[1], cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return q.shape[0], num_heads, num_kv_heads, num_heads // num_kv_heads


def check_paged_cache(cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor, batch: int) -> None:
    """block_table `[batch, max_blocks]` and per-sequence lengths `[batch]`, integer, on the cache's device."""
    for n, t in (("block_table", block_table), ("seq_lens", lens)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _INT:
            raise ValueError(f"{n} must be an int32 or int64 tensor")
        if t.device != cache.device:
            raise ValueError(f"{n} is on {t.device} but the cache is on {cache.device}")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.stride(1) != 1:
        raise ValueError(
            f"block_table must be [batch={batch}, max_blocks] with contiguous rows, got "
            f"{tuple(block_table.shape)}"
        )
    if lens.shape != (batch,):
        raise ValueError(f"sequence lengths must be [batch={batch}], got {tuple(lens.shape)}")
