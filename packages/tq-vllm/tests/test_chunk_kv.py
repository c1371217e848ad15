"""``TQ_VLLM_CHUNK_KV=compressed``: a prefill's result does not depend on where its chunks are cut.

The same 24-token prompt is attended once as one chunk and once as two chunks of 12 (the second over
the compressed cache of the first), and the last 12 rows are compared.  In ``compressed`` mode every
query sees the same decoded K/V either way, so the rows agree to float rounding; in ``exact`` mode the
single chunk sees its first 12 tokens exactly and the split run sees them compressed, so they differ
by the quantization error.  That difference is what made preemption and prefix-cache hits change
greedy tokens on the H200 (experiments/results/vllm_consistency.json).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch
from _steps import Layer, build_layer, vllm_cache

from tq_core import named_format, paged_extend_attention_ref
from tq_core.testing import poisoned, rel_err
from tq_vllm.impl import TurboQuantImpl

LAYER_NAME = "model.layers.2.self_attn.attn"
BLOCK = 16
N = 24
CASE = dict(kv="turboquant_3bit_nc", d=64, h=4, hkv=2, dtype=torch.float16)


def _meta(builder, start: int, end: int, table: torch.Tensor):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, end - start], dtype=torch.int32)
    seq = torch.tensor([end], dtype=torch.int32)
    cam = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=1,
        num_actual_tokens=end - start, max_query_len=end - start, max_seq_len=end, block_table_tensor=table,
        slot_mapping=torch.arange(start, end, dtype=torch.int64), seq_lens_cpu_upper_bound=seq.clone(),
    )  # fmt: skip
    return builder.build(0, cam)


def _attend(mode: str, cuts: list[int], q, k, v, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the prompt attended chunk by chunk (``cuts`` are the chunk ends); also the cache."""
    monkeypatch.setenv("TQ_VLLM_CHUNK_KV", mode)
    builder, impl, _, _ = build_layer(CASE, LAYER_NAME, BLOCK)
    assert isinstance(impl, TurboQuantImpl) and impl.chunk_kv == mode
    fmt = named_format(CASE["kv"], CASE["d"])
    _, kv_cache = vllm_cache(3, BLOCK, CASE["hkv"], fmt.slot_bytes, torch.uint8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    layer, rows, start = Layer(LAYER_NAME), [], 0
    for end in cuts:
        impl.do_kv_cache_update(layer, k[start:end], v[start:end], kv_cache, torch.arange(start, end))
        out = poisoned((end - start, CASE["h"], CASE["d"]), dtype=CASE["dtype"])
        impl.forward(layer, q[start:end], k[start:end], v[start:end], kv_cache, _meta(builder, start, end, table),
                     output=out)  # fmt: skip
        rows.append(out)
        start = end
    return torch.cat(rows), kv_cache


def _inputs():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(N, CASE["h"], CASE["d"], generator=g).to(CASE["dtype"])
    k = (2 * torch.randn(N, CASE["hkv"], CASE["d"], generator=g)).to(CASE["dtype"])
    v = torch.randn(N, CASE["hkv"], CASE["d"], generator=g).to(CASE["dtype"])
    return q, k, v


def test_compressed_chunks_do_not_depend_on_the_cut(monkeypatch) -> None:
    q, k, v = _inputs()
    err = {}
    for mode in ("exact", "compressed"):
        one, _ = _attend(mode, [N], q, k, v, monkeypatch)
        two, _ = _attend(mode, [12, N], q, k, v, monkeypatch)
        assert bool(one.isfinite().all()) and bool(two.isfinite().all())
        err[mode] = rel_err(two[12:], one[12:])
    assert err["compressed"] < 5e-3, err
    assert err["compressed"] < 0.2 * err["exact"], err


def test_compressed_chunk_matches_the_reference_on_decoded_kv(monkeypatch) -> None:
    """One chunk in ``compressed`` mode equals the reference over the chunk's own decoded K/V."""
    q, k, v = _inputs()
    out, _ = _attend("compressed", [N], q, k, v, monkeypatch)
    fmt = named_format(CASE["kv"], CASE["d"])
    k_hat, v_hat = fmt.decode(fmt.encode(k.float(), v.float(), layer=2), layer=2)
    empty = fmt.allocate_cache(1, BLOCK, CASE["hkv"])
    ref = paged_extend_attention_ref(
        q, k_hat, v_hat, empty, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
        torch.tensor([0, N], dtype=torch.int32), fmt, layer=2, scale=CASE["d"] ** -0.5,
    )  # fmt: skip
    assert rel_err(out, ref) < 4e-3


def test_unknown_chunk_mode_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("TQ_VLLM_CHUNK_KV", "lossless")
    with pytest.raises(ValueError, match="TQ_VLLM_CHUNK_KV must be one of exact, compressed"):
        build_layer(CASE, LAYER_NAME, BLOCK)
