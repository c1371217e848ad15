"""The metadata builder on a real ``CommonAttentionMetadata``: decode/prefill split, graph support."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from _steps import make_step
from _vllm_compat import customize_attention_spec
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode

from tq_vllm.backend import TurboQuantBackend
from tq_vllm.metadata import TurboQuantMetadata, TurboQuantMetadataBuilder

BLOCK = 16


def _builder(kv_cache_dtype: str = "turboquant_4bit_nc") -> TurboQuantMetadataBuilder:
    spec = customize_attention_spec(
        TurboQuantBackend,
        FullAttentionSpec(
            block_size=BLOCK,
            num_kv_heads=2,
            head_size=128,
            dtype=torch.uint8 if kv_cache_dtype != "auto" else torch.bfloat16,
            kv_quant_mode=get_kv_quant_mode(kv_cache_dtype),
        ),
        kv_cache_dtype,
    )
    config = VllmConfig()
    with set_current_vllm_config(config):
        return TurboQuantBackend.get_builder_cls()(
            spec, ["model.layers.3.self_attn.attn"], config, torch.device("cpu")
        )


def _step(requests: list[tuple[int, int]], seed: int = 0):
    return make_step(
        requests,
        num_heads=4,
        num_kv_heads=2,
        head_size=128,
        block_size=BLOCK,
        dtype=torch.bfloat16,
        seed=seed,
    )


def test_builder_reorders_decodes_first_and_supports_uniform_decode_graphs() -> None:
    builder = _builder()
    assert builder.reorder_batch_threshold == 1
    cg = TurboQuantMetadataBuilder.get_cudagraph_support(VllmConfig(), builder.kv_cache_spec)
    # single-token decodes only: speculative verification runs the prefill path, decided on the host
    assert cg == AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE


@pytest.mark.parametrize(
    ("requests", "split"),
    [
        ([(20, 1), (37, 1), (16, 9), (0, 13)], (2, 2, 2, 22)),  # mixed
        ([(5, 1), (70, 1), (1, 1)], (3, 0, 3, 0)),  # decodes only (a full-graph batch)
        ([(0, 7), (16, 5)], (0, 2, 0, 12)),  # prefills only: a fresh prompt and a prefix-cache hit
        ([(32, 1)], (1, 0, 1, 0)),  # one decode
    ],
    ids=["mixed", "decode", "prefill", "single"],
)
def test_build_splits_decodes_and_prefills(requests: list[tuple[int, int]], split: tuple[int, ...]) -> None:
    step = _step(requests)
    cam = step.common_metadata()
    meta = _builder().build(0, cam)
    assert isinstance(meta, TurboQuantMetadata)
    assert (meta.num_decodes, meta.num_prefills, meta.num_decode_tokens, meta.num_prefill_tokens) == split
    assert meta.num_actual_tokens == step.num_tokens
    assert meta.max_query_len == cam.max_query_len and meta.max_seq_len == cam.max_seq_len
    # the metadata holds vLLM's persistent tensors themselves, so a captured graph sees each step's values
    for mine, theirs in (
        (meta.seq_lens, cam.seq_lens),
        (meta.block_table, cam.block_table_tensor),
        (meta.query_start_loc, cam.query_start_loc),
        (meta.slot_mapping, cam.slot_mapping),
    ):
        assert mine.data_ptr() == theirs.data_ptr()


def test_decode_splits_depend_on_batch_size_only() -> None:
    """A captured decode graph keeps its grid: the split count must not follow the step's lengths."""
    builder = _builder()
    builder.max_model_len = 4096  # an engine's model config sets it (the bare VllmConfig here has none)
    short = builder.build(0, _step([(3, 1), (5, 1)], seed=1).common_metadata())
    long = builder.build(0, _step([(300, 1), (411, 1)], seed=2).common_metadata())
    assert short.decode_len_bound == long.decode_len_bound == 4096


def test_builder_sets_the_reorder_threshold_without_vllms_private_helper(monkeypatch) -> None:
    """A vLLM that renames ``_init_reorder_batch_threshold`` (or changes its signature) still gets
    decodes reordered first, through the documented attribute."""
    from vllm.v1.attention.backend import AttentionMetadataBuilder

    monkeypatch.delattr(AttentionMetadataBuilder, "_init_reorder_batch_threshold")
    monkeypatch.setattr(TurboQuantMetadataBuilder, "reorder_batch_threshold", None)
    assert _builder().reorder_batch_threshold == 1

    def renamed_args(self, threshold, *, spec_as_decode=False):
        raise AssertionError("not called with its old keywords")

    monkeypatch.setattr(
        AttentionMetadataBuilder, "_init_reorder_batch_threshold", renamed_args, raising=False
    )
    assert _builder().reorder_batch_threshold == 1


def test_uncompressed_group_uses_the_same_builder() -> None:
    meta = _builder("auto").build(0, _step([(9, 1), (0, 4)]).common_metadata())
    assert (meta.num_decodes, meta.num_prefills) == (1, 1)


def test_builder_rejects_non_causal_batches() -> None:
    cam = _step([(0, 4)]).common_metadata()
    cam.causal = False
    with pytest.raises(NotImplementedError, match="causal"):
        _builder().build(0, cam)
