"""A vision-language model through vLLM: bf16 against tq-vllm on the same dummy weights and images.

    PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 experiments/vllm/vlm.py [--tiny] [--rows ...]

The model is ``vlm_model.py``'s dummy Gemma 3 (a prefix-LM: bidirectional attention inside each image's
256 tokens, which vLLM hands the backend as media ranges).  Each request has ``--images`` images
(40 x 256 = 10,240 media tokens) between words; every row runs the same requests in its own process:
1. probe: request 0 alone, every attention layer's output recorded during its prefill (the prompt is cut
   into chunks at image boundaries, so later chunks read the earlier ones from the compressed cache);
2. the batch: all requests at once, greedy, ``--gen`` tokens each: output token ids, TPOT, KV capacity.
The last step compares every row with bf16: attention output error per layer (relative RMS over the
probe's rows), greedy-token agreement, KV capacity and TPOT ratios -> results/vllm_vlm_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from vlm_engine import ROWS, run_row

from tq_core.eval.results import gpu_tag, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"


def compare(rows: dict, out: Path) -> dict:
    import torch

    ref, res = rows["bf16"], {}
    for name, r in rows.items():
        errs = []
        for f in sorted((out / "probe_bf16").glob("*.pt")):
            g = out / f"probe_{name}" / f.name
            if g.exists():
                x, y = torch.load(f).float(), torch.load(g).float()
                errs.append((f.name[:3], float((y - x).norm() / x.norm().clamp_min(1e-30))))
        per_layer: dict[str, float] = {}
        for layer, e in errs:  # a layer's chunks: the largest error
            per_layer[layer] = max(e, per_layer.get(layer, 0.0))
        pairs = list(zip(ref["tokens"], r["tokens"], strict=True))
        same = [
            next((i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p != q), len(a)) for a, b in pairs
        ]
        agree = sum(p == q for a, b in pairs for p, q in zip(a, b, strict=True)) / max(
            1, sum(map(len, ref["tokens"]))
        )
        res[name] = {k: v for k, v in r.items() if k != "tokens"} | {
            "attn_err_per_layer": per_layer, "attn_err_max": max(per_layer.values(), default=None),
            "greedy_agree_prefix": same, "greedy_agree_frac": round(agree, 4),
            "kv_capacity_vs_bf16": round(r["kv_capacity_tokens"] / ref["kv_capacity_tokens"], 3),
            "tpot_vs_bf16": round(r["tpot_p50_ms"] / ref["tpot_p50_ms"], 3) if r["tpot_p50_ms"] and ref["tpot_p50_ms"] else None,
        }  # fmt: skip
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer model, 2 images: a CPU smoke run")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--batched-tokens", type=int, default=4096)
    ap.add_argument("--out", default="/tmp/tq_vlm_run")
    ap.add_argument("--timeout", type=float, default=420)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_row(a.one, a)), flush=True)
        return
    out, rows = Path(a.out), {}
    out.mkdir(parents=True, exist_ok=True)
    for name in a.rows:
        env = dict(os.environ, TQ_VLLM_FULL_CAPACITY="1" if ROWS[name][2] else "0", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, __file__, "--one", name, *sys.argv[1:]]
        log = out / f"vlm_{name}.log"
        with open(log, "w") as f:
            try:
                subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=a.timeout)
            except subprocess.TimeoutExpired:
                f.write(f"\ntimed out after {a.timeout} s\n")
        line = next(
            (ln for ln in reversed(log.read_text(errors="replace").splitlines()) if ln.startswith("RESULT ")),
            None,
        )
        print(f"{name}: {'ERROR, see ' + str(log) if line is None else 'ok'}", flush=True)
        if line:
            rows[name] = json.loads(line[7:])
    if "bf16" not in rows:
        sys.exit("the bf16 row failed: nothing to compare with")
    res = compare(rows, out)
    for name, r in res.items():
        print(name, {k: r[k] for k in ("kv_capacity_tokens", "kv_capacity_vs_bf16", "tpot_p50_ms", "tpot_vs_bf16",
                                        "attn_err_max", "greedy_agree_frac")})  # fmt: skip
    settings = {k: getattr(a, k) for k in ("tiny", "requests", "images", "gen", "batched_tokens")}
    write_result(
        f"vllm_vlm_{gpu_tag()}",
        {"settings": settings, "rows": res},
        results=RESULTS,
    )


if __name__ == "__main__":
    main()
