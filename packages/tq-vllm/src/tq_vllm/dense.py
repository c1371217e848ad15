"""Uncompressed layers of the CUSTOM backend: a paged cache of the model dtype, K and V side by side.

With a ``turboquant_*`` kv-cache dtype vLLM keeps some layers at ``"auto"`` (the first and last two,
plus any ``--kv-cache-dtype-skip-layers``) and still routes them to the selected backend.  Their cache
is ``[num_blocks, block_size, num_kv_heads, 2 * head_size]`` (K in the first half, V in the second).

On CUDA the write and the attention use vLLM's own Triton kernels for this layout
(``triton_reshape_and_cache_flash`` and ``unified_attention``, the kernels of its TRITON_ATTN
backend, present with the same signature in every supported vLLM): they skip padding slots, read
any strides, and capture into CUDA graphs.  ``TQ_VLLM_DENSE_ATTENTION=flash`` runs the attention with
vLLM's FlashAttention varlen kernel over the paged cache instead (not for sinks): on the H200 the
Triton kernel took 0.55 ms per decode call of the anchor workload, FlashAttention 0.25 ms in the bf16
run (experiments/results/vllm_profile_decode_h200_2026-11-28_bf16_and_nibble.log).  It is opt-in until it has run on a GPU
under CUDA graphs.  vLLM disables its Triton kernels on the CPU platform, so
there the layer runs in torch, one request at a time, with tq_core's reference attention: that path
exists for CPU engines and tests, not for speed.
"""

from __future__ import annotations

from typing import Any

import torch

from tq_core.attention import attention_ref, mm_prefix_mask

__all__ = ["DenseAttention", "split_kv", "window_size"]


def window_size(sliding_window: int | None) -> list[int]:
    """vLLM's attention kernels' ``window_size`` (keys left and right of a query, -1 for unbounded) of a
    layer whose query at ``p`` sees keys ``j > p - sliding_window``."""
    return [-1, -1] if sliding_window is None else [sliding_window - 1, 0]


def split_kv(cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) views `[num_blocks, block_size, num_kv_heads, head_size]` of a dense layer's cache."""
    if cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"an uncompressed layer's cache must hold 2 * head_size = {2 * head_size} elements per "
            f"token-head, got shape {tuple(cache.shape)}"
        )
    return cache[..., :head_size], cache[..., head_size:]


class DenseAttention:
    """Write and attend over an uncompressed paged cache (one layer's settings).

    Args:
        num_heads, num_kv_heads, head_size, scale: the layer's attention shape and softmax scale.
        sliding_window: vLLM's window (a query at ``p`` sees keys ``j > p - sliding_window``), or None.
        softcap: tanh logit soft-capping, or None.
        sinks: `[num_heads]` sink logits, or None.
        flash: vLLM's FlashAttention varlen function (``tq_vllm.impl._flash_varlen``) to attend with
            instead of the Triton kernel on CUDA, or None.

    Attributes:
        use_vllm_kernels: run vLLM's Triton kernels (True), the torch path (False), or decide by the
            tensors' device (None: vLLM's kernels on CUDA).  Tests set True to run vLLM's kernels under
            Triton's interpreter.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_size: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        sinks: torch.Tensor | None,
        flash: Any = None,
    ) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.sinks = sinks
        self.flash = flash if sinks is None else None  # vLLM's FlashAttention varlen, bound (or None)
        self.use_vllm_kernels: bool | None = None

    def _vllm_kernels(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.use_vllm_kernels is None else self.use_vllm_kernels

    # -- write ------------------------------------------------------------------------------------
    def write(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Store K, V `[num_tokens, num_kv_heads, head_size]` at ``slot_mapping`` (-1 skipped)."""
        k_cache, v_cache = split_kv(cache, self.head_size)
        if self._vllm_kernels(key):
            from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
                triton_reshape_and_cache_flash,
            )

            k_scale, v_scale = _scales(layer, key.device)
            triton_reshape_and_cache_flash(
                key, value, k_cache, v_cache, slot_mapping, "auto", k_scale, v_scale
            )
            return
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].to(torch.int64)
        block_size = cache.shape[1]
        blocks, offsets = slots // block_size, slots % block_size
        k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
        v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)

    # -- attention --------------------------------------------------------------------------------
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        cache: torch.Tensor,
        meta: Any,
        out: torch.Tensor,
    ) -> None:
        """Attention of the step's ``query`` `[num_actual_tokens, num_heads, head_size]` into ``out``."""
        k_cache, v_cache = split_kv(cache, self.head_size)
        # FlashAttention has no mask for media ranges (prefix-LM models): vLLM's Triton kernel has
        media = getattr(meta, "mm_range_tensor", None) is not None
        if self._vllm_kernels(query) and self.flash is not None and not media:
            self._forward_flash(query, k_cache, v_cache, meta, out)
        elif self._vllm_kernels(query):
            self._forward_triton(layer, query, k_cache, v_cache, meta, out)
        else:
            self._forward_torch(query, k_cache, v_cache, meta, out)

    def _forward_triton(
        self,
        layer: Any,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        out: torch.Tensor,
    ) -> None:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        k_scale, v_scale = _scales(layer, query.device)
        descale_shape = (meta.query_start_loc.shape[0] - 1, self.num_kv_heads)
        unified_attention(
            **self._paged_args(query, k_cache, v_cache, meta, out),
            q_descale=None,
            k_descale=k_scale.expand(descale_shape),
            v_descale=v_scale.expand(descale_shape),
            sinks=self.sinks,
            **(
                {"mm_prefix_range": meta.mm_range_tensor}
                if getattr(meta, "mm_range_tensor", None) is not None
                else {}
            ),
        )

    def _forward_flash(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        out: torch.Tensor,
    ) -> None:
        # the K and V halves of the cache are views with a head stride of 2 * head_size: FlashAttention
        # takes the block, row and head strides of a paged cache as given (only the last dim must be
        # contiguous), as for vLLM's own [2, blocks, block_size, heads, head_size] cache
        assert self.flash is not None  # the caller checked
        self.flash(**self._paged_args(query, k_cache, v_cache, meta, out))

    def _paged_args(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any, out: torch.Tensor
    ) -> dict[str, Any]:
        """The keywords vLLM's Triton unified attention and its FlashAttention varlen kernel share for
        causal attention over a paged cache."""
        return dict(
            q=query,
            k=k_cache,
            v=v_cache,
            out=out,
            cu_seqlens_q=meta.query_start_loc,
            max_seqlen_q=meta.max_query_len,
            seqused_k=meta.seq_lens,
            max_seqlen_k=meta.max_seq_len,
            softmax_scale=self.scale,
            causal=True,
            window_size=window_size(self.sliding_window),
            block_table=meta.block_table,
            softcap=self.softcap or 0.0,
        )

    def _forward_torch(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: Any,
        out: torch.Tensor,
    ) -> None:
        qsl = meta.query_start_loc_cpu.tolist()
        seq_lens = meta.seq_lens.tolist()
        block_size = k_cache.shape[1]
        media = getattr(meta, "mm_ranges", None) or {}
        for i, seq_len in enumerate(seq_lens):
            start, end = qsl[i], qsl[i + 1]
            if end == start:
                continue
            pos = torch.arange(seq_len, device=query.device)
            blocks = meta.block_table[i].to(torch.int64)[pos // block_size]
            k = k_cache[blocks, pos % block_size]
            v = v_cache[blocks, pos % block_size]
            mask = None
            if media.get(i):  # a prefix-LM request's media ranges: the mask holds causality and window
                mask = mm_prefix_mask(
                    media[i],
                    seq_len - (end - start),
                    end - start,
                    sliding_window=self.sliding_window,
                    device=query.device,
                )
            out[start:end] = attention_ref(
                query[start:end],
                k,
                v,
                scale=self.scale,
                causal=mask is None,
                sliding_window=self.sliding_window if mask is None else None,
                softcap=self.softcap,
                sinks=self.sinks,
                mask=mask,
            ).to(out.dtype)


def _scales(layer: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's K/V scales (1.0 for an unquantized cache; vLLM's kernels take them anyway)."""
    k_scale = getattr(layer, "_k_scale", None)
    v_scale = getattr(layer, "_v_scale", None)
    if k_scale is None or v_scale is None:
        one = torch.ones((), dtype=torch.float32, device=device)
        return one, one
    return k_scale, v_scale
