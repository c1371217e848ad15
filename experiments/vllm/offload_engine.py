"""One row of offload.py inside its own process: the vLLM engine with or without host offload, the three
phases (visit every prefix, revisit one at a time timing TTFT, revisit all with greedy tokens) and
what the row records (see offload.py)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from throughput_engine import metrics, model_config

from tq_core.eval.results import gpu_name

BASES = {"bf16": ("auto", "FLASH_ATTN"), "fp8": ("fp8", None), "ours-4bit": ("turboquant_4bit_nc", "CUSTOM")}


def run_row(name: str, s: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: its metrics
    kv, backend = BASES[name.removesuffix("+offload")]
    offload = name.endswith("+offload")
    cfg = model_config({**s, "shape": "llama8b", "prompt_len": s["prefix_len"] + s["suffix_len"]})
    mdir = Path(f"/tmp/tq_offload{'_tiny' if s['tiny'] else ''}")
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(cfg))
    if backend == "CUSTOM":
        import tq_vllm

        tq_vllm.register()
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    P, S, G, N = s["prefix_len"], s["suffix_len"], s["gen_len"], s["num_prefixes"]
    kw = dict(model=str(mdir), load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=kv, seed=s["seed"],
              dtype="bfloat16", max_model_len=P + S + G, enable_prefix_caching=True, disable_log_stats=False,
              kv_cache_memory_bytes=int(s["kv_gib"] * 2**30))  # fmt: skip
    if backend:
        kw["attention_backend"] = backend
    if offload:
        kw["kv_offloading_size"] = s["host_gib"]  # GiB of host memory for the connector
    llm = LLM(**kw)
    cc = llm.llm_engine.vllm_config.cache_config
    gen = torch.Generator().manual_seed(s["seed"])
    prefixes = torch.randint(3, cfg["vocab_size"], (N, P), generator=gen).tolist()

    def turn(i: int, turn_no: int) -> dict:  # prefix i plus S tokens that differ per turn
        suffix = torch.randint(
            3, cfg["vocab_size"], (S,), generator=torch.Generator().manual_seed(1000 * turn_no + i)
        )
        return {"prompt_token_ids": prefixes[i] + suffix.tolist()}

    greedy = dict(temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate([turn(i, 0) for i in range(N)], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
    order = list(range(N))
    random.Random(s["seed"]).shuffle(order)
    before, ttft, cached = metrics(llm), [], []
    for i in order:  # one request per call: its wall time is its TTFT (prefill or load, one token)
        t0 = time.perf_counter()
        (out,) = llm.generate([turn(i, 1)], SamplingParams(max_tokens=1, **greedy), use_tqdm=False)
        ttft.append(time.perf_counter() - t0)
        cached.append(out.num_cached_tokens or 0)
    random.Random(s["seed"] + 1).shuffle(order)
    t0 = time.perf_counter()
    outs = llm.generate([turn(i, 2) for i in order], SamplingParams(max_tokens=G, **greedy), use_tqdm=False)
    wall = time.perf_counter() - t0
    d = {k: v - before.get(k, 0) for k, v in metrics(llm).items() if "cache" in k or "offload" in k}
    tokens = {i: list(o.outputs[0].token_ids) for i, o in zip(order, outs, strict=True)}
    block_bytes = s["kv_gib"] * 2**30 / cc.num_gpu_blocks  # vLLM's bytes per block, all layers
    ttft.sort()
    return {"row": name, "kv_cache_dtype": kv, "attention_backend": backend, "offload": offload,
            "connector": ("SimpleCPUOffloadConnector" if s["simple"] else "OffloadingConnector") if offload else None,
            "vllm": vllm.__version__, "gpu": gpu_name(), "settings": s, "model": cfg,
            "block_size": cc.block_size, "num_gpu_blocks": cc.num_gpu_blocks,
            "gpu_cache_tokens": cc.num_gpu_blocks * cc.block_size, "prefix_tokens_total": N * P,
            "host_tokens_per_gib": round(2**30 / (block_bytes / cc.block_size)) if offload else None,
            "ttft_p50_ms": round(1000 * ttft[len(ttft) // 2], 2), "ttft_mean_ms": round(1000 * sum(ttft) / N, 2),
            "revisit_cached_tokens_mean": round(sum(cached) / N, 1),
            "output_tok_s": round(sum(len(t) for t in tokens.values()) / wall, 1), "metrics_delta": d,
            "tokens": {str(i): tokens[i] for i in sorted(tokens)}}  # fmt: skip
