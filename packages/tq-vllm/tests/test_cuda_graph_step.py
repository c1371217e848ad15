"""The decode step vLLM captures in a full CUDA graph, on CPU: its padded shape and its host traffic.

vLLM's model runner V2 (the default for dense models in vLLM 0.26 and 0.32) captures uniform decode
batches padded to a capture size: padding *requests* join the batch with no query token, sequence
length 0 and a zeroed block-table row, and ``num_actual_tokens`` counts the padded tokens
(``model_states/default.py`` ``prepare_attn`` with ``CUDAGraphMode.FULL``; ``input_batch.py``
``prepare_pos_seq_lens`` zeroes the padded lengths).  The CPU engine never pads requests, so this is
the only place the shape is run before a GPU sees it.

A captured step must not read device values on the host either (``.item()``, ``.tolist()``,
``.cpu()``, ``bool(tensor)``): on CUDA that synchronizes, which aborts the capture.  Here the Triton
launches are stubbed out (their interpreter reads tensors on the host by design) and every host read
of a tensor raises.
"""

from __future__ import annotations

import contextlib

import pytest

pytest.importorskip("vllm")

import torch
from _steps import PAD, Layer, attention_kwargs, build_layer, make_step, vllm_cache
from vllm.v1.attention.backend import CommonAttentionMetadata

import tq_kernels.ops.decode as decode_ops
import tq_kernels.ops.store as store_ops
from tq_core import named_format, paged_decode_attention_ref
from tq_core.testing import ATTENTION_RTOL, poisoned, rel_err
from tq_vllm.impl import compressed_cache_view

LAYER_NAME = "model.layers.5.self_attn.attn"
BLOCK = 16
CASE = dict(kv="turboquant_4bit_nc", d=128, h=4, hkv=2, dtype=torch.bfloat16)
DECODES = [(20, 1), (37, 1), (5, 1)]  # real requests of the batch; PAD padding requests follow


def _padded_decode_step():
    """(step, metadata of the batch padded by PAD requests, as runner V2 builds it for a full graph)."""
    step = make_step(
        DECODES, num_heads=CASE["h"], num_kv_heads=CASE["hkv"], head_size=CASE["d"], block_size=BLOCK,
        dtype=CASE["dtype"], seed=3,
    )  # fmt: skip
    n = step.num_tokens
    qsl = torch.cat([step.query_start_loc, torch.full((PAD,), n, dtype=torch.int32)])
    seq_lens = torch.cat([step.seq_lens, torch.zeros(PAD, dtype=torch.int32)])
    table = torch.cat([step.block_table, torch.zeros(PAD, step.block_table.shape[1], dtype=torch.int32)])
    cam = CommonAttentionMetadata(
        query_start_loc=qsl,
        query_start_loc_cpu=qsl.clone(),
        seq_lens=seq_lens,
        num_reqs=len(DECODES) + PAD,
        num_actual_tokens=n + PAD,
        max_query_len=1,
        max_seq_len=4096,  # runner V2 captures with max_model_len
        block_table_tensor=table,
        slot_mapping=step.new_slots,
        seq_lens_cpu_upper_bound=seq_lens.clone(),
    )
    return step, cam


def _prepared():
    step, cam = _padded_decode_step()
    builder, impl, _, sinks = build_layer(CASE, LAYER_NAME, BLOCK)
    _, kv_cache = vllm_cache(step.num_blocks, BLOCK, CASE["hkv"], impl.fmt.slot_bytes, torch.uint8)
    layer = Layer(LAYER_NAME)
    hist_k, hist_v = step.history()
    impl.do_kv_cache_update(layer, hist_k, hist_v, kv_cache, step.history_slots)
    return step, cam, builder, impl, layer, kv_cache, sinks


def test_padded_uniform_decode_batch_matches_reference() -> None:
    step, cam, builder, impl, layer, kv_cache, sinks = _prepared()
    meta = builder.build(0, cam)
    n = step.num_tokens
    assert (meta.num_decodes, meta.num_decode_tokens, meta.num_prefills) == (n + PAD, n + PAD, 0)
    impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
    output = poisoned((n + PAD, CASE["h"], CASE["d"]), dtype=CASE["dtype"])
    impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)
    fmt = named_format(CASE["kv"], CASE["d"])
    ref = paged_decode_attention_ref(
        step.query[:n],
        compressed_cache_view(kv_cache, fmt.slot_bytes),
        step.block_table,
        step.seq_lens,
        fmt,
        layer=5,
        **attention_kwargs(CASE, sinks),
    )
    assert rel_err(output[:n], ref) < ATTENTION_RTOL[CASE["dtype"]]
    # a padding request has no context: its row is written (the graph covers it) and holds zeros
    assert bool((output[n:] == 0).all())


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _host_reads_forbidden(monkeypatch: pytest.MonkeyPatch):
    def refuse(name: str):
        def method(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} during a captured step (a host sync on CUDA)")

        return method

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__"):
            m.setattr(torch.Tensor, name, refuse(name))
        m.setattr(torch, "nonzero", refuse("nonzero"))
        yield


def test_decode_step_reads_no_device_value_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    step, cam, builder, impl, layer, kv_cache, _ = _prepared()
    meta = builder.build(0, cam)  # built on the host before replay, outside the graph
    for module, name in (
        (decode_ops, "_tq_decode_attention_kernel"),
        (decode_ops, "_tq_decode_reduce_kernel"),
        (store_ops, "_tq_store_kernel"),
    ):
        monkeypatch.setattr(module, name, _NoLaunch())
    output = torch.empty(step.num_tokens + PAD, CASE["h"] * CASE["d"], dtype=CASE["dtype"])
    with _host_reads_forbidden(monkeypatch):
        impl.do_kv_cache_update(layer, step.new_keys, step.new_values, kv_cache, step.new_slots)
        impl.forward(layer, step.query, step.new_keys, step.new_values, kv_cache, meta, output=output)
