"""Collect anchor runs (``RESULT`` lines of vllm_anchor.py via anchor_ours.sh) into one result file.

    python3 experiments/vllm/anchor_report.py RUNS.jsonl [MORE.jsonl ...] [--name vllm_anchor_h200]

Writes results/<name>.json as {"command", "date", "gpu", "vllm", "rows": [{"run", "kv", "backend",
"kv_capacity_tokens", "prefill_s", "decode_step_ms", ... ratios to the bf16 row}]} and <name>.png
(decode ms/step and KV capacity, each relative to bf16 FlashAttention of the same run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tq_core.eval.results import out_path, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--name", default="vllm_anchor_h200")
    ap.add_argument("--gpu", default="NVIDIA H200")
    ap.add_argument("--vllm", default="0.26.0")
    ap.add_argument("--runs-command", help="the device commands that produced the rows (recorded as is)")
    args = ap.parse_args()
    rows = [json.loads(ln) for f in args.jsonl for ln in Path(f).read_text().splitlines() if ln.strip()]
    base = next((r for r in rows if r.get("run") == "bf16"), None)
    if base is None:
        sys.exit("no bf16 row: the ratios need the bf16 FlashAttention run of the same session")
    for r in rows:
        r["decode_vs_bf16"] = round(r["decode_step_ms"] / base["decode_step_ms"], 3)
        r["prefill_vs_bf16"] = round(r["prefill_s"] / base["prefill_s"], 3)
        r["capacity_vs_bf16"] = round(r["kv_capacity_tokens"] / base["kv_capacity_tokens"], 3)
    extra = {"runs_command": args.runs_command} if args.runs_command else {}
    write_result(args.name, {"gpu": args.gpu, "vllm": args.vllm, **extra, "rows": rows}, results=RESULTS)
    print(f"{'run':16} {'kv':22} {'backend':10} {'capacity':>10} {'x bf16':>6} {'prefill s':>9} {'x':>5} "
          f"{'ms/step':>8} {'x bf16':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['run']:16} {r['kv']:22} {r['backend'] or '-':10} {r['kv_capacity_tokens']:>10} "
              f"{r['capacity_vs_bf16']:6.2f} {r['prefill_s']:9.2f} {r['prefill_vs_bf16']:5.2f} "
              f"{r['decode_step_ms']:8.2f} {r['decode_vs_bf16']:6.2f}")  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        print(f"no plot: {exc}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["run"] for r in rows]
    for ax, key, label in (
        (axes[0], "decode_step_ms", "decode ms/step (lower is better)"),
        (axes[1], "kv_capacity_tokens", "KV capacity, tokens (higher is better)"),
    ):
        vals = [r[key] for r in rows]
        colors = ["#1f77b4" if n.startswith("ours") else "#7f7f7f" for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        ax.set_xlabel(label)
        for i, r in enumerate(rows):
            ratio = r["decode_vs_bf16"] if key == "decode_step_ms" else r["capacity_vs_bf16"]
            ax.text(vals[i], i, f" {ratio:.2f}x", va="center", fontsize=8)
    fig.suptitle(f"vLLM {args.vllm} anchor: Llama-8B shape, 32 x 8K prompt, 256 new tokens, {args.gpu}")
    fig.tight_layout()
    fig.savefig(out_path(f"{args.name}.png", results=RESULTS), dpi=120)


if __name__ == "__main__":
    main()
