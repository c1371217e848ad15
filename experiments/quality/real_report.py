"""Merge real_quality.py's rows into results/quality_real.json, a markdown table and one plot.

    python experiments/quality/real_report.py experiments/results/quality_real_smollm2.jsonl [...] [--name quality_real]

Each row is compared with its model's baseline row (bf16, or fp32 when the run was in float32) over the same
tokens: perplexity change with a paired-bootstrap 95% interval over the held-out sequences, and greedy
agreement (steps before the first divergence / steps, averaged over prompts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from paired_stats import agreement, paired_bootstrap, ppl_delta_ci
from report_plots import real_models_plot

from tq_core.eval.results import write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

BASELINES = ("bf16", "fp32")
SCHEMA = ("model", "engine", "scheme", "preset", "bytes_per_token_head", "ppl", "ppl_delta_pct",
          "ppl_delta_ci95", "token_agreement", "needle_acc")  # fmt: skip


def merge(raw: list[dict]) -> list[dict]:
    """The schema's rows, one per (model, engine, scheme); the last row of a scheme wins, errors are skipped."""
    latest = {(r["model"], r["engine"], r["scheme"]): r for r in raw if "error" not in r}
    base = {(m, e): r for (m, e, s), r in latest.items() if s in BASELINES}
    rows = []
    for (m, e, _), r in latest.items():
        b = base.get((m, e))
        if b is not None and b["nll_per_seq"] and len(b["nll_per_seq"]) != len(r["nll_per_seq"]):
            raise ValueError(f"{m} {r['scheme']}: scored other sequences than its baseline; rerun both")
        rows.append({
            "model": m, "engine": e, "scheme": r["scheme"], "preset": r["preset"],
            "bytes_per_token_head": r["bytes_per_token_head"], "ppl": r["ppl"],
            "ppl_delta_pct": 100 * (r["ppl"] / b["ppl"] - 1) if b else None,
            "ppl_delta_ci95": ppl_delta_ci(_total(r), _total(b)) if b else None,
            "token_agreement": agreement(r["agree_tokens"], b["agree_tokens"])[0] if b else None,
            "needle_acc": r["needle_acc"],
        })  # fmt: skip
    return rows


# issue 15's absolute targets on SmolLM2 (perplexity increase, %), by the preset whose byte budget a row uses
ABSOLUTE = {"smollm2": {"turboquant_4bit_nc": 1.0, "turboquant_k3v4_nc": 1.5, "turboquant_3bit_nc": 4.0}}


def targets(raw: list[dict], draws: int = 2000, seed: int = 0) -> list[dict]:
    """Per model and preset, ours against the vLLM-like scheme at the same byte budget: both increases, the
    paired-bootstrap 95% intervals of (ours - theirs) and of (ours - theirs / 2) in points (the target:
    ours at most half of theirs, that interval below zero), and the absolute target where there is one."""
    latest = {(r["model"], r["engine"], r["scheme"]): _total(r) for r in raw if "error" not in r}
    out = []
    for (m, e, s), ours in sorted(latest.items()):
        if not s.startswith("ours-") or s.endswith("-nearest") or ours.get("preset") is None:
            continue
        theirs = latest.get((m, e, s.replace("ours-", "vllm-like-", 1)))
        base = next((latest[(m, e, b)] for b in BASELINES if (m, e, b) in latest), None)
        if theirs is None or base is None:
            continue
        boot = paired_bootstrap([ours, theirs], base, draws, seed)
        if boot is None:
            continue
        q = lambda xs: [sorted(xs)[int(0.025 * draws)], sorted(xs)[int(0.975 * draws) - 1]]  # noqa: E731
        d_ours = 100 * (ours["ppl"] / base["ppl"] - 1)
        d_theirs = 100 * (theirs["ppl"] / base["ppl"] - 1)
        half = q([x - y / 2 for x, y in boot])
        bound = ABSOLUTE.get(m, {}).get(ours["preset"])
        out.append({
            "model": m, "engine": e, "preset": ours["preset"], "ours": s, "theirs": theirs["scheme"],
            "ours_delta_pct": d_ours, "theirs_delta_pct": d_theirs,
            "diff_ci95": q([x - y for x, y in boot]), "ours_minus_half_theirs_ci95": half,
            "half_target_met": half[1] < 0, "absolute_target_pct": bound,
            "absolute_target_met": None if bound is None else d_ours <= bound,
        })  # fmt: skip
    return out


def targets_table(rows: list[dict]) -> str:
    lines = [
        "| model | preset | ours Δ% | vLLM-like Δ% | ours - theirs [95% CI] | ours - theirs/2 [95% CI] | half met | "
        "absolute target | met |",
        "|" + "---|" * 9,
    ]
    for t in rows:
        d, h = t["diff_ci95"], t["ours_minus_half_theirs_ci95"]
        bound = "-" if t["absolute_target_pct"] is None else f"≤ +{t['absolute_target_pct']:g}%"
        met = "-" if t["absolute_target_met"] is None else ("yes" if t["absolute_target_met"] else "no")
        lines.append(
            f"| {t['model']} | {t['preset']} | {t['ours_delta_pct']:+.2f} | {t['theirs_delta_pct']:+.2f} | "
            f"[{d[0]:+.2f}, {d[1]:+.2f}] | [{h[0]:+.2f}, {h[1]:+.2f}] | {'yes' if t['half_target_met'] else 'no'} "
            f"| {bound} | {met} |"
        )
    return "\n".join(lines) + "\n"


def _total(r: dict) -> dict:
    # report.py's bootstrap divides by all scored tokens; real_quality's scored_tokens counts one sequence
    return {**r, "scored_tokens": r["scored_total"]}


def table(rows: list[dict]) -> str:
    lines = [
        "| model | scheme | B/token-head | ppl | Δppl % [95% CI] | agreement | needle |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        ci = r["ppl_delta_ci95"]
        delta = "-" if r["ppl_delta_pct"] is None else f"{r['ppl_delta_pct']:+.2f}"
        delta += f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
        agree = "-" if r["token_agreement"] is None else f"{r['token_agreement']:.3f}"
        needle = "-" if r["needle_acc"] is None else f"{r['needle_acc']:.2f}"
        lines.append(f"| {r['model']} | {r['scheme']} | {r['bytes_per_token_head']:g} | {r['ppl']:.3f} | "
                     f"{delta} | {agree} | {needle} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("jsonl", type=Path, nargs="+")
    ap.add_argument("--name", default="quality_real")
    ap.add_argument("--command", default="", help="the command(s) that produced the jsonl files, recorded")
    args = ap.parse_args()
    raw = [json.loads(ln) for f in args.jsonl for ln in f.read_text().splitlines() if ln.strip()]
    rows = merge(raw)
    protocols = {r["model"]: r["protocol"] for r in raw if "protocol" in r}
    scored = {r["model"]: r["scored_total"] for r in raw if "scored_total" in r}
    notes = {"protocol": protocols, "scored_tokens_per_scheme": scored, "raw": [str(f) for f in args.jsonl],
             "run_command": args.command, "errors": [r for r in raw if "error" in r]}  # fmt: skip
    goals = targets(raw)
    (RESULTS / f"{args.name}.md").write_text(table(rows) + "\n" + targets_table(goals))
    real_models_plot(rows, RESULTS / f"{args.name}.png", BASELINES)
    path = write_result(args.name, {"rows": rows, "targets": goals, "notes": notes}, results=RESULTS)
    print(table(rows))
    print(targets_table(goals))
    print(f"wrote {path}, {args.name}.md, {args.name}.png")


if __name__ == "__main__":
    main()
