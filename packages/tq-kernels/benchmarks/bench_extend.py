"""Extend (a chunk of new tokens over a compressed prefix) against torch's bf16 flash SDPA, Llama-8B heads.

    pytest packages/tq-kernels/benchmarks/bench_extend.py --benchmark-only

One sequence: a ``P<prefix>+C<chunk>`` chunk of queries attends causally to the prefix (compressed
cache) and to its own exact K/V.  Each case first checks the kernel's output (written into a
NaN-poisoned buffer) against ``tq_core.paged_extend_attention_ref``, then times eager calls, like the
baseline (``torch.nn.attention.bias.causal_lower_right``).
"""

from __future__ import annotations

import pytest
import torch
from _workload import (
    BF16,
    EXTEND_BASELINE,
    FORMATS,
    extend_baseline,
    extend_bytes,
    extend_case,
    extend_reference,
    flash_extend,
    record,
    run_benchmark,
    times,
)

from tq_core.testing import ATTENTION_RTOL, poisoned_like, rel_err
from tq_kernels.ops.extend import tq_extend_attention

SHAPES = [(8192, 2048)]
CASES = [(prefix, chunk, fmt) for prefix, chunk in SHAPES for fmt in (BF16, *FORMATS)]


@pytest.mark.parametrize(("prefix", "chunk", "fmt_name"), CASES, ids=[f"P{p}+C{c}-{f}" for p, c, f in CASES])
def test_extend(benchmark, copy_gbps, prefix, chunk, fmt_name):
    if fmt_name == BF16:
        fn, fmt = flash_extend(prefix, chunk), None
        assert fn().isfinite().all()  # torch's own kernel; the comparison that matters is ours below
        timed = extend_baseline(prefix, chunk)
    else:
        fmt, q, kn, vn, cache, table, plens, qsl = extend_case(fmt_name, prefix, chunk)
        out = poisoned_like(q)
        tq_extend_attention(q, kn, vn, cache, table, plens, qsl, chunk, fmt, out=out)
        assert not out.isnan().any(), "the extend kernel left output elements unwritten"
        err = rel_err(out, extend_reference(fmt_name, prefix, chunk))
        assert err < ATTENTION_RTOL[torch.bfloat16], f"extend kernel vs tq_core reference: rel err {err:.2e}"

        def fn():
            return tq_extend_attention(q, kn, vn, cache, table, plens, qsl, chunk, fmt, out=out)

        timed = times(fn, cuda_graph=False)
    run_benchmark(benchmark, fn)
    record(
        benchmark,
        op="extend",
        shape=f"P{prefix}+C{chunk}",
        fmt=fmt_name,
        nbytes=extend_bytes(prefix, chunk, fmt),
        timed=timed,
        base=extend_baseline(prefix, chunk),
        baseline=EXTEND_BASELINE,
        copy_gbps=copy_gbps,
    )
