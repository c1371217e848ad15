"""Store (encode K/V into a paged cache) against a bf16 scatter of the same tokens, Llama-8B KV heads.

    pytest packages/tq-kernels/benchmarks/bench_store.py --benchmark-only

Shapes: ``T65536`` stores 65536 tokens into a cache of 65536 slots (a long prefill), ``T32`` one decode
step of 32 sequences into that cache.  Each case first checks the kernel's slots, decoded, against the
tq_core reference store (``KVFormat.store_paged``), both into caches filled with poison bytes, then
times eager calls and CUDA-graph replays (the eager call carries ~0.3 ms of Python launch cost).
"""

from __future__ import annotations

import functools

import pytest
import torch
from _workload import (
    BF16,
    CACHE_TOKENS,
    FORMATS,
    HKV,
    STORE_BASELINE,
    STORE_RTOL,
    D,
    kernel_format,
    poisoned_cache,
    record,
    run_benchmark,
    store_error,
    store_inputs,
    times,
)

from tq_kernels.ops.store import tq_store_paged

SHAPES = [65536, 32]
CASES = [(tokens, fmt) for tokens in SHAPES for fmt in (BF16, *FORMATS)]


def bf16_scatter(tokens: int):
    """The baseline's call (K and V scattered into a bf16 cache of ``CACHE_TOKENS`` slots) and its cache."""
    k, v, slots = store_inputs(tokens)
    cache = torch.empty(CACHE_TOKENS, 2, HKV, D, device=k.device, dtype=torch.bfloat16)
    return (lambda: cache.index_copy_(0, slots, torch.stack([k, v], 1))), cache


@functools.cache
def store_baseline(tokens: int) -> dict[str, float]:
    fn, _ = bf16_scatter(tokens)
    return times(fn)


@pytest.mark.parametrize(("tokens", "fmt_name"), CASES, ids=[f"T{t}-{f}" for t, f in CASES])
def test_store(benchmark, copy_gbps, tokens, fmt_name):
    k, v, slots = store_inputs(tokens)
    if fmt_name == BF16:
        fn, cache = bf16_scatter(tokens)
        fn()
        assert torch.equal(cache[slots], torch.stack([k, v], 1))
        timed, nbytes = store_baseline(tokens), tokens * HKV * 2 * D * 2 * 2  # read and write bf16 K, V
    else:
        fmt = kernel_format(fmt_name)
        cache = poisoned_cache(fmt)
        tq_store_paged(k, v, cache, slots, fmt)
        err = store_error(fmt, cache, tokens)
        assert err < STORE_RTOL, f"store kernel vs tq_core reference store: rel err of decoded K/V {err:.2e}"

        def fn():
            tq_store_paged(k, v, cache, slots, fmt)

        # reads bf16 K and V, writes one slot per token and KV head
        timed, nbytes = times(fn), tokens * HKV * (2 * D * 2 + fmt.slot_bytes)
    run_benchmark(benchmark, fn)
    record(
        benchmark,
        op="store",
        shape=f"T{tokens}",
        fmt=fmt_name,
        nbytes=nbytes,
        timed=timed,
        base=store_baseline(tokens),
        baseline=STORE_BASELINE,
        copy_gbps=copy_gbps,
        cache_tokens=CACHE_TOKENS,
    )
