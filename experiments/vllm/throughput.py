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
from pathlib import Path

from throughput_engine import ROWS, SHAPES, run_row
from throughput_report import report

from tq_core.eval.results import out_path

RESULTS = Path(__file__).resolve().parents[1] / "results"

# (default, --tiny default): the full workload, and one that starts and finishes in seconds
DEFAULTS = {"num_requests": (512, 8), "prompt_len": (8192, 128), "gen_len": (512, 16),
            "max_num_seqs": (1024, 16), "kv_gib": (None, 1 / 16)}  # fmt: skip


# vLLM's own log lines for the start-up phases (seconds)
INIT_LOG = {"capture_s": r"Graph capturing finished in ([\d.]+) secs",
            "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+)"}  # fmt: skip


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
