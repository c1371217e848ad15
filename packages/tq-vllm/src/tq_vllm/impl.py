"""``TurboQuantImpl``: the per-layer store and attention of the CUSTOM backend.

A layer with a ``turboquant_*`` kv-cache dtype:

* ``do_kv_cache_update`` encodes the step's K and V into the compressed cache
  (:func:`tq_kernels.ops.store.tq_store_paged`; padding slots ``-1`` are skipped);
* ``forward`` runs the decodes (first in the batch) with the fused split-context decode kernel
  (:func:`tq_kernels.ops.decode.tq_decode_attention`, which reads the slots in place) and the rest
  (prefill chunks, chunked prefill, prefix-cache hits, speculative verification) causally over the
  cached prefix plus the chunk's own exact K/V.  On CUDA, where vLLM has FlashAttention, first chunks
  (nothing cached before them) run its varlen kernel on the exact K/V, and chunks over a cached prefix
  run it over the prefix decoded from the cache (:mod:`tq_vllm.prefix`, within
  ``TQ_VLLM_PREFIX_FLASH_MB``).  Otherwise the extend kernel
  (:func:`tq_kernels.ops.extend.tq_extend_attention`) computes the same attention from the compressed
  cache directly.  ``TQ_VLLM_PREFILL_FLASH=0`` keeps every chunk on the extend kernel.

``TQ_VLLM_CHUNK_KV`` chooses what a prefill chunk's queries see of the chunk itself: ``exact`` (the
default: its own K/V as computed) or ``compressed`` (its own K/V quantized and decoded exactly as the
cache holds them).  With ``compressed`` every token attends to the same representation of every
earlier token however the scheduler cut the prompt into chunks, so chunk boundaries, preemption with
recompute and prefix-cache hits do not change the attention (beyond float rounding); ``exact`` is
more precise inside a chunk and does not pay the extra encode/decode of the chunk.

A layer vLLM keeps at ``"auto"`` runs :class:`tq_vllm.dense.DenseAttention` on a plain cache, with
vLLM's FlashAttention where vLLM has it (CUDA), else (or with ``TQ_VLLM_DENSE_ATTENTION=triton``) vLLM's
Triton attention kernel.

Each layer rotates with its own seed, chosen by the layer number in its vLLM name
(``model.layers.7.self_attn.attn`` -> 7); a layer that shares another layer's KV cache uses the
owner's number, since it reads the owner's slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from tq_kernels.ops.decode import DecodePlan, plan_decode, tq_decode_attention
from tq_kernels.ops.dequant import tq_dequantize, tq_dequantize_paged
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.ops.store import tq_store, tq_store_paged
from tq_kernels.tuning import STORE_SMALL_ROWS
from tq_vllm.dense import DenseAttention, window_size
from tq_vllm.metadata import TurboQuantMetadata
from tq_vllm.prefix import gather_prefix_kv, prefix_flash_budget
from tq_vllm.presets import SUPPORTED_HEAD_DIMS, describe_support, kv_format, layer_index

__all__ = ["TurboQuantImpl", "compressed_cache_view", "flash_varlen", "prefill_flash_version"]


def compressed_cache_view(kv_cache: torch.Tensor, slot_bytes: int) -> torch.Tensor:
    """vLLM's ``[num_blocks, num_kv_heads, block_size, C]`` uint8 view as the kernels' cache.

    Returns ``[num_blocks, num_kv_heads, block_size, slot_bytes]`` (a view, no copy) whose (block, head)
    regions are contiguous, as tq-kernels lays them out (:meth:`tq_core.KVFormat.region_offsets`).
    ``C`` is ``slot_bytes``, except for a sliding-window layer on vLLM 0.26, which sizes that layer's
    page at ``2 * head_size`` bytes per token-head; the region then takes the leading bytes.

    Raises:
        ValueError: when the cache is not uint8, or its (block, head) regions are not contiguous
            (a KV-cache layout with heads inside tokens, which the backend does not declare).
    """
    if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[-1] < slot_bytes:
        raise ValueError(
            f"a compressed layer's cache must be uint8 [num_blocks, num_kv_heads, block_size, >= "
            f"{slot_bytes}], got {kv_cache.dtype} {tuple(kv_cache.shape)}"
        )
    block_size, content = kv_cache.shape[2:]
    if kv_cache.stride(3) != 1 or (block_size > 1 and kv_cache.stride(2) != content):
        raise ValueError(
            "a compressed layer needs each (block, head) region of its cache contiguous (KV-cache "
            f"layout LBHNC or BLHNC); got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}"
        )
    if content == slot_bytes:
        return kv_cache
    return kv_cache.flatten(2)[..., : block_size * slot_bytes].unflatten(2, (block_size, slot_bytes))


# tokens of the warm-up store that compiles the prefill launch: more rows than the small-batch
# launch takes, for any number of KV heads
_WARM_STORE_TOKENS = STORE_SMALL_ROWS + 1

CHUNK_KV_MODES = ("exact", "compressed")


def _chunk_kv_mode() -> str:
    mode = os.environ.get("TQ_VLLM_CHUNK_KV", "exact")
    if mode not in CHUNK_KV_MODES:
        raise ValueError(f"TQ_VLLM_CHUNK_KV must be one of {', '.join(CHUNK_KV_MODES)}, got {mode!r}")
    return mode


DENSE_ATTENTION_MODES = ("triton", "flash")


def _dense_attention_mode() -> str:
    mode = os.environ.get("TQ_VLLM_DENSE_ATTENTION", "flash")
    if mode not in DENSE_ATTENTION_MODES:
        raise ValueError(
            f"TQ_VLLM_DENSE_ATTENTION must be one of {', '.join(DENSE_ATTENTION_MODES)}, got {mode!r}"
        )
    return mode


def _flash_varlen(head_size: int, contiguous_kv: bool = False) -> Callable[..., Any] | None:
    """vLLM's FlashAttention varlen function bound to a FA version, or None (not CUDA, not built,
    or ``TQ_VLLM_PREFILL_FLASH=0``).

    The version is the one vLLM configures, except for ``contiguous_kv`` callers (the prefill
    paths, which attend over contiguous K/V outside CUDA graphs): they get the platform's best
    (:func:`_prefill_fa_version`).  With a ``turboquant_*`` kv-cache dtype vLLM pins
    ``flash_attn_version`` to 2 because its own TurboQuant backend cannot run FA3 boundary layers;
    that restriction does not concern our prefill.  Paged boundary-layer attention inside decode
    graphs keeps vLLM's choice.
    """
    raw = os.environ.get("TQ_VLLM_PREFILL_FLASH", "1")
    if raw not in ("0", "1"):
        raise ValueError(f"TQ_VLLM_PREFILL_FLASH must be 0 or 1, got {raw!r}")
    if raw == "0":
        return None
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cuda():
            return None
        from vllm.v1.attention.backends.fa_utils import (
            flash_attn_varlen_func,
            get_flash_attn_version,
            is_flash_attn_varlen_func_available,
        )
    except ImportError:
        return None
    if not is_flash_attn_varlen_func_available():
        return None
    version = get_flash_attn_version(head_size=head_size)
    if contiguous_kv:
        version = _prefill_fa_version(head_size, version)

    def flash(**kw: Any) -> Any:
        return (
            flash_attn_varlen_func(**kw)
            if version is None
            else flash_attn_varlen_func(**kw, fa_version=version)
        )

    return flash


def _prefill_fa_version(head_size: int, configured: int | None) -> int | None:
    """FA3 on Hopper when vLLM's build has it and ``head_size`` fits (FA3 runs head sizes up to 256);
    else ``configured``.  ``TQ_VLLM_FLASH_VERSION`` (2, 3 or 4) overrides."""
    raw = os.environ.get("TQ_VLLM_FLASH_VERSION")
    if raw:
        if raw not in ("2", "3", "4"):
            raise ValueError(f"TQ_VLLM_FLASH_VERSION must be 2, 3 or 4, got {raw!r}")
        return int(raw)
    if configured != 2 or head_size > 256:
        return configured
    try:
        from vllm.platforms import current_platform
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported

        capability = current_platform.get_device_capability()
    except ImportError:
        return configured
    if capability is not None and capability.major == 9 and is_fa_version_supported(3):
        return 3
    return configured


def _check_head_size(head_size: object) -> None:
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size < 1:
        raise ValueError(
            f"head_size must be a positive int (the model's attention head dim), got {head_size!r}"
        )


def flash_varlen(head_size: int, *, contiguous_kv: bool = False) -> Callable[..., Any] | None:
    """vLLM's FlashAttention varlen function as the impl calls it, or None where the impl does not.

    The function takes ``flash_attn_varlen_func``'s keyword arguments and runs the FlashAttention
    version the impl would pick: vLLM's configured one, or with ``contiguous_kv=True`` (the prefill
    paths, over contiguous K/V outside CUDA graphs) :func:`prefill_flash_version`'s.  None where vLLM's
    platform is not CUDA, its FlashAttention is not built, or ``TQ_VLLM_PREFILL_FLASH=0``.  Assigning
    the result to a :class:`TurboQuantImpl`'s ``flash`` attribute switches its prefill path, as
    ``experiments/vllm/prefix_flash_check.py`` does to time FA2 against FA3.

    Args:
        head_size: the attention head dim.
        contiguous_kv: pick the prefill paths' version instead of vLLM's configured one.

    Raises:
        ValueError: ``head_size`` is not a positive int, or ``TQ_VLLM_PREFILL_FLASH`` /
            ``TQ_VLLM_FLASH_VERSION`` hold a value other than the documented ones.

    Example:
        >>> import os
        >>> os.environ["TQ_VLLM_PREFILL_FLASH"] = "0"
        >>> flash_varlen(128, contiguous_kv=True) is None
        True
        >>> del os.environ["TQ_VLLM_PREFILL_FLASH"]
    """
    _check_head_size(head_size)
    return _flash_varlen(head_size, contiguous_kv)


def prefill_flash_version(head_size: int, configured: int | None) -> int | None:
    """The FlashAttention version the impl's prefill paths run, given vLLM's ``configured`` one.

    FA3 on Hopper when vLLM's build has it, ``configured`` is 2 (what vLLM pins for ``turboquant_*``
    kv-cache dtypes) and ``head_size`` fits FA3 (up to 256); else ``configured``.
    ``TQ_VLLM_FLASH_VERSION`` (2, 3 or 4) overrides both.

    Args:
        head_size: the attention head dim.
        configured: the version vLLM configured (``get_flash_attn_version``), or None where it has none.

    Raises:
        ValueError: ``head_size`` is not a positive int, ``configured`` is neither None nor an int, or
            ``TQ_VLLM_FLASH_VERSION`` is set to something other than 2, 3 or 4.

    Example:
        >>> import os
        >>> os.environ["TQ_VLLM_FLASH_VERSION"] = "2"
        >>> prefill_flash_version(128, 3)
        2
        >>> del os.environ["TQ_VLLM_FLASH_VERSION"]
        >>> prefill_flash_version(512, 2)  # FA3 runs head sizes up to 256
        2
    """
    _check_head_size(head_size)
    if configured is not None and (isinstance(configured, bool) or not isinstance(configured, int)):
        raise ValueError(
            f"configured must be vLLM's FlashAttention version (an int) or None, got {configured!r}"
        )
    return _prefill_fa_version(head_size, configured)


class TurboQuantImpl(AttentionImpl[TurboQuantMetadata]):
    """Store and attention of one attention layer (arguments as vLLM's ``AttentionImpl``).

    Raises:
        NotImplementedError: for what the backend does not serve (ALiBi, encoder or cross attention),
            at model construction, so vLLM stops at startup.
        ValueError: for a kv-cache dtype or head dim outside :mod:`tq_vllm.presets`.
    """

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra_impl_args: Any,
    ) -> None:
        if alibi_slopes is not None:
            raise NotImplementedError(f"ALiBi is not supported; {describe_support()}")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"attention type {attn_type!r} is not supported; {describe_support()}")
        if head_size not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim {head_size} is not supported; {describe_support()}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap or None
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # `sinks` is the layer's parameter, filled when weights load; keep the reference.
        self.sinks: torch.Tensor | None = extra_impl_args.get("sinks")
        self.fmt = kv_format(kv_cache_dtype, head_size)  # None for an uncompressed layer
        dense_mode = _dense_attention_mode()  # validated on every layer, used by uncompressed ones
        self.dense = (
            DenseAttention(
                num_heads,
                self.num_kv_heads,
                head_size,
                self.scale,
                sliding_window,
                self.logits_soft_cap,
                self.sinks,
                flash=_flash_varlen(head_size) if dense_mode == "flash" else None,
            )
            if self.fmt is None
            else None
        )
        self.layer: int | None = None  # rotation seed index, from the layer name on first use
        # First prefill chunks (no cached prefix) on FlashAttention; sinks stay on our kernel.
        self.flash = (
            _flash_varlen(head_size, contiguous_kv=True)
            if self.fmt is not None and self.sinks is None
            else None
        )
        self.chunk_kv = _chunk_kv_mode()
        self.prefix_budget = prefix_flash_budget()
        self._decode_plans: dict[tuple[int, ...], DecodePlan] = {}

    # -- setup ------------------------------------------------------------------------------------
    def _layer_of(self, layer: Any) -> int:
        if self.layer is None:
            name = self.kv_sharing_target_layer_name or getattr(layer, "layer_name", "")
            self.layer = layer_index(str(name))
        return self.layer

    def prepare(
        self,
        layer_name: str,
        device: torch.device,
        block_size: int,
        *,
        warm: bool | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        """Fix the layer number and build the kernels' device tables before any graph capture.

        The kernels cache their rotation and codebook tensors per device on first use; a first use
        inside a CUDA-graph capture would copy from the host mid-capture.  One tiny store, decode and
        extend on a scratch block, with K/V of the model's ``dtype``, build them and compile the
        kernels now (vLLM's capture runs decode batches only, so without this the extend kernel would
        compile inside the first timed prefill).  ``warm`` None does that on CUDA only (tests pass
        True to run it on the CPU).  The prefill launches of the store and the paged dequantize (the
        prefix path) are compiled here too: vLLM's warm-up does not reach them, and a Triton compile
        inside the first requests costs a second or more.
        """
        if self.layer is None:
            self.layer = layer_index(self.kv_sharing_target_layer_name or layer_name)
        device = torch.device(device)
        if self.fmt is None or not (device.type == "cuda" if warm is None else warm):
            return
        fmt = self.fmt
        cache = fmt.allocate_cache(1, block_size, self.num_kv_heads, device=device)
        kv = torch.zeros(1, self.num_kv_heads, self.head_size, dtype=dtype, device=device)
        q = torch.zeros(1, self.num_heads, self.head_size, dtype=dtype, device=device)
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)
        one = torch.ones(1, dtype=torch.int32, device=device)
        tq_store_paged(kv, kv, cache, torch.zeros(1, dtype=torch.int64, device=device), fmt, layer=self.layer)
        # a prefill's store launches differently from a decode step's (tq_kernels.tuning.store_config):
        # compile that launch too, on rows that all skip (slot -1)
        # (the interpreter has one launch for every size)
        if device.type == "cuda":
            big = torch.zeros(
                _WARM_STORE_TOKENS, self.num_kv_heads, self.head_size, dtype=dtype, device=device
            )
            skip = torch.full((_WARM_STORE_TOKENS,), -1, dtype=torch.int64, device=device)
            tq_store_paged(big, big, cache, skip, fmt, layer=self.layer)
        # chunks continuing a cached prefix decode it from the paged cache (tq_vllm.prefix)
        tq_dequantize_paged(
            cache, torch.zeros(1, dtype=torch.int64, device=device), fmt, layer=self.layer, dtype=dtype
        )
        tq_decode_attention(q, cache, table, one, fmt, layer=self.layer, num_splits=1)
        qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
        tq_extend_attention(q, kv, kv, cache, table, one, qsl, 1, fmt, layer=self.layer)
        if self.chunk_kv == "compressed":
            slots = torch.empty(1, self.num_kv_heads, fmt.slot_bytes, dtype=torch.uint8, device=device)
            tq_dequantize(tq_store(kv, kv, slots, fmt, layer=self.layer), fmt, layer=self.layer, dtype=dtype)

    def decode_plan(self, batch: int, len_bound: int, cache: torch.Tensor) -> DecodePlan:
        """This layer's decode launch for ``batch`` decodes planned for ``len_bound`` tokens
        (:func:`tq_kernels.ops.decode.plan_decode`, once per batch size: host arithmetic only, and
        the same plan, hence the same grid and kernel variant, for every step of a captured batch).
        ``cache`` is the layer's compressed cache view (its alignment picks the loop)."""
        key = (batch, len_bound, cache.data_ptr() % 4, cache.stride(0) % 4, cache.stride(1) % 4)
        plan = self._decode_plans.get(key)
        if plan is None:
            assert self.fmt is not None
            plan = plan_decode(
                self.fmt, self.num_heads, self.num_kv_heads, batch, len_bound, cache.device, cache=cache
            )
            self._decode_plans[key] = plan
        return plan

    # -- write path -------------------------------------------------------------------------------
    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's K/V `[num_tokens, num_kv_heads, head_size]` into the layer's cache.

        ``slot_mapping`` has one entry per real token (and ``-1`` for padding tokens when vLLM pads);
        rows of ``key`` beyond it are CUDA-graph padding.
        """
        num_tokens = slot_mapping.shape[0]
        if num_tokens == 0:
            return
        key, value = key[:num_tokens], value[:num_tokens]
        if self.fmt is None:
            assert self.dense is not None
            self.dense.write(layer, key, value, kv_cache.transpose(1, 2), slot_mapping)
            return
        cache = compressed_cache_view(kv_cache, self.fmt.slot_bytes)
        tq_store_paged(key, value, cache, slot_mapping, self.fmt, layer=self._layer_of(layer))

    def _prefix_fits(self, meta: TurboQuantMetadata) -> bool:
        """Whether this step's prefill can decode its prefix into dense K/V buffers within
        ``TQ_VLLM_PREFIX_FLASH_MB`` (the buffers, plus the decode's temporaries, four copies)."""
        if meta.prefill_prefix_tokens is None:
            return False
        rows = meta.prefill_prefix_tokens + meta.num_prefill_tokens
        return 4 * rows * self.num_kv_heads * self.head_size * 2 <= self.prefix_budget

    # -- attention --------------------------------------------------------------------------------
    def forward(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: TurboQuantMetadata | None,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the step's queries `[num_tokens, num_heads, head_size]` into ``output``.

        The cache already holds this step's K/V (``do_kv_cache_update`` runs first).  ``output`` is
        `[num_tokens, num_heads, head_size]` or `[num_tokens, num_heads * head_size]`; rows beyond
        ``num_actual_tokens`` are padding and are left alone.
        """
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"fused output quantization is not supported; {describe_support()}")
        if output is None:
            output = torch.empty(
                query.shape[0], self.num_heads, self.head_size, dtype=query.dtype, device=query.device
            )
        if attn_metadata is None:  # vLLM's profiling run
            return output.fill_(0)
        meta = attn_metadata
        n = meta.num_actual_tokens
        out = output.view(-1, self.num_heads, self.head_size)[:n]
        query = query[:n]
        if self.fmt is None:
            assert self.dense is not None
            self.dense.forward(layer, query, kv_cache.transpose(1, 2), meta, out)
            return output
        self._forward_compressed(layer, query, key[:n], value[:n], kv_cache, meta, out)
        return output

    def _forward_compressed(
        self,
        layer: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TurboQuantMetadata,
        out: torch.Tensor,
    ) -> None:
        fmt = self.fmt
        assert fmt is not None
        cache = compressed_cache_view(kv_cache, fmt.slot_bytes)
        common: dict[str, Any] = dict(
            layer=self._layer_of(layer),
            scale=self.scale,
            sliding_window=self.sliding_window,
            softcap=self.logits_soft_cap,
            sinks=self.sinks,
        )
        # Decode rows are requests 0..nd-1, one token each (trailing zero-token padding requests of
        # a padded batch own no row).
        nd = meta.num_decode_tokens
        if nd > 0:
            tq_decode_attention(
                query[:nd],
                cache,
                meta.block_table[:nd],
                meta.seq_lens[:nd],
                fmt,
                plan=self.decode_plan(nd, meta.decode_len_bound, cache),
                out=out[:nd],
                **common,
            )
        if meta.num_prefills > 0 and query.shape[0] > nd:
            first = meta.num_decodes
            qsl = meta.query_start_loc[first:] - nd
            key, value = key[nd:], value[nd:]
            if self.chunk_kv == "compressed":  # the chunk sees itself as the cache holds it
                slots = torch.empty(*key.shape[:-1], fmt.slot_bytes, dtype=torch.uint8, device=key.device)
                tq_store(key, value, slots, fmt, layer=common["layer"])
                key, value = tq_dequantize(slots, fmt, layer=common["layer"], dtype=query.dtype)
            # a media range reaching past a query (prefix-LM models) needs the extend kernel's key_end
            key_end = meta.prefill_key_end
            if self.flash is not None and query.dtype != torch.float32 and key_end is None:
                flash_args: dict[str, Any] = dict(
                    q=query[nd:],
                    max_seqlen_q=meta.max_query_len,
                    softmax_scale=self.scale,
                    causal=True,
                    window_size=window_size(self.sliding_window),
                    softcap=self.logits_soft_cap or 0.0,
                    out=out[nd:],
                )
                if not meta.prefill_has_prefix:  # first chunks: the exact K/V is the whole context
                    self.flash(
                        k=key, v=value, cu_seqlens_q=qsl, cu_seqlens_k=qsl, max_seqlen_k=meta.max_query_len,
                        **flash_args,
                    )  # fmt: skip
                    return
                if self._prefix_fits(meta):  # decode the prefix, then attend densely
                    plan = meta.prefix_plan(cache.shape[2])
                    dense_k, dense_v = gather_prefix_kv(plan, cache, fmt, common["layer"], key, value)
                    self.flash(
                        k=dense_k, v=dense_v, cu_seqlens_q=qsl, cu_seqlens_k=plan.cu_seqlens_k,
                        max_seqlen_k=plan.max_seqlen_k, **flash_args,
                    )  # fmt: skip
                    return
            # Tokens already cached before each chunk; computed on the device (no host sync).
            prefix_lens = meta.seq_lens[first:] - (qsl[1:] - qsl[:-1])
            tq_extend_attention(
                query[nd:],
                key,
                value,
                cache,
                meta.block_table[first:],
                prefix_lens,
                qsl,
                meta.max_query_len,
                fmt,
                key_end=key_end,
                out=out[nd:],
                **common,
            )
