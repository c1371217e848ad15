"""``offload.py --report``: collect the rows' JSON lines into results/vllm_offload_<gpu>.json, each
+offload row compared with its twin without offload (greedy identity, TTFT) and with bf16+offload
(host tokens per GiB)."""

from __future__ import annotations

import json
from pathlib import Path

from tq_core.eval.results import write_result


def report(files: list[str], results: Path) -> None:
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
    print(f"wrote {write_result(name, payload, results=results)}")
