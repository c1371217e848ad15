"""Decode-kernel variants on one GPU: numerics against the tq_core reference, then CUDA-graph timings
against torch's bf16 flash SDPA and the copy bandwidth, all in one run.

    python experiments/kernels/decode_sweep.py [--shapes 32x8192,32x2048,1x131072]

Variants are :class:`tq_kernels.tuning.LaunchConfig` values of the 4-bit eight-phase loop: the register
lookup (``sym``) or the byte tables read in pairs (``byte``), with 1, 2 or 4 tiles stacked a step
(``chunks``).  Writes results/kernels_decode_sweep_<gpu>.json and .png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tq_core import named_format, paged_decode_attention_ref
from tq_core.eval.plots import line_plot
from tq_core.eval.results import gpu_name, out_path, write_result
from tq_core.testing import rel_err
from tq_kernels.ops.decode import tq_decode_attention
from tq_kernels.testing import (
    copy_bandwidth_gbps,
    filled_paged_cache,
    gpu_time_ms,
    random_paged_cache,
    reference_on_byte_grid,
)
from tq_kernels.tuning import LaunchConfig, decode_config

RESULTS = Path(__file__).resolve().parents[1] / "results"
H, HKV, D, PAGE = 32, 8, 128, 16  # Llama-3.1-8B attention, as packages/tq-kernels/benchmarks
VARIANTS = {
    "sym (previous default)": LaunchConfig(32, 1, 3, lut="sym", nibble_3bit=True),
    "sym chains2": LaunchConfig(32, 1, 3, lut="sym", score_chains=2),
    "sym r168": LaunchConfig(32, 1, 3, lut="sym", maxnreg=168),
    "sym chains2 r168": LaunchConfig(32, 1, 3, lut="sym", score_chains=2, maxnreg=168),
    "sym r152": LaunchConfig(32, 1, 3, lut="sym", maxnreg=152),
    "sym chains2 r168 s4": LaunchConfig(32, 1, 4, lut="sym", score_chains=2, maxnreg=168),
    "byte": LaunchConfig(32, 1, 3, lut="byte"),
    "byte chains2": LaunchConfig(32, 1, 3, lut="byte", score_chains=2),
    "sym stacked2": LaunchConfig(32, 1, 3, lut="sym", chunks=2),
}


def numerics() -> list[dict]:
    """Every variant against the reference on odd shapes (GQA 1, 4, 5, 7, 8; head_dim 64/128/256)."""
    rows = []
    for d, group, lens in ((128, 4, [1, 300, 1025, 4000]), (64, 7, [45, 3, 2000]), (256, 1, [700, 16])):
        fmt = named_format("turboquant_4bit_nc", d)
        cache, table, _, _ = random_paged_cache(fmt, lens, 2, 16, seed=d + group)
        cache, table = cache.cuda(), table.cuda()
        q = torch.randn(len(lens), 2 * group, d, device="cuda", dtype=torch.bfloat16)
        seq = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for kw in (
            ({},)
            if d != 64
            else ({"sliding_window": 700, "softcap": 20.0, "sinks": torch.randn(2 * group, device="cuda")},)
        ):
            ref = paged_decode_attention_ref(q.float(), cache, table, seq, fmt, **kw)
            with reference_on_byte_grid(fmt):
                ref_grid = paged_decode_attention_ref(q.float(), cache, table, seq, fmt, **kw)
            for name, cfg in VARIANTS.items():
                out = torch.full_like(q, float("nan"))
                tq_decode_attention(q, cache, table, seq, fmt, out=out, config=cfg, **kw)
                err = rel_err(out, ref_grid if cfg.lut == "byte" else ref)
                rows.append(dict(variant=name, d=d, group=group, lens=lens, extras=bool(kw), rel_err=err,
                                 nan=bool(out.isnan().any())))  # fmt: skip
                print(
                    f"numerics d{d} g{group} {lens} extras={bool(kw)} {name}: rel err {err:.2e}", flush=True
                )
    return rows


def _graph_ms(q, cache, table, seq_lens, fmt, cfg, ctx, splits) -> float:
    out = torch.empty_like(q)
    return gpu_time_ms(
        lambda: tq_decode_attention(
            q, cache, table, seq_lens, fmt, config=cfg, max_seq_len=ctx, out=out, num_splits=splits
        )
    )[0]


def decode_inputs(batch: int, ctx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block table (each sequence its own run of blocks), lengths and queries of one decode step."""
    table = torch.arange(batch * (ctx // PAGE), device="cuda", dtype=torch.int32).view(batch, ctx // PAGE)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return table, seq_lens, torch.randn(batch, H, D, device="cuda", dtype=torch.bfloat16)


def flash_decode_graph_ms(batch: int, ctx: int) -> float:
    """torch's flash SDPA on the same shape, the GQA group folded into the query length (CUDA graph)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, HKV, H // HKV, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return gpu_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))[0]


def timings(shapes: list[tuple[int, int]], copy_gbps: float) -> list[dict]:
    fmt = named_format("turboquant_4bit_nc", D)
    rows = []
    for batch, ctx in shapes:
        base = flash_decode_graph_ms(batch, ctx)
        table, seq_lens, q = decode_inputs(batch, ctx)
        cache = filled_paged_cache(fmt, table.numel(), PAGE, HKV)
        nbytes = batch * ctx * HKV * fmt.slot_bytes
        for name, cfg in VARIANTS.items():
            for splits in (None, 16) if batch > 1 else (64, 128, 256):
                try:
                    ms = _graph_ms(q, cache, table, seq_lens, fmt, cfg, ctx, splits)
                except Exception as e:  # a config out of registers or shared memory
                    print(f"B{batch}xL{ctx} {name} splits={splits}: {type(e).__name__}: {e}", flush=True)
                    continue
                row = dict(shape=f"B{batch}xL{ctx}", variant=name, num_splits=splits, ms_graph=ms,
                           bw_fraction=nbytes / ms / 1e6 / copy_gbps, bf16_sdpa_ms_graph=base,
                           speedup_vs_bf16=base / ms)  # fmt: skip
                rows.append(row)
                print(f"B{batch}xL{ctx} {name} splits={splits}: {ms:.4f} ms, {row['bw_fraction']:.1%} of copy "
                      f"bandwidth, x{base / ms:.2f} vs bf16 SDPA {base:.4f} ms", flush=True)  # fmt: skip
        ms = _graph_ms(q, cache, table, seq_lens, fmt, None, ctx, None)
        print(
            f"B{batch}xL{ctx} launcher default {decode_config(D, H // HKV, q.device, True)}: {ms:.4f} ms",
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="32x8192,32x2048,1x131072")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    args = ap.parse_args()
    torch.manual_seed(0)
    copy_gbps = copy_bandwidth_gbps()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s on {gpu_name()}", flush=True)
    num = [] if args.skip_numerics else numerics()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rows = timings(shapes, copy_gbps)  # type: ignore[arg-type]
    tag = gpu_name().replace("NVIDIA ", "").replace(" ", "_").lower() + (f"_{args.tag}" if args.tag else "")
    write_result(
        f"kernels_decode_sweep_{tag}",
        {"gpu": gpu_name(), "copy_gbps": copy_gbps, "numerics": num, "rows": rows},
        results=RESULTS,
    )
    best: dict[str, tuple[list[float], list[float]]] = {}
    for i, (b, c) in enumerate(shapes):
        for name in VARIANTS:
            ms = [r["bw_fraction"] for r in rows if r["variant"] == name and r["shape"] == f"B{b}xL{c}"]
            if ms:
                xs, ys = best.setdefault(name, ([], []))
                xs.append(i)
                ys.append(max(ms) * 100)
    line_plot(out_path(f"kernels_decode_sweep_{tag}.png", results=RESULTS), best, xlabel="shape index (" + args.shapes + ")",
              ylabel="% of copy bandwidth (best split count)", title=f"4-bit decode variants ({gpu_name()})")  # fmt: skip


if __name__ == "__main__":
    main()
