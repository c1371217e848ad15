"""`TurboQuantLayer`: the cache of one attention layer, compressed tokens plus an exact residual window.

Storage of one layer (batch ``B``, ``Hkv`` KV heads, head_dim ``d``)::

    store      a :class:`~tq_hf._store.CompressedStore`: positions [start, n_comp) of every row,
               compressed in one paged cache that tq_kernels' decode kernel reads in place
    residual   model dtype [B, Hkv, R, d] for K and for V: the newest r <= R tokens (positions
               [n_comp, n_comp + r)), exact

New tokens go to the residual window.  When it would hold more than ``R`` tokens, its oldest tokens are
compressed in one batched store (``R // 2`` of them in steady decoding, so one store per ``R // 2``
steps).  The store grows by whole chunks with ~1/8 headroom, or never when ``max_cache_len`` is given.
Sliding-window layers keep only the tokens a future query can still see (``sliding_window +
chunk_tokens``, the extra chunk so that assisted decoding can roll back), dropping whole blocks in place.

The first forward's tokens (the prompt) stay *pending* (the model's own tensors, no copy) until this
layer's attention has run: the ``"turboquant"`` attention then stores them knowing each row's left
padding, so that each row's first real token starts a block; under any other attention they are stored
at the next update of any layer.

K/V reach attention in one of three forms, chosen by the attention implementation (detected on the first
forward): the ``"turboquant"`` attention (:mod:`tq_hf.attention`) gets :class:`CompressedKV`
placeholders from :meth:`TurboQuantLayer.update` and asks the layer what to read: the pending prompt
(:attr:`TurboQuantLayer.pending`), a :class:`DecodeRead` for the decode kernel
(:meth:`TurboQuantLayer.decode_read`), or full tensors (:meth:`TurboQuantLayer.dequantize`); any other
attention gets this layer's K/V dequantized into full tensors from ``update``, one layer at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers.cache_utils import CacheLayerMixin

from tq_core import KVFormat
from tq_hf import _validate as _v
from tq_hf._placeholder import CompressedKV, _tag
from tq_hf._store import CompressedStore, PagedRead

__all__ = ["CompressedKV", "DecodeRead", "TurboQuantLayer"]

Backend = Literal["auto", "torch", "triton"]
ChunkKV = Literal["exact", "compressed"]


@dataclass(frozen=True)
class DecodeRead:
    """What one decode step over a :class:`TurboQuantLayer` reads, from :meth:`TurboQuantLayer.decode_read`.

    Attributes:
        compressed: how tq_kernels' paged decode kernel reads each row's visible compressed tokens, or
            ``None`` when no compressed token is visible.
        residual_k: the exact residual window's keys `[B, Hkv, r, d]` (a view, model dtype).
        residual_v: its values, same shape.
        residual_pos: position of the window's first token (the compressed tokens end there).
        length: tokens in the layer, the new one included: the query sits at ``length - 1``.
        fmt: the layer's format.
        layer_idx: the layer index (the format's rotations depend on it).
    """

    compressed: PagedRead | None
    residual_k: torch.Tensor
    residual_v: torch.Tensor
    residual_pos: int
    length: int
    fmt: KVFormat
    layer_idx: int


# -- one layer --------------------------------------------------------------------------------------
class TurboQuantLayer(CacheLayerMixin):
    """The cache of one attention layer: compressed paged tokens plus an exact residual window.

    Created by :class:`~tq_hf.cache.TurboQuantCache`; see the module docstring for the layout.  What the
    ``"turboquant"`` attention uses: :attr:`pending` and :meth:`flush_pending` (the prompt),
    :meth:`decode_read` (the kernel path), :meth:`dequantize`, :meth:`claim_for_fused_attention`, and the
    layer's configuration (``fmt``, ``num_kv_heads``, ``head_dim``, ``chunk_tokens``,
    ``residual_length``, ``sliding_window``, ``backend``, ``cumulative_length``).
    """

    is_compileable = False
    is_croppable = True

    def __init__(
        self,
        fmt: KVFormat,
        layer_idx: int,
        *,
        num_kv_heads: int,
        sliding_window: int | None = None,
        residual_length: int = 64,
        chunk_tokens: int = 128,
        max_cache_len: int | None = None,
        backend: Backend = "auto",
        fused_attention: bool | None = None,
        chunk_kv: ChunkKV = "exact",
        pending_registry: set[int] | None = None,
    ) -> None:
        super().__init__()
        residual_length, chunk_tokens, max_cache_len = _v.check_layer_args(
            fmt,
            layer_idx,
            num_kv_heads,
            sliding_window,
            residual_length=residual_length,
            chunk_tokens=chunk_tokens,
            max_cache_len=max_cache_len,
            backend=backend,
            fused_attention=fused_attention,
            chunk_kv=chunk_kv,
        )
        self.fmt = fmt
        self.chunk_kv = chunk_kv
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.head_dim = fmt.head_dim
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.residual_length = residual_length
        self.chunk_tokens = chunk_tokens
        self._max_cache_len = max_cache_len
        self._backend_choice = backend
        self.backend: str = "torch"
        self._fused: bool | None = fused_attention
        self._pending_registry = pending_registry if pending_registry is not None else set()
        self._reset_state()

    def _reset_state(self) -> None:
        self.cumulative_length = 0  # tokens seen (n), pending ones included
        self.r = 0  # residual tokens are positions [n_comp, n_comp + r)
        self._store: CompressedStore | None = None  # created with the first tokens
        self.res_k: torch.Tensor | None = None
        self.res_v: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._placeholder: CompressedKV | None = None
        # decode_read's memo: (store version, pads, sliding), whether the kernel can read, the read
        self._read_memo: tuple[Any, bool, PagedRead | None] | None = None
        self.keys = self.values = None
        self.is_initialized = False
        # the exact K/V of the multi-token forward in progress (chunk_kv="exact")
        self.chunk: tuple[torch.Tensor, torch.Tensor] | None = None
        # transformers sets record_past back to False itself (DeferredStopCheck.finish), hence a plain field
        self.record_past = False
        self._crop_floor = 0  # while recording, a crop may go back to this length (see _retain_from)
        self._pending_registry.discard(self.layer_idx)

    def __repr__(self) -> str:
        kind = f"sliding({self.sliding_window})" if self.is_sliding else "full"
        return f"TurboQuantLayer({self.layer_idx}, {kind}, {self.fmt.name or self.fmt.describe()})"

    # -- the compressed store, read-only views ---------------------------------------------------------
    @property
    def store(self) -> CompressedStore:
        """The compressed tokens (created by the first update)."""
        if self._store is None:
            raise RuntimeError(f"TurboQuantCache layer {self.layer_idx} has not stored any token yet")
        return self._store

    @property
    def start(self) -> int:
        """Oldest position kept (it only moves for sliding-window layers)."""
        return self._store.start if self._store is not None else 0

    @property
    def n_comp(self) -> int:
        """Compressed tokens are positions ``[start, n_comp)``."""
        return self._store.end if self._store is not None else 0

    @property
    def slots(self) -> torch.Tensor | None:
        """The paged cache of the compressed tokens (``None`` before the first compression)."""
        return self._store.slots if self._store is not None else None

    @property
    def chunks(self) -> int:
        """Blocks per row of the paged cache."""
        return self._store.chunks if self._store is not None else 0

    @property
    def shift(self) -> list[int]:
        """Per row, the slots its positions are shifted by so that its first real token starts a block."""
        return list(self._store.shift) if self._store is not None else []

    @property
    def capacity(self) -> int:
        """Compressed tokens each row can hold before the storage grows."""
        return self._store.capacity if self._store is not None else 0

    # -- transformers CacheLayerMixin --------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        if d != self.head_dim or h != self.num_kv_heads:
            raise ValueError(
                f"TurboQuantCache layer {self.layer_idx} was built for {self.num_kv_heads} KV heads of "
                f"head_dim {self.head_dim}, got key states {tuple(key_states.shape)}"
            )
        if not key_states.dtype.is_floating_point:
            raise ValueError(f"key states must be floating point, got {key_states.dtype}")
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size = b
        if self._backend_choice == "auto":
            self.backend = "triton" if self.device.type == "cuda" else "torch"
        else:
            self.backend = self._backend_choice
        if self.backend == "triton" and self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"TurboQuantCache layer {self.layer_idx}: the Triton kernels store float16, bfloat16 or "
                f"float32 keys and values, got {self.dtype}; cast the model, or pass backend='torch'"
            )
        res_shape = (b, h, self.residual_length, d)
        self.res_k = torch.empty(res_shape, dtype=self.dtype, device=self.device)
        self.res_v = torch.empty(res_shape, dtype=self.dtype, device=self.device)
        chunk = self.chunk_tokens
        initial: int | None = None
        if self.sliding_window is not None:
            initial = self.sliding_window + 3 * chunk + self.residual_length
        elif self._max_cache_len is not None:
            initial = self._max_cache_len + chunk
        self._store = CompressedStore(
            self.fmt,
            self.layer_idx,
            batch_size=b,
            num_kv_heads=h,
            chunk_tokens=chunk,
            device=self.device,
            backend=self.backend,
            initial_tokens=initial,
        )
        self._read_memo = None
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens `[B, Hkv, T, d]`; return what this layer's attention should read.

        Returns the full (dequantized) K/V of the positions announced by :meth:`get_mask_sizes` for an
        ordinary attention, or :class:`CompressedKV` placeholders once the ``"turboquant"`` attention has
        claimed the layer.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"key and value states must have the same shape, got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}"
            )
        if key_states.shape[0] != self.batch_size:
            raise ValueError(
                f"TurboQuantCache holds a batch of {self.batch_size}, got key states for {key_states.shape[0]}"
            )
        k = key_states.to(self.dtype)
        v = value_states.to(self.dtype)
        self.chunk = None
        self.flush_pending()
        if self.cumulative_length == 0 and self._fused is not False:
            # the prompt: kept as is until this layer's attention has run (see flush_pending)
            self.pending = (k, v)
            self._pending_registry.add(self.layer_idx)
            self.cumulative_length = k.shape[-2]
            if self._fused:
                return self._placeholders()
            return _tag(k, self), v
        full = None
        if not self._fused:
            # Gather before storing: sliding layers may drop old tokens while storing, but the mask of
            # this forward was sized (get_mask_sizes) on the positions held before it.
            pk, pv = self.dequantize()
            full = (torch.cat([pk, k], dim=-2), torch.cat([pv, v], dim=-2))
        self.cumulative_length += k.shape[-2]
        # this forward's attention reads the layer after the store: its first query must find its window
        self._append(k, v, self.cumulative_length, first_query=self.cumulative_length - k.shape[-2])
        if self._fused:
            # a chunk over a filled cache: its attention reads the store, then its own tokens as computed
            self.chunk = (k, v) if self.chunk_kv == "exact" and k.shape[-2] > 1 else None
            return self._placeholders()
        assert full is not None
        return _tag(full[0], self), full[1]

    def _placeholders(self) -> tuple[torch.Tensor, torch.Tensor]:
        ph = self._placeholder
        if ph is None or ph.shape[0] != self.batch_size:
            ph = CompressedKV(self, (self.batch_size, self.num_kv_heads, 0, self.head_dim), self.dtype)
            self._placeholder = ph
        return ph, ph

    def flush_pending(
        self, pads: tuple[int, ...] | None = None, pads_dev: torch.Tensor | None = None
    ) -> None:
        """Store the pending prompt tokens; ``pads`` (left padding per row, from the attention mask)
        lets each row's first real token start a block, so the decode kernel can skip the padding."""
        if self.pending is None:
            return
        k, v = self.pending
        self.pending = None
        self._pending_registry.discard(self.layer_idx)
        self.store.set_shift(pads, pads_dev)
        self._append(k, v, self.cumulative_length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the K/V an ordinary attention receives from :meth:`update`."""
        return self.cumulative_length + query_length - self.start, self.start

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    get_max_cache_shape = get_max_length  # the name before transformers 5.16

    def reset(self) -> None:
        fused = self._fused
        self._reset_state()
        self._fused = fused
        if hasattr(self, "batch_size"):
            del self.batch_size

    def offload(self) -> None:  # offloading would need the slots on the host; not supported
        return None

    def prefetch(self) -> None:
        return None

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None, **kwargs: Any) -> None:
        """Until the next :meth:`crop`, keep every token a crop may roll back to (transformers calls this
        before assisted decoding; 5.25 passes ``recurrent_states_to_keep``).

        As in transformers' own attention layers the count is ignored: it sizes recurrent-state history, and
        this layer has none.  Sliding layers also keep a spare chunk without this call, so transformers
        before 5.14, which never makes it, can still roll back up to ``chunk_tokens`` tokens.
        """
        self.record_past = True
        self._crop_floor = self.cumulative_length

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (0: nothing; a positive value, as in transformers
        4.x, is the length to keep).

        Exact: every token is quantized on its own, so cropping compressed tokens just forgets them.
        """
        self.flush_pending()
        self.chunk = None
        # transformers 5.17 passes a 0-d tensor: kept as one, it would become the length fields, and an
        # in-place `+=` on one would move the others that share it
        tokens_to_remove = int(tokens_to_remove)
        n = self.cumulative_length
        target = max(n + tokens_to_remove, 0) if tokens_to_remove <= 0 else min(tokens_to_remove, n)
        remove = n - target
        if remove > 0 and self.is_initialized:
            # the next query, at position target, must still find its whole window
            if self.is_sliding and max(target + 1 - (self.sliding_window or 0), 0) < self.start:
                raise RuntimeError(
                    f"cannot crop {remove} tokens from sliding-window layer {self.layer_idx}: it only kept "
                    f"positions >= {self.start} (window {self.sliding_window} + {self.chunk_tokens} spare). "
                    "Call cache.activate_past_recording() (transformers >= 5.14) before the steps to roll "
                    f"back, or create the cache with chunk_tokens >= {remove}"
                )
            if remove <= self.r:
                self.r -= remove
            else:
                self.r = 0
                self.store.truncate(target)
            self.cumulative_length = target
        # as in transformers, recording keeps what one crop may undo: the next rollback starts here
        self._crop_floor = self.cumulative_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search: a gather of the compressed bytes, no requantization."""
        if self.is_initialized:
            self._select(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(indices.to(self.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        idx = torch.arange(self.batch_size, device=self.device).repeat_interleave(repeats)
        self._select(idx)

    def _select(self, idx: torch.Tensor) -> None:
        self.flush_pending()
        self.chunk = None
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        self.store.select(idx)
        assert self.res_k is not None and self.res_v is not None
        self.res_k = self.res_k.index_select(0, idx)
        self.res_v = self.res_v.index_select(0, idx)
        self.batch_size = self.store.batch_size
        self._placeholder = None

    # -- memory accounting ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes this layer has allocated (compressed slots and residual window)."""
        total = self._store.nbytes if self._store is not None else 0
        for t in (self.res_k, self.res_v):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    @property
    def used_bytes(self) -> int:
        """Bytes holding live tokens (the rest is preallocated headroom); pending prompt tokens count
        at their full size."""
        if not self.is_initialized:
            return 0
        res = 2 * self.batch_size * self.num_kv_heads * self.r * self.head_dim * self.dtype.itemsize
        if self.pending is not None:
            res += sum(t.numel() * t.element_size() for t in self.pending)
        return self.store.used_bytes + res

    # -- storage -------------------------------------------------------------------------------------
    def _append(
        self, k: torch.Tensor, v: torch.Tensor, total_after: int, *, first_query: int | None = None
    ) -> None:
        """Add new tokens `[B, Hkv, T, d]` (ending at position ``total_after``) to the residual window,
        compressing what overflows it.  A sliding layer keeps every token the query at ``first_query``
        (default: the newest token) can see."""
        seen = total_after if first_query is None else first_query + 1  # positions that query sees
        assert self.res_k is not None and self.res_v is not None
        big_r, r, t = self.residual_length, self.r, k.shape[-2]
        if r + t <= big_r:
            self.res_k[:, :, r : r + t] = k
            self.res_v[:, :, r : r + t] = v
            self.r = r + t
            return
        keep = big_r - big_r // 2  # after a flush, room for R // 2 more tokens
        f = r + t - keep
        f_r = min(f, r)
        f_n = f - f_r
        if f_r:
            self._compress(self.res_k[:, :, :f_r], self.res_v[:, :, :f_r], seen)
        if f_n:
            self._compress(k[:, :, :f_n], v[:, :, :f_n], seen)
        if f_r < r:  # part of the old window survives, then all new tokens (f_n == 0)
            tail = r - f_r
            self.res_k[:, :, :tail] = self.res_k[:, :, f_r:r].clone()
            self.res_v[:, :, :tail] = self.res_v[:, :, f_r:r].clone()
            self.res_k[:, :, tail : tail + t] = k
            self.res_v[:, :, tail : tail + t] = v
            self.r = tail + t
        else:
            self.res_k[:, :, : t - f_n] = k[:, :, f_n:]
            self.res_v[:, :, : t - f_n] = v[:, :, f_n:]
            self.r = t - f_n

    def _retain_from(self, seen: int) -> int:
        """Oldest position a sliding layer must keep for the oldest query still to attend, which sees
        positions ``[0, seen)`` (queries see ``sliding_window`` keys, plus a spare chunk so that a rollback
        of up to ``chunk_tokens`` tokens still finds its window; while recording the past, the window of
        every length down to the last crop's)."""
        assert self.sliding_window is not None
        end = min(seen, self._crop_floor) if self.record_past else seen
        return max(0, end - self.sliding_window - self.chunk_tokens)

    def _compress(self, k: torch.Tensor, v: torch.Tensor, seen: int) -> None:
        """Compress tokens `[B, Hkv, f, d]` at positions [n_comp, n_comp + f) into the store, keeping
        what a query that sees positions ``[0, seen)`` reads (sliding layers)."""
        self.store.append(k, v, self._retain_from(seen) if self.is_sliding else None)

    def dequantize_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed positions [start, n_comp) decoded, `[B, Hkv, n_comp - start, d]` (model dtype)."""
        return self.store.gather(self.dtype)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V at positions [start, n) as full tensors `[B, Hkv, n - start, d]`, as this
        forward's attention reads them: the stored tokens decoded, except a multi-token forward's own
        tokens, which are exact while ``chunk_kv="exact"``."""
        if self.pending is not None:
            return self.pending
        k, v = self._stored()
        chunk = self.chunk
        if chunk is not None:  # the forward's own tokens (chunk_kv="exact") are the newest positions
            t = min(chunk[0].shape[-2], k.shape[-2])
            k = torch.cat([k[:, :, : k.shape[-2] - t], chunk[0][:, :, -t:]], dim=-2)
            v = torch.cat([v[:, :, : v.shape[-2] - t], chunk[1][:, :, -t:]], dim=-2)
        return k, v

    def _stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, n) as stored: the compressed ones decoded, then the residual window."""
        assert self.res_k is not None and self.res_v is not None
        rk, rv = self.res_k[:, :, : self.r], self.res_v[:, :, : self.r]
        if self.n_comp == self.start:
            return rk, rv
        ck, cv = self.dequantize_compressed()
        return torch.cat([ck, rk], dim=-2), torch.cat([cv, rv], dim=-2)

    def claim_for_fused_attention(self) -> None:
        """Called by the turboquant attention: from the next update on, hand out placeholders."""
        if self._fused is None:
            self._fused = True

    # -- what the decode kernel reads ------------------------------------------------------------------
    def decode_read(
        self,
        pads: tuple[int, ...] | None = None,
        pads_dev: torch.Tensor | None = None,
        window: int | None = None,
    ) -> DecodeRead | None:
        """What a decode step (one query per row, at position ``cumulative_length - 1``) reads.

        Args:
            pads: left padding per row (host), or ``None`` when nothing is padded.
            pads_dev: the same on the layer's device.
            window: the attention's sliding window, if any.

        Returns:
            The read, or ``None`` when a row's first visible compressed token does not start a block
            (left padding the storage was not shifted for): the kernel cannot skip it, so the caller
            dequantizes instead.  The kernel's part is memoized until the storage changes.
        """
        if self.pending is not None:
            raise RuntimeError(
                f"TurboQuantCache layer {self.layer_idx}: the prompt is still pending; attend it and call "
                "flush_pending() before reading it for a decode step"
            )
        store = self.store
        if pads is not None and len(pads) != self.batch_size:
            raise ValueError(f"pads has {len(pads)} rows, the layer holds a batch of {self.batch_size}")
        key = (store.version, pads, window is None)
        memo = self._read_memo
        if memo is not None and memo[0] == key:
            ok, read = memo[1], memo[2]
        else:
            ok, read = self._paged_read(store, pads, pads_dev, window)
            self._read_memo = (key, ok, read)
        if not ok:
            return None
        assert self.res_k is not None and self.res_v is not None
        return DecodeRead(
            compressed=read,
            residual_k=self.res_k[:, :, : self.r],
            residual_v=self.res_v[:, :, : self.r],
            residual_pos=store.end,
            length=self.cumulative_length,
            fmt=self.fmt,
            layer_idx=self.layer_idx,
        )

    def _paged_read(
        self,
        store: CompressedStore,
        pads: tuple[int, ...] | None,
        pads_dev: torch.Tensor | None,
        window: int | None,
    ) -> tuple[bool, PagedRead | None]:
        """(whether the kernel can read this layer, its read: ``None`` when nothing compressed is
        visible); each row's read starts at its first real, kept token."""
        start = store.start
        if store.slots is None or store.end <= start:
            return True, None
        row_pads = pads if pads is not None else (0,) * self.batch_size
        # A row's first visible slot must start a block; for a sliding layer the oldest kept token may
        # not, but the kernel's window never reaches back to it (a spare chunk is kept before the window).
        ok = all(
            store.starts_block(row, max(p, start)) or (window is not None and max(p, start) == start)
            for row, p in enumerate(row_pads)
        )
        if not ok:
            return False, None
        first = torch.full((self.batch_size,), start, device=store.device, dtype=torch.int64)
        if pads is not None and pads_dev is not None:
            first = torch.maximum(first, pads_dev.to(device=store.device, dtype=torch.int64))
        return True, store.paged_read(first)
