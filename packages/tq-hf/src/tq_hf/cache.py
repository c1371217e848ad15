"""`TurboQuantCache`: a transformers `Cache` whose layers keep keys and values TurboQuant-compressed.

Storage of one layer (batch ``B``, ``Hkv`` KV heads, head_dim ``d``)::

    slots      uint8 fmt.cache_shape(B * chunks, chunk_tokens, Hkv)
               a tq_core paged cache; row b owns blocks [b * chunks, (b + 1) * chunks), so each
               sequence's compressed tokens are one contiguous buffer
    residual   model dtype [B, Hkv, R, d] for K and for V: the newest r <= R tokens, exact

Position ``p`` of row ``b`` (compressed tokens are positions [start, n_comp)) lives at slot
``b * chunks * chunk_tokens + p - base + shift[b]`` of that paged cache: ``base`` is a multiple of
``chunk_tokens`` (it only moves for sliding-window layers), ``shift[b] = -pad[b] mod chunk_tokens`` puts
each row's first real token after left padding at a block boundary.  So the same bytes are what
``tq_kernels``' paged decode kernel reads, with block table row ``b = b * chunks + first_block[b] + [0, 1,
...]`` and no copy; all reads and writes go through the paged APIs (``tq_store_paged`` /
``tq_dequantize_paged`` on GPU, ``KVFormat.store_paged`` / ``gather_paged`` on CPU), whatever the page
layout inside a block.

New tokens go to the residual window.  When it would hold more than ``R`` tokens, its oldest tokens are
compressed in one batched store (``R // 2`` of them in steady decoding, so one store per ``R // 2``
steps).  ``slots`` grows by whole chunks with ~1/8 headroom, reallocating (one copy of this layer's
compressed bytes) only when the headroom is used up, or never when ``max_cache_len`` is given.
Sliding-window layers keep only the tokens a future query can still see (``sliding_window +
chunk_tokens``, the extra chunk so that assisted decoding can roll back), compacting whole blocks in
place.

The first forward's tokens (the prompt) stay *pending* (the model's own tensors, no copy) until this
layer's attention has run: the ``"turboquant"`` attention then stores them knowing each row's left
padding; under any other attention they are stored at the next update of any layer.

How a layer hands K/V to attention depends on the attention implementation, detected on the first
forward: the ``"turboquant"`` attention (:mod:`tq_hf.attention`) reads the compressed slots and the
residual directly, so ``update`` returns :class:`CompressedKV` placeholders; any other attention gets
this layer's K/V dequantized into full tensors, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from tq_core import KVFormat
from tq_hf import _validate as _v
from tq_kernels import SUPPORTED_HEAD_DIMS

__all__ = ["CompressedKV", "TurboQuantCache", "TurboQuantLayer", "KERNEL_HEAD_DIMS"]

FormatSpec = str | KVFormat
LayerFormats = Mapping[int, FormatSpec] | Sequence[FormatSpec] | Callable[[int], FormatSpec] | None
Backend = Literal["auto", "torch", "triton"]

# head dims the tq_kernels attention kernels are built for (tq-kernels' one list)
KERNEL_HEAD_DIMS = SUPPORTED_HEAD_DIMS
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


# -- placeholders handed to the turboquant attention ------------------------------------------------
_PLACEHOLDER_OK = {
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,
    torch.Tensor.ndim.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
}


class CompressedKV(torch.Tensor):
    """Stands in for a layer's K or V when they live compressed in a :class:`TurboQuantLayer`.

    Only the ``"turboquant"`` attention function reads it (through ``.tq_layer``).  It has no data
    (``meta`` device, sequence length 0): any other attention implementation that tries to compute with
    it gets an error naming the problem instead of a wrong answer.
    """

    tq_layer: TurboQuantLayer

    @staticmethod
    def __new__(cls, layer: TurboQuantLayer, shape: tuple[int, ...], dtype: torch.dtype) -> CompressedKV:
        t = torch.Tensor._make_subclass(cls, torch.empty(shape, dtype=dtype, device="meta"))
        t.tq_layer = layer
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _PLACEHOLDER_OK:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        layer = next((a.tq_layer for a in args if isinstance(a, CompressedKV)), None)
        idx = layer.layer_idx if layer is not None else "?"
        raise RuntimeError(
            f"TurboQuantCache layer {idx} keeps its keys and values compressed for the 'turboquant' "
            f"attention, but another attention implementation tried to use them "
            f"({getattr(func, '__name__', func)}). Load the model with attn_implementation='turboquant' "
            "(after `import tq_hf`), or create the cache with TurboQuantCache(..., fused_attention=False) so "
            "every layer is dequantized for any attention."
        )


def _tag(t: torch.Tensor, layer: TurboQuantLayer) -> torch.Tensor:
    t.tq_layer = layer  # type: ignore[attr-defined]
    return t


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# -- one layer --------------------------------------------------------------------------------------
class TurboQuantLayer(CacheLayerMixin):
    """The cache of one attention layer: compressed paged slots plus an exact residual window.

    Created by :class:`TurboQuantCache`; see the module docstring for the layout.
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
        )
        self.fmt = fmt
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
        self.start = 0  # compressed tokens are positions [start, n_comp)
        self.n_comp = 0
        self.base = 0  # slot origin (a multiple of chunk_tokens), see the module docstring
        self.r = 0  # residual tokens are positions [n_comp, n_comp + r)
        self.chunks = 0  # blocks per row
        self.slots: torch.Tensor | None = None
        self.res_k: torch.Tensor | None = None
        self.res_v: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.row_pads: tuple[int, ...] | None = None  # left padding the shifts were chosen for
        self.shift: list[int] = []
        self.shift_dev: torch.Tensor | None = None
        self._placeholder: CompressedKV | None = None
        self.kernel_state: dict[str, Any] = {}  # memo of the attention path (block tables), per storage state
        self.keys = self.values = None
        self.is_initialized = False
        # transformers sets record_past back to False itself (DeferredStopCheck.finish), hence a plain field
        self.record_past = False
        self._crop_floor = 0  # while recording, a crop may go back to this length (see _retain_from)
        self._pending_registry.discard(self.layer_idx)

    def __repr__(self) -> str:
        kind = f"sliding({self.sliding_window})" if self.is_sliding else "full"
        return f"TurboQuantLayer({self.layer_idx}, {kind}, {self.fmt.name or self.fmt.describe()})"

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
        self._set_shift(None, None)
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
        self._append(k, v, self.cumulative_length)
        if self._fused:
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
        self._set_shift(pads, pads_dev)
        self._append(k, v, self.cumulative_length)

    def _set_shift(self, pads: tuple[int, ...] | None, pads_dev: torch.Tensor | None) -> None:
        c = self.chunk_tokens
        if pads is None or not any(pads) or pads_dev is None:
            self.row_pads = None
            self.shift = [0] * self.batch_size
            self.shift_dev = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        else:
            self.row_pads = tuple(pads)
            self.shift = [(-p) % c for p in pads]
            self.shift_dev = (-pads_dev.to(device=self.device, dtype=torch.int64)) % c
        self.kernel_state.clear()

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
                self.r, self.n_comp = 0, target
                self.kernel_state.clear()
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
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        host = idx.tolist()
        if self.slots is not None:
            tail = self.slots.shape[1:]
            rows = self.slots.view(self.batch_size, self.chunks, *tail)
            self.slots = rows.index_select(0, idx).reshape(len(host) * self.chunks, *tail)
        assert self.res_k is not None and self.res_v is not None and self.shift_dev is not None
        self.res_k = self.res_k.index_select(0, idx)
        self.res_v = self.res_v.index_select(0, idx)
        self.shift = [self.shift[i] for i in host]
        self.shift_dev = self.shift_dev.index_select(0, idx)
        if self.row_pads is not None:
            self.row_pads = tuple(self.row_pads[i] for i in host)
        self.batch_size = len(host)
        self._placeholder = None
        self.kernel_state.clear()

    # -- memory accounting ---------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes this layer has allocated (compressed slots and residual window)."""
        total = self.slots.numel() if self.slots is not None else 0
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
        b, h = self.batch_size, self.num_kv_heads
        comp = b * (self.n_comp - self.start) * h * self.fmt.slot_bytes
        res = 2 * b * h * self.r * self.head_dim * self.dtype.itemsize
        if self.pending is not None:
            res += sum(t.numel() * t.element_size() for t in self.pending)
        return comp + res

    @property
    def capacity(self) -> int:
        """Compressed tokens each row can hold before the storage grows."""
        return self.chunks * self.chunk_tokens

    # -- storage -------------------------------------------------------------------------------------
    def _append(self, k: torch.Tensor, v: torch.Tensor, total_after: int) -> None:
        """Add new tokens `[B, Hkv, T, d]` (ending at position ``total_after``) to the residual window,
        compressing what overflows it."""
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
            self._compress(self.res_k[:, :, :f_r], self.res_v[:, :, :f_r], total_after)
        if f_n:
            self._compress(k[:, :, :f_n], v[:, :, :f_n], total_after)
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

    def _retain_from(self, total_after: int) -> int:
        """Oldest position a sliding layer must keep (queries see ``sliding_window`` keys, plus a spare
        chunk so that a rollback of up to ``chunk_tokens`` tokens still finds its window; while recording
        the past, the window of every length down to the last crop's)."""
        assert self.sliding_window is not None
        end = min(total_after, self._crop_floor) if self.record_past else total_after
        return max(0, end - self.sliding_window - self.chunk_tokens)

    def _floor(self, p: int) -> int:
        return p // self.chunk_tokens * self.chunk_tokens

    def _compress(self, k: torch.Tensor, v: torch.Tensor, total_after: int) -> None:
        """Compress tokens `[B, Hkv, f, d]` at positions [n_comp, n_comp + f) into the slots."""
        f = k.shape[-2]
        pos0 = self.n_comp
        if self.is_sliding:
            keep_from = self._retain_from(total_after)
            if pos0 + f <= keep_from:  # already outside every future window: nothing to keep
                self.n_comp = self.start = pos0 + f
                self.base = self._floor(self.start)
                self.kernel_state.clear()
                return
            if pos0 < keep_from:  # keep the tail only; everything stored so far is older
                k, v = k[:, :, keep_from - pos0 :], v[:, :, keep_from - pos0 :]
                pos0 = self.n_comp = self.start = keep_from
                self.base = self._floor(keep_from)
                f = k.shape[-2]
        end = pos0 + f - self.base + max(self.shift)  # slots the longest row needs
        if end > self.capacity:
            self._make_room(end, total_after)
        self._store(k, v, pos0 - self.base)
        self.n_comp = pos0 + f
        self.kernel_state.clear()

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(self.batch_size, self.chunks, *t.shape[1:])

    def _make_room(self, end: int, total_after: int) -> None:
        chunk = self.chunk_tokens
        if self.is_sliding and self.slots is not None:
            new_start = max(self.start, min(self._retain_from(total_after), self.n_comp))
            new_base = self._floor(new_start)
            if new_base > self.base:  # drop whole blocks no future window reaches
                skip = (new_base - self.base) // chunk
                live = self.chunks - skip
                rows = self._rows(self.slots)
                rows[:, :live] = rows[:, skip:].clone()
                end -= new_base - self.base
                self.base, self.start = new_base, new_start
            if end <= self.capacity:
                return
        if self.slots is None:
            if self.is_sliding:
                assert self.sliding_window is not None
                want = self.sliding_window + 3 * chunk + self.residual_length
            elif self._max_cache_len is not None:
                want = self._max_cache_len + chunk
            else:
                want = end + chunk
            chunks = _round_up(max(want, end), chunk) // chunk
        else:
            cap = self.capacity
            chunks = _round_up(max(end, cap + max(chunk, cap // 8)), chunk) // chunk
        shape = self.fmt.cache_shape(self.batch_size * chunks, chunk, self.num_kv_heads)
        new = torch.empty(shape, dtype=torch.uint8, device=self.device)
        if self.slots is not None:
            used = -(-(self.n_comp - self.base + max(self.shift)) // chunk)
            new.view(self.batch_size, chunks, *shape[1:])[:, :used] = self._rows(self.slots)[:, :used]
        self.slots = new
        self.chunks = chunks
        self.kernel_state.clear()

    def _mapping(self, slot0: int, count: int) -> torch.Tensor:
        """int64 `[B * count]` paged-cache slots of row slots [slot0, slot0 + count) of every row."""
        assert self.shift_dev is not None
        rows = torch.arange(self.batch_size, device=self.device, dtype=torch.int64) * self.capacity
        first = rows + self.shift_dev + slot0
        return (first[:, None] + torch.arange(count, device=self.device, dtype=torch.int64)).flatten()

    def _store(self, k: torch.Tensor, v: torch.Tensor, slot0: int) -> None:
        """Encode `[B, Hkv, f, d]` into row slots [slot0, slot0 + f) (plus each row's shift)."""
        assert self.slots is not None
        b, f = self.batch_size, k.shape[-2]
        kt = k.transpose(1, 2).reshape(b * f, self.num_kv_heads, self.head_dim)
        vt = v.transpose(1, 2).reshape(b * f, self.num_kv_heads, self.head_dim)
        mapping = self._mapping(slot0, f)
        if self.backend == "triton":
            from tq_kernels.ops.store import tq_store_paged

            tq_store_paged(kt, vt, self.slots, mapping, self.fmt, layer=self.layer_idx)
        else:
            self.fmt.store_paged(self.slots, kt, vt, mapping, layer=self.layer_idx)

    def dequantize_compressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed positions [start, n_comp) decoded, `[B, Hkv, n_comp - start, d]` (model dtype)."""
        assert self.slots is not None
        count = self.n_comp - self.start
        slot0 = self.start - self.base
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        if self.backend == "triton":
            from tq_kernels.ops.dequant import tq_dequantize_paged

            k, v = tq_dequantize_paged(
                self.slots, self._mapping(slot0, count), self.fmt, layer=self.layer_idx, dtype=self.dtype
            )
            k, v = k.view(b, count, h, d), v.view(b, count, h, d)
        else:
            ks, vs = [], []
            for row in range(b):
                table = torch.arange(self.chunks, device=self.device) + row * self.chunks
                off = slot0 + self.shift[row]
                kr, vr = self.fmt.gather_paged(self.slots, table, off + count, layer=self.layer_idx)
                ks.append(kr[off:])
                vs.append(vr[off:])
            k, v = torch.stack(ks).to(self.dtype), torch.stack(vs).to(self.dtype)
        return k.transpose(1, 2), v.transpose(1, 2)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K/V at positions [start, n) as full tensors `[B, Hkv, n - start, d]`."""
        if self.pending is not None:
            return self.pending
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


# -- the cache --------------------------------------------------------------------------------------
def _text_config(config: Any) -> Any:
    if hasattr(config, "config") and not hasattr(config, "num_hidden_layers"):
        config = config.config  # a model
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"TurboQuantCache supports decoder-only models; {getattr(config, 'model_type', '?')} is an "
            "encoder-decoder model"
        )
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    return config


def _model_name(cfg: Any) -> str:
    return str(getattr(cfg, "model_type", None) or type(cfg).__name__)


def _layer_types(cfg: Any) -> list[str]:
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"config of {_model_name(cfg)} has no num_hidden_layers")
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        elif getattr(cfg, "sliding_window", None) is not None:
            types = ["sliding_attention"] * n
        else:
            types = ["full_attention"] * n
    return list(types)


def _check_config(cfg: Any) -> tuple[list[str], int, int, int]:
    """Validate that every layer is attention TurboQuantCache can serve; returns
    (layer_types, num_heads, num_kv_heads, head_dim)."""
    name = _model_name(cfg)
    types = _layer_types(cfg)
    bad = sorted({t for t in types if t not in _SUPPORTED_LAYER_TYPES})
    if bad:
        raise ValueError(
            f"TurboQuantCache cannot serve {name}: layer types {bad} are not supported (supported: "
            f"{list(_SUPPORTED_LAYER_TYPES)})"
        )
    unsupported = {
        "kv_lora_rank": "multi-head latent attention (compressed KV projections)",
        "kv_sharing_modes": "KV sharing between layers",
        "cross_attention_layers": "cross-attention layers",
    }
    for attr, what in unsupported.items():
        if getattr(cfg, attr, None) is not None:
            raise ValueError(f"TurboQuantCache cannot serve {name}: {what} ({attr}) is not supported")
    if getattr(cfg, "num_kv_shared_layers", 0):
        raise ValueError(f"TurboQuantCache cannot serve {name}: KV sharing between layers is not supported")
    if getattr(cfg, "alibi", False) or name in ("bloom", "mpt"):
        raise ValueError(f"TurboQuantCache cannot serve {name}: ALiBi position biases are not supported")
    if getattr(cfg, "is_causal", True) is False:
        raise ValueError(f"TurboQuantCache cannot serve {name}: its attention is not causal")
    num_heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(
            f"TurboQuantCache cannot serve {name}: its config has no attention heads (num_attention_heads)"
        )
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv:
        raise ValueError(
            f"{name}: num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv})"
        )
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    for attr in ("v_head_dim", "global_head_dim"):
        other = getattr(cfg, attr, None)
        if other is not None and other != head_dim:
            raise ValueError(
                f"TurboQuantCache cannot serve {name}: {attr}={other} differs from head_dim={head_dim} "
                "(one head_dim for keys and values of every layer is required)"
            )
    if "sliding_attention" in types and not isinstance(getattr(cfg, "sliding_window", None), int):
        raise ValueError(f"{name} has sliding_attention layers but no integer sliding_window")
    return types, num_heads, num_kv, head_dim


def _check_kernel_format(fmt: KVFormat, where: str) -> None:
    if fmt.head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"{where}: head_dim {fmt.head_dim} has no tq_kernels kernels (supported: {KERNEL_HEAD_DIMS}); "
            "pass backend='torch' for the (slow) tq_core reference path"
        )
    from tq_kernels._format import kernel_format  # the kernels' own check of a format's layout

    try:
        kernel_format(fmt)
    except ValueError as e:
        raise ValueError(f"{where}: {e}; or pass backend='torch' for the tq_core reference path") from e


class TurboQuantCache(Cache):
    """A transformers 5.x `Cache` that keeps keys and values TurboQuant-compressed.

    All but the newest ``residual_length`` tokens of every layer are stored compressed in the given
    tq_core format (``slot_bytes`` per token and KV head, e.g. 134 B instead of 512 B for bf16 at
    head_dim 128); the residual window stays in the model's dtype.  Works with any attention
    implementation (layers are dequantized one at a time); with ``attn_implementation="turboquant"``
    attention reads the compressed bytes directly (fused kernels on GPU).

    Args:
        config: the model's config (or the model); its layer types, heads and head_dim are checked here,
            so an unsupported model fails at creation with an error naming the problem.
        format: a named tq_core format (``tq_core.format_names()``, e.g. ``"turboquant_4bit_nc"``) or a
            `tq_core.KVFormat` for every layer.
        layer_formats: per-layer overrides: a mapping ``{layer_idx: format}`` (indices 0 to
            ``num_hidden_layers - 1``), a sequence with one format per layer, or a callable
            ``layer_idx -> format``.
        residual_length: tokens kept uncompressed per layer (the newest), 0 to
            ``tq_hf.MAX_RESIDUAL_LENGTH`` (65536), and at most the model's ``max_position_embeddings``
            and ``max_cache_len``: the window is allocated in full at the first forward.
        chunk_tokens: granularity of the compressed storage (and the block size the decode kernel
            sees), 1 to ``tq_hf.MAX_CHUNK_TOKENS`` (4096).
        max_cache_len: preallocate compressed storage for this many tokens (>= 1; no reallocation
            below it), or ``None`` to grow as needed.
        backend: ``"triton"`` (tq_kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"torch"``
            (tq_core reference) or ``"auto"`` (triton on CUDA tensors, torch otherwise).
        fused_attention: ``None`` detects whether the model runs the ``"turboquant"`` attention; ``False``
            always hands full dequantized K/V to attention.

    Every argument is checked here: a wrong type raises ``TypeError``, a value out of range
    ``ValueError``, each saying what is allowed.

    Example:
        >>> import torch, tq_hf
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(
        ...     hidden_size=128,
        ...     intermediate_size=256,
        ...     num_hidden_layers=2,
        ...     num_attention_heads=4,
        ...     num_key_value_heads=2,
        ...     head_dim=64,
        ...     vocab_size=128,
        ... )
        >>> model = LlamaForCausalLM(cfg).eval()
        >>> model.set_attn_implementation("turboquant")
        >>> cache = tq_hf.TurboQuantCache(model.config, "turboquant_4bit_nc", residual_length=8)
        >>> ids = torch.randint(0, 128, (1, 20))
        >>> # past_key_values=cache before transformers 5.24
        >>> out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)  # doctest: +SKIP
        >>> cache.get_seq_length()  # doctest: +SKIP
        23
    """

    def __init__(
        self,
        config: Any,
        format: FormatSpec = "turboquant_4bit_nc",
        *,
        layer_formats: LayerFormats = None,
        residual_length: int = 64,
        chunk_tokens: int = 128,
        max_cache_len: int | None = None,
        backend: Backend = "auto",
        fused_attention: bool | None = None,
    ) -> None:
        _v.check_config(config)
        cfg = _text_config(config)
        types, num_heads, num_kv, head_dim = _check_config(cfg)
        residual_length, chunk_tokens, max_cache_len = _v.check_options(
            residual_length=residual_length,
            chunk_tokens=chunk_tokens,
            max_cache_len=max_cache_len,
            backend=backend,
            fused_attention=fused_attention,
            config=cfg,
        )
        check_kernels = backend == "triton" or (backend == "auto" and torch.cuda.is_available())
        if check_kernels:
            _v.check_triton(backend)
        _v.resolve_format(format, head_dim, "format")
        specs = _v.layer_format_specs(format, layer_formats, len(types))
        self.formats: list[KVFormat] = []
        self._pending: set[int] = set()
        layers: list[TurboQuantLayer] = []
        for i, (kind, (spec, where)) in enumerate(zip(types, specs, strict=True)):
            fmt = _v.resolve_format(spec, head_dim, where)
            if check_kernels:
                _check_kernel_format(fmt, f"layer {i} ({_model_name(cfg)})")
            self.formats.append(fmt)
            layers.append(
                TurboQuantLayer(
                    fmt,
                    i,
                    num_kv_heads=num_kv,
                    sliding_window=cfg.sliding_window if kind == "sliding_attention" else None,
                    residual_length=residual_length,
                    chunk_tokens=chunk_tokens,
                    max_cache_len=max_cache_len,
                    backend=backend,
                    fused_attention=fused_attention,
                    pending_registry=self._pending,
                )
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv, head_dim
        self.residual_length = residual_length
        super().__init__(layers=layers)  # type: ignore[arg-type]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V `[B, Hkv, T, d]` of layer ``layer_idx`` (see :meth:`TurboQuantLayer.update`)."""
        if self._pending:
            # a layer whose prompt is still pending after the next layer started: its attention was not
            # the turboquant one, so store the prompt now (no per-row padding shift)
            for idx in [i for i in self._pending if i != layer_idx]:
                self.tq_layers[idx].flush_pending()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def tq_layers(self) -> list[TurboQuantLayer]:
        """The layers, typed."""
        return self.layers  # type: ignore[return-value]

    def flush_pending(self) -> None:
        """Store every layer's pending prompt tokens now."""
        for idx in list(self._pending):
            self.tq_layers[idx].flush_pending()

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers (compressed slots, preallocated headroom and residual windows)."""
        return sum(layer.nbytes for layer in self.tq_layers)

    @property
    def used_bytes(self) -> int:
        """Bytes holding live tokens."""
        return sum(layer.used_bytes for layer in self.tq_layers)

    def dense_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a `DynamicCache` would hold for the same tokens in ``dtype`` (sliding layers capped at
        their window, as `DynamicCache` does)."""
        total = 0
        for layer in self.tq_layers:
            if not layer.is_initialized:
                continue
            n = layer.cumulative_length
            if layer.sliding_window is not None:
                n = min(n, layer.sliding_window - 1)
            total += 2 * layer.batch_size * layer.num_kv_heads * n * layer.head_dim * dtype.itemsize
        return total

    def __repr__(self) -> str:
        names = sorted({f.name or f.describe() for f in self.formats})
        return (
            f"TurboQuantCache({len(self.layers)} layers, formats={names}, residual_length="
            f"{self.residual_length}, seq_length={self.get_seq_length()})"
        )
