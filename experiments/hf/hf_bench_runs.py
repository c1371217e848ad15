"""``bench_hf.py``'s pieces: the random-weight Llama-8B-shaped model, one timed decode run per cache and
attention implementation, the summary table and the plots.
"""

from __future__ import annotations

import gc
import inspect
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tq_hf
from tq_core.eval.plots import line_plot
from tq_core.eval.results import out_path

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


def write_plots(rows: list[dict], title: str, results: Path) -> None:
    """hf_decode.png (decode tokens/s) and hf_kv.png (KV cache GiB) against the context, one line per config."""
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
                out_path(png, results=results),
                series,
                xlabel="context (tokens)",
                ylabel=ylabel,
                title=title,
                logx=True,
            )
        except ImportError as e:  # no matplotlib on this machine
            print(f"no plot: {e}")
