"""Shared builders for kernel tests: random paged caches filled through the tq_core reference."""

from __future__ import annotations

import torch

from tq_core.formats import KVFormat
from tq_core.testing import poisoned


def make_paged(
    fmt: KVFormat,
    lens: list[int],
    num_kv_heads: int,
    page: int,
    *,
    seed: int = 0,
    spare_blocks: int = 3,
    layer: int = 0,
):
    """A cache holding random K/V for sequences of ``lens`` tokens, blocks scattered at random."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max((n + page - 1) // page for n in lens))
    nblocks = len(lens) * max_blocks + spare_blocks
    table = torch.randperm(nblocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    cache = poisoned(fmt.cache_shape(nblocks, page, num_kv_heads), dtype=torch.uint8)
    keys, values = [], []
    for b, n in enumerate(lens):
        k = torch.randn(n, num_kv_heads, fmt.head_dim, generator=g) * 2
        v = torch.randn(n, num_kv_heads, fmt.head_dim, generator=g)
        pos = torch.arange(n)
        fmt.store_paged(cache, k, v, table[b][pos // page] * page + pos % page, layer=layer)
        keys.append(k)
        values.append(v)
    return cache, table.to(torch.int32), keys, values
