"""Kernel benchmarks on one GPU: decode, store and extend vs bf16 FlashAttention in the same run.

    python experiments/kernels/bench_kernels.py [--quick]

Writes results/kernels_h200.json ({"command", "date", "gpu", "copy_gbps", "rows": [...]}) and
kernels_decode.png.  Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128.
The bf16 baseline is torch's flash SDPA with the GQA group folded into the query length (one decode
query per head, no mask), which reads exactly the bf16 K/V once, like a paged decode kernel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import bench_ms, copy_bandwidth_gbps, gpu_name, graph_ms, line_plot, out_path, write_result

from tq_core import named_format
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.ops.extend import tq_extend_attention
from tq_kernels.ops.store import tq_store_paged

H, HKV, D, PAGE = 32, 8, 128, 16
FORMATS = ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc"]


def flash_decode_ms(batch: int, ctx: int) -> tuple[float, float]:
    """(eager ms, CUDA-graph replay ms) of torch's flash SDPA decode on the same shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = H // HKV
    q = torch.randn(batch, HKV, g, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):

        def fn():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        return bench_ms(fn)[0], graph_ms(fn)


def random_cache(fmt, num_blocks: int) -> torch.Tensor:
    # Random bytes are valid codes; norms must be finite: write real slots for a prefix, tile the rest.
    cache = fmt.allocate_cache(num_blocks, PAGE, HKV, device="cuda")
    n = min(num_blocks, 4096) * PAGE
    k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
    fmt.store_paged(cache, k, torch.randn_like(k), torch.arange(n, device="cuda"))  # tq_core reference
    filled = n // PAGE
    for s in range(filled, num_blocks, filled):
        cache[s : s + filled] = cache[: min(filled, num_blocks - s)]
    return cache


def decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table (each sequence its own run of blocks), lengths and queries of one decode step."""
    blocks_per_seq = ctx // PAGE
    table = torch.arange(batch * blocks_per_seq, device="cuda", dtype=torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)
    return table, seq_lens, q


def decode_rows(batch: int, ctx: int, copy_gbps: float) -> list[dict]:
    rows = []
    base, base_graph = flash_decode_ms(batch, ctx)
    bf16_bytes = batch * ctx * HKV * D * 2 * 2
    rows.append(
        dict(
            op="decode",
            shape=f"B{batch}xL{ctx}",
            format="bf16",
            ms=base,
            gbps=bf16_bytes / base / 1e6,
            bw_fraction=bf16_bytes / base / 1e6 / copy_gbps,
            baseline="torch flash SDPA bf16",
            baseline_ms=base,
            speedup_vs_baseline=1.0,
            ms_graph=base_graph,
            baseline_ms_graph=base_graph,
            speedup_vs_baseline_graph=1.0,
        )
    )
    table, seq_lens, q = decode_inputs(batch, ctx)
    for name in FORMATS:
        fmt = named_format(name, D)
        cache = random_cache(fmt, table.numel())
        out = torch.empty_like(q)

        def fn(fmt=fmt, cache=cache, out=out):
            return tq_decode_attention(q, cache, table, seq_lens, fmt, out=out, max_seq_len=ctx)

        ms, ms_graph = bench_ms(fn)[0], graph_ms(fn)
        nbytes = batch * ctx * HKV * fmt.slot_bytes
        rows.append(
            dict(
                op="decode",
                shape=f"B{batch}xL{ctx}",
                format=name,
                ms=ms,
                gbps=nbytes / ms / 1e6,
                bw_fraction=nbytes / ms / 1e6 / copy_gbps,
                baseline="torch flash SDPA bf16",
                baseline_ms=base,
                speedup_vs_baseline=base / ms,
                ms_graph=ms_graph,
                gbps_graph=nbytes / ms_graph / 1e6,
                bw_fraction_graph=nbytes / ms_graph / 1e6 / copy_gbps,
                baseline_ms_graph=base_graph,
                speedup_vs_baseline_graph=base_graph / ms_graph,
            )
        )
        del cache
    return rows


def tune_decode(batch: int, ctx: int, name: str) -> list[dict]:
    """Time every launch configuration of the decode kernel on one shape (printed, kept in the JSON)."""
    from tq_kernels.tuning import LaunchConfig

    fmt = named_format(name, D)
    table, seq_lens, q = decode_inputs(batch, ctx)
    cache = random_cache(fmt, table.numel())
    rows = []
    configs = [
        (LaunchConfig(128, 4, 2, nibble=False), None),
    ]
    if name != "turboquant_4bit_nc":  # formats with 3-bit codes: the eight-phase loop is opt-in there
        configs += [
            (LaunchConfig(bn, 1, 3, lut=lut, nibble_3bit=True), splits)
            for bn in (16, 32)
            for lut in ("exact", "sym")
            for splits in (8, 16)
        ]
    else:
        configs += [(LaunchConfig(32, 1, 3, lut="sym"), s) for s in (None, 8, 16)]  # symmetric-table lookup
        configs += [(LaunchConfig(16, 1, 3, lut="sym"), s) for s in (8, 16)]
        configs += [
            (LaunchConfig(bn, warps, stages), splits)
            for bn, warps in ((16, 1), (32, 1), (64, 1), (32, 2), (64, 2), (64, 4), (128, 4))
            for stages in (2, 3)
            for splits in (None, 8, 16)
        ]
    for cfg, splits in configs:
        out = torch.empty_like(q)
        try:
            ms = graph_ms(  # GPU time, as vLLM runs decode (full CUDA graphs)
                lambda cfg=cfg, out=out, splits=splits: tq_decode_attention(
                    q, cache, table, seq_lens, fmt, config=cfg, max_seq_len=ctx, out=out, num_splits=splits
                )
            )
        except Exception as e:  # out of shared memory / registers for this config
            print(f"tune {cfg} splits={splits}: {type(e).__name__}: {e}", flush=True)
            continue
        rows.append(dict(block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                         nibble=cfg.nibble, lut=cfg.lut, nibble_3bit=cfg.nibble_3bit, format=name, num_splits=splits, ms_graph=ms))  # fmt: skip
        print(f"tune B{batch}xL{ctx} {name} {cfg} splits={splits}: {ms:.3f} ms (CUDA graph)", flush=True)
    return rows


def ablate_decode(batch: int, ctx: int, name: str) -> list[dict]:
    """Time the decode kernel's plane loop with stages left out (ablated_decode.py: 1: no centroid
    lookup, 2: no code loads, 3: neither)."""
    from ablated_decode import ABLATIONS, ablated_decode_attention

    from tq_kernels.tuning import LaunchConfig

    fmt = named_format(name, D)
    table, seq_lens, q = decode_inputs(batch, ctx)
    cache = random_cache(fmt, table.numel())
    rows = []
    for cfg in (LaunchConfig(64, 4, 2, nibble=False), LaunchConfig(128, 4, 2, nibble=False)):
        for ab in ABLATIONS:
            ms = graph_ms(
                lambda cfg=cfg, ab=ab: ablated_decode_attention(
                    q, cache, table, seq_lens, fmt, ablate=ab, config=cfg, max_seq_len=ctx
                )
            )
            rows.append(dict(config=str(cfg), ablate=ab, ms=ms))
            print(f"ablate {ab} {cfg}: {ms:.3f} ms", flush=True)
    return rows


def store_rows(tokens: int, copy_gbps: float, cache_tokens: int | None = None) -> list[dict]:
    """Store ``tokens`` (token, KV-head) K/V pairs into random slots of a cache of ``cache_tokens``
    tokens; CUDA-graph timings (the eager call carries ~0.3 ms of Python launch cost)."""
    rows = []
    cache_tokens = cache_tokens or tokens
    k = torch.randn(tokens, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(cache_tokens, device="cuda")[:tokens]
    bf16_cache = torch.empty(cache_tokens, 2, HKV, D, device="cuda", dtype=torch.bfloat16)
    base = graph_ms(lambda: bf16_cache.index_copy_(0, slots, torch.stack([k, v], 1)))
    for name in FORMATS:
        fmt = named_format(name, D)
        cache = fmt.allocate_cache(cache_tokens // PAGE, PAGE, HKV, device="cuda")
        ms = graph_ms(lambda fmt=fmt, cache=cache: tq_store_paged(k, v, cache, slots, fmt))
        nbytes = tokens * HKV * (2 * D * 2 + fmt.slot_bytes)
        rows.append(
            dict(
                op="store",
                shape=f"T{tokens}",
                format=name,
                ms=ms,
                gbps=nbytes / ms / 1e6,
                bw_fraction=nbytes / ms / 1e6 / copy_gbps,
                baseline="bf16 scatter (index_copy_), CUDA graph",
                baseline_ms=base,
                speedup_vs_baseline=base / ms,
            )
        )
    return rows


def tune_store(tokens: int, cache_tokens: int) -> list[dict]:
    """Time the store kernel's launch configurations (rows per program x warps) on one shape."""
    from tq_kernels.tuning import LaunchConfig

    k = torch.randn(tokens, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(cache_tokens, device="cuda")[:tokens]
    rows = []
    for name in ("turboquant_4bit_nc", "turboquant_k8v4"):
        fmt = named_format(name, D)
        cache = fmt.allocate_cache(cache_tokens // PAGE, PAGE, HKV, device="cuda")
        for bn, warps in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8)):
            cfg = LaunchConfig(bn, warps, 1)
            try:
                ms = graph_ms(
                    lambda fmt=fmt, cache=cache, cfg=cfg: tq_store_paged(k, v, cache, slots, fmt, config=cfg)
                )
            except Exception as e:
                print(f"store tune {cfg}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(
                dict(op="store", tokens=tokens, format=name, block_n=bn, num_warps=warps, ms_graph=ms)
            )
            print(f"store tune T{tokens} {name} {bn}x{warps}: {ms:.4f} ms (CUDA graph)", flush=True)
    return rows


def extend_inputs(prefix: int, chunk: int) -> tuple[torch.Tensor, ...]:
    """The chunk's K/V, block table, prefix lengths and query offsets of one sequence extending a
    ``prefix``-token cache by ``chunk`` tokens, and the cache's block count."""
    kn = torch.randn(chunk, HKV, D, device="cuda", dtype=torch.bfloat16)
    vn = torch.randn_like(kn)
    nblk = (prefix + chunk) // PAGE + 1
    table = torch.arange(nblk, device="cuda", dtype=torch.int32)[None]
    plens = torch.tensor([prefix], device="cuda", dtype=torch.int32)
    qsl = torch.tensor([0, chunk], device="cuda", dtype=torch.int32)
    return kn, vn, table, plens, qsl, nblk


def tune_extend(prefix: int, chunk: int) -> list[dict]:
    """Time the extend kernel's loops and tiles on one shape (the eight-phase loop is opt-in there)."""
    from tq_kernels.tuning import LaunchConfig

    q = torch.randn(chunk, H, D, device="cuda", dtype=torch.bfloat16)
    kn, vn, table, plens, qsl, nblk = extend_inputs(prefix, chunk)
    rows = []
    for name in ("turboquant_4bit_nc", "turboquant_k3v4_nc"):
        fmt = named_format(name, D)
        cache = random_cache(fmt, nblk)
        configs = [LaunchConfig(64, 4, 2, nibble=False)] + [
            LaunchConfig(bn, w, st, nibble=True, lut=lut, nibble_3bit=True)
            for bn, w in ((64, 4), (32, 4), (64, 8))
            for st in (2, 3)
            for lut in ("exact", "sym")
        ]
        for cfg in configs:
            try:
                ms = graph_ms(
                    lambda fmt=fmt, cache=cache, cfg=cfg: tq_extend_attention(
                        q, kn, vn, cache, table, plens, qsl, chunk, fmt, config=cfg
                    )
                )
            except Exception as e:
                print(f"extend tune {cfg}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(dict(op="extend", format=name, block_n=cfg.block_n, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, nibble=cfg.nibble, lut=cfg.lut, ms_graph=ms))  # fmt: skip
            print(f"extend tune P{prefix}+C{chunk} {name} {cfg}: {ms:.3f} ms (CUDA graph)", flush=True)
    return rows


def extend_rows(prefix: int, chunk: int, copy_gbps: float) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    rows = []
    q = torch.randn(1, H, chunk, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, H, prefix + chunk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(chunk, prefix + chunk)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        base = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))[0]
    qt = q[0].transpose(0, 1).contiguous()
    kn, vn, table, plens, qsl, nblk = extend_inputs(prefix, chunk)
    for name in FORMATS:
        fmt = named_format(name, D)
        cache = random_cache(fmt, nblk)
        ms = bench_ms(
            lambda fmt=fmt, cache=cache: tq_extend_attention(qt, kn, vn, cache, table, plens, qsl, chunk, fmt)
        )[0]
        rows.append(
            dict(
                op="extend",
                shape=f"P{prefix}+C{chunk}",
                format=name,
                ms=ms,
                gbps=None,
                bw_fraction=None,
                baseline="torch flash SDPA bf16 (causal lower-right)",
                baseline_ms=base,
                speedup_vs_baseline=base / ms,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller shapes")
    ap.add_argument("--only", default="decode,tune,store,extend")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {gpu_name()}", flush=True)
    rows: list[dict] = []
    only = args.only.split(",")
    shapes = [(32, 8192), (1, 131072)] if not args.quick else [(8, 4096)]
    if "decode" in only:
        for batch, ctx in shapes + (
            [(32, 1024), (32, 2048), (32, 4096), (32, 16384)] if not args.quick else []
        ):
            rows += decode_rows(batch, ctx, copy_gbps)
            for r in rows[-5:]:
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    tuning = []
    if "ablate" in only:
        tuning += ablate_decode(32, 8192, "turboquant_4bit_nc")
    if "tune" in only:
        tuning += tune_decode(32, 8192, "turboquant_4bit_nc")
        tuning += tune_decode(32, 8192, "turboquant_k3v4_nc")
        tuning += tune_decode(32, 8192, "turboquant_3bit_nc")
    if "store" in only:
        try:
            rows += store_rows(65536 if not args.quick else 4096, copy_gbps)
            rows += store_rows(32, copy_gbps, cache_tokens=65536)  # one decode step of 32 sequences
            tuning += tune_store(65536, 65536) + tune_store(32, 65536)
        except Exception as e:  # keep the other measurements if the store kernel fails
            print(f"store benchmark failed: {type(e).__name__}: {e}", flush=True)
    if "extend" in only:
        rows += extend_rows(8192, 2048, copy_gbps) if not args.quick else extend_rows(1024, 256, copy_gbps)
        tuning += tune_extend(8192, 2048) if not args.quick else tune_extend(1024, 256)
    for r in rows:
        print(
            f"{r['op']:7s} {r['shape']:14s} {r['format']:20s} {r['ms']:8.3f} ms  "
            f"{(r['bw_fraction'] or 0) * 100:5.1f}% bw  base {r['baseline_ms']:8.3f} ms  "
            f"x{r['speedup_vs_baseline']:.2f}"
            + (
                f"   graph {r['ms_graph']:7.3f} ms vs {r['baseline_ms_graph']:7.3f} ms "
                f"x{r['speedup_vs_baseline_graph']:.2f}"
                if "ms_graph" in r
                else ""
            ),
            flush=True,
        )
    write_result(
        "kernels_h200", {"gpu": gpu_name(), "copy_gbps": copy_gbps, "rows": rows, "decode_tuning": tuning}
    )
    dec = sorted(
        (r for r in rows if r["op"] == "decode" and r["shape"].startswith("B32")),
        key=lambda r: int(r["shape"].split("xL")[1]),
    )
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in dec:
        ctx = int(r["shape"].split("xL")[1])
        xs, ys = series.setdefault(r["format"], ([], []))
        xs.append(ctx)
        ys.append(r["ms"])
    line_plot(
        out_path("kernels_decode.png"),
        series,
        xlabel="context length (batch 32)",
        ylabel="ms per decode step",
        title="Decode attention, Llama-8B heads (H200)",
        logx=True,
        logy=True,
    )


if __name__ == "__main__":
    main()
