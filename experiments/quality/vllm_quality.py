"""Quality of KV-cache configs through vLLM 0.26 on the reference model (GPU only; see README.md).

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 \\
        python3 experiments/quality/vllm_quality.py MODEL_DIR [NAME ...] [--jobs 2] [--jsonl F] [--log F]

One engine per process (``--one NAME``), each printing ``RESULT {json}``; the parent runs up to ``--jobs``
of them at a time, with a timeout, and appends every child's output to ``--log``.  Chunked prefill with a
``chunk``-token budget (the protocol's, 256) makes every chunk after a prompt's first read the cache,
compressed for turboquant dtypes.  bf16 / fp8 and vLLM's own presets run on vLLM's default backend; ours
on ``attention_backend="CUSTOM"``.  ``-full`` configs set ``TQ_VLLM_FULL_CAPACITY=1`` (every layer
compressed; otherwise the first and last two layers stay bf16, as vLLM's presets do by default); the
patch replaces vLLM's boundary-skip rule, so it applies to vLLM's own backend as well.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import workload as wl

from tq_core.eval.results import run_result_process

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
DEFAULT = ["bf16", "fp8", *(f"{e}-{s}" for s in SHORT for e in ("vllm", "ours")), "vllm-4bit_nc-full",
           "ours-4bit_nc-full"]  # fmt: skip
TIMEOUT = int(os.environ.get("QUALITY_TIMEOUT", "300"))
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


def spawn(model_dir: Path, name: str, small: bool, eager: bool, log: Path | None) -> dict:
    env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="1" if CONFIGS[name][2] else "0")
    cmd = [sys.executable, __file__, str(model_dir), "--one", name]
    cmd += ["--small"] if small else []
    cmd += [] if eager else ["--cuda-graphs"]
    t0 = time.perf_counter()
    result, out, err = run_result_process(cmd, env, TIMEOUT)
    if log:
        with log.open("a") as f:
            f.write(f"===== {name} ({time.perf_counter() - t0:.0f} s)\n{out}\n----- stderr\n{err[-20000:]}\n")
    if result is None:
        return {"engine": "vllm", "config": name, "error": (err or out)[-3000:]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument(
        "names", nargs="*", help=f"configs (default: {' '.join(DEFAULT)}; known: {' '.join(CONFIGS)})"
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--small", action="store_true", help="the CPU smoke protocol's short lengths")
    ap.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (slower start)")
    ap.add_argument("--jobs", type=int, default=1, help="engines at a time on the one GPU")
    ap.add_argument("--jsonl", type=Path)
    ap.add_argument("--log", type=Path)
    args = ap.parse_args()
    if args.one:
        print(
            "RESULT " + json.dumps(run_one(args.model_dir, args.one, args.small, not args.cuda_graphs)),
            flush=True,
        )
        return
    names = args.names or DEFAULT
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {
            n: pool.submit(spawn, args.model_dir, n, args.small, not args.cuda_graphs, args.log)
            for n in names
        }
        for fut in futures.values():
            wl.emit(fut.result(), args.jsonl)


if __name__ == "__main__":
    main()
