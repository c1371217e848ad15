"""`CompressedStore`: the compressed tokens of one cache layer, for every row of a batch, in one paged cache.

Storage (batch ``B``, ``Hkv`` KV heads)::

    slots      uint8 fmt.cache_shape(B * chunks, chunk_tokens, Hkv)
               a tq_core paged cache; row b owns blocks [b * chunks, (b + 1) * chunks), so each
               sequence's compressed tokens are one contiguous buffer

The store holds positions ``[start, end)`` of every row.  Position ``p`` of row ``b`` lives at row slot
``p - base + shift[b]``, that is at paged-cache slot ``b * chunks * chunk_tokens + p - base + shift[b]``:
``base`` is a multiple of ``chunk_tokens`` (it only moves when old tokens are dropped), and ``shift[b] =
-pad[b] mod chunk_tokens`` puts each row's first real token after left padding at a block boundary.  So
the same bytes are what ``tq_kernels``' paged decode kernel reads, with block table row ``b`` = ``b *
chunks + first_block[b] + [0, 1, ...]`` and no copy (:meth:`CompressedStore.paged_read`).  All reads and
writes go through the paged APIs (``tq_store_paged`` / ``tq_dequantize_paged`` for the Triton backend,
``KVFormat.store_paged`` / ``gather_paged`` for the tq_core reference), whatever the page layout inside a
block.

``slots`` grows by whole chunks with ~1/8 headroom, reallocating (one copy of the compressed bytes) only
when the headroom is used up; the first allocation reserves ``initial_tokens`` when given.  A caller that
keeps only recent tokens (a sliding-window layer) passes the oldest position it still needs to
:meth:`CompressedStore.append`: older whole blocks are then dropped in place before the store grows.

This module holds the only copy of the slot arithmetic; :class:`~tq_hf.layer.TurboQuantLayer` owns one
store per layer and decides what to keep, the store decides where it lives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tq_core import KVFormat

__all__ = ["CompressedStore", "PagedRead"]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@dataclass(frozen=True)
class PagedRead:
    """How ``tq_kernels``' paged decode kernel reads each row's compressed tokens, from
    :meth:`CompressedStore.paged_read` (the kernel's ``cache``, ``block_table``, ``seq_lens`` and
    ``max_seq_len`` arguments).

    Attributes:
        slots: the paged cache, uint8 ``fmt.cache_shape(B * chunks, chunk_tokens, Hkv)``.
        block_table: int32 `[B, chunks]`: row ``b``'s blocks, from the one holding its first read token.
        seq_lens: int32 `[B]`: tokens the kernel reads in row ``b``, counted from the first slot of
            ``block_table[b, 0]`` (a sliding window is counted back from the end).
        max_seq_len: an upper bound of ``seq_lens`` (host int).
    """

    slots: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int


class CompressedStore:
    """Positions ``[start, end)`` of ``batch_size`` rows, compressed in ``fmt`` into one paged cache.

    See the module docstring for the layout.  ``version`` changes whenever what a kernel read would see
    changes (contents range, layout, batch), so callers can memoize :meth:`paged_read`.

    Args:
        fmt: the tq_core format of every token.
        layer_idx: the layer index the format's rotations are drawn for.
        batch_size: rows.
        num_kv_heads: KV heads per token.
        chunk_tokens: tokens per block.
        device: where ``slots`` lives.
        backend: ``"triton"`` (tq_kernels' paged store and dequantize) or ``"torch"`` (tq_core).
        initial_tokens: row slots the first allocation reserves (it holds at least what is stored), or
            ``None`` for one chunk beyond the first store.

    Example:
        >>> import torch
        >>> from tq_core import named_format
        >>> store = CompressedStore(
        ...     named_format("turboquant_4bit_nc", 64), 0, batch_size=2, num_kv_heads=2, chunk_tokens=8
        ... )
        >>> store.set_shift((0, 3), torch.tensor([0, 3]))
        >>> store.append(torch.randn(2, 2, 10, 64), torch.randn(2, 2, 10, 64))
        >>> store.start, store.end, store.shift, store.chunks
        (0, 10, [0, 5], 3)
        >>> store.gather(torch.float32)[0].shape
        torch.Size([2, 2, 10, 64])
    """

    def __init__(
        self,
        fmt: KVFormat,
        layer_idx: int,
        *,
        batch_size: int,
        num_kv_heads: int,
        chunk_tokens: int,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        initial_tokens: int | None = None,
    ) -> None:
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        if batch_size < 1 or num_kv_heads < 1 or chunk_tokens < 1:
            raise ValueError(
                f"batch_size, num_kv_heads and chunk_tokens must be >= 1, got {batch_size}, {num_kv_heads}, "
                f"{chunk_tokens}"
            )
        self.fmt = fmt
        self.layer_idx = layer_idx
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.chunk_tokens = chunk_tokens
        self.device = torch.device(device)
        self.backend = backend
        self.initial_tokens = initial_tokens
        self.slots: torch.Tensor | None = None
        self.chunks = 0  # blocks per row
        self.start = self.end = 0  # stored positions
        self.base = 0  # slot origin, a multiple of chunk_tokens
        self.shift: list[int] = [0] * batch_size
        self.shift_dev = torch.zeros(batch_size, dtype=torch.int64, device=self.device)
        self.version = 0

    def __repr__(self) -> str:
        return (
            f"CompressedStore(layer {self.layer_idx}, {self.batch_size} rows, positions [{self.start}, "
            f"{self.end}), {self.chunks} blocks of {self.chunk_tokens} per row)"
        )

    # -- layout --------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Row slots each row has before the storage grows."""
        return self.chunks * self.chunk_tokens

    @property
    def nbytes(self) -> int:
        """Bytes allocated (live tokens and headroom)."""
        return self.slots.numel() if self.slots is not None else 0

    @property
    def used_bytes(self) -> int:
        """Bytes holding the stored positions."""
        return self.batch_size * (self.end - self.start) * self.num_kv_heads * self.fmt.slot_bytes

    def _slots_needed(self, end: int) -> int:
        """Row slots the longest row needs to hold positions up to ``end``."""
        return end - self.base + max(self.shift)

    def _floor(self, pos: int) -> int:
        return pos // self.chunk_tokens * self.chunk_tokens

    def set_shift(self, pads: Sequence[int] | None, pads_dev: torch.Tensor | None) -> None:
        """Let each row's first real token (after ``pads[b]`` tokens of left padding) start a block; ``None``
        (or no padding) for no shift.  Only while the store is empty: stored tokens would move."""
        if self.end != self.start:
            raise RuntimeError(
                f"layer {self.layer_idx}: the padding shift is chosen before the first store, but "
                f"positions [{self.start}, {self.end}) are stored already"
            )
        c = self.chunk_tokens
        if pads is None or not any(pads) or pads_dev is None:
            self.shift = [0] * self.batch_size
            self.shift_dev = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        else:
            if len(pads) != self.batch_size:
                raise ValueError(f"pads has {len(pads)} rows, the store holds {self.batch_size}")
            self.shift = [(-p) % c for p in pads]
            self.shift_dev = (-pads_dev.to(device=self.device, dtype=torch.int64)) % c
        self.version += 1

    def mapping(self, pos0: int, count: int) -> torch.Tensor:
        """int64 `[B * count]`: the paged-cache slots of positions ``[pos0, pos0 + count)`` of every row
        (row-major), the ``slot_mapping`` of the paged store and dequantize."""
        rows = torch.arange(self.batch_size, device=self.device, dtype=torch.int64) * self.capacity
        first = rows + self.shift_dev + (pos0 - self.base)
        return (first[:, None] + torch.arange(count, device=self.device, dtype=torch.int64)).flatten()

    def starts_block(self, row: int, pos: int) -> bool:
        """Whether position ``pos`` of ``row`` is the first slot of a block."""
        return (pos - self.base + self.shift[row]) % self.chunk_tokens == 0

    def paged_read(self, first: torch.Tensor) -> PagedRead:
        """The decode kernel's view of every row's tokens from position ``first[b]`` (int64 `[B]`, on the
        store's device) to ``end``.  The kernel reads whole blocks from their first slot: when ``first[b]``
        does not start a block (:meth:`starts_block`), the row's read begins up to ``chunk_tokens - 1``
        tokens earlier."""
        if self.slots is None:
            raise RuntimeError(f"layer {self.layer_idx}: nothing is stored yet")
        b, c, dev = self.batch_size, self.chunk_tokens, self.device
        first_block = (first - self.base + self.shift_dev) // c
        rows = torch.arange(b, device=dev, dtype=torch.int64) * self.chunks
        idx = torch.arange(self.chunks, device=dev, dtype=torch.int64)[None, :] + first_block[:, None]
        table = (rows[:, None] + idx.clamp_(max=self.chunks - 1)).to(torch.int32)
        seq_lens = (self.end - self.base + self.shift_dev - first_block * c).clamp_(min=0).to(torch.int32)
        return PagedRead(self.slots, table, seq_lens, self._slots_needed(self.end))

    # -- contents ------------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, keep_from: int | None = None) -> None:
        """Compress tokens `[B, Hkv, f, d]` at positions ``[end, end + f)``.

        ``keep_from``: the oldest position the caller still needs (a sliding-window layer), or ``None``
        to keep everything; tokens before it are not stored, and whole blocks before it are dropped
        before the storage grows.
        """
        f = k.shape[-2]
        pos0 = self.end
        if keep_from is not None:
            if pos0 + f <= keep_from:  # already outside every future window: nothing to keep
                self._forget_all(pos0 + f)
                return
            if pos0 < keep_from:  # keep the tail only; everything stored so far is older
                k, v = k[:, :, keep_from - pos0 :], v[:, :, keep_from - pos0 :]
                self._forget_all(keep_from)
                pos0, f = keep_from, k.shape[-2]
        need = self._slots_needed(pos0 + f)
        if need > self.capacity:
            self._make_room(need, keep_from)
        self._write(k, v, pos0)
        self.end = pos0 + f
        self.version += 1

    def _forget_all(self, pos: int) -> None:
        """Drop every stored position; the next one stored is ``pos``."""
        self.start = self.end = pos
        self.base = self._floor(pos)
        self.version += 1

    def truncate(self, end: int) -> None:
        """Forget positions ``>= end`` (exact: every token is quantized on its own)."""
        if not self.start <= end <= self.end:
            raise ValueError(f"cannot truncate positions [{self.start}, {self.end}) to end at {end}")
        self.end = end
        self.version += 1

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows ``idx`` (int64 `[B']`, on the store's device; repeats allowed), in that order: a gather
        of the compressed bytes."""
        host = idx.tolist()
        if self.slots is not None:
            tail = self.slots.shape[1:]
            rows = self._rows(self.slots)
            self.slots = rows.index_select(0, idx).reshape(len(host) * self.chunks, *tail)
        self.shift = [self.shift[i] for i in host]
        self.shift_dev = self.shift_dev.index_select(0, idx)
        self.batch_size = len(host)
        self.version += 1

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.batch_size, self.chunks, *t.shape[1:])

    def _make_room(self, need: int, keep_from: int | None) -> None:
        """Make every row hold ``need`` row slots: drop blocks older than ``keep_from`` first, then grow."""
        chunk = self.chunk_tokens
        if keep_from is not None and self.slots is not None:
            new_start = max(self.start, min(keep_from, self.end))
            new_base = self._floor(new_start)
            if new_base > self.base:  # drop whole blocks no future read reaches
                skip = (new_base - self.base) // chunk
                rows = self._rows(self.slots)
                rows[:, : self.chunks - skip] = rows[:, skip:].clone()
                need -= new_base - self.base
                self.base, self.start = new_base, new_start
                self.version += 1
            if need <= self.capacity:
                return
        if self.slots is None:
            want = self.initial_tokens if self.initial_tokens is not None else need + chunk
            chunks = _round_up(max(want, need), chunk) // chunk
        else:
            cap = self.capacity
            chunks = _round_up(max(need, cap + max(chunk, cap // 8)), chunk) // chunk
        shape = self.fmt.cache_shape(self.batch_size * chunks, chunk, self.num_kv_heads)
        new = torch.empty(shape, dtype=torch.uint8, device=self.device)
        if self.slots is not None:
            used = -(-self._slots_needed(self.end) // chunk)
            new.view(self.batch_size, chunks, *shape[1:])[:, :used] = self._rows(self.slots)[:, :used]
        self.slots = new
        self.chunks = chunks
        self.version += 1

    def _write(self, k: torch.Tensor, v: torch.Tensor, pos0: int) -> None:
        """Encode `[B, Hkv, f, d]` into positions [pos0, pos0 + f) of every row."""
        assert self.slots is not None
        b, h, f, d = k.shape
        kt = k.transpose(1, 2).reshape(b * f, h, d)
        vt = v.transpose(1, 2).reshape(b * f, h, d)
        mapping = self.mapping(pos0, f)
        if self.backend == "triton":
            from tq_kernels.ops.store import tq_store_paged

            tq_store_paged(kt, vt, self.slots, mapping, self.fmt, layer=self.layer_idx)
        else:
            self.fmt.store_paged(self.slots, kt, vt, mapping, layer=self.layer_idx)

    def gather(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored positions decoded, K and V `[B, Hkv, end - start, d]` in ``dtype``."""
        b, h, d = self.batch_size, self.num_kv_heads, self.fmt.head_dim
        count = self.end - self.start
        if self.slots is None or count == 0:
            empty = torch.empty(b, h, 0, d, dtype=dtype, device=self.device)
            return empty, empty.clone()
        if self.backend == "triton":
            from tq_kernels.ops.dequant import tq_dequantize_paged

            k, v = tq_dequantize_paged(
                self.slots, self.mapping(self.start, count), self.fmt, layer=self.layer_idx, dtype=dtype
            )
            k, v = k.view(b, count, h, d), v.view(b, count, h, d)
        else:
            ks, vs = [], []
            for row in range(b):
                table = torch.arange(self.chunks, device=self.device) + row * self.chunks
                off = self.start - self.base + self.shift[row]
                kr, vr = self.fmt.gather_paged(self.slots, table, off + count, layer=self.layer_idx)
                ks.append(kr[off:])
                vs.append(vr[off:])
            k, v = torch.stack(ks).to(dtype), torch.stack(vs).to(dtype)
        return k.transpose(1, 2), v.transpose(1, 2)
