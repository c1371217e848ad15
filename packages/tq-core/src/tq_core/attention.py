"""Reference attention (float32 torch) over plain tensors and over a compressed paged cache.

The one definition of the attention math every kernel is compared with: grouped-query heads, causal
masks with an offset, sliding windows, explicit masks (a vision-language model's bidirectional image
ranges), logit soft-capping and attention sinks.

Conventions (as in vLLM): a query at absolute position ``p`` sees key ``j`` iff ``j <= p`` (causal) and
``p - j < sliding_window`` (when set); ``softcap`` maps a score ``s`` to ``softcap * tanh(s / softcap)``;
``sinks`` `[num_heads]` are extra logits that join each softmax denominator but carry no value.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from tq_core._validate import check_float_tensor
from tq_core.formats import KVFormat

__all__ = [
    "attention_ref",
    "mm_prefix_key_end",
    "mm_prefix_mask",
    "paged_decode_attention_ref",
    "paged_extend_attention_ref",
]

#: A request's bidirectional media ranges: inclusive absolute ``(start, end)`` token positions, as vLLM's
#: ``CommonAttentionMetadata.mm_req_doc_ranges`` holds them (ranges with ``start >= end`` are ignored).
MediaRanges = Sequence[tuple[int, int]]


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be [tokens, heads, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head_dim differ: {q.shape[-1]} vs {k.shape[-1]}")
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv:
        raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({hkv})")
    return h // hkv


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_offset: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one sequence in float32.

    Args:
        q: `[num_q, num_heads, d]`.
        k, v: `[num_k, num_kv_heads, d]`; ``num_heads % num_kv_heads == 0`` (GQA).
        scale: score scale, default ``d ** -0.5``.
        causal: mask keys after the query's position.
        q_offset: absolute position of ``q[0]``; default ``num_k - num_q`` (queries are the last tokens).
        sliding_window: keys with ``p - j >= sliding_window`` are masked.
        softcap: tanh soft-capping of scores.
        sinks: `[num_heads]` sink logits.
        mask: bool `[num_q, num_k]`, True where a query may see a key; it is combined (and) with the causal
            and sliding-window masks, so a pattern that looks ahead (the bidirectional image range of a
            vision-language model's prefix) is given with ``causal=False``.

    Returns:
        float32 `[num_q, num_heads, d]`.

    Non-finite inputs propagate, they are never zeroed: the output of a query (one head) is NaN when
    the query, or a key or value it can see, holds a NaN or an Inf; a NaN or +Inf sink makes its whole
    head NaN.  Keys and values a query cannot see (causal mask, sliding window, ``mask``) never affect
    it.  A query that sees no key at all (a sliding window past every key) outputs 0, whatever it holds,
    as the kernels do; with ``sinks`` its weight goes to the sink, which carries no value: 0 as well.

    Example:
        >>> q, k = torch.randn(3, 4, 16), torch.randn(10, 2, 16)
        >>> attention_ref(q, k, k).shape
        torch.Size([3, 4, 16])
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(t, name)
    group = _check_heads(q, k, v)
    nq, h, d = q.shape
    nk = k.shape[0]
    scale = d**-0.5 if scale is None else scale
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if sinks is not None and sinks.shape != (h,):
        raise ValueError(f"sinks must be [num_heads={h}], got {tuple(sinks.shape)}")
    if mask is not None and (mask.shape != (nq, nk) or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor [num_q={nq}, num_k={nk}] (True: the query sees the key), got "
            f"{mask.dtype} {tuple(mask.shape)}"
        )
    off = nk - nq if q_offset is None else q_offset
    pos = off + torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    explicit = mask
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        mask &= j <= pos
    if sliding_window is not None:
        mask &= (pos - j) < sliding_window
    if explicit is not None:
        mask &= explicit.to(q.device)
    # Non-finite inputs: computed as zeros (so a masked key's NaN cannot leak in through 0 * NaN), then
    # the rows that saw them are set to NaN.
    q32, bad_q = _finite_rows(q.to(torch.float32))  # [nq, h, d], [nq, h]
    k32, bad_k = _finite_rows(k.to(torch.float32).repeat_interleave(group, dim=1))
    v32, bad_v = _finite_rows(v.to(torch.float32).repeat_interleave(group, dim=1))
    s = torch.einsum("qhd,khd->hqk", q32, k32) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(torch.float32).to(q.device)[:, None, None].expand(h, nq, 1)
        p = torch.softmax(torch.cat([s, sink_col], dim=-1), dim=-1)[..., :nk]
    else:
        p = torch.softmax(s, dim=-1)
        # a query with no visible key: softmax over nothing is 0/0; it outputs 0
        p = p.masked_fill(~mask.any(-1)[None, :, None], 0.0)
    out = torch.einsum("hqk,khd->qhd", p, v32)
    seen_bad = (mask[None] & (bad_k | bad_v).T[:, None, :]).any(-1).T  # [nq, h]
    poisoned = seen_bad | (bad_q & mask.any(-1)[:, None])
    return out.masked_fill(poisoned[..., None], float("nan"))


def _finite_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` `[n, h, d]` with its non-finite vectors zeroed, and which vectors those were `[n, h]`."""
    bad = ~torch.isfinite(x).all(-1)
    return x.masked_fill(bad[..., None], 0.0), bad


def _check_paged_args(cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor, batch: int) -> None:
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [batch={batch}, max_blocks], got {tuple(block_table.shape)}")
    if lens.dim() != 1 or lens.shape[0] != batch:
        raise ValueError(f"sequence lengths must be [batch={batch}], got {tuple(lens.shape)}")
    if bool((lens < 0).any()) or bool((lens > block_table.shape[1] * cache.shape[2]).any()):
        raise ValueError("sequence lengths must be in 0..max_blocks*block_size")


def paged_decode_attention_ref(
    q: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    fmt: KVFormat,
    *,
    layer: int = 0,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step over a compressed paged cache.

    Args:
        q: `[batch, num_heads, d]`, the query of each sequence's last token (already in the cache).
        cache: uint8 `[num_blocks, num_kv_heads, block_size, slot_bytes]` (see :class:`~tq_core.formats.KVFormat`).
        block_table: int `[batch, max_blocks]`.
        seq_lens: int `[batch]`, tokens in each sequence including the current one.
        fmt: the cache's :class:`~tq_core.formats.KVFormat`.

    Returns:
        float32 `[batch, num_heads, d]`.
    """
    check_float_tensor(q, "q")
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, head_dim], got {tuple(q.shape)}")
    _check_paged_args(cache, block_table, seq_lens, q.shape[0])
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        if n == 0:
            continue
        k, v = fmt.gather_paged(cache, block_table[b], n, layer=layer)
        out[b] = attention_ref(
            q[b : b + 1],
            k,
            v,
            scale=scale,
            causal=True,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=sinks,
        )[0]
    return out


def paged_extend_attention_ref(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    fmt: KVFormat,
    *,
    layer: int = 0,
    scale: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    mm_ranges: Sequence[MediaRanges] | None = None,
) -> torch.Tensor:
    """Causal attention of new chunks over their compressed prefix plus their own exact K/V.

    Sequence ``b`` owns queries ``query_start_loc[b]:query_start_loc[b+1]`` at absolute positions
    ``prefix_lens[b] + i``; its first ``prefix_lens[b]`` tokens are read from the cache, the chunk's
    keys and values come from ``k_new``/``v_new`` unquantized.

    Args:
        q: `[total_q, num_heads, d]`.
        k_new, v_new: `[total_q, num_kv_heads, d]`.
        cache, block_table, fmt, layer: as for :func:`paged_decode_attention_ref`.
        prefix_lens: int `[batch]`.
        query_start_loc: int `[batch + 1]`, cumulative chunk lengths starting at 0.
        mm_ranges: optional, per sequence, its bidirectional media ranges (:data:`MediaRanges`): a query
            inside a range also sees every key of that range (:func:`mm_prefix_mask`).

    Returns:
        float32 `[total_q, num_heads, d]`.
    """
    check_float_tensor(q, "q")
    _check_heads(q, k_new, v_new)
    if k_new.shape[0] != q.shape[0]:
        raise ValueError("k_new/v_new must have one row per query token")
    batch = prefix_lens.shape[0]
    if query_start_loc.shape != (batch + 1,) or int(query_start_loc[-1]) != q.shape[0]:
        raise ValueError(f"query_start_loc must be [batch+1] cumulative lengths ending at {q.shape[0]}")
    _check_paged_args(cache, block_table, prefix_lens, batch)
    if mm_ranges is not None and len(mm_ranges) != batch:
        raise ValueError(
            f"mm_ranges must hold one list of ranges per sequence ({batch}), got {len(mm_ranges)}"
        )
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(batch):
        s, e = int(query_start_loc[b]), int(query_start_loc[b + 1])
        n = int(prefix_lens[b])
        if e == s:
            continue
        kp, vp = fmt.gather_paged(cache, block_table[b], n, layer=layer)
        k = torch.cat([kp, k_new[s:e].to(torch.float32)])
        v = torch.cat([vp, v_new[s:e].to(torch.float32)])
        if mm_ranges is not None and mm_ranges[b]:
            mask = mm_prefix_mask(mm_ranges[b], n, e - s, sliding_window=sliding_window, device=q.device)
            out[s:e] = attention_ref(
                q[s:e], k, v, scale=scale, causal=False, mask=mask, softcap=softcap, sinks=sinks
            )
            continue
        out[s:e] = attention_ref(
            q[s:e],
            k,
            v,
            scale=scale,
            causal=True,
            q_offset=n,
            sliding_window=sliding_window,
            softcap=softcap,
            sinks=sinks,
        )
    return out


def mm_prefix_mask(
    ranges: MediaRanges,
    prefix_len: int,
    chunk_len: int,
    *,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Which keys each of a chunk's queries sees in a prefix-LM (vision-language) model.

    ``(causal AND sliding window) OR (query and key inside the same media range)``, vLLM's order (its
    FlexAttention and Triton masks): the chunk's queries sit at positions ``prefix_len + i`` and see
    keys ``0 .. prefix_len + chunk_len - 1``.

    Returns:
        bool `[chunk_len, prefix_len + chunk_len]`, True where the query sees the key.

    Example:
        >>> mm_prefix_mask([(1, 2)], 0, 4).int().tolist()
        [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    if prefix_len < 0 or chunk_len < 0:
        raise ValueError(f"prefix_len and chunk_len must be >= 0, got {prefix_len}, {chunk_len}")
    pos = torch.arange(prefix_len, prefix_len + chunk_len, device=device)[:, None]
    j = torch.arange(prefix_len + chunk_len, device=device)[None, :]
    mask = j <= pos
    if sliding_window is not None:
        mask &= (pos - j) < sliding_window
    for start, end in _valid_ranges(ranges):
        mask |= (pos >= start) & (pos <= end) & (j >= start) & (j <= end)
    return mask


def mm_prefix_key_end(
    ranges: Sequence[MediaRanges], query_start_loc: Sequence[int], prefix_lens: Sequence[int]
) -> list[int] | None:
    """Each chunk query's exclusive end of visible chunk keys (the extend kernel's ``key_end``), or None
    when no media range reaches past a query of these chunks (then plain causal attention is exact).

    Query ``i`` of sequence ``b`` (absolute position ``p = prefix_lens[b] + i``) inside a range
    ``[start, end]`` sees the chunk's keys up to ``end`` (clamped to the chunk), else up to itself: with
    causality that is exactly :func:`mm_prefix_mask`, since a range's keys before ``p`` are visible anyway.
    With a sliding window it equals the mask for ranges no longer than the window (vLLM drops longer
    ones for models that do not clamp them in the kernel).

    Args:
        ranges: per sequence, its media ranges (:data:`MediaRanges`).
        query_start_loc: host ints `[batch + 1]`, cumulative chunk lengths from 0.
        prefix_lens: host ints `[batch]`, tokens cached before each chunk.

    Example:
        >>> mm_prefix_key_end([[(1, 2)]], [0, 4], [0])
        [1, 3, 3, 4]
    """
    batch = len(prefix_lens)
    if len(ranges) != batch or len(query_start_loc) != batch + 1:
        raise ValueError(
            f"ranges ({len(ranges)}) and prefix_lens ({batch}) need one entry per sequence and "
            f"query_start_loc {batch + 1} offsets, got {len(query_start_loc)}"
        )
    key_end: list[int] | None = None
    for b in range(batch):
        start_q, q_len, prefix = (
            int(query_start_loc[b]),
            int(query_start_loc[b + 1] - query_start_loc[b]),
            int(prefix_lens[b]),
        )
        for start, end in _valid_ranges(ranges[b]):
            first = max(start - prefix, 0)  # chunk rows inside the range
            last = min(end - prefix, q_len - 1)
            if first >= last:  # no row of this chunk sees past itself
                continue
            if key_end is None:
                key_end = [
                    i + 1
                    for b2 in range(batch)
                    for i in range(int(query_start_loc[b2 + 1] - query_start_loc[b2]))
                ]
            stop = min(end - prefix + 1, q_len)
            for i in range(first, last + 1):
                key_end[start_q + i] = max(key_end[start_q + i], stop)
    return key_end


def _valid_ranges(ranges: MediaRanges) -> list[tuple[int, int]]:
    out = []
    for r in ranges:
        try:
            start, end = (operator.index(x) for x in r)
        except (TypeError, ValueError):
            raise ValueError(f"a media range is a (start, end) pair of ints, got {r!r}") from None
        if start < end:
            out.append((start, end))
    return out
