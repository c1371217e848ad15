"""One row of throughput.py inside its own process: the model shape, the vLLM engine, the timed
``llm.generate`` call and the metrics a row records (offload.py reuses the shape and the metrics)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from tq_core.eval.profiling import StackSampler
from tq_core.eval.results import gpu_name

# name: (kv_cache_dtype, attention_backend (None: vLLM picks), TQ_VLLM_FULL_CAPACITY)
ROWS = {
    "bf16": ("auto", "FLASH_ATTN", False),
    "fp8": ("fp8", None, False),
    "vllm-tq4": ("turboquant_4bit_nc", None, False),
    "ours-4bit": ("turboquant_4bit_nc", "CUSTOM", False),
    "ours-4bit-full": ("turboquant_4bit_nc", "CUSTOM", True),
}


COMMON = {"rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False, "bos_token_id": 1,
          "eos_token_id": 2, "hidden_act": "silu", "head_dim": 128}  # fmt: skip


SHAPES = {
    "llama8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
                "rope_theta": 500000.0},
    # GQA 7; no sliding window, so every layer is a full-attention layer as in Qwen2.5-7B at <= 32K
    "qwen7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
               "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
               "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False},
}  # fmt: skip


TINY = {"intermediate_size": 512, "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000}  # fmt: skip


def model_config(s: dict) -> dict:
    cfg = {**COMMON, **SHAPES[s["shape"]]}
    if s["tiny"]:  # the shape's GQA group (4 or 7) on 2 KV heads of 64
        heads = 2 * cfg["num_attention_heads"] // cfg["num_key_value_heads"]
        cfg.update(TINY, num_attention_heads=heads, hidden_size=64 * heads)
    cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"], s["prompt_len"] + s["gen_len"])
    return cfg


def metrics(llm) -> dict[str, float]:
    """vLLM's Prometheus metrics summed over labels; a histogram gives ``<name>_count`` and ``_sum``."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        parts = {m.name: m.value} if hasattr(m, "value") else {}  # counters, gauges
        if hasattr(m, "count"):  # histograms
            parts = {m.name + "_count": m.count, m.name + "_sum": m.sum}
        out.update({k: out.get(k, 0) + v for k, v in parts.items()})
    return out


def pct_ms(xs: list[float], q: float) -> float | None:
    """The q-quantile of seconds ``xs`` (nearest rank), in milliseconds."""
    return round(1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None


def triton_cache_entries() -> set[str]:
    """Kernels in Triton's on-disk cache (one directory per compiled specialization): the entries new
    after a phase are the compiles it did (cache hits add nothing; a count difference would also see
    entries Triton removes)."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return {e.name for e in root.iterdir() if e.is_dir()} if root.is_dir() else set()


def run_row(name: str, s: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its metrics
    kv, backend, full = ROWS[name]
    cfg = model_config(s)
    mdir = Path(f"/tmp/tq_throughput_{s['shape']}{'_tiny' if s['tiny'] else ''}")
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(cfg))
    extra: dict = {}
    if backend == "CUSTOM":
        import tq_vllm
        from tq_vllm.patches import self_check

        tq_vllm.register()  # what vLLM's plugin loader does; applies full capacity when the env asks
        extra = {"tq_vllm": tq_vllm.__version__, "patches": self_check()}
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    P, G, N = s["prompt_len"], s["gen_len"], s["num_requests"]
    kw = dict(model=str(mdir), load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=kv, seed=s["seed"],
              dtype="bfloat16", max_model_len=P + G, max_num_seqs=s["max_num_seqs"], enable_prefix_caching=False,
              gpu_memory_utilization=s["gmu"], disable_log_stats=False)  # fmt: skip
    if s["kv_gib"]:  # a fixed KV budget (vLLM then ignores gpu_memory_utilization for the KV cache)
        kw["kv_cache_memory_bytes"] = int(s["kv_gib"] * 2**30)
    if s["max_num_batched_tokens"]:
        kw["max_num_batched_tokens"] = s["max_num_batched_tokens"]
    if backend:
        kw["attention_backend"] = backend
    if s.get(
        "capture_sizes"
    ):  # the same CUDA-graph sizes for every row (fewer than vLLM's ~50: faster start)
        kw["compilation_config"] = {"cudagraph_capture_sizes": s["capture_sizes"]}
    compiles0, t0 = triton_cache_entries(), time.perf_counter()
    with StackSampler() as sampler:  # where the start-up time goes (printed, not part of the result)
        llm = LLM(**kw)
    init_s = time.perf_counter() - t0
    compiles_init = len(triton_cache_entries() - compiles0)
    for pct, where in sampler.top(int(os.environ.get("TQ_INIT_PROFILE_TOP", "90"))):
        print(f"INIT_PROFILE {pct:5.1f}% {where}")
    for pct, where in sampler.top(30, leaves=True):
        print(f"INIT_SELF {pct:5.1f}% {where}")
    cfgv = llm.llm_engine.vllm_config
    cc = cfgv.cache_config
    gen = torch.Generator().manual_seed(s["seed"])
    ids = torch.randint(3, cfg["vocab_size"], (N, P), generator=gen).tolist()
    prompts = [{"prompt_token_ids": p} for p in ids]
    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    # warm-up outside the timed call: kernels that compile or autotune on first use (shapes it does not
    # reach may still compile inside the timed call; a larger --warmup covers more batch sizes)
    llm.generate(prompts[: min(s["warmup"], N)], SamplingParams(max_tokens=4, **greedy), use_tqdm=False)
    before, samples, done = metrics(llm), [], threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            samples.append(metrics(llm).get("vllm:num_requests_running", 0.0))

    poller = threading.Thread(target=sample, daemon=True)
    poller.start()
    compiles1, t0 = triton_cache_entries(), time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=G, **greedy), use_tqdm=False)
    wall = time.perf_counter() - t0
    done.set()
    poller.join()
    after = metrics(llm)
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    tpot = [(m.last_token_ts - m.first_token_ts) / (m.num_generation_tokens - 1)
            for o in outs if (m := o.metrics) is not None and m.num_generation_tokens > 1]  # fmt: skip
    steps = d.get("vllm:iteration_tokens_total_count", 0)
    cap = (cc.num_gpu_blocks or 0) * cc.block_size
    return {"row": name, "kv_cache_dtype": kv, "attention_backend": backend, "full_capacity": full, **extra,
            "vllm": vllm.__version__, "gpu": gpu_name(), "settings": s, "model": cfg,
            "max_num_batched_tokens": cfgv.scheduler_config.max_num_batched_tokens, "block_size": cc.block_size,
            "num_gpu_blocks": cc.num_gpu_blocks, "kv_capacity_tokens": cap,
            "full_length_seqs_that_fit": round(cap / (P + G), 2), "init_s": round(init_s, 1),
            "torch_compile_s": round(float(getattr(cfgv.compilation_config, "compilation_time", 0) or 0), 1),
            "triton_compiles_init": compiles_init, "triton_compiles_timed": len(triton_cache_entries() - compiles1),
            "wall_s": round(wall, 3), "output_tokens": out_tok, "all_outputs_full": out_tok == N * G,
            "output_tok_s": round(out_tok / wall, 1), "total_tok_s": round((out_tok + N * P) / wall, 1),
            "tpot_p50_ms": pct_ms(tpot, 0.5), "tpot_p99_ms": pct_ms(tpot, 0.99),
            "tpot_mean_ms": round(1000 * sum(tpot) / len(tpot), 3) if tpot else None,
            "preemptions": int(d.get("vllm:num_preemptions", 0)), "engine_steps": int(steps),
            "gen_tokens_per_step": round(d.get("vllm:generation_tokens", 0) / steps, 2) if steps else None,
            "running_mean_sampled": round(sum(samples) / len(samples), 2) if samples else None,
            "running_max_sampled": max(samples, default=None)}  # fmt: skip
