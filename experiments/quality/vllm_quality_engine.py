"""One config of vllm_quality.py inside its own process: the configs' table, the engine (a fixed KV size,
chunked prefill at the protocol's chunk) and the run that scores perplexity, needles and greedy
agreement on the reference model (see vllm_quality.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import workload as wl

SHORT = {"k8v4": "turboquant_k8v4", "4bit_nc": "turboquant_4bit_nc", "k3v4_nc": "turboquant_k3v4_nc",
         "3bit_nc": "turboquant_3bit_nc"}  # fmt: skip
# name: (kv_cache_dtype, attention_backend, full capacity)
CONFIGS: dict[str, tuple[str, str | None, bool]] = {
    "bf16": ("auto", None, False),
    "fp8": ("fp8", None, False),
}
for _s, _kv in SHORT.items():
    CONFIGS[f"vllm-{_s}"] = (_kv, None, False)
    CONFIGS[f"ours-{_s}"] = (_kv, "CUSTOM", False)
    CONFIGS[f"vllm-{_s}-full"] = (_kv, None, True)
    CONFIGS[f"ours-{_s}-full"] = (_kv, "CUSTOM", True)
KV_CACHE_BYTES = 4 << 30  # fixed KV memory per engine (~10x what the 16K needle batch needs)


def bytes_per_token_head(kv: str, head_dim: int = 128) -> int:
    if kv == "auto":
        return 4 * head_dim
    if kv.startswith("fp8"):
        return 2 * head_dim
    from tq_core.formats import budget_bytes

    return budget_bytes(kv, head_dim)


def make_llm(model_dir: Path, name: str, protocol: wl.Protocol, eager: bool):
    from vllm import LLM

    kv, backend, _ = CONFIGS[name]
    kw = dict(model=str(model_dir), tokenizer=str(model_dir), kv_cache_dtype=kv, dtype="bfloat16", seed=0,
              max_model_len=max(protocol.needle_lengths) + 64, max_num_seqs=16,
              max_num_batched_tokens=protocol.chunk, enable_prefix_caching=False, enforce_eager=eager,
              gpu_memory_utilization=float(os.environ.get("QUALITY_GPU_UTIL", "0.3")))  # fmt: skip
    if backend:
        kw["attention_backend"] = backend
    try:  # a fixed KV size: no dependence on memory profiling (and several engines can share the GPU)
        return LLM(**kw, kv_cache_memory_bytes=KV_CACHE_BYTES)
    except TypeError:
        return LLM(**kw)


def run_one(model_dir: Path, name: str, small: bool, eager: bool) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import SamplingParams

    import tq_vllm

    tq_vllm.register()  # what vLLM's plugin loader does; also applies full capacity when the env asks
    work = wl.build(model_dir, wl.SMALL if small else wl.FULL)
    p = work.protocol
    t0 = time.perf_counter()
    llm = make_llm(model_dir, name, p, eager)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # perplexity: one sequence at a time, so every sequence's chunks start at 0, chunk, 2*chunk, ...
    score = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    nll_per_seq, scored = [], 0
    for seq in work.ppl:
        (out,) = llm.generate([{"prompt_token_ids": seq}], score, use_tqdm=False)
        nll_per_seq.append(
            -sum(out.prompt_logprobs[i][seq[i]].logprob for i in range(p.prefix + 1, len(seq)))
        )
        scored += len(seq) - p.prefix - 1
    nll = sum(nll_per_seq)
    # needles: all prompts at once (greedy answer)
    n_ans = max(len(s.answer) for _, s in work.needles)
    greedy = SamplingParams(max_tokens=n_ans, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": s.prompt} for _, s in work.needles], greedy, use_tqdm=False)
    hits: dict[int, list[bool]] = {}
    for (length, s), o in zip(work.needles, outs, strict=True):
        hits.setdefault(length, []).append(wl.needle_hits(list(o.outputs[0].token_ids), s))
    # agreement: greedy continuations
    cont = SamplingParams(max_tokens=p.agree_steps, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": a} for a in work.agree], cont, use_tqdm=False)
    agree = [list(o.outputs[0].token_ids) for o in outs]
    kv, backend, full = CONFIGS[name]
    cc = llm.llm_engine.vllm_config.cache_config
    try:
        n_layers = llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
    except AttributeError:
        n_layers = None
    skip = list(getattr(cc, "kv_cache_dtype_skip_layers", None) or [])
    return wl.summarize(
        name,
        "vllm",
        nll,
        scored,
        hits,
        agree,
        nll_per_seq=nll_per_seq,
        kv=kv,
        bytes_per_token_head=bytes_per_token_head(kv),
        backend=backend or "default",
        full_capacity=full,
        skip_layers=skip,
        compressed_layers=0 if kv == "auto" or n_layers is None else n_layers - len(skip),
        vllm=vllm.__version__,
        enforce_eager=eager,
        init_s=round(init_s, 1),
        seconds=round(time.perf_counter() - t0, 1),
        protocol=work.describe(),
    )
