"""KV-bound serving throughput through vLLM's offline ``LLM``: bf16, fp8, vLLM's own TurboQuant and ours.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/throughput.py [ROW ...] [flags]
    python3 experiments/vllm/throughput.py --report RUNS.jsonl [MORE.jsonl ...]

ROW is one of bf16 (FLASH_ATTN), fp8, vllm-tq4 (``turboquant_4bit_nc`` on vLLM's own backend), ours-4bit
(``turboquant_4bit_nc`` + ``attention_backend="CUSTOM"``), ours-4bit-full (the same with
``TQ_VLLM_FULL_CAPACITY=1``); default all.  Dummy weights (a Llama-3.1-8B shape, or Qwen2.5-7B's GQA-7
shape with ``--shape qwen7b``).  N random prompts of P tokens plus G greedy tokens (ignore_eos) are
submitted in one ``llm.generate`` call with a large ``max_num_seqs`` and prefix caching off, so the
batch is bounded by the KV cache, and a bigger cache means more sequences per decode step.

Each row runs in its own process (a crash or a timeout loses that row only, and GPU memory is freed),
appends one JSON line to ``--jsonl`` and writes its log beside it.  Metrics, all from vLLM 0.26's own
accounting: output (and total) tokens/s over the generate call; KV capacity = num_gpu_blocks x
block_size; TPOT p50/p99 per request from ``RequestOutput.metrics`` (``RequestStateStats``:
(last_token_ts - first_token_ts) / (tokens - 1)); preemptions from the ``vllm:num_preemptions``
counter; the running batch as the ``vllm:num_requests_running`` gauge sampled every 0.25 s (mean, max),
and ``gen_tokens_per_step`` = ``vllm:generation_tokens`` / observations of ``vllm:iteration_tokens_total``
(one per engine step that returned outputs), i.e. sequences advanced per step.  ``--report`` collects
rows into results/vllm_throughput_<gpu>.json with ratios against fp8 and bf16 and a bar plot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tq_core.eval.plots import bar_plot
from tq_core.eval.profiling import StackSampler
from tq_core.eval.results import gpu_name, out_path, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

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
# (default, --tiny default): the full workload, and one that starts and finishes in seconds
DEFAULTS = {"num_requests": (512, 8), "prompt_len": (8192, 128), "gen_len": (512, 16),
            "max_num_seqs": (1024, 16), "kv_gib": (None, 1 / 16)}  # fmt: skip
TARGETS = [("ours-4bit-full", "fp8", 1.5), ("ours-4bit-full", "bf16", 2.5), ("ours-4bit", "fp8", 1.3)]


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


# vLLM's own log lines for the start-up phases (seconds)
INIT_LOG = {"capture_s": r"Graph capturing finished in ([\d.]+) secs",
            "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"}  # fmt: skip


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


def run_rows(names: list[str], s: dict, jsonl: Path, timeout: float) -> None:
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        log = jsonl.with_name(f"{jsonl.stem}_{name}.log")
        env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="1" if ROWS[name][2] else "0", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, __file__, "--one", name, json.dumps(s)]
        with open(log, "a") as f:  # the log, not a pipe: nothing can block on a pipe a grandchild holds
            f.write(f"== {name}: {' '.join(cmd)}\n")
            f.flush()
            # own session, so a timeout kills the whole process group this row started
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                f.write(f"\ntimed out after {timeout} s\n")
        text = log.read_text(errors="replace").rsplit(f"== {name}: ", 1)[-1]
        line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"row": name, "settings": s, "error": text[-3000:]}
        for key, pattern in INIT_LOG.items():
            if line and (m := re.search(pattern, text)):
                row[key] = float(m.group(1))
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        keys = (
            "kv_capacity_tokens",
            "output_tok_s",
            "tpot_p50_ms",
            "running_max_sampled",
            "preemptions",
            "init_s",
        )
        print(f"{name}: {f'ERROR, see {log}' if line is None else {k: row[k] for k in keys}}", flush=True)


def report(files: list[str], name: str | None) -> None:
    rows: dict[str, dict] = {}
    for f in files:  # a rerun of a row replaces it, unless the rerun failed and the earlier run did not
        for r in (json.loads(ln) for ln in Path(f).read_text().splitlines() if ln.strip()):
            if "error" not in r or "error" in rows.get(r["row"], {"error": 1}):
                rows[r["row"]] = r
    ok = {k: r for k, r in rows.items() if "error" not in r}
    if not ok:
        sys.exit("no row without an error")
    first = next(iter(ok.values()))
    s = first["settings"]
    if any(r["settings"] != s for r in ok.values()):
        sys.exit("rows ran different workloads (settings differ); ratios would compare unlike runs")
    for r in ok.values():
        for base in ("fp8", "bf16"):
            if base in ok:
                r[f"output_tok_s_vs_{base}"] = round(r["output_tok_s"] / ok[base]["output_tok_s"], 3)
        if "fp8" in ok and r["tpot_p50_ms"] and ok["fp8"]["tpot_p50_ms"]:
            r["tpot_p50_vs_fp8"] = round(r["tpot_p50_ms"] / ok["fp8"]["tpot_p50_ms"], 3)
    targets = {f"{row} output tok/s >= {x}x {base}": {"ratio": ok[row][f"output_tok_s_vs_{base}"], "target": x,
               "met": ok[row][f"output_tok_s_vs_{base}"] >= x} for row, base, x in TARGETS if row in ok and base in ok}  # fmt: skip
    if "bf16" in ok:  # start-up (engine init, all phases) against bf16's in the same run
        for r in ok.values():
            r["init_vs_bf16"] = round(r["init_s"] / ok["bf16"]["init_s"], 2)
            if r.get("capture_s") and ok["bf16"].get("capture_s"):
                r["capture_vs_bf16"] = round(r["capture_s"] / ok["bf16"]["capture_s"], 2)
    m = re.search(r"\b[A-Z]\d{2,4}\b", first["gpu"])
    gpu = m.group(0).lower() if m else re.sub(r"\W+", "_", first["gpu"]).lower()
    shape = ("" if s["shape"] == "llama8b" else "_" + s["shape"]) + ("_tiny" if s["tiny"] else "")
    name = name or f"vllm_throughput_{gpu}{shape}"
    order = [k for k in ROWS if k in rows]
    path = write_result(name, {"gpu": first["gpu"], "vllm": first["vllm"], "settings": s, "targets": targets,
                               "sources": files, "rows": [rows[k] for k in order]}, results=RESULTS)  # fmt: skip
    keys = ("kv_capacity_tokens", "output_tok_s", "output_tok_s_vs_fp8", "output_tok_s_vs_bf16", "tpot_p50_ms",
            "tpot_p50_vs_fp8", "running_max_sampled", "preemptions", "init_s", "init_vs_bf16", "torch_compile_s",
            "capture_s", "triton_compiles_init", "triton_compiles_timed")  # fmt: skip
    for k in order:
        print(
            f"{k:15} " + ("ERROR" if "error" in rows[k] else "  ".join(f"{c} {rows[k].get(c)}" for c in keys))
        )
    for t, v in targets.items():
        print(f"target {t}: {v['ratio']} -> {'met' if v['met'] else 'NOT met'}")
    notes = {k: f"{r.get('output_tok_s_vs_bf16', '-')}x bf16, {r.get('output_tok_s_vs_fp8', '-')}x fp8"
             for k, r in ok.items()}  # fmt: skip
    budget = f"KV {s['kv_gib']:g} GiB" if s["kv_gib"] else f"gmu {s['gmu']}"
    title = (f"vLLM {first['vllm']}, {s['shape']}{' tiny' if s['tiny'] else ''} dummy weights, {first['gpu']}: "
             f"{s['num_requests']} x ({s['prompt_len']} + {s['gen_len']}) tokens, "
             f"{budget}")  # fmt: skip
    try:
        bar_plot(out_path(f"{name}.png", results=RESULTS), {k: ok[k]["output_tok_s"] for k in order if k in ok},
                 xlabel="output tokens/s (higher is better)", title=title, notes=notes)  # fmt: skip
    except ImportError as exc:  # the JSON is the result; the plot is a view of it
        print(f"no plot: {exc}")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="*", metavar="ROW", help=f"any of {', '.join(ROWS)} (default: all)")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama8b")
    ap.add_argument(
        "--tiny", action="store_true", help="2 layers, 2 KV heads of 64 (same GQA), a few short requests"
    )
    ap.add_argument("--num-requests", type=int, help="default 512 (--tiny: 8)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens per request, default 8192 (--tiny: 128)")
    ap.add_argument("--gen-len", type=int, help="generated tokens per request, default 512 (--tiny: 16)")
    ap.add_argument("--max-num-seqs", type=int, help="default 1024 (--tiny: 16)")
    ap.add_argument("--kv-gib", type=float, help="fixed KV budget (kv_cache_memory_bytes); default: --gmu")
    ap.add_argument("--gmu", type=float, default=0.9, help="gpu_memory_utilization, the same for every row")
    ap.add_argument("--max-num-batched-tokens", type=int, help="default: vLLM's (16384 on H100/H200)")
    ap.add_argument(
        "--capture-sizes", type=lambda t: sorted({int(x) for x in t.split(",")}), metavar="N,N,...",
        help="CUDA-graph batch sizes for every row (default: vLLM's)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=4, help="requests (P + 4 tokens) run before the timed call")
    ap.add_argument("--timeout", type=float, default=560, help="seconds per row (device calls stop at 600)")
    ap.add_argument("--jsonl", type=Path, help="default: $OUT (or results/) /vllm_throughput_<shape>.jsonl")
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="collect rows into results/ (no run)")
    ap.add_argument("--name", help="result name for --report (default vllm_throughput_<gpu>[_<shape>])")
    ap.add_argument("--one", nargs=2, metavar=("ROW", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if set(args.rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(set(args.rows) - set(ROWS))}; choose from {', '.join(ROWS)}")
    if args.one:
        print("RESULT " + json.dumps(run_row(args.one[0], json.loads(args.one[1]))), flush=True)
        return
    if args.report:
        report(args.report, args.name)
        return
    s = {"shape": args.shape, "tiny": args.tiny, "gmu": args.gmu, "seed": args.seed, "warmup": args.warmup,
         "max_num_batched_tokens": args.max_num_batched_tokens, "capture_sizes": args.capture_sizes,
         "prefix_caching": False, "greedy": True,
         "ignore_eos": True}  # fmt: skip
    for k, (full, tiny) in DEFAULTS.items():
        v = getattr(args, k)
        s[k] = v if v is not None else (tiny if args.tiny else full)
    tag = args.shape + ("_tiny" if args.tiny else "")
    run_rows(
        args.rows or list(ROWS),
        s,
        args.jsonl or out_path(f"vllm_throughput_{tag}.jsonl", results=RESULTS),
        args.timeout,
    )


if __name__ == "__main__":
    main()
