"""Merge the RESULT rows of both engines into results/quality.json, a markdown table and one plot.

    python experiments/quality/report.py MODEL_DIR RESULTS.jsonl [...] [--name quality]

Perplexity change and token agreement are computed against the bf16 row of the same engine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_stats import agreement, delta_difference_ci, intervals_overlap, ppl_delta_ci
from report_plots import reference_model_plot

from tq_core.eval.results import write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

AGREEMENT = {
    "token_agreement": "mean over prompts of (greedy tokens equal to bf16's before the first divergence) / steps",
    "token_agreement_positionwise": "mean over prompts of the fraction of the steps whose token equals bf16's at "
    "the same position (after a divergence the texts differ, so this mostly counts re-synchronized runs)",
}


def merge(rows: list[dict]) -> list[dict]:
    base = {r["engine"]: r for r in rows if r.get("config") == "bf16" and "error" not in r}
    out = []
    for r in rows:
        if "error" in r:
            out.append({"engine": r["engine"], "kv": r["config"], "error": r["error"][-500:]})
            continue
        b = base.get(r["engine"])
        agree, pos = agreement(r["agree_tokens"], b["agree_tokens"]) if b else (None, None)
        row = {
            "engine": r["engine"],
            "kv": r["config"],
            "bytes_per_token_head": r["bytes_per_token_head"],
            "ppl": r["ppl"],
            "ppl_delta_pct": 100 * (r["ppl"] / b["ppl"] - 1) if b else None,
            "ppl_delta_ci95": ppl_delta_ci(r, b) if b else None,
            "needle_acc": r["needle_acc"],
            "token_agreement": agree,
            "token_agreement_positionwise": pos,
            "needle_acc_by_length": r["needle_acc_by_length"],
        }
        extra = ("kv", "backend", "full_capacity", "compressed_layers", "note", "cache", "attn", "residual_length",
                 "compressed_tokens_layer0", "attention_paths", "scored_tokens", "seconds", "init_s")  # fmt: skip
        row["details"] = {("kv_dtype" if k == "kv" else k): r[k] for k in extra if k in r}
        out.append(row)
    return out


def targets(rows: list[dict], raw: list[dict] | None = None) -> dict:
    """The issue's targets, checked where both rows exist; with the ``raw`` RESULT rows, also the paired
    difference between ours and vLLM's scheme where both ran on the same engine."""
    by = {(r["engine"], r["kv"]): r for r in rows if "error" not in r}
    res = {}
    nll = {(r["engine"], r["config"]): r for r in raw or [] if "error" not in r}
    for s in ("k8v4", "4bit_nc", "k3v4_nc", "3bit_nc", "4bit_nc-full"):
        for eng, ours, theirs in (
            ("vllm", f"ours-{s}", f"vllm-{s}"),
            ("hf", f"qdq-ours-{s}", f"qdq-vllm-like-{s}"),
        ):
            a, o, b = nll.get((eng, ours)), nll.get((eng, theirs)), nll.get((eng, "bf16"))
            if a and o and b:
                d = delta_difference_ci(a, o, b)
                if d is not None:
                    res[f"{eng}:{ours} minus {eng}:{theirs}, paired (ppl delta points)"] = {
                        "median": d[0], "ci95": d[1:], "ours_lower": d[2] < 0}  # fmt: skip
    for s in ("k8v4", "4bit_nc", "k3v4_nc", "3bit_nc"):
        for ours, theirs in ((("vllm", f"ours-{s}"), ("vllm", f"vllm-{s}")), (("hf", f"ours-{s}"), ("vllm", f"vllm-{s}-full"))):  # fmt: skip
            if ours in by and theirs in by:
                a, b = by[ours]["ppl_delta_pct"], by[theirs]["ppl_delta_pct"]
                res[f"{ours[0]}:{ours[1]} ppl delta <= half of {theirs[0]}:{theirs[1]}"] = {
                    "ours": a, "theirs": b, "pass": a <= 0.5 * max(b, 0.0),
                    "ours_ci95": by[ours].get("ppl_delta_ci95"), "theirs_ci95": by[theirs].get("ppl_delta_ci95"),
                    "within_noise": intervals_overlap(by[ours].get("ppl_delta_ci95"), by[theirs].get("ppl_delta_ci95"))}  # fmt: skip
    for eng in ("hf", "vllm"):
        r, b = by.get((eng, "ours-4bit_nc")), by.get((eng, "bf16"))
        if r and b:
            res[f"{eng}: 134 B needle accuracy equals bf16's at every length"] = {
                "ours": r["needle_acc_by_length"], "bf16": b["needle_acc_by_length"],
                "pass": all(r["needle_acc_by_length"][k] >= v for k, v in b["needle_acc_by_length"].items())}  # fmt: skip
        r = by.get((eng, "ours-k3v4_nc"))
        if r:
            res[f"{eng}: 118 B ppl within +1% of bf16"] = {
                "ours": r["ppl_delta_pct"],
                "pass": r["ppl_delta_pct"] <= 1.0,
            }
    return res


def table(rows: list[dict]) -> str:
    head = (
        "| engine | kv | B/token-head | ppl | Δppl % [95% CI] | needle acc | by length "
        "| agreement (prefix / positionwise) |"
    )
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['kv']} | error | | | | | |")
            continue
        by_len = " ".join(f"{k}:{v:.2f}" for k, v in r["needle_acc_by_length"].items())
        ci = r.get("ppl_delta_ci95")
        delta = f"{r['ppl_delta_pct']:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
        needle = "-" if r["needle_acc"] is None else f"{r['needle_acc']:.3f}"
        agree = (
            "-"
            if r["token_agreement"] is None
            else f"{r['token_agreement']:.3f} / {r['token_agreement_positionwise']:.3f}"
        )
        lines.append(
            f"| {r['engine']} | {r['kv']} | {r['bytes_per_token_head']:g} | {r['ppl']:.3f} | "
            f"{delta} | {needle} | {by_len or '-'} | {agree} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("jsonl", type=Path, nargs="+")
    ap.add_argument("--name", default="quality")
    args = ap.parse_args()
    raw = [json.loads(ln) for f in args.jsonl for ln in f.read_text().splitlines() if ln.strip()]
    rows = merge(raw)
    prov_path = args.model_dir / "provenance.json"
    prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    protocol = next((r["protocol"] for r in raw if "protocol" in r), None)
    model = {"dir": str(args.model_dir), "parameters": prov.get("architecture", {}).get("parameters"),
             "bf16_needle_accuracy_at_training": prov.get("eval", {}).get("needle_accuracy_bf16")}  # fmt: skip
    checks = targets(rows, raw)
    (RESULTS / f"{args.name}.md").write_text(table(rows))
    reference_model_plot(rows, RESULTS / f"{args.name}.png")
    path = write_result(args.name, {"model": model, "protocol": protocol, "rows": rows, "targets": checks,
                                    "definitions": AGREEMENT, "raw_logs": [str(f) for f in args.jsonl]},
                        results=RESULTS)  # fmt: skip
    print(table(rows))
    print(json.dumps(checks, indent=1))
    print(f"wrote {path}, {args.name}.md, {args.name}.png")


if __name__ == "__main__":
    main()
