"""The TurboQuant attention backend: ``--attention-backend CUSTOM``, and one named backend per own dtype.

:func:`tq_vllm.register` points vLLM's ``AttentionBackendEnum.CUSTOM`` at :class:`TurboQuantBackend`.
With ``--attention-backend CUSTOM`` every attention layer of the model comes here: the layers that
carry a ``turboquant_*`` kv-cache dtype get our compressed slots (:func:`tq_core.named_format`, the
same bytes per token-head as vLLM's preset of that name), and the layers vLLM keeps at ``"auto"``
(the first and last two with a turboquant dtype) get a plain cache of the model dtype.

On vLLM 0.33+ each of tq-vllm's own dtypes (``tq_4bit`` ...) has a subclass of its own in
:data:`NAMED_BACKENDS`, registered as ``TQ_VLLM_4BIT`` ...; the ledger's ``backend_selection`` patch
sends every layer of such a run there.  The subclass differs only in knowing its dtype: vLLM sizes a
page from the layer's spec alone, whose mode (``KVQuantMode.CUSTOM``) is the same for every registered
name.

The KV cache of one layer, as vLLM hands it to the impl, is a logical ``[num_blocks, num_kv_heads,
block_size, content]`` view whose physical order keeps each (block, head) region of ``block_size *
content`` contiguous (vLLM 0.26: :meth:`TurboQuantBackend.get_kv_cache_shape` with the identity stride
order; vLLM 0.32: the engine-wide ``KVCacheLayout``, LBHNC or BLHNC).  ``content`` is the slot (uint8,
``slot_bytes``) of a compressed layer, whose region tq-kernels fills with arrays of codes and norms,
and ``2 * head_size`` elements of the model dtype (K then V) of an uncompressed one.

Example:
    >>> from tq_vllm.backend import TurboQuantBackend
    >>> TurboQuantBackend.get_name()
    'CUSTOM'
    >>> TurboQuantBackend.get_kv_cache_shape(10, 16, 8, 128, "turboquant_4bit_nc")
    (10, 8, 16, 134)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from tq_vllm.presets import (
    COMPRESSED_CACHE_DTYPES,
    DENSE_CACHE_DTYPES,
    OWN_CACHE_DTYPES,
    SUPPORTED_HEAD_DIMS,
    backend_name,
    describe_support,
    is_compressed,
    kv_format,
)

if TYPE_CHECKING:
    from tq_vllm.impl import TurboQuantImpl
    from tq_vllm.metadata import TurboQuantMetadataBuilder

__all__ = ["NAMED_BACKENDS", "TurboQuantBackend"]

# Triton's fp16/bf16 tensor-core paths the kernels are written for (Ampere and newer).
_MIN_CAPABILITY = (8, 0)


class TurboQuantBackend(AttentionBackend):
    """Attention over a TurboQuant-compressed paged KV cache (tq-kernels), registered as CUSTOM."""

    accept_output_buffer: bool = True
    # The cache is written by `do_kv_cache_update` (vLLM's separate `unified_kv_cache_update` op),
    # before `forward`; both are captured in full CUDA graphs.
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = [
        *DENSE_CACHE_DTYPES,
        *COMPRESSED_CACHE_DTYPES,
        *OWN_CACHE_DTYPES,
    ]
    # The own dtype (``tq_4bit`` ...) a named subclass serves; its specs carry no dtype name.
    own_dtype: ClassVar[str | None] = None

    @staticmethod
    def get_name() -> str:
        # vLLM maps the name back to its enum (`AttentionBackendEnum[backend.get_name()]`).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[TurboQuantImpl]:
        from tq_vllm.impl import TurboQuantImpl

        return TurboQuantImpl

    @staticmethod
    def get_builder_cls() -> type[TurboQuantMetadataBuilder]:
        from tq_vllm.metadata import TurboQuantMetadataBuilder

        return TurboQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        # vLLM 0.32 passes the layer's spec, 0.26 passes nothing. The kernels take any page size;
        # 16 keeps blocks at least one tl.dot tile of tokens.
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_sink(cls) -> bool:
        return True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        """Prefix-LM vision-language models (Gemma 3, PaliGemma, Molmo 2...): a query inside an image or
        video range also sees that range's later tokens (``TurboQuantMetadata.prefill_key_end`` for the
        compressed layers, vLLM's own range mask for the uncompressed ones)."""
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_compute_capability(cls, capability: Any) -> bool:
        # None on the CPU platform (the kernels then run under Triton's interpreter).
        return capability is None or (capability.major, capability.minor) >= _MIN_CAPABILITY

    @classmethod
    def validate_configuration(cls, *args: Any, **kwargs: Any) -> list[str]:
        """vLLM's checks, plus one reason that names the offending values and what is supported.

        vLLM raises ``Selected backend CUSTOM is not valid for this configuration. Reason: [...]`` at
        startup with these reasons; its own are terse ("head_size not supported"), so tq-vllm adds the
        values it got and the full list of what it serves.
        """
        reasons = list(super().validate_configuration(*args, **kwargs))
        if not reasons:
            return reasons
        bound = inspect.signature(super().validate_configuration).bind_partial(*args, **kwargs).arguments
        got = []
        if "head_size" in bound and not cls.supports_head_size(bound["head_size"]):
            got.append(f"head_dim={bound['head_size']}")
        if "dtype" in bound and not cls.supports_dtype(bound["dtype"]):
            got.append(f"model dtype={str(bound['dtype']).removeprefix('torch.')}")
        if "kv_cache_dtype" in bound and not cls.supports_kv_cache_dtype(bound["kv_cache_dtype"]):
            got.append(f"kv_cache_dtype={bound['kv_cache_dtype']!r}")
        if bound.get("use_mla"):
            got.append("an MLA model")
        if "attn_type" in bound and not cls.supports_attn_type(bound["attn_type"]):
            got.append(f"attention type {bound['attn_type']!r}")
        detail = f"tq-vllm got {', '.join(got)}. " if got else ""
        reasons.append(f"{detail}{describe_support()}")
        return reasons

    # -- vLLM 0.26: the backend chooses the cache view ---------------------------------------------
    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = "auto",
    ) -> tuple[int, ...]:
        """Logical cache shape of one layer (vLLM 0.26; 0.32 derives it from the spec).

        ``(num_blocks, num_kv_heads, block_size, slot_bytes)`` for a compressed layer and
        ``(num_blocks, num_kv_heads, block_size, 2 * head_size)`` otherwise; the product matches the
        page vLLM allocates (``TQFullAttentionSpec`` and ``FullAttentionSpec``).  A sliding-window
        layer with a turboquant dtype arrives here as ``"auto"`` with a uint8 page of ``2 * head_size``
        bytes per token-head (0.26 sizes it so); the impl keeps its region in the leading bytes.
        """
        if is_compressed(cache_dtype_str):
            fmt = kv_format(cache_dtype_str, head_size)
            assert fmt is not None
            return (num_blocks, num_kv_heads, block_size, fmt.slot_bytes)
        return (num_blocks, num_kv_heads, block_size, 2 * head_size)

    @staticmethod
    def get_kv_cache_stride_order(include_num_layers_dimension: bool = False) -> tuple[int, ...]:
        """Physical order ``[num_blocks][num_kv_heads][block_size][content]`` (vLLM 0.26): each
        (block, head) region contiguous, as tq-kernels' region layout needs."""
        if include_num_layers_dimension:
            return (0, 1, 2, 3, 4)  # layers outermost, then the same per-layer order
        return (0, 1, 2, 3)

    # -- vLLM 0.32: the backend sizes the page through the spec ------------------------------------
    @classmethod
    def customize_spec(cls, spec: Any) -> Any:
        """Give a compressed layer our slot size (vLLM 0.28+); other specs pass unchanged.

        ``state_content_bytes`` is what vLLM allocates per (token, kv head); ours equals vLLM's
        preset (134 B for ``turboquant_4bit_nc`` at head_dim 128), so capacity matches its backend.
        A ``turboquant_*`` spec names its preset through its mode; a spec of one of our own dtypes
        has mode ``KVQuantMode.CUSTOM`` and takes the dtype of the named backend it was sent to.

        Raises:
            ValueError: for a ``KVQuantMode.CUSTOM`` spec on the plain CUSTOM backend, which cannot
                tell which of our dtypes it is (the ``backend_selection`` patch routes those layers
                to their named backend).
        """
        mode = getattr(spec, "kv_quant_mode", None)
        if getattr(spec, "state_content_bytes", None) is not None or mode is None:
            return spec
        if getattr(mode, "is_turboquant", False):
            name = mode.name.lower()
        elif _is_custom_mode(mode):
            if cls.own_dtype is None:
                raise ValueError(
                    f"{cls.__name__} got a layer of a plugin kv-cache dtype (KVQuantMode.CUSTOM) without "
                    f"knowing which; tq-vllm's own dtypes {list(OWN_CACHE_DTYPES)} run on their named "
                    "backends (TQ_VLLM_*), which tq_vllm.register() sets up and selects"
                )
            name = cls.own_dtype
        else:
            return spec
        fmt = kv_format(name, spec.head_size)
        assert fmt is not None
        return dataclasses.replace(spec, state_content_bytes=fmt.slot_bytes)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[Any, ...]:
        """Layouts whose (block, head) regions are contiguous (vLLM 0.32), most preferred first.

        tq-kernels stores a compressed block-head as one region of arrays (codes, then norms), so
        tokens must sit inside heads; the block-compact ones come first because vLLM narrows to those
        when compressed and uncompressed layers share the cache.
        """
        from vllm.v1.kv_cache_layout import KVCacheLayout

        return (KVCacheLayout.LBHNC, KVCacheLayout.BLHNC, KVCacheLayout.LHBNC, KVCacheLayout.BHLNC)


def _is_custom_mode(mode: Any) -> bool:
    """``mode is KVQuantMode.CUSTOM`` where vLLM has that member (0.33+)."""
    from vllm.v1.kv_cache_interface import KVQuantMode

    custom = getattr(KVQuantMode, "CUSTOM", None)
    return custom is not None and mode is custom


def _named_backend(kv_cache_dtype: str) -> type[TurboQuantBackend]:
    """The subclass that serves ``kv_cache_dtype`` (compressed) and the dense layers of its runs."""
    name = backend_name(kv_cache_dtype)
    qualname = f"TurboQuantBackend_{kv_cache_dtype}"

    def get_name() -> str:
        return name  # vLLM maps it back to its enum member (`AttentionBackendEnum[get_name()]`)

    return type(
        qualname,
        (TurboQuantBackend,),
        {
            "__module__": __name__,
            "__qualname__": qualname,
            "__doc__": f"TurboQuantBackend for --kv-cache-dtype {kv_cache_dtype}, registered as {name}.",
            "own_dtype": kv_cache_dtype,
            "supported_kv_cache_dtypes": [*DENSE_CACHE_DTYPES, kv_cache_dtype],
            "get_name": staticmethod(get_name),
        },
    )


#: ``{own dtype: its backend class}``; each class is a module attribute, so vLLM resolves it by path
#: (``tq_vllm.backend.TurboQuantBackend_tq_4bit``).
NAMED_BACKENDS: dict[str, type[TurboQuantBackend]] = {
    dtype: _named_backend(dtype) for dtype in OWN_CACHE_DTYPES
}
globals().update({cls.__qualname__: cls for cls in NAMED_BACKENDS.values()})
