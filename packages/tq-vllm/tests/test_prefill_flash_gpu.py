"""On a CUDA device with vLLM's FlashAttention: the prefill paths against the extend kernel.

Chunks over a cached prefix run FlashAttention over the prefix decoded from the cache
(``tq_vllm.prefix``); the extend kernel computes the same attention from the compressed cache.  Both
run here on the same fresh random cache, outputs poisoned with NaN first, and must agree.  Skipped
without a GPU (``nox -s gpu`` runs it on the device, with vLLM's CUDA build importable).
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch

from tq_core import named_format
from tq_core.testing import poisoned, rel_err
from tq_kernels.ops.store import tq_store_paged
from tq_vllm.impl import TurboQuantImpl
from tq_vllm.metadata import TurboQuantMetadata

pytestmark = pytest.mark.gpu

H, HKV, D, BLOCK, LAYER = 16, 4, 128, 16, 5


def _step(kv: str, requests: list[tuple[int, int]], seed: int):
    """(impl, cache, metadata, q, k, v) of one prefill step of ``requests`` ((cached, new) pairs)."""
    dev = torch.device("cuda")
    fmt = named_format(kv, D)
    impl = TurboQuantImpl(H, D, D**-0.5, HKV, None, None, kv, None, "decoder", None)
    impl.prepare(f"model.layers.{LAYER}.self_attn.attn", dev, BLOCK)
    g = torch.Generator(device=dev).manual_seed(seed)
    seq = [p + c for p, c in requests]
    max_blocks = max(-(-s // BLOCK) for s in seq)
    num_blocks = len(requests) * max_blocks + 3
    table = torch.randperm(num_blocks, device=dev, generator=g)[: len(requests) * max_blocks]
    table = table.view(len(requests), max_blocks).to(torch.int32)
    cache = poisoned((num_blocks, HKV, BLOCK, fmt.slot_bytes), dtype=torch.uint8, device=dev)
    for r, (p, _) in enumerate(requests):
        if p:
            pos = torch.arange(p, device=dev)
            kv_ = torch.randn(2, p, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
            tq_store_paged(kv_[0] * 2, kv_[1], cache, table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK, fmt,
                           layer=LAYER)  # fmt: skip
    q_lens = torch.tensor([c for _, c in requests], dtype=torch.int32)
    qsl = torch.zeros(len(requests) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    n = int(qsl[-1])
    meta = TurboQuantMetadata(
        num_actual_tokens=n, max_query_len=int(q_lens.max()), max_seq_len=max(seq),
        query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl,
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=dev), block_table=table,
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev), num_decodes=0, num_decode_tokens=0,
        num_prefills=len(requests), num_prefill_tokens=n, decode_len_bound=max(seq),
        prefill_prefix_tokens=sum(p for p, _ in requests),
        prefill_max_seq_len=max(seq),
    )  # fmt: skip
    q = torch.randn(n, H, D, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(n, HKV, D, device=dev, generator=g, dtype=torch.bfloat16) * 2
    v = torch.randn(n, HKV, D, device=dev, generator=g, dtype=torch.bfloat16)
    return impl, cache, meta, q, k, v


def _forward(impl, cache, meta, q, k, v) -> torch.Tensor:
    out = poisoned((q.shape[0], H, D), dtype=q.dtype, device=q.device)
    meta._prefix_plans.clear()
    impl.forward(None, q, k, v, cache, meta, output=out)
    return out


@pytest.mark.parametrize("kv", ["turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_k8v4"])
@pytest.mark.parametrize(
    "requests",
    [[(300, 7), (0, 33), (1000, 64)], [(8190, 2), (0, 500)], [(17, 1), (4096, 129)]],
    ids=["mixed", "continuation", "one-token-chunk"],
)
def test_prefix_on_flash_matches_the_extend_kernel(kv: str, requests: list[tuple[int, int]]) -> None:
    step = _step(kv, requests, seed=len(requests))
    impl = step[0]
    assert impl.flash is not None, "vLLM's FlashAttention varlen kernel is not available"
    flash_out = _forward(*step)
    impl.flash = None
    extend_out = _forward(*step)
    assert bool(flash_out.isfinite().all()) and bool(extend_out.isfinite().all())
    err = rel_err(flash_out, extend_out)
    assert err < 2e-2, err
