"""Kernel benchmark results: pytest-benchmark's JSON of packages/tq-kernels/benchmarks -> results file + plot.

    python3 -m pytest packages/tq-kernels/benchmarks --benchmark-only --benchmark-json=.benchmarks/tq-kernels.json
    python3 experiments/kernels/bench_report.py [.benchmarks/tq-kernels.json] [--name kernels_h200_2026-12-06]

(`nox -s gpu-bench` runs the first line; `bash experiments/device_session.sh kernels` both on the device
machine.)  Writes results/kernels_<gpu>_<date>.json with the fields docs/hooks/results.py reads
({"command", "date", "gpu", "copy_gbps", "rows": [...], "decode_tuning": [...]}; a row per case: op,
shape, format, ms / ms_graph, gbps, bw_fraction, baseline, baseline_ms, speedup_vs_baseline ...) and
kernels_<gpu>_<date>_decode.png (decode at batch 32 over the context, CUDA-graph timings).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from tq_core.eval.plots import line_plot
from tq_core.eval.results import command_line, out_path, write_result

RESULTS = Path(__file__).resolve().parents[1] / "results"
DEFAULT_JSON = Path(__file__).resolve().parents[2] / ".benchmarks" / "tq-kernels.json"
# Per-case copies of the run's facts (benchmarks/_workload.py); the results file keeps them once, on top.
RUN_KEYS = ("kind", "copy_gbps", "gpu", "cuda", "torch", "triton", "tq-core", "tq-kernels")


def load_cases(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's top level and every case's ``extra_info`` from a pytest-benchmark JSON."""
    if not path.is_file():
        raise SystemExit(
            f"{path} does not exist: run `python3 -m pytest packages/tq-kernels/benchmarks --benchmark-only "
            f"--benchmark-json={path}` on a GPU machine first (or `nox -s gpu-bench`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:  # pytest-benchmark leaves it empty when no case ran
        raise SystemExit(f"{path} is not JSON ({exc}): did any benchmark run? See the pytest log") from exc
    cases = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    if not any(c.get("kind") in ("row", "tune") for c in cases):
        raise SystemExit(
            f"{path} holds no kernel benchmark rows (extra_info kind 'row'/'tune'): is it the JSON of "
            "packages/tq-kernels/benchmarks, run with --benchmark-only on a CUDA machine?"
        )
    return data, cases


def machine_slug(gpu: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100_80gb_hbm3``, ``NVIDIA H200`` -> ``h200``."""
    return re.sub(r"[^a-z0-9]+", "_", gpu.lower().replace("nvidia", "")).strip("_") or "gpu"


def report(data: dict[str, Any], cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The results file's body: the run's facts once, the rows and the tuning rows."""
    env = data.get("environment") or {k: cases[0][k] for k in RUN_KEYS[2:] if k in cases[0]}
    slim = [{k: v for k, v in c.items() if k not in RUN_KEYS} for c in cases]
    return {
        "command": data.get("command", "python3 -m pytest packages/tq-kernels/benchmarks --benchmark-only"),
        "report_command": command_line(),
        "date": str(data.get("datetime", ""))[:10],
        "gpu": env.get("gpu", "?"),
        "copy_gbps": data.get("copy_gbps", cases[0].get("copy_gbps")),
        "versions": {k: v for k, v in env.items() if k != "gpu"},
        "rows": [r for r, c in zip(slim, cases, strict=True) if c.get("kind") == "row"],
        "decode_tuning": [r for r, c in zip(slim, cases, strict=True) if c.get("kind") == "tune"],
    }


def summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for r in rows:
        graph = (
            f"   graph {r['ms_graph']:7.3f} ms vs {r['baseline_ms_graph']:7.3f} x{r['speedup_vs_baseline_graph']:.2f}"
            if r.get("ms_graph") is not None
            else ""
        )
        lines.append(
            f"{r['op']:7s} {r['shape']:14s} {r['format']:20s} {r['ms']:8.3f} ms  "
            f"{(r.get('bw_fraction') or 0) * 100:5.1f}% bw  base {r['baseline_ms']:8.3f} ms  "
            f"x{r['speedup_vs_baseline']:.2f}{graph}"
        )
    return "\n".join(lines)


def plot(body: dict[str, Any], png: Path) -> None:
    """Decode at batch 32 over the context length, one line per format, CUDA-graph milliseconds."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    dec = [r for r in body["rows"] if r["op"] == "decode" and r["shape"].startswith("B32x")]
    for r in sorted(dec, key=lambda r: int(r["shape"].split("xL")[1])):
        xs, ys = series.setdefault(r["format"], ([], []))
        xs.append(int(r["shape"].split("xL")[1]))
        ys.append(r["ms_graph"])
    if not series:
        print("no batch-32 decode rows: no plot")
        return
    line_plot(
        png,
        series,
        xlabel="context length (batch 32)",
        ylabel="ms per decode step (CUDA graph)",
        title=f"Decode attention, Llama-8B heads ({body['gpu']}, {body['date']})",
        logx=True,
        logy=True,
    )
    print(f"wrote {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON, help="pytest-benchmark JSON")
    ap.add_argument("--name", help="results file name without .json (default kernels_<gpu>_<date>)")
    args = ap.parse_args()
    data, cases = load_cases(args.json)
    body = report(data, cases)
    name = args.name or f"kernels_{machine_slug(body['gpu'])}_{body['date']}"
    print(summary(body["rows"]))
    print(f"{len(body['decode_tuning'])} tuning rows")
    print(f"wrote {write_result(name, body, results=RESULTS)}")
    plot(body, out_path(f"{name}_decode.png", results=RESULTS))


if __name__ == "__main__":
    main()
