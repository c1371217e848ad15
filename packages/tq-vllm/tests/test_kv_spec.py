"""KV page size per preset and head dim, on both cache-sizing APIs.

vLLM 0.32 sizes each layer's page through the backend's ``customize_spec`` (run here through vLLM's own
``customize_attention_spec``); vLLM 0.26 sizes it from the dtype (``TQFullAttentionSpec``, vLLM's
``slot_size_aligned``) and asks the backend for the view shape.  Either way the bytes per token-head
must equal vLLM's preset, so capacity matches vLLM's own TurboQuant backend.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

import torch
from _vllm_compat import KV_CACHE_LAYOUTS, SPEC_HOOK, customize_attention_spec
from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
from vllm.v1.attention.backend import MultipleOf
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    SlidingWindowSpec,
    get_kv_quant_mode,
)

from tq_core import budget_bytes, named_format
from tq_vllm.backend import TurboQuantBackend
from tq_vllm.impl import compressed_cache_view
from tq_vllm.presets import COMPRESSED_CACHE_DTYPES, SUPPORTED_HEAD_DIMS

BLOCK, HEADS = 16, 2
# What the issue promises at head_dim 128 (bf16 takes 512).
AT_128 = {
    "turboquant_k8v4": 196,
    "turboquant_4bit_nc": 134,
    "turboquant_k3v4_nc": 118,
    "turboquant_3bit_nc": 102,
}


def _spec(kv_cache_dtype: str, head_dim: int, cls=FullAttentionSpec, **extra):
    dense = kv_cache_dtype == "auto"
    return cls(
        block_size=BLOCK,
        num_kv_heads=HEADS,
        head_size=head_dim,
        dtype=torch.bfloat16 if dense else torch.uint8,
        kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
        **extra,
    )


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kv", COMPRESSED_CACHE_DTYPES, ids=lambda s: s.removeprefix("turboquant_"))
def test_page_bytes_per_token_head_equal_vllm_presets(kv: str, head_dim: int) -> None:
    ours = customize_attention_spec(TurboQuantBackend, _spec(kv, head_dim), kv)
    per_token_head = ours.page_size_bytes // (BLOCK * HEADS)
    assert ours.page_size_bytes == BLOCK * HEADS * per_token_head
    assert per_token_head == TurboQuantConfig.from_cache_dtype(kv, head_dim).slot_size_aligned
    assert per_token_head == budget_bytes(kv, head_dim) == named_format(kv, head_dim).slot_bytes
    if head_dim == 128:
        assert per_token_head == AT_128[kv]
    # vLLM's own TurboQuant backend gives the same page
    from vllm.v1.attention.backends.turboquant_attn import TurboQuantAttentionBackend

    assert customize_attention_spec(TurboQuantAttentionBackend, _spec(kv, head_dim), kv).page_size_bytes == (
        ours.page_size_bytes
    )


@pytest.mark.skipif(
    not SPEC_HOOK, reason="vLLM 0.26-0.27 size these pages without the backend (test_vllm026_cache_views_...)"
)
def test_sliding_window_layers_get_the_compressed_page_too() -> None:
    spec = _spec("turboquant_3bit_nc", 128, SlidingWindowSpec, sliding_window=64)
    page = customize_attention_spec(TurboQuantBackend, spec, "turboquant_3bit_nc").page_size_bytes
    assert page == BLOCK * HEADS * 102


def test_uncompressed_layers_keep_the_model_dtype_page() -> None:
    spec = _spec("auto", 128)
    assert (
        customize_attention_spec(TurboQuantBackend, spec, "auto").page_size_bytes
        == BLOCK * HEADS * 2 * 128 * 2
    )


def test_block_sizes_the_backend_declares() -> None:
    sizes = TurboQuantBackend.get_supported_kernel_block_sizes()
    assert [(type(s), s.base) for s in sizes] == [(MultipleOf, 16)]
    # vLLM 0.32 passes the spec; 0.26 calls it with no argument.  MultipleOf compares by identity
    # before 0.32 (a plain class there, a dataclass since), so the declarations compare by base.
    with_spec = TurboQuantBackend.get_supported_kernel_block_sizes(_spec("turboquant_4bit_nc", 128))
    assert [(type(s), s.base) for s in with_spec] == [(MultipleOf, 16)]


def _vllm026_view(num_blocks: int, kv_cache_dtype: str, head_dim: int, page_bytes: int, dtype: torch.dtype):
    """What vLLM 0.26's runner does with the backend's shape and stride order (attn_utils.py:
    ``raw.view(dtype).view(permuted shape).permute(inverse)``), on a raw int8 tensor of its page size."""
    shape = TurboQuantBackend.get_kv_cache_shape(
        num_blocks, BLOCK, HEADS, head_dim, cache_dtype_str=kv_cache_dtype
    )
    order = TurboQuantBackend.get_kv_cache_stride_order()
    raw = torch.zeros(num_blocks * page_bytes, dtype=torch.int8)
    assert math.prod(shape) * dtype.itemsize == raw.numel(), "shape does not fill the page exactly"
    inverse = [order.index(i) for i in range(len(order))]
    return raw.view(dtype).view(tuple(shape[i] for i in order)).permute(*inverse)


@pytest.mark.parametrize("kv", COMPRESSED_CACHE_DTYPES, ids=lambda s: s.removeprefix("turboquant_"))
def test_vllm026_cache_view_of_a_compressed_layer(kv: str) -> None:
    slot = TurboQuantConfig.from_cache_dtype(kv, 128).slot_size_aligned  # TQFullAttentionSpec's page
    view = _vllm026_view(5, kv, 128, BLOCK * HEADS * slot, torch.uint8)
    cache = compressed_cache_view(view, slot)
    assert cache.shape == (5, HEADS, BLOCK, slot)
    assert cache.is_contiguous()  # physical [blocks][heads][tokens][slot]: (block, head) regions
    # vLLM 0.26 finds the block dim by planting a sentinel block count (get_kv_cache_block_dim)
    sentinel = 1234567
    assert TurboQuantBackend.get_kv_cache_shape(sentinel, BLOCK, HEADS, 128, kv).index(sentinel) == 0


def test_vllm026_cache_views_of_boundary_and_sliding_window_layers() -> None:
    dense = _vllm026_view(3, "auto", 128, BLOCK * HEADS * 2 * 128 * 2, torch.bfloat16)
    assert dense.shape == (3, HEADS, BLOCK, 256) and dense.is_contiguous()
    # 0.26 gives a turboquant sliding-window layer a uint8 page of 2 * head_dim bytes per token-head
    # and asks for its shape with "auto"; the impl keeps its region in the leading bytes of each
    # (block, head) region of the page.
    window = _vllm026_view(3, "auto", 128, BLOCK * HEADS * 2 * 128, torch.uint8)
    cache = compressed_cache_view(window, 134)
    assert cache.shape == (3, HEADS, BLOCK, 134)
    assert cache.stride() == (HEADS * BLOCK * 256, BLOCK * 256, 134, 1)
    assert TurboQuantBackend.get_kv_cache_stride_order(include_num_layers_dimension=True) == (0, 1, 2, 3, 4)


@pytest.mark.skipif(not KV_CACHE_LAYOUTS, reason="vLLM before 0.31 takes get_kv_cache_stride_order instead")
def test_vllm032_layouts_keep_block_head_regions_contiguous() -> None:
    from vllm.v1.kv_cache_layout import KVCacheLayout

    layouts = TurboQuantBackend.supported_kv_cache_layouts()
    assert layouts[0] == KVCacheLayout.LBHNC
    for layout in layouts:
        # tokens (N) then content (C) innermost: each (block, head) region is one contiguous run
        assert layout.value[-2:] == (3, 4), layout
    assert KVCacheLayout.LBNHC not in layouts
