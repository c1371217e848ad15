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
own process and appends a JSON line; --report writes results/vllm_offload_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from throughput_engine import metrics, model_config

from tq_core.eval.results import gpu_name, out_path, run_result_process, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

BASES = {"bf16": ("auto", "FLASH_ATTN"), "fp8": ("fp8", None), "ours-4bit": ("turboquant_4bit_nc", "CUSTOM")}
ROWS = [name + suffix for name in BASES for suffix in ("", "+offload")]
# (default, --tiny): the H200 workload, and one that starts and finishes in seconds
DEFAULTS = {"num_prefixes": (48, 6), "prefix_len": (8192, 256), "suffix_len": (64, 16), "gen_len": (64, 8),
            "kv_gib": (8.0, 1 / 64), "host_gib": (32.0, 1 / 16)}  # fmt: skip


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


def report(files: list[str]) -> None:
    lines = [json.loads(ln) for f in files for ln in Path(f).read_text().splitlines() if ln.strip()]
    rows = {r["row"]: r for r in lines if "error" not in r}  # a later run of a row replaces it
    for name, r in rows.items():
        twin = rows.get(name.removesuffix("+offload"))
        if r["offload"] and twin:  # greedy identity and TTFT against the same dtype without offload
            same = sum(r["tokens"][k] == twin["tokens"][k] for k in r["tokens"])
            r["greedy_identical_requests"] = f"{same}/{len(r['tokens'])}"
            r["ttft_p50_vs_no_offload"] = round(r["ttft_p50_ms"] / twin["ttft_p50_ms"], 3)
        if r["offload"] and (base := rows.get("bf16+offload")):
            r["host_tokens_per_gib_vs_bf16"] = round(
                r["host_tokens_per_gib"] / base["host_tokens_per_gib"], 2
            )
    first = next(iter(rows.values()))
    gpu = first["gpu"].split()[-1].lower() if first["gpu"] else "gpu"
    name = f"vllm_offload_{gpu}{'_tiny' if first['settings']['tiny'] else ''}"
    keys = ("host_tokens_per_gib", "ttft_p50_ms", "ttft_p50_vs_no_offload", "revisit_cached_tokens_mean",
            "output_tok_s", "greedy_identical_requests")  # fmt: skip
    for k, r in rows.items():
        print(f"{k:18} " + "  ".join(f"{c} {r.get(c)}" for c in keys))
    payload = {"gpu": first["gpu"], "vllm": first["vllm"], "sources": files, "rows": list(rows.values())}
    print(f"wrote {write_result(name, payload, results=RESULTS)}")


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
        return report(args.report)
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
