"""``throughput.py --report``: rows of one or more runs into results/vllm_throughput_<gpu>.json, with
ratios against fp8 and bf16, the issue's targets and a bar plot."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from throughput_engine import ROWS

from tq_core.eval.plots import bar_plot
from tq_core.eval.results import out_path, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"

TARGETS = [("ours-4bit-full", "fp8", 1.5), ("ours-4bit-full", "bf16", 2.5), ("ours-4bit", "fp8", 1.3)]


def report(files: list[str], name: str | None) -> None:
    rows: dict[str, dict] = {}
    for f in files:  # a rerun of a row replaces it, unless the rerun failed and the earlier run did not
        for r in (json.loads(ln) for ln in Path(f).read_text().splitlines() if ln.strip()):
            if "error" not in r or "error" in rows.get(r["row"], {"error": 1}):
                rows[r["row"]] = r
    ok = {k: r for k, r in rows.items() if "error" not in r}
    if not ok:
        sys.exit("no row without an error")
    first = next(iter(ok.values()))
    s = first["settings"]
    if any(r["settings"] != s for r in ok.values()):
        sys.exit("rows ran different workloads (settings differ); ratios would compare unlike runs")
    for r in ok.values():
        for base in ("fp8", "bf16"):
            if base in ok:
                r[f"output_tok_s_vs_{base}"] = round(r["output_tok_s"] / ok[base]["output_tok_s"], 3)
        if "fp8" in ok and r["tpot_p50_ms"] and ok["fp8"]["tpot_p50_ms"]:
            r["tpot_p50_vs_fp8"] = round(r["tpot_p50_ms"] / ok["fp8"]["tpot_p50_ms"], 3)
    targets = {f"{row} output tok/s >= {x}x {base}": {"ratio": ok[row][f"output_tok_s_vs_{base}"], "target": x,
               "met": ok[row][f"output_tok_s_vs_{base}"] >= x} for row, base, x in TARGETS if row in ok and base in ok}  # fmt: skip
    if "bf16" in ok:  # start-up (engine init, all phases) against bf16's in the same run
        for r in ok.values():
            r["init_vs_bf16"] = round(r["init_s"] / ok["bf16"]["init_s"], 2)
            if r.get("capture_s") and ok["bf16"].get("capture_s"):
                r["capture_vs_bf16"] = round(r["capture_s"] / ok["bf16"]["capture_s"], 2)
    m = re.search(r"\b[A-Z]\d{2,4}\b", first["gpu"])
    gpu = m.group(0).lower() if m else re.sub(r"\W+", "_", first["gpu"]).lower()
    shape = ("" if s["shape"] == "llama8b" else "_" + s["shape"]) + ("_tiny" if s["tiny"] else "")
    name = name or f"vllm_throughput_{gpu}{shape}"
    order = [k for k in ROWS if k in rows]
    path = write_result(name, {"gpu": first["gpu"], "vllm": first["vllm"], "settings": s, "targets": targets,
                               "sources": files, "rows": [rows[k] for k in order]}, results=RESULTS)  # fmt: skip
    keys = ("kv_capacity_tokens", "output_tok_s", "output_tok_s_vs_fp8", "output_tok_s_vs_bf16", "tpot_p50_ms",
            "tpot_p50_vs_fp8", "running_max_sampled", "preemptions", "init_s", "init_vs_bf16", "torch_compile_s",
            "capture_s", "triton_compiles_init", "triton_compiles_timed")  # fmt: skip
    for k in order:
        print(
            f"{k:15} " + ("ERROR" if "error" in rows[k] else "  ".join(f"{c} {rows[k].get(c)}" for c in keys))
        )
    for t, v in targets.items():
        print(f"target {t}: {v['ratio']} -> {'met' if v['met'] else 'NOT met'}")
    notes = {k: f"{r.get('output_tok_s_vs_bf16', '-')}x bf16, {r.get('output_tok_s_vs_fp8', '-')}x fp8"
             for k, r in ok.items()}  # fmt: skip
    budget = f"KV {s['kv_gib']:g} GiB" if s["kv_gib"] else f"gmu {s['gmu']}"
    title = (f"vLLM {first['vllm']}, {s['shape']}{' tiny' if s['tiny'] else ''} dummy weights, {first['gpu']}: "
             f"{s['num_requests']} x ({s['prompt_len']} + {s['gen_len']}) tokens, "
             f"{budget}")  # fmt: skip
    try:
        bar_plot(out_path(f"{name}.png", results=RESULTS), {k: ok[k]["output_tok_s"] for k in order if k in ok},
                 xlabel="output tokens/s (higher is better)", title=title, notes=notes)  # fmt: skip
    except ImportError as exc:  # the JSON is the result; the plot is a view of it
        print(f"no plot: {exc}")
    print(f"wrote {path}")
