"""Prefix-LM vision-language models: bidirectional attention inside each media (image/video) range.

vLLM hands a backend that declares ``supports_mm_prefix`` each request's media ranges
(``CommonAttentionMetadata.mm_req_doc_ranges``, inclusive absolute positions); a query inside a range
also sees the range's later tokens.  These tests run steps with ranges inside a fresh prefill, ranges
that start in the cached prefix (a chunked prefill or a prefix-cache hit inside an image) and ranges cut
by the chunk's end, through the compressed layers (extend kernel under the interpreter) and the
uncompressed boundary layers (torch path; ``test_vllm_kernels.py`` runs vLLM's Triton path), against
tq_core's reference with the explicit mask (:func:`tq_core.attention.mm_prefix_mask`).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from _steps import PAD, Layer, attention_kwargs, build_layer, make_step, run_uncompressed_step, vllm_cache

from tq_core import named_format, paged_decode_attention_ref, paged_extend_attention_ref
from tq_core.testing import ATTENTION_RTOL, poisoned, rel_err
from tq_vllm.backend import TurboQuantBackend

LAYER_NAME = "model.layers.3.self_attn.attn"
LAYER = 3
BLOCK = 16
# decodes first (one new token), then a chunk over a cached prefix and a fresh prompt
REQUESTS = [(30, 1), (16, 19), (0, 24)]
MEDIA = {
    # request 0 (a decode past its image): its range is in the past and changes nothing
    "fresh-and-prefix": {0: [(2, 12)], 1: [(10, 20), (25, 30)], 2: [(3, 9), (14, 22)]},
    # ranges cut by the chunk's end (vLLM with chunked multimodal input): keys beyond the chunk do not exist yet
    "cut-by-chunk-end": {1: [(20, 40)], 2: [(18, 30)]},
}


@pytest.mark.parametrize("media", list(MEDIA))
@pytest.mark.parametrize(
    "case",
    [
        dict(kv="turboquant_4bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16),
        dict(kv="turboquant_3bit_nc", d=64, h=4, hkv=1, dtype=torch.float16, window=16, softcap=30.0),
    ],
    ids=["4bit-D128", "3bit-D64-window-softcap"],
)
def test_compressed_layer_attends_bidirectionally_inside_media_ranges(case: dict, media: str) -> None:
    ranges = MEDIA[media]
    if case.get("window"):  # vLLM drops ranges longer than the window (unless the model clamps them)
        ranges = {r: [x for x in rs if x[1] - x[0] < case["window"]] for r, rs in ranges.items()}
    d, h, hkv, dtype = case["d"], case["h"], case["hkv"], case["dtype"]
    fmt = named_format(case["kv"], d)
    step = make_step(REQUESTS, num_heads=h, num_kv_heads=hkv, head_size=d, block_size=BLOCK, dtype=dtype,
                     seed=11, media=ranges)  # fmt: skip
    builder, impl, _, sinks = build_layer(case, LAYER_NAME, BLOCK)
    layer = Layer(LAYER_NAME)
    _, kv_cache = vllm_cache(step.num_blocks, BLOCK, hkv, fmt.slot_bytes, torch.uint8)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    meta = builder.build(0, step.common_metadata())
    assert meta.prefill_key_end is not None and meta.mm_range_tensor is not None
    n, nd = step.num_tokens, meta.num_decode_tokens
    output = poisoned((n + PAD, h, d), dtype=dtype)
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)

    view = kv_cache  # compressed_cache_view is the identity for a slot-sized page
    kw = attention_kwargs(case, sinks)
    qsl = step.query_start_loc[nd:] - nd
    prefill_ranges = [ranges.get(r, []) for r in range(meta.num_decodes, len(REQUESTS))]
    args = (step.query[nd:n], step.new_keys[nd:n], step.new_values[nd:n], view, step.block_table[nd:],
            step.cached_lens[nd:], qsl, fmt)  # fmt: skip
    ref = paged_extend_attention_ref(*args, layer=LAYER, mm_ranges=prefill_ranges, **kw)
    causal = paged_extend_attention_ref(*args, layer=LAYER, **kw)
    assert rel_err(causal, ref) > 0.05  # the ranges matter: a causal answer cannot pass
    ref_dec = paged_decode_attention_ref(
        step.query[:nd], view, step.block_table[:nd], step.seq_lens[:nd], fmt, layer=LAYER, **kw
    )
    assert bool(output[n:].isnan().all()), "padding rows were written"
    assert rel_err(output[:nd], ref_dec) < ATTENTION_RTOL[dtype]
    assert rel_err(output[nd:n], ref) < ATTENTION_RTOL[dtype]


def test_media_ranges_keep_prefill_off_flash_attention() -> None:
    """FlashAttention has no range mask: with media ranges the prefill runs the extend kernel."""
    case = dict(kv="turboquant_4bit_nc", d=64, h=2, hkv=1, dtype=torch.float16)
    step = make_step(REQUESTS, num_heads=2, num_kv_heads=1, head_size=64, block_size=BLOCK, dtype=torch.float16,
                     seed=2, media=MEDIA["fresh-and-prefix"])  # fmt: skip
    builder, impl, _, _ = build_layer(case, LAYER_NAME, BLOCK)

    def no_flash(**kw):
        raise AssertionError("FlashAttention ran a step with media ranges")

    impl.flash = no_flash
    fmt = impl.fmt
    _, kv_cache = vllm_cache(step.num_blocks, BLOCK, 1, fmt.slot_bytes, torch.uint8)
    layer = Layer(LAYER_NAME)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    out = poisoned((step.num_tokens + PAD, 2, 64), dtype=torch.float16)
    meta = builder.build(0, step.common_metadata())
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=out)
    assert bool(out[: step.num_tokens].isfinite().all())


@pytest.mark.parametrize("media", list(MEDIA))
def test_uncompressed_layer_attends_bidirectionally_inside_media_ranges(media: str) -> None:
    case = dict(kv="auto", d=64, h=4, hkv=2, dtype=torch.float16)
    output, ref, n = run_uncompressed_step(case, REQUESTS, LAYER_NAME, BLOCK, media=MEDIA[media])
    _, causal, _ = run_uncompressed_step(case, REQUESTS, LAYER_NAME, BLOCK)
    assert rel_err(causal, ref) > 0.05
    assert bool(output[n:].isnan().all())
    assert rel_err(output[:n], ref) < ATTENTION_RTOL[case["dtype"]]


def test_metadata_carries_ranges_only_when_they_reach_past_a_query() -> None:
    case = dict(kv="turboquant_4bit_nc", d=64, h=2, hkv=1, dtype=torch.float16)
    builder, _, _, _ = build_layer(case, LAYER_NAME, BLOCK)

    def build(media):
        step = make_step(REQUESTS, num_heads=2, num_kv_heads=1, head_size=64, block_size=BLOCK,
                         dtype=torch.float16, seed=0, media=media)  # fmt: skip
        return builder.build(0, step.common_metadata())

    assert build(None).prefill_key_end is None and build(None).mm_range_tensor is None
    assert build({0: [], 1: []}).mm_range_tensor is None
    # a range wholly in request 1's cached prefix: the dense layers get it, the prefill needs no key_end
    meta = build({1: [(2, 9)]})
    assert meta.prefill_key_end is None
    assert meta.mm_range_tensor.tolist() == [[[0, 0]], [[2, 9]], [[0, 0]]]
    # request 2's chunk (fresh, 24 tokens) with a range over its positions 3..9
    meta = build({2: [(3, 9)]})
    key_end = meta.prefill_key_end.tolist()
    assert len(key_end) == 19 + 24
    assert key_end[:19] == list(range(1, 20))  # request 1: causal
    assert key_end[19:] == [1, 2, 3, 10, 10, 10, 10, 10, 10, 10, *range(11, 25)]


def test_backend_declares_mm_prefix_support() -> None:
    assert TurboQuantBackend.supports_mm_prefix() is True


def test_decode_only_batches_carry_no_ranges() -> None:
    """Decodes sit past their prompt's ranges; a decode-only batch keeps the metadata it was captured
    with in a full CUDA graph (no ranges)."""
    case = dict(kv="turboquant_4bit_nc", d=64, h=2, hkv=1, dtype=torch.float16)
    builder, _, _, _ = build_layer(case, LAYER_NAME, BLOCK)
    step = make_step([(30, 1), (40, 1)], num_heads=2, num_kv_heads=1, head_size=64, block_size=BLOCK,
                     dtype=torch.float16, seed=0, media={0: [(2, 12)], 1: [(5, 30)]})  # fmt: skip
    meta = builder.build(0, step.common_metadata())
    assert meta.num_prefills == 0
    assert (meta.mm_ranges, meta.mm_range_tensor, meta.prefill_key_end) == (None, None, None)
