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
and the plots hf_decode.png, hf_kv.png.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tq_hf
from tq_core.eval.plots import line_plot
from tq_core.eval.results import gpu_name, out_path, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

CONFIGS = [("DynamicCache", "sdpa"), ("TurboQuantCache", "sdpa"), ("TurboQuantCache", "turboquant")]


def build_model(layers: int, max_pos: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=max_pos,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create the weights in bf16 directly
    try:
        with torch.device("cuda"):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)


def run(model, ids, cache_name: str, attn: str, args) -> tuple[dict, torch.Tensor]:
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model.set_attn_implementation(attn)
    if cache_name == "DynamicCache":
        cache = DynamicCache(config=model.config)
    else:
        cache = tq_hf.TurboQuantCache(model.config, args.format, residual_length=args.residual)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kw = {cache_kw: cache, "logits_to_keep": 1}
    stats0 = dict(tq_hf.attention.STATS)
    with torch.inference_mode():
        t0 = time.perf_counter()
        nxt = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        prefill_s, prefill_peak = time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        first = model(input_ids=nxt, **kw).logits[:, -1].float()
        nxt = first.argmax(-1, keepdim=True)
        for _ in range(args.warmup):
            nxt = model(input_ids=nxt, **kw).logits[:, -1:].argmax(-1)
        times = []
        for _ in range(args.repeats):  # host-bound decode steps are noisy: keep the median run
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                nxt = model(input_ids=nxt, **kw).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) / args.steps)
    step_s = statistics.median(times)  # (with 2 runs, their mean: a one-off spike counts half)
    kv = (
        cache.nbytes
        if cache_name != "DynamicCache"
        else sum(x.keys.nbytes + x.values.nbytes for x in cache.layers)
    )
    row = dict(
        context=ids.shape[1],
        cache=cache_name,
        attn=attn,
        decode_tok_s=args.batch / step_s,
        kv_bytes=kv,
        peak_mem_bytes=torch.cuda.max_memory_allocated() - base,
        prefill_peak_mem_bytes=prefill_peak,
        prefill_s=prefill_s,
        ms_per_step_runs=[1e3 * t for t in times],
        seq_length=cache.get_seq_length(),
        logits_finite=bool(torch.isfinite(first).all()),
        **{f"{k}_decode_calls": tq_hf.attention.STATS[k] - stats0[k] for k in stats0},
    )
    return row, first


def summarize(rows: list[dict]) -> None:
    for r in rows:
        base = next(b for b in rows if b["context"] == r["context"] and b["cache"] == "DynamicCache")
        r["speedup_vs_dynamic_sdpa"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["kv_ratio_vs_dynamic"] = r["kv_bytes"] / base["kv_bytes"]
        r["peak_ratio_vs_dynamic"] = r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1)
    print(
        f"\n{'context':>8} {'cache':16} {'attn':11} {'tok/s':>7} {'x dyn':>6} {'KV GiB':>7} {'KV x':>6} {'logit err':>9}"
    )
    for r in rows:
        print(
            f"{r['context']:>8} {r['cache']:16} {r['attn']:11} {r['decode_tok_s']:7.1f} "
            f"{r['speedup_vs_dynamic_sdpa']:6.2f} {r['kv_bytes'] / 2**30:7.3f} {r['kv_ratio_vs_dynamic']:6.3f} "
            f"{r['first_logits_rel_err_vs_dynamic']:9.4f}"
        )
    if any(r["dequantize_decode_calls"] for r in rows if r["attn"] == "turboquant"):
        print("WARNING: turboquant decode steps fell back to the dequantize path (see the warnings above)")


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
    for key, ylabel, png, scale in (
        ("decode_tok_s", "decode tokens/s", "hf_decode.png", 1.0),
        ("kv_bytes", "KV cache GiB", "hf_kv.png", 2**-30),
    ):
        series = {
            f"{c} + {a}": ([r["context"] for r in rows if (r["cache"], r["attn"]) == (c, a)],
                           [r[key] * scale for r in rows if (r["cache"], r["attn"]) == (c, a)])
            for c, a in CONFIGS
        }  # fmt: skip
        try:
            line_plot(
                out_path(png, results=RESULTS),
                series,
                xlabel="context (tokens)",
                ylabel=ylabel,
                title=title,
                logx=True,
            )
        except ImportError as e:  # no matplotlib on this machine
            print(f"no plot: {e}")


if __name__ == "__main__":
    main()
