"""One prefill step of tq-vllm's impl on one layer, no engine (prefix_flash_check.py): the cases'
impl, compressed cache and metadata, the NaN-poisoned call, its median CUDA time, relative error."""

from __future__ import annotations

import torch

from tq_core import named_format
from tq_kernels.ops.store import tq_store_paged
from tq_vllm.impl import TurboQuantImpl
from tq_vllm.metadata import TurboQuantMetadata

H, HKV, D, BLOCK = 32, 8, 128, 16
DEV = torch.device("cuda")


def make_case(kv: str, requests: list[tuple[int, int]], seed: int):
    """(impl, kv_cache, metadata, query, key, value) of one prefill step of ``requests`` (prefix, chunk)."""
    fmt = named_format(kv, D)
    impl = TurboQuantImpl(H, D, D**-0.5, HKV, None, None, kv, None, "decoder", None)
    impl.prepare("model.layers.5.self_attn.attn", DEV, BLOCK)
    g = torch.Generator(device=DEV).manual_seed(seed)
    seq = [p + c for p, c in requests]
    max_blocks = max(-(-s // BLOCK) for s in seq)
    num_blocks = len(requests) * max_blocks + 1
    table = torch.randperm(num_blocks, device=DEV, generator=g)[: len(requests) * max_blocks]
    table = table.view(len(requests), max_blocks).to(torch.int32)
    kv_cache = torch.zeros(num_blocks, HKV, BLOCK, fmt.slot_bytes, dtype=torch.uint8, device=DEV)
    for r, (p, _) in enumerate(requests):  # the cached prefix, written by the store kernel
        if p:
            pos = torch.arange(p, device=DEV)
            slots = table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
            k = torch.randn(p, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16) * 2
            v = torch.randn(p, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16)
            tq_store_paged(k, v, kv_cache, slots, fmt, layer=5)
    q_lens = torch.tensor([c for _, c in requests], dtype=torch.int32)
    qsl_cpu = torch.zeros(len(requests) + 1, dtype=torch.int32)
    qsl_cpu[1:] = torch.cumsum(q_lens, 0)
    n = int(qsl_cpu[-1])
    meta = TurboQuantMetadata(
        num_actual_tokens=n,
        max_query_len=int(q_lens.max()),
        max_seq_len=max(seq),
        query_start_loc=qsl_cpu.to(DEV),
        query_start_loc_cpu=qsl_cpu,
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=DEV),
        block_table=table,
        slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=DEV),
        num_decodes=0,
        num_decode_tokens=0,
        num_prefills=len(requests),
        num_prefill_tokens=n,
        decode_len_bound=1,
        prefill_prefix_tokens=sum(p for p, _ in requests),
        prefill_max_seq_len=max(seq),
    )
    query = torch.randn(n, H, D, device=DEV, generator=g, dtype=torch.bfloat16)
    key = torch.randn(n, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16) * 2
    value = torch.randn(n, HKV, D, device=DEV, generator=g, dtype=torch.bfloat16)
    return impl, kv_cache, meta, query, key, value


def run(impl, kv_cache, meta, query, key, value) -> torch.Tensor:
    out = torch.full((query.shape[0], H, D), float("nan"), dtype=query.dtype, device=DEV)
    meta._prefix_plans.clear()  # every call plans again, as every engine step does
    impl.forward(None, query, key, value, kv_cache, meta, output=out)
    return out


def ms(case: tuple, reps: int = 20) -> float:
    """Median CUDA time of ``run(*case)``."""
    for _ in range(3):
        run(*case)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        run(*case)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())
