"""transformers decode with TurboQuantCache vs DynamicCache + SDPA, on one GPU, in one run.

    PYTHONPATH=packages/tq-core/src:packages/tq-kernels/src:packages/tq-hf/src \\
        python experiments/hf/bench_hf.py [--layers 32] [--contexts 4096,32768,131072]

Model: Llama-3.1-8B shaped (hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 14336, vocab 128256),
random bf16 weights, ``--layers`` decoder layers (32: the full model).  Per context, one prompt (batch
``--batch``) is prefilled and decoded greedily with DynamicCache + SDPA, TurboQuantCache + SDPA (layers
dequantized for attention) and TurboQuantCache + the turboquant attention (fused kernels): one step
whose logits are compared across the three, ``--warmup`` untimed steps, then ``--repeats`` timed runs
of ``--steps`` steps (median).  Writes results/hf_h200.json (rows: context, cache, attn, decode_tok_s,
kv_bytes = bytes the cache holds, peak_mem_bytes = peak allocated bytes above the weights while decoding)
and the plots hf_decode.png, hf_kv.png.  The model, the timed run, the summary and the plots are in
``hf_bench_runs.py``; this file holds the flags and the loop over contexts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers
from hf_bench_runs import CONFIGS, build_model, run, summarize, write_plots

from tq_core.eval.results import gpu_name, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--format", default="turboquant_4bit_nc")
    ap.add_argument("--residual", type=int, default=64)
    ap.add_argument("--name", default="hf_h200")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    t_start = time.perf_counter()
    model = build_model(args.layers, max(contexts) + args.steps * args.repeats + args.warmup + 8)
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, model.config.vocab_size, (args.batch, ctx), device="cuda")
        firsts = []
        for cache_name, attn in CONFIGS:
            row, first = run(model, ids, cache_name, attn, args)
            rows.append(row)
            firsts.append(first)
        # The first decode step sees the same tokens everywhere: its logits against DynamicCache's
        # (quantization error) and, for the fused path, against the dequantize path's (same bytes).
        for row, first in zip(rows[-3:], firsts, strict=True):
            row["first_logits_rel_err_vs_dynamic"] = float((first - firsts[0]).norm() / firsts[0].norm())
        rows[-1]["first_logits_rel_err_vs_dequantize"] = float(
            (firsts[2] - firsts[1]).norm() / firsts[1].norm()
        )
        for row in rows[-3:]:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    summarize(rows)
    meta = dict(
        gpu=gpu_name(),
        model=f"Llama-3.1-8B shape, {args.layers} layers, random bf16 weights",
        batch=args.batch,
        steps=args.steps,
        repeats=args.repeats,
        format=args.format,
        residual_length=args.residual,
        versions={"torch": torch.__version__, "transformers": transformers.__version__},
        peak_mem_note="peak allocated bytes above the weights while decoding (KV + activations)",
        wall_s=time.perf_counter() - t_start,
    )
    write_result(args.name, {**meta, "rows": rows}, results=RESULTS)
    title = f"Llama-8B shape ({args.layers} layers), batch {args.batch}, {gpu_name()}"
    write_plots(rows, title, RESULTS)


if __name__ == "__main__":
    main()
