"""Merge the RESULT rows of both engines into results/quality.json, a markdown table and one plot.

    python experiments/quality/report.py MODEL_DIR RESULTS.jsonl [...] [--name quality]

Perplexity change and token agreement are computed against the bf16 row of the same engine.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from tq_core.eval.results import write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

AGREEMENT = {
    "token_agreement": "mean over prompts of (greedy tokens equal to bf16's before the first divergence) / steps",
    "token_agreement_positionwise": "mean over prompts of the fraction of the steps whose token equals bf16's at "
    "the same position (after a divergence the texts differ, so this mostly counts re-synchronized runs)",
}


MAIN = ("ours-k8v4", "ours-4bit_nc", "ours-k3v4_nc", "ours-3bit_nc")


def agreement(tokens: list[list[int]], base: list[list[int]]) -> tuple[float | None, float | None]:
    if not tokens or not base:  # a ppl-only run
        return None, None
    prefix, same = [], []
    for a, b in zip(tokens, base, strict=True):
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        prefix.append(first / n)
        same.append(sum(x == y for x, y in zip(a, b, strict=False)) / n)
    return sum(prefix) / len(prefix), sum(same) / len(same)


def paired_bootstrap(rows: list[dict], b: dict, draws: int, seed: int) -> list[list[float]] | None:
    """Paired bootstrap over the held-out sequences that every row of ``rows`` and ``b`` scored: for each
    draw (sequences resampled with replacement), the perplexity change (%) of each row against ``b``.
    None when a row lacks per-sequence NLLs (results written before they were recorded)."""
    series = [r.get("nll_per_seq") for r in rows]
    z = b.get("nll_per_seq")
    if not z or any(not x or len(x) != len(z) for x in series):
        return None
    rng = random.Random(seed)
    n = len(z)
    tokens = rows[0]["scored_tokens"]  # every sequence scores the same number of targets
    out = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        out.append([100 * (math.exp(sum(x[i] - z[i] for i in idx) / tokens) - 1) for x in series])
    return out


def ppl_delta_ci(r: dict, b: dict, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """95% interval of the perplexity change (%) against ``b``, by a paired bootstrap over the held-out
    sequences (both rows scored the same sequences).  None without per-sequence NLLs."""
    boot = paired_bootstrap([r], b, draws, seed)
    if boot is None:
        return None
    deltas = sorted(d for (d,) in boot)
    return [deltas[int(0.025 * draws)], deltas[int(0.975 * draws) - 1]]


def delta_difference_ci(r: dict, o: dict, b: dict, draws: int = 2000, seed: int = 0) -> list[float] | None:
    """Median and 95% interval of (Δppl% of ``r``) - (Δppl% of ``o``), both against ``b``, by a paired
    bootstrap over the held-out sequences that all three rows scored: whether two configs of the same
    engine are told apart.  None without per-sequence NLLs."""
    boot = paired_bootstrap([r, o], b, draws, seed)
    if boot is None:
        return None
    diffs = sorted(x - y for x, y in boot)
    return [diffs[draws // 2], diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]]


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
                    "within_noise": _overlap(by[ours].get("ppl_delta_ci95"), by[theirs].get("ppl_delta_ci95"))}  # fmt: skip
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


def _overlap(x: list[float] | None, y: list[float] | None) -> bool | None:
    """Whether two 95% intervals overlap (the two deltas are not told apart); None without intervals."""
    if x is None or y is None:
        return None
    return x[0] <= y[1] and y[0] <= x[1]


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


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "error" in r or r["ppl_delta_pct"] is None:
            continue
        kv = r["kv"]
        if kv in ("bf16", "fp8"):
            label = f"{kv} ({r['engine']})"
        elif kv.startswith("vllm-"):
            label = (
                "vLLM presets, all layers" if kv.endswith("-full") else "vLLM presets (boundary layers bf16)"
            )
        elif r["engine"] == "vllm":
            label = (
                "ours in vLLM, all layers" if kv.endswith("-full") else "ours in vLLM (boundary layers bf16)"
            )
        elif kv in MAIN:
            label = "ours in tq-hf, all layers"
        else:
            label = "ours in tq-hf: other variants"
        groups.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_token_head"])
        xs = [r["bytes_per_token_head"] for r in rs]
        style = "o-" if len(rs) > 1 and "variants" not in label else "s"
        axes[0].plot(xs, [r["ppl_delta_pct"] for r in rs], style, label=label)
        axes[1].plot(xs, [r["needle_acc"] for r in rs], style, label=label)
        if "variants" in label:
            for r in rs:
                axes[0].annotate(
                    r["kv"].removeprefix("ours-"), (r["bytes_per_token_head"], r["ppl_delta_pct"]), fontsize=7
                )
    for ax, ylabel in zip(
        axes, ("perplexity increase over bf16 (%)", "needle accuracy (2K-16K x 5 depths)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per token per KV head (K+V)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[1].legend(fontsize=7)
    fig.suptitle("KV-cache compression on the reference model (head_dim 128)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    plot(rows, RESULTS / f"{args.name}.png")
    path = write_result(args.name, {"model": model, "protocol": protocol, "rows": rows, "targets": checks,
                                    "definitions": AGREEMENT, "raw_logs": [str(f) for f in args.jsonl]},
                        results=RESULTS)  # fmt: skip
    print(table(rows))
    print(json.dumps(checks, indent=1))
    print(f"wrote {path}, {args.name}.md, {args.name}.png")


if __name__ == "__main__":
    main()
