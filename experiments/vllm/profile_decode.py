"""Where a decode step's GPU time goes: the anchor's model and batch under torch.profiler, per kernel.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/profile_decode.py \\
        KV [BACKEND]            # e.g. auto FLASH_ATTN | turboquant_4bit_nc CUSTOM

Why: on 2026-11-28 the anchor decoded at 30-31 ms/step with tq-vllm against 13.4 ms for bf16
(experiments/results/vllm_anchor_h200.json), while the kernel benchmark put our decode attention at
0.51 ms per layer call (32 layers: ~16 ms).  This prints the CUDA kernels of ``STEPS`` decode steps of
the same workload (Llama-8B shape, dummy weights, ``NSEQ`` x ``CTX`` prompts), sorted by total GPU
time, with their time per step, so the gap can be attributed, and a per-step timeline (``TIMELINE``:
wall time between the sampler kernels of consecutive steps against the time any kernel ran), which
tells GPU work from GPU idle time spent waiting for the host.  The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which lets torch.profiler see its kernels, CUDA graphs included.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

CTX = int(os.environ.get("CTX", "8192"))
NSEQ = int(os.environ.get("NSEQ", "32"))
STEPS = int(os.environ.get("STEPS", "16"))
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}  # fmt: skip


def step_timeline(kernels: list[tuple[str, float, float]], marker: str) -> list[tuple[float, float]]:
    """(wall ms, GPU-busy ms) of each step between consecutive ``marker`` kernels (the sampler runs
    once per step), from kernel (name, start us, end us) records: how much of a step the GPU idles,
    waiting for the host, between the kernels it runs."""
    kernels = sorted(kernels, key=lambda k: k[1])
    ends = [e for n, _, e in kernels if marker in n]
    steps = []
    for lo, hi in itertools.pairwise(ends):
        busy, cur_s, cur_e = 0.0, None, None
        for _, s, e in kernels:
            s, e = max(s, lo), min(e, hi)
            if e <= s:
                continue
            if cur_e is None or s > cur_e:  # a gap: close the current busy interval
                busy += (cur_e - cur_s) if cur_e is not None else 0.0
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        busy += (cur_e - cur_s) if cur_e is not None else 0.0
        steps.append(((hi - lo) / 1e3, busy / 1e3))
    return steps


def main() -> None:
    kv = sys.argv[1]
    backend = sys.argv[2] if len(sys.argv) > 2 else None
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams

    mdir = "/tmp/profile_model"
    os.makedirs(mdir, exist_ok=True)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    kw = dict(model=mdir, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=kv, seed=0,
              max_model_len=CTX + 2 * STEPS + 64, max_num_seqs=NSEQ, enable_prefix_caching=True,
              gpu_memory_utilization=float(os.environ.get("GMU", "0.85")))  # fmt: skip
    if backend:
        kw["attention_backend"] = backend
    llm = LLM(**kw)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 128000) for _ in range(CTX)]} for _ in range(NSEQ)]
    # Prefill everything once; the profiled call then hits the prefix cache for all full blocks of each
    # prompt (a partial last block is recomputed), so nearly all of its GPU time is decode steps.
    prefill = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False)
    decode = SamplingParams(max_tokens=STEPS + 1, ignore_eos=True, temperature=0.0, detokenize=False)
    llm.generate(prompts, prefill, use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(prompts, decode, use_tqdm=False)
    untimed = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, decode, use_tqdm=False)
    print(f"RESULT kv={kv} backend={backend} ctx={CTX} nseq={NSEQ} steps={STEPS} "
          f"generate_s={untimed:.3f} (cached prefill + {STEPS} decode steps, unprofiled)")  # fmt: skip
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows)
    print(f"{'kernel / op':80s} {'calls':>7s} {'GPU ms':>9s} {'ms/step':>8s} {'share':>6s}")
    for e in rows[:40]:
        name = e.key if len(e.key) <= 80 else e.key[:77] + "..."
        ms = e.self_device_time_total / 1e3
        print(
            f"{name:80s} {e.count:7d} {ms:9.2f} {ms / (STEPS + 1):8.3f} {100 * ms * 1e3 / max(total, 1):5.1f}%"
        )
    print(
        f"self GPU time in total: {total / 1e3:.2f} ms ({total / 1e3 / (STEPS + 1):.2f} ms per step incl. prefill)"
    )
    # Per-step timeline: wall time between sampler kernels against the time some kernel was running.
    kernels = []
    for e in prof.events():
        if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            kernels.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    marker = next(
        (n for n in ("_gumbel_sample_kernel", "argmax", "sample") if any(n in k[0] for k in kernels)), None
    )
    if marker is None:
        print("TIMELINE unavailable: no sampler kernel to split steps at")
    else:
        steps = step_timeline(kernels, marker)[1:]  # the first interval holds the (cached) prefill
        if steps:
            wall = sum(w for w, _ in steps) / len(steps)
            busy = sum(b for _, b in steps) / len(steps)
            print(f"TIMELINE decode steps={len(steps)} wall_ms_per_step={wall:.2f} gpu_busy_ms_per_step={busy:.2f} "
                  f"idle_fraction={1 - busy / max(wall, 1e-9):.3f} (between '{marker}' kernels)")  # fmt: skip
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
