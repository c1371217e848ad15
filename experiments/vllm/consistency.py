"""Preemption and prefix-cache hits must not change greedy tokens: one config, two engines, same prompts.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/consistency.py \\
        [--model DIR] [NAME ...]        # NAME: 4bit_nc (default), bf16-flash, k8v4, k3v4_nc, 3bit_nc,
                                        # any of them + "-compressed" (TQ_VLLM_CHUNK_KV=compressed)

For each NAME (a config of gpu_smoke.py), engine A runs with ample KV memory and no prefix caching;
engine B runs with prefix caching on and so few KV blocks (``num_gpu_blocks_override``) that the
scheduler must preempt running requests and recompute them.  The 16 prompts come in groups of four that
share a 1024-token prefix, so B also serves prefix-cache hits.  Greedy, 128 new tokens each.  The rows
say how many sequences are identical, where the others first diverge, B's preemption count and cached
tokens.  With ``--model`` the weights are loaded from DIR (e.g. the reference model); without it the
seeded random weights of gpu_smoke.py are used.  Writes results/vllm_consistency.json (and $OUT/).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"

GEN = 128
PREFIX, TAIL = 1024, 480
BLOCKS_B = 256  # x 16 tokens: about 2.5 of the 16 sequences fit at full length -> preemption


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    out = []
    for _ in range(4):
        prefix = [rng.randrange(3, vocab) for _ in range(PREFIX)]
        out += [
            prefix + [rng.randrange(3, vocab) for _ in range(rng.randrange(TAIL // 2, TAIL))]
            for _ in range(4)
        ]
    return out


def run_engine(name: str, mode: str, model_dir: str | None) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from gpu_smoke import COMMON, CONFIGS, MODELS, set_weights
    from vllm import LLM, SamplingParams

    import tq_vllm

    tq_vllm.register()
    model, kv, backend, _, _ = CONFIGS[name]
    if model_dir is None:
        mdir = Path(f"/tmp/tq_smoke_{model}")
        mdir.mkdir(exist_ok=True)
        (mdir / "config.json").write_text(json.dumps({**MODELS[model], **COMMON}))
        vocab = MODELS[model]["vocab_size"]
    else:
        mdir = Path(model_dir)
        vocab = json.loads((mdir / "config.json").read_text())["vocab_size"]
    kw = dict(model=str(mdir), skip_tokenizer_init=True, kv_cache_dtype=kv, seed=0, dtype="bfloat16",
              max_model_len=4096, max_num_seqs=16, max_num_batched_tokens=1024, gpu_memory_utilization=0.3)  # fmt: skip
    if model_dir is None:
        kw["load_format"] = "dummy"
    if backend:
        kw["attention_backend"] = backend
    if mode == "B":
        # stats logging on: LLM.get_metrics() asserts it ("Stat logging disabled"), and LLM() turns it off
        kw.update(enable_prefix_caching=True, num_gpu_blocks_override=BLOCKS_B, disable_log_stats=False)
    else:
        kw.update(enable_prefix_caching=False)
    llm = LLM(**kw)
    if model_dir is None:
        llm.apply_model(set_weights)
    sp = SamplingParams(max_tokens=GEN, temperature=0.0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts(vocab)], sp, use_tqdm=False)
    preempted = None
    try:  # LLM.get_metrics(): counters of the engine (vLLM >= 0.10)
        for m in llm.get_metrics():
            if m.name == "vllm:num_preemptions":
                preempted = int(m.value)
    except Exception as exc:  # report, do not fail the run over a metrics API change
        preempted = f"unavailable: {type(exc).__name__}"
    cc = llm.llm_engine.vllm_config.cache_config
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs], "preemptions": preempted,
            "cached_tokens": [o.num_cached_tokens for o in outs], "num_gpu_blocks": cc.num_gpu_blocks}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["4bit_nc"])
    ap.add_argument("--model", default=None, help="HF model dir with weights (default: seeded dummy weights)")
    ap.add_argument("--one", nargs=2, metavar=("NAME", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_engine(*args.one, args.model)), flush=True)
        return
    from gpu_smoke import CONFIGS

    from tq_core.eval.results import run_result_process, write_result

    rows = []
    for full_name in args.names:
        name = full_name.removesuffix("-compressed")
        chunk_kv = "compressed" if full_name.endswith("-compressed") else "exact"
        res, errors = {}, {}
        for mode in ("A", "B"):
            cmd = [sys.executable, __file__, "--one", name, mode] + (
                ["--model", args.model] if args.model else []
            )
            full = "1" if CONFIGS[name][3] else "0"
            env = dict(os.environ, TQ_VLLM_FULL_CAPACITY=full, TQ_VLLM_CHUNK_KV=chunk_kv)
            result, out, err = run_result_process(cmd, env, 300)
            if result is None:
                errors[mode] = (err or out)[-2500:]
            else:
                res[mode] = result
        row: dict = {
            "name": full_name,
            "kv": CONFIGS[name][1],
            "backend": CONFIGS[name][2],
            "chunk_kv": chunk_kv,
        }
        if errors:
            row["error"] = errors
        else:
            a, b = res["A"]["tokens"], res["B"]["tokens"]
            first = [
                next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), None)
                for s, t in zip(a, b, strict=True)
            ]
            row |= {"sequences": len(a), "identical": sum(f is None for f in first),
                    "first_divergence": [f for f in first if f is not None],
                    "preemptions_B": res["B"]["preemptions"], "num_gpu_blocks_B": res["B"]["num_gpu_blocks"],
                    "cached_tokens_B": res["B"]["cached_tokens"], "cached_tokens_A": res["A"]["cached_tokens"]}  # fmt: skip
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    weights = f"trained: {args.model}" if args.model else "seeded random (dummy load), not a trained model"
    write_result("vllm_consistency", {"weights": weights, "gen_tokens": GEN, "rows": rows}, results=RESULTS)


if __name__ == "__main__":
    main()
