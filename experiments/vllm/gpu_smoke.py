"""GPU smoke run of tq-vllm: every turboquant_* preset through ``attention_backend="CUSTOM"`` against
the bf16 FLASH_ATTN run of the same model, offline, on vLLM 0.26 from the device bundle.

NO TRAINED WEIGHTS.  The models are small Llama / Mistral (sliding window) configs loaded with
``load_format="dummy"``.  vLLM's dummy values (uniform in +-1e-3) make every logit equal, so after
loading, the weights are overwritten in place with seeded random values at unit activation scale,
identical in every config.  Agreement with bf16 says whether the plugin computes the attention bf16
computes, up to compression error on a random model; it says nothing about quality on real text.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/gpu_smoke.py [NAME ...]

Each config runs in its own process (``--one NAME``) with CUDA graphs on, chunked prefill (1024-token
budget) and prefix caching; it prints ``RESULT {json}``.  The parent compares each with its bf16
baseline (name it first in the same call) and writes results/vllm_gpu_smoke[_$SMOKE_TAG].json (and
$OUT/).  The models, the configs and the run of one config are in gpu_smoke_engine.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from gpu_smoke_engine import CONFIGS, GEN, TIMEOUT, run_one

RESULTS = Path(__file__).resolve().parents[1] / "results"


def compare(res: dict, base: dict) -> dict:
    """Agreement with the baseline: greedy prefixes, logprobs where tokens agree, replay consistency."""
    agree, dlp = [], []
    for s, b in zip(res["seqs"], base["seqs"], strict=True):
        n = next((i for i, (x, y) in enumerate(zip(s["tokens"], b["tokens"], strict=True)) if x != y), GEN)
        agree.append(n)
        dlp += [abs(x - y) for x, y in zip(s["logprobs"][:n], b["logprobs"][:n], strict=True)]
    pl = [
        abs(x - y)
        for x, y in zip(res["prompt_logprobs_3"], base["prompt_logprobs_3"], strict=True)
        if x is not None and y is not None
    ]
    rp = [abs(x - y) for x, y in zip(res["replay_logprobs_3"], res["seqs"][3]["logprobs"], strict=True)]
    return {"greedy_agree_tokens": agree, "seqs_identical": sum(a == GEN for a in agree),
            "mean_abs_dlogprob_agreeing": sum(dlp) / max(len(dlp), 1),
            "prompt_logprob_mean_abs_diff": sum(pl) / len(pl), "prompt_logprob_max_abs_diff": max(pl),
            "decode_vs_replay_mean_abs_diff": sum(rp) / len(rp),
            "hit_tokens_identical": res["hit_tokens"] == base["hit_tokens"],
            "capacity_vs_baseline": res["kv_capacity_tokens"] / base["kv_capacity_tokens"]}  # fmt: skip


def main(names: list[str]) -> None:
    from tq_core.eval.results import run_result_process, write_result

    results, rows = {}, []
    for name in names or list(CONFIGS):
        env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="1" if CONFIGS[name][3] else "0")
        res, out, err = run_result_process([sys.executable, __file__, "--one", name], env, TIMEOUT)
        if res is None:
            row = {"name": name, "error": (err or out)[-3000:]}
        else:
            results[name] = res
            base = results.get(CONFIGS[name][4] or "")
            row = {
                k: v
                for k, v in res.items()
                if k not in ("seqs", "prompt_logprobs_3", "replay_logprobs_3", "hit_tokens")
            }
            row |= compare(res, base) if base else {}
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    tag = os.environ.get("SMOKE_TAG", "")
    write_result(
        f"vllm_gpu_smoke{'_' + tag if tag else ''}",
        {"weights": "seeded random (dummy load), not a trained model", "rows": rows},
        results=RESULTS,
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print("RESULT " + json.dumps(run_one(sys.argv[2])), flush=True)
    else:
        main(sys.argv[1:])
