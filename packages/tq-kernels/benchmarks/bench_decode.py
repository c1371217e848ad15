"""Decode attention over the compressed paged cache against torch's bf16 flash SDPA, Llama-8B heads.

    pytest packages/tq-kernels/benchmarks/bench_decode.py --benchmark-only

One case per shape (``B<batch>xL<context>``) and format; ``bf16`` is the baseline's own case.  Each
case first checks the kernel's output (written into a NaN-poisoned buffer) against
``tq_core.paged_decode_attention_ref`` on the same cache, then times eager calls and CUDA-graph replays.
"""

from __future__ import annotations

import pytest
import torch
from _workload import (
    BF16,
    DECODE_BASELINE,
    FORMATS,
    decode_baseline,
    decode_bytes,
    decode_case,
    decode_reference,
    flash_decode,
    record,
    run_benchmark,
    times,
)

from tq_core import attention_ref
from tq_core.testing import ATTENTION_RTOL, poisoned_like, rel_err
from tq_kernels.ops.decode import tq_decode_attention

# 32 x 8K and one 128K sequence first (the headline shapes), then the context sweep at batch 32.
SHAPES = [(32, 8192), (1, 131072), (32, 1024), (32, 2048), (32, 4096), (32, 16384)]
CASES = [(batch, ctx, fmt) for batch, ctx in SHAPES for fmt in (BF16, *FORMATS)]


@pytest.mark.parametrize(("batch", "ctx", "fmt_name"), CASES, ids=[f"B{b}xL{c}-{f}" for b, c, f in CASES])
def test_decode(benchmark, copy_gbps, batch, ctx, fmt_name):
    base = decode_baseline(batch, ctx)
    if fmt_name == BF16:
        fn, (q, k, v) = flash_decode(batch, ctx)
        # the baseline computes attention: sequence 0 against the float32 reference (queries [group, kv, d])
        q0, k0, v0 = (x[0].transpose(0, 1).float() for x in (q, k, v))
        want = attention_ref(q0, k0, v0, causal=False)
        assert rel_err(fn()[0].transpose(0, 1), want) < ATTENTION_RTOL[torch.bfloat16]
        timed, fmt = base, None
    else:
        fmt, cache, table, seq_lens, q = decode_case(fmt_name, batch, ctx)
        out = poisoned_like(q)
        tq_decode_attention(q, cache, table, seq_lens, fmt, out=out, max_seq_len=ctx)
        assert not out.isnan().any(), "the decode kernel left output elements unwritten"
        err = rel_err(out, decode_reference(fmt_name, batch, ctx))
        assert err < ATTENTION_RTOL[torch.bfloat16], f"decode kernel vs tq_core reference: rel err {err:.2e}"

        def fn():
            return tq_decode_attention(q, cache, table, seq_lens, fmt, out=out, max_seq_len=ctx)

        timed = times(fn)
    run_benchmark(benchmark, fn)
    record(
        benchmark,
        op="decode",
        shape=f"B{batch}xL{ctx}",
        fmt=fmt_name,
        nbytes=decode_bytes(batch, ctx, fmt),
        timed=timed,
        base=base,
        baseline=DECODE_BASELINE,
        copy_gbps=copy_gbps,
    )
