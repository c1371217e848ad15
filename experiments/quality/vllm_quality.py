"""Quality of KV-cache configs through vLLM 0.26 on the reference model (GPU only; see README.md).

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 \\
        python3 experiments/quality/vllm_quality.py MODEL_DIR [NAME ...] [--jobs 2] [--jsonl F] [--log F]

One engine per process (``--one NAME``), each printing ``RESULT {json}``; the parent runs up to ``--jobs``
of them at a time, with a timeout, and appends every child's output to ``--log``.  Chunked prefill with a
``chunk``-token budget (the protocol's, 256) makes every chunk after a prompt's first read the cache,
compressed for turboquant dtypes.  bf16 / fp8 and vLLM's own presets run on vLLM's default backend; ours
on ``attention_backend="CUSTOM"``.  ``-full`` configs set ``TQ_VLLM_FULL_CAPACITY=1`` (every layer
compressed; otherwise the first and last two layers stay bf16, as vLLM's presets do by default); the
patch replaces vLLM's boundary-skip rule, so it applies to vLLM's own backend as well.  The configs and
the run of one engine are in vllm_quality_engine.py.
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
from vllm_quality_engine import CONFIGS, SHORT, run_one

from tq_core.eval.results import run_result_process

DEFAULT = ["bf16", "fp8", *(f"{e}-{s}" for s in SHORT for e in ("vllm", "ours")), "vllm-4bit_nc-full",
           "ours-4bit_nc-full"]  # fmt: skip
TIMEOUT = int(os.environ.get("QUALITY_TIMEOUT", "300"))


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
