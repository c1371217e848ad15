"""What the kernel benchmarks share: the attention shapes, their inputs, the bf16 baselines, and one row of
timings per case in ``benchmark.extra_info``.

Shapes are Llama-3.1-8B's attention: 32 query heads, 8 KV heads, head_dim 128, 16-token pages.  Every
case checks the kernel against the tq_core reference on its own inputs (into a NaN-poisoned output)
before anything is timed.  Timings come from :func:`tq_kernels.testing.gpu_time_ms` (CUDA events, eager
and CUDA-graph replay); pytest-benchmark's own columns are the host's wall time of an eager call plus a
synchronize, kept so that its comparisons across runs work, while the rows the results report read are
in ``extra_info``.
"""

from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from typing import Any

import torch

from tq_core import named_format, paged_decode_attention_ref, paged_extend_attention_ref
from tq_core.formats import KVFormat
from tq_core.testing import DEQUANT_RTOL, poisoned, rel_err
from tq_kernels.testing import filled_paged_cache, gpu_time_ms

H, HKV, D, PAGE = 32, 8, 128, 16
DEVICE = "cuda"
FORMATS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")
BF16 = "bf16"
DECODE_BASELINE = "torch flash SDPA bf16"
EXTEND_BASELINE = "torch flash SDPA bf16 (causal lower-right)"
STORE_BASELINE = "bf16 scatter (index_copy_)"
# Filled in by the session fixture ``copy_gbps``; the conftest writes it into the JSON's top level too.
RUN: dict[str, Any] = {}


@functools.cache
def environment() -> dict[str, str]:
    """GPU name and the versions of what is timed, for every case's ``extra_info``."""
    versions = {}
    for dist in ("torch", "triton", "tq-core", "tq-kernels"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
            versions[dist] = "source tree"
    versions["torch"] = torch.__version__
    return {"gpu": torch.cuda.get_device_name(), "cuda": str(torch.version.cuda), **versions}


def kernel_format(name: str) -> KVFormat:
    return named_format(name, D)


def times(fn: Callable[[], object], *, cuda_graph: bool = True) -> dict[str, float]:
    """Eager and CUDA-graph medians (with p20/p80) of ``fn`` in milliseconds."""
    ms, p20, p80 = gpu_time_ms(fn, cuda_graph=False)
    out = {"ms": ms, "ms_p20": p20, "ms_p80": p80}
    if cuda_graph:
        g, g20, g80 = gpu_time_ms(fn)
        out |= {"ms_graph": g, "ms_graph_p20": g20, "ms_graph_p80": g80}
    return out


def run_benchmark(benchmark: Any, fn: Callable[[], object]) -> None:
    """pytest-benchmark's own timing: wall time of an eager call and a synchronize."""

    def call() -> None:
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(call, rounds=20, warmup_rounds=3, iterations=1)


def record(
    benchmark: Any,
    *,
    op: str,
    shape: str,
    fmt: str,
    nbytes: int | None,
    timed: dict[str, float],
    base: dict[str, float],
    baseline: str,
    copy_gbps: float,
    **extra: object,
) -> dict[str, Any]:
    """One results row (the fields ``experiments/kernels/bench_report.py`` and the docs read) into
    ``benchmark.extra_info``: bytes moved, GB/s and the fraction of the copy bandwidth measured in the
    same run, the baseline's time and the speed-up against it, eager and CUDA-graph."""
    row: dict[str, Any] = {"kind": "row", "op": op, "shape": shape, "format": fmt, "bytes": nbytes}
    for suffix in ("", "_graph"):
        if f"ms{suffix}" not in timed:
            continue
        ms = timed[f"ms{suffix}"]
        gbps = None if nbytes is None else nbytes / ms / 1e6
        row |= {
            f"ms{suffix}": ms,
            f"ms{suffix}_p20": timed[f"ms{suffix}_p20"],
            f"ms{suffix}_p80": timed[f"ms{suffix}_p80"],
            f"gbps{suffix}": gbps,
            f"bw_fraction{suffix}": None if gbps is None else gbps / copy_gbps,
        }
        if f"ms{suffix}" in base:
            row[f"baseline_ms{suffix}"] = base[f"ms{suffix}"]
            row[f"speedup_vs_baseline{suffix}"] = base[f"ms{suffix}"] / ms
    row |= {"baseline": baseline, "copy_gbps": copy_gbps, **extra, **environment()}
    benchmark.extra_info.update(row)
    return row


# -- decode ------------------------------------------------------------------------------------------


def decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table (each sequence its own run of blocks), lengths and bf16 queries of one decode step."""
    blocks = ctx // PAGE
    table = torch.arange(batch * blocks, device=DEVICE, dtype=torch.int32).view(batch, blocks)
    seq_lens = torch.full((batch,), ctx, device=DEVICE, dtype=torch.int32)
    g = torch.Generator(device=DEVICE).manual_seed(batch * ctx)
    q = torch.randn(batch, H, D, device=DEVICE, generator=g).to(torch.bfloat16)
    return table, seq_lens, q


@functools.lru_cache(maxsize=1)
def decode_case(
    name: str, batch: int, ctx: int
) -> tuple[KVFormat, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(fmt, cache, block_table, seq_lens, q)`` of one decode shape (the cache filled once per format)."""
    fmt = kernel_format(name)
    table, seq_lens, q = decode_inputs(batch, ctx)
    return fmt, filled_paged_cache(fmt, table.numel(), PAGE, HKV, device=DEVICE), table, seq_lens, q


@functools.lru_cache(maxsize=1)
def decode_reference(name: str, batch: int, ctx: int) -> torch.Tensor:
    fmt, cache, table, seq_lens, q = decode_case(name, batch, ctx)
    return paged_decode_attention_ref(q.float(), cache, table, seq_lens, fmt)


def flash_decode(batch: int, ctx: int) -> tuple[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]]:
    """torch's flash SDPA on the same shape with the GQA group folded into the query length (one decode
    query per head, no mask): it reads the bf16 K/V once, like a paged decode kernel.  Returns the call
    and its ``(q, k, v)``, ``q`` `[batch, kv_heads, group, d]`."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=DEVICE).manual_seed(ctx)
    q = torch.randn(batch, HKV, H // HKV, D, device=DEVICE, generator=g).to(torch.bfloat16)
    k = torch.randn(batch, HKV, ctx, D, device=DEVICE, generator=g).to(torch.bfloat16)
    v = torch.randn(batch, HKV, ctx, D, device=DEVICE, generator=g).to(torch.bfloat16)

    def fn() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fn, (q, k, v)


@functools.cache
def decode_baseline(batch: int, ctx: int) -> dict[str, float]:
    """The bf16 baseline's times on one decode shape, measured once per run and shared by its cases."""
    fn, _ = flash_decode(batch, ctx)
    return times(fn)


def decode_bytes(batch: int, ctx: int, fmt: KVFormat | None) -> int:
    """Bytes of K/V a decode step reads (bf16 K and V, or one compressed slot per token and KV head)."""
    per_token_head = 2 * D * 2 if fmt is None else fmt.slot_bytes
    return batch * ctx * HKV * per_token_head


# -- extend ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def extend_case(name: str, prefix: int, chunk: int) -> tuple[Any, ...]:
    """``(fmt, q, k_new, v_new, cache, block_table, prefix_lens, query_start_loc)`` of one sequence
    extending a ``prefix``-token cache by ``chunk`` tokens."""
    fmt = kernel_format(name)
    g = torch.Generator(device=DEVICE).manual_seed(prefix + chunk)
    q, kn, vn = (
        torch.randn(chunk, heads, D, device=DEVICE, generator=g).to(torch.bfloat16) for heads in (H, HKV, HKV)
    )
    nblk = (prefix + chunk) // PAGE + 1
    table = torch.arange(nblk, device=DEVICE, dtype=torch.int32)[None]
    plens = torch.tensor([prefix], device=DEVICE, dtype=torch.int32)
    qsl = torch.tensor([0, chunk], device=DEVICE, dtype=torch.int32)
    return fmt, q, kn, vn, filled_paged_cache(fmt, nblk, PAGE, HKV, device=DEVICE), table, plens, qsl


def flash_extend(prefix: int, chunk: int) -> Callable[[], torch.Tensor]:
    """torch's flash (or memory-efficient) SDPA of a ``chunk``-token chunk over ``prefix + chunk`` bf16
    keys per head, causal from the lower right."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    g = torch.Generator(device=DEVICE).manual_seed(prefix)
    q = torch.randn(1, H, chunk, D, device=DEVICE, generator=g).to(torch.bfloat16)
    k = torch.randn(1, H, prefix + chunk, D, device=DEVICE, generator=g).to(torch.bfloat16)
    v = torch.randn(1, H, prefix + chunk, D, device=DEVICE, generator=g).to(torch.bfloat16)
    mask = causal_lower_right(chunk, prefix + chunk)

    def fn() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fn


@functools.lru_cache(maxsize=1)
def extend_reference(name: str, prefix: int, chunk: int) -> torch.Tensor:
    fmt, q, kn, vn, cache, table, plens, qsl = extend_case(name, prefix, chunk)
    return paged_extend_attention_ref(q.float(), kn.float(), vn.float(), cache, table, plens, qsl, fmt)


@functools.cache
def extend_baseline(prefix: int, chunk: int) -> dict[str, float]:
    return times(flash_extend(prefix, chunk), cuda_graph=False)


def extend_bytes(prefix: int, chunk: int, fmt: KVFormat | None) -> int:
    """Bytes an extend reads and writes at least: the prefix's K/V, the chunk's bf16 K/V, queries, output."""
    q_and_out = 2 * chunk * H * D * 2
    if fmt is None:  # the baseline's K/V: bf16, one per query head, prefix and chunk
        return (prefix + chunk) * H * 2 * D * 2 + q_and_out
    return prefix * HKV * fmt.slot_bytes + chunk * HKV * 2 * D * 2 + q_and_out


# -- store -------------------------------------------------------------------------------------------

CACHE_TOKENS = 65536
# Codes of a vector close to a cell boundary may differ between the kernel and the CPU-order reference
# (the rotation's accumulation order); tests/test_store.py checks every such flip is a tie.  A flip moves
# one coordinate by one cell, a few per 10^4 vectors, well inside this bound on the decoded values.
STORE_RTOL = 10 * DEQUANT_RTOL[torch.bfloat16]


@functools.lru_cache(maxsize=1)
def store_inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 K and V `[tokens, kv_heads, d]` and distinct random slots of a ``CACHE_TOKENS``-slot cache."""
    g = torch.Generator(device=DEVICE).manual_seed(tokens)
    k = torch.randn(tokens, HKV, D, device=DEVICE, generator=g).to(torch.bfloat16)
    v = torch.randn(tokens, HKV, D, device=DEVICE, generator=g).to(torch.bfloat16)
    slots = torch.randperm(CACHE_TOKENS, device=DEVICE, generator=g)[:tokens]
    return k, v, slots


def poisoned_cache(fmt: KVFormat) -> torch.Tensor:
    return poisoned(fmt.cache_shape(CACHE_TOKENS // PAGE, PAGE, HKV), dtype=torch.uint8, device=DEVICE)


def store_error(fmt: KVFormat, cache: torch.Tensor, tokens: int) -> float:
    """Relative error of the K/V decoded from ``cache``'s stored slots against the tq_core reference
    store of the same tokens into a poisoned cache (an unwritten slot decodes to poison and fails)."""
    k, v, slots = store_inputs(tokens)
    ref = poisoned_cache(fmt)
    fmt.store_paged(ref, k, v, slots)
    blocks = torch.arange(ref.shape[0], device=ref.device)
    got, want = (torch.stack(fmt.gather_paged(c, blocks, CACHE_TOKENS))[:, slots] for c in (cache, ref))
    return rel_err(got, want)
