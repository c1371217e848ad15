"""Prefill chunks over a compressed prefix on FlashAttention: decode the prefix, then attend densely.

A prefill chunk that continues a cached prefix (chunked prefill, prefix-cache hits, and every chunk
that shares a step with running decodes, since those decodes take tokens from the step's budget and
cut the next prompt mid-way) needs attention over the compressed prefix plus its own exact K/V.  The
extend kernel computes that straight from the cache, but ran at ~3.5x FlashAttention's time on the
H200 (``experiments/results/kernels_h200.json``).  Decoding the prefix is cheap by comparison: it
reads the compressed bytes once and writes bf16 once (bandwidth-bound, a few microseconds per
thousand tokens), after which one FlashAttention varlen call does the quadratic part at dense speed.

The result is the same attention as the extend kernel's: the extend kernel dots the rotated query
with the codebook values and rotates the output back; here the prefix is rotated back first
(``tq_dequantize_paged``, the same decode ``fmt.decode`` defines), then rounded to the model's dtype,
which adds a rounding far below the quantization error.

Layout: :func:`plan_prefix_gather` (once per step; all layers of the step share it) places request
``r``'s keys at rows ``cu_k[r] .. cu_k[r+1]`` of a dense buffer, its ``p_r`` prefix tokens first
(decoded from the cache), then its chunk's ``c_r`` new tokens; ``cu_k`` are the FlashAttention key
offsets, and causal masking aligned to the bottom right gives each chunk query its prefix plus the
chunk tokens up to itself.  Everything is computed on the device from sizes the host already knows:
no synchronization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tq_core.formats import KVFormat
from tq_kernels.ops.dequant import tq_dequantize_paged

__all__ = ["PrefixGather", "gather_prefix_kv", "plan_prefix_gather", "prefix_flash_budget"]

_DEFAULT_BUDGET_MB = 1024


def prefix_flash_budget() -> int:
    """Bytes a step may spend on the dense prefix buffers (``TQ_VLLM_PREFIX_FLASH_MB``, default 1024;
    0 turns the path off).  Larger prefills run the extend kernel, which needs no extra memory."""
    raw = os.environ.get("TQ_VLLM_PREFIX_FLASH_MB", str(_DEFAULT_BUDGET_MB))
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise ValueError(f"TQ_VLLM_PREFIX_FLASH_MB must be a non-negative integer (MiB), got {raw!r}")
    return mb << 20


@dataclass(frozen=True)
class PrefixGather:
    """Where each prefill request's keys go in the dense buffer, for one step.

    Attributes:
        prefix_slots: int64 `[total_prefix]`, the cache slot of every prefix token, request by request.
        prefix_rows: int64 `[total_prefix]`, its row in the dense buffer.
        chunk_rows: int64 `[num_chunk_tokens]`, the row of every new (chunk) token, in query order.
        cu_seqlens_k: int32 `[num_requests + 1]`, FlashAttention's key offsets (prefix + chunk).
        num_rows: host int, rows of the dense buffer (prefix plus chunk tokens).
        max_seqlen_k: host int, the longest request's prefix + chunk.
    """

    prefix_slots: torch.Tensor
    prefix_rows: torch.Tensor
    chunk_rows: torch.Tensor
    cu_seqlens_k: torch.Tensor
    num_rows: int
    max_seqlen_k: int


def plan_prefix_gather(
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    *,
    total_prefix: int,
    num_chunk_tokens: int,
    max_seqlen_k: int,
) -> PrefixGather:
    """Plan the dense layout of the prefill requests' keys.

    Args:
        seq_lens: int `[R]` on the device, each request's context including its chunk.
        query_start_loc: int `[R + 1]` on the device, chunk offsets starting at 0.
        block_table: int `[R, max_blocks]`, the requests' kernel block ids.
        block_size: tokens per kernel block of the cache.
        total_prefix: host int, ``sum(seq_lens - chunk lengths)`` (sizes the index tensors).
        num_chunk_tokens: host int, ``query_start_loc[-1]``.
        max_seqlen_k: host int, ``max(seq_lens)``.
    """
    dev = seq_lens.device
    num_req = seq_lens.shape[0]
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).to(torch.int64)
    k_lens = seq_lens.to(torch.int64)
    prefix = k_lens - q_lens
    cu_k = torch.zeros(num_req + 1, dtype=torch.int64, device=dev)
    torch.cumsum(k_lens, 0, out=cu_k[1:])
    req_ids = torch.arange(num_req, device=dev)

    # prefix token i of request r: position pos = i - (start of r's prefix tokens)
    p_req = torch.repeat_interleave(req_ids, prefix, output_size=total_prefix)
    p_start = torch.cumsum(prefix, 0) - prefix
    pos = torch.arange(total_prefix, device=dev) - p_start[p_req]
    blocks = block_table[p_req, pos // block_size].to(torch.int64)
    prefix_slots = blocks * block_size + pos % block_size
    prefix_rows = cu_k[p_req] + pos

    # chunk token t of request r goes after r's prefix
    c_req = torch.repeat_interleave(req_ids, q_lens, output_size=num_chunk_tokens)
    offset = torch.arange(num_chunk_tokens, device=dev) - query_start_loc[c_req].to(torch.int64)
    chunk_rows = cu_k[c_req] + prefix[c_req] + offset
    return PrefixGather(
        prefix_slots=prefix_slots,
        prefix_rows=prefix_rows,
        chunk_rows=chunk_rows,
        cu_seqlens_k=cu_k.to(torch.int32),
        num_rows=total_prefix + num_chunk_tokens,
        max_seqlen_k=max_seqlen_k,
    )


def gather_prefix_kv(
    plan: PrefixGather,
    cache: torch.Tensor,
    fmt: KVFormat,
    layer: int,
    key: torch.Tensor,
    value: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K and V `[plan.num_rows, num_kv_heads, head_dim]` (``key``'s dtype): each request's
    prefix decoded from ``cache``, followed by its chunk's ``key`` / ``value`` rows."""
    shape = (plan.num_rows, key.shape[1], key.shape[2])
    dense_k = torch.empty(shape, dtype=key.dtype, device=key.device)
    dense_v = torch.empty(shape, dtype=value.dtype, device=value.device)
    if plan.prefix_slots.numel():
        pk, pv = tq_dequantize_paged(cache, plan.prefix_slots, fmt, layer=layer, dtype=key.dtype)
        dense_k.index_copy_(0, plan.prefix_rows, pk)
        dense_v.index_copy_(0, plan.prefix_rows, pv)
    dense_k.index_copy_(0, plan.chunk_rows, key)
    dense_v.index_copy_(0, plan.chunk_rows, value)
    return dense_k, dense_v
