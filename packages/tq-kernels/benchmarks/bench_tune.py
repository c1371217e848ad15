"""Launch-configuration sweeps of decode, store and extend (marker ``tune``), CUDA-graph timings.

    pytest packages/tq-kernels/benchmarks/bench_tune.py --benchmark-only
    pytest packages/tq-kernels/benchmarks --benchmark-only -m "not tune"   # everything else

What :mod:`tq_kernels.tuning`'s defaults were chosen from: every case runs one
:class:`~tq_kernels.tuning.LaunchConfig` (and split count) on one shape, checked against the tq_core
reference first like the other benchmarks.  A configuration the GPU cannot run (shared memory,
registers) is skipped with the compiler's message.  Rows go to ``extra_info`` with ``kind: "tune"``.
"""

from __future__ import annotations

import pytest
import torch
from _workload import (
    STORE_RTOL,
    decode_case,
    decode_reference,
    environment,
    extend_case,
    extend_reference,
    kernel_format,
    poisoned_cache,
    run_benchmark,
    store_error,
    store_inputs,
)

from tq_core.testing import ATTENTION_RTOL, poisoned_like, rel_err
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.ops.store import tq_store_paged
from tq_kernels.testing import gpu_time_ms
from tq_kernels.tuning import LaunchConfig

pytestmark = pytest.mark.tune
BATCH, CTX = 32, 8192
PREFIX, CHUNK = 8192, 2048


def _decode_configs(name: str) -> list[tuple[LaunchConfig, int | None]]:
    configs: list[tuple[LaunchConfig, int | None]] = [(LaunchConfig(128, 4, 2, nibble=False), None)]
    if name != "turboquant_4bit_nc":  # formats with 3-bit codes: the eight-phase loop is opt-in there
        return configs + [
            (LaunchConfig(bn, 1, 3, lut=lut, nibble_3bit=True), splits)
            for bn in (16, 32)
            for lut in ("exact", "sym")
            for splits in (8, 16)
        ]
    configs += [(LaunchConfig(32, 1, 3, lut="sym"), s) for s in (None, 8, 16)]  # symmetric-table lookup
    configs += [(LaunchConfig(16, 1, 3, lut="sym"), s) for s in (8, 16)]
    return configs + [
        (LaunchConfig(bn, warps, stages), splits)
        for bn, warps in ((16, 1), (32, 1), (64, 1), (32, 2), (64, 2), (64, 4), (128, 4))
        for stages in (2, 3)
        for splits in (None, 8, 16)
    ]


def _cfg_id(cfg: LaunchConfig) -> str:
    loop = ("nibble" if cfg.nibble else "plane") + ("3" if cfg.nibble_3bit else "")
    return f"n{cfg.block_n}-w{cfg.num_warps}-s{cfg.num_stages}-{loop}-{cfg.lut}"


def _run_or_skip(fn):
    try:
        return fn()
    except Exception as exc:  # out of shared memory / registers for this configuration on this GPU
        pytest.skip(f"this GPU cannot run the configuration: {type(exc).__name__}: {exc}")


def _record(benchmark, op: str, shape: str, name: str, cfg: LaunchConfig, ms: float, **extra) -> None:
    benchmark.extra_info.update(
        kind="tune", op=op, shape=shape, format=name, block_n=cfg.block_n, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, nibble=cfg.nibble, lut=cfg.lut, nibble_3bit=cfg.nibble_3bit,
        ms_graph=ms, **extra, **environment(),
    )  # fmt: skip


DECODE = [
    (name, cfg, splits)
    for name in ("turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
    for cfg, splits in _decode_configs(name)
]


@pytest.mark.parametrize(
    ("name", "cfg", "splits"), DECODE, ids=[f"{n}-{_cfg_id(c)}-splits{s or 'auto'}" for n, c, s in DECODE]
)
def test_tune_decode(benchmark, name, cfg, splits):
    fmt, cache, table, seq_lens, q = decode_case(name, BATCH, CTX)
    out = poisoned_like(q)

    def fn():
        return tq_decode_attention(
            q, cache, table, seq_lens, fmt, config=cfg, max_seq_len=CTX, out=out, num_splits=splits
        )

    _run_or_skip(fn)
    err = rel_err(out, decode_reference(name, BATCH, CTX))
    assert err < ATTENTION_RTOL[torch.bfloat16], f"{cfg} splits={splits}: rel err {err:.2e} vs tq_core"
    ms = gpu_time_ms(fn)[0]
    run_benchmark(benchmark, fn)
    _record(benchmark, "decode", f"B{BATCH}xL{CTX}", name, cfg, ms, num_splits=splits)


STORE = [
    (tokens, name, LaunchConfig(bn, warps, 1))
    for tokens in (65536, 32)
    for name in ("turboquant_4bit_nc", "turboquant_k8v4")
    for bn, warps in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8))
]


@pytest.mark.parametrize(
    ("tokens", "name", "cfg"), STORE, ids=[f"T{t}-{n}-n{c.block_n}-w{c.num_warps}" for t, n, c in STORE]
)
def test_tune_store(benchmark, tokens, name, cfg):
    k, v, slots = store_inputs(tokens)
    fmt = kernel_format(name)
    cache = poisoned_cache(fmt)

    def fn():
        tq_store_paged(k, v, cache, slots, fmt, config=cfg)

    _run_or_skip(fn)
    err = store_error(fmt, cache, tokens)
    assert err < STORE_RTOL, f"{cfg}: rel err of decoded K/V {err:.2e} vs the tq_core reference store"
    ms = gpu_time_ms(fn)[0]
    run_benchmark(benchmark, fn)
    _record(benchmark, "store", f"T{tokens}", name, cfg, ms, tokens=tokens)


EXTEND = [
    (name, cfg)
    for name in ("turboquant_4bit_nc", "turboquant_k3v4_nc")
    for cfg in [LaunchConfig(64, 4, 2, nibble=False)]
    + [
        LaunchConfig(bn, w, st, nibble=True, lut=lut, nibble_3bit=True)
        for bn, w in ((64, 4), (32, 4), (64, 8))
        for st in (2, 3)
        for lut in ("exact", "sym")
    ]
]


@pytest.mark.parametrize(("name", "cfg"), EXTEND, ids=[f"{n}-{_cfg_id(c)}" for n, c in EXTEND])
def test_tune_extend(benchmark, name, cfg):
    fmt, q, kn, vn, cache, table, plens, qsl = extend_case(name, PREFIX, CHUNK)
    out = poisoned_like(q)

    def fn():
        return tq_extend_attention(q, kn, vn, cache, table, plens, qsl, CHUNK, fmt, config=cfg, out=out)

    _run_or_skip(fn)
    err = rel_err(out, extend_reference(name, PREFIX, CHUNK))
    assert err < ATTENTION_RTOL[torch.bfloat16], f"{cfg}: rel err {err:.2e} vs tq_core"
    ms = gpu_time_ms(fn)[0]
    run_benchmark(benchmark, fn)
    _record(benchmark, "extend", f"P{PREFIX}+C{CHUNK}", name, cfg, ms)
