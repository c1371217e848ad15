"""CPU encode throughput of the reference quantizer: 1M vectors of d = 128 at 4 bits (target < 5 s).

pytest packages/tq-core/benchmarks --benchmark-only
"""

from __future__ import annotations

import platform

import torch

from tq_core import ComponentFormat, KVFormat

N, D = 1_000_000, 128


def test_encode_1m_vectors_4bit(benchmark):
    fmt = KVFormat(D, ComponentFormat(4), ComponentFormat(4))
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(N // 2, 1, D, generator=gen)
    v = torch.randn(N // 2, 1, D, generator=gen)
    slots = benchmark.pedantic(fmt.encode, args=(k, v), rounds=3, iterations=1, warmup_rounds=1)
    assert slots.shape == (N // 2, 1, fmt.slot_bytes)
    benchmark.extra_info.update(
        vectors=N,
        head_dim=D,
        bits=4,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpu=platform.processor() or platform.machine(),
    )
    assert benchmark.stats.stats.median < 5.0, "encoding 1M vectors took longer than the 5 s target"
