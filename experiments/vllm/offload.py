"""Prefix-cache offload to host memory through vLLM's own connector: bf16, fp8 and ours, offload on/off.

NOT YET RUN (written 2026-12-06 on a CPU machine; no GPU result exists).  Issue 21 part 1's workload:

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/offload.py [ROW ...] [flags]
    python3 experiments/vllm/offload.py --tiny          # a 2-layer smoke run of every row

ROW is bf16, fp8 or ours-4bit (``turboquant_4bit_nc`` + ``attention_backend="CUSTOM"``), each as is and
with ``+offload`` (vLLM's ``kv_offloading_size``: the ``OffloadingConnector``, or with ``--simple``
``VLLM_USE_SIMPLE_KV_OFFLOAD=1``, the ``SimpleCPUOffloadConnector``); default all six.  Dummy weights in
throughput.py's Llama-3.1-8B shape.  N conversations share long prefixes (P tokens each, more in total
than the GPU cache holds with --kv-gib); each turn is its prefix plus S fresh tokens.  Phase 1 visits
every prefix once (offload stores it); phase 2 revisits them one at a time in a seeded random order
with one output token, timing each call (TTFT: served from host memory, or recomputed); phase 3
revisits all of them in one batch with G greedy tokens (output tokens/s, and the token ids, which
--report compares between a row and its +offload twin).  Host capacity in tokens per GiB comes from
vLLM's bytes per block (the connector stores whole blocks, compressed for ours).  Each row runs in its
own process (offload_engine.py) and appends a JSON line; --report (offload_report.py) writes
results/vllm_offload_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from offload_engine import BASES, run_row
from offload_report import report

from tq_core.eval.results import out_path, run_result_process

RESULTS = Path(__file__).resolve().parents[1] / "results"

ROWS = [name + suffix for name in BASES for suffix in ("", "+offload")]
# (default, --tiny): the H200 workload, and one that starts and finishes in seconds
DEFAULTS = {"num_prefixes": (48, 6), "prefix_len": (8192, 256), "suffix_len": (64, 16), "gen_len": (64, 8),
            "kv_gib": (8.0, 1 / 64), "host_gib": (32.0, 1 / 16)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="*", metavar="ROW", help=f"any of {', '.join(ROWS)} (default: all)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 2 KV heads of 64, a few short prefixes")
    for k, (full, tiny) in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(full), help=f"default {full} (--tiny: {tiny})")
    ap.add_argument(
        "--simple", action="store_true", help="SimpleCPUOffloadConnector (default OffloadingConnector)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=560, help="seconds per row (device calls stop at 600)")
    ap.add_argument("--jsonl", type=Path, help="default: $OUT (or results/) /vllm_offload[_tiny].jsonl")
    ap.add_argument("--report", nargs="+", metavar="JSONL", help="collect rows into results/ (no run)")
    ap.add_argument("--one", nargs=2, metavar=("ROW", "SETTINGS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if set(args.rows) - set(ROWS):
        ap.error(f"unknown rows {sorted(set(args.rows) - set(ROWS))}; choose from {', '.join(ROWS)}")
    if args.one:
        print("RESULT " + json.dumps(run_row(args.one[0], json.loads(args.one[1]))), flush=True)
        return
    if args.report:
        return report(args.report, RESULTS)
    s = {"tiny": args.tiny, "seed": args.seed, "simple": args.simple}
    for k, (full, tiny) in DEFAULTS.items():
        s[k] = getattr(args, k) if getattr(args, k) is not None else (tiny if args.tiny else full)
    jsonl = args.jsonl or out_path(f"vllm_offload{'_tiny' if args.tiny else ''}.jsonl", results=RESULTS)
    env = dict(os.environ, PYTHONUNBUFFERED="1", VLLM_USE_SIMPLE_KV_OFFLOAD="1" if args.simple else "0")
    for name in args.rows or ROWS:
        cmd = [sys.executable, __file__, "--one", name, json.dumps(s)]
        row, out, err = run_result_process(cmd, env, args.timeout)
        jsonl.with_name(f"{jsonl.stem}_{name.replace('+', '_')}.log").write_text(out + "\n" + err)
        row = row or {"row": name, "settings": s, "error": err[-3000:]}
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(
            name,
            row.get("error", "")[-300:] or {k: row[k] for k in ("ttft_p50_ms", "output_tok_s")},
            flush=True,
        )


if __name__ == "__main__":
    main()
