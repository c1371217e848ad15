"""mkdocs hook: put experiments/results on the site at build time, so the docs never copy a number.

* Every PNG in ``experiments/results`` is added to the site as ``assets/results/<name>.png``.
* A page asks for a table or a plot with a marker on a line of its own::

      <!-- results: kernels-decode -->

  and :func:`on_page_markdown` replaces it with markdown rendered from the JSON (with the file's date and
  the command that wrote it).  A result that is not there yet becomes a visible "not measured yet" note,
  never an error, so pages can name results that later GPU runs will add.

Only the standard library: the hook runs inside mkdocs and must not need torch; mkdocs itself is
imported only by :func:`on_files`, so ``docs/tests`` can render the markers without it.
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"
ASSETS = "assets/results"
MARKER = re.compile(r"^<!-- results: ([a-z0-9-]+) -->$", re.MULTILINE)
PRESETS = ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")


# -- files ------------------------------------------------------------------------------------------
def on_files(files: Files, config: Any) -> Files:
    # Imported here so that docs/tests can import this module without mkdocs.
    from mkdocs.structure.files import File

    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"{ASSETS}/{png.name}", abs_src_path=str(png)))
    return files


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {"rows": data}


def _read(name: str) -> str | None:
    """A results file's text (logs), or None where it is not there."""
    path = RESULTS / name
    return path.read_text() if path.is_file() else None


def _date(name: str, data: dict[str, Any]) -> str:
    """The result's own ``date`` field; failing that, the date of the commit that last changed the file."""
    if data.get("date"):
        return str(data["date"])
    try:
        out = subprocess.run(
            ["git", "log", "-1", "--format=%cs", "--", str(RESULTS / name)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        out = ""
    return f"{out} (commit date; the file has no date field)" if out else "date unknown"


def _source(name: str, data: dict[str, Any]) -> str:
    parts = [f"`experiments/results/{name}`", _date(name, data)]
    if data.get("gpu"):
        parts.append(str(data["gpu"]))
    if data.get("command"):
        parts.append(f"written by `{data['command']}`")
    return "Source: " + ", ".join(parts) + "."


def _missing(name: str) -> str:
    return (
        f'!!! warning "Not measured yet"\n'
        f"    `experiments/results/{name}` is not in this build of the site; this section fills in "
        f"when the experiment that writes it has run.\n"
    )


def _cell(x: Any) -> str:
    """One table cell: a result's strings may hold newlines (error tracebacks) or pipes."""
    text = " ".join(str(x).split())
    return text.replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    return f"{x:.{digits}g}"


# -- renderers --------------------------------------------------------------------------------------
def _distortion(_: str) -> str:
    name = "turboquant_eval.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [r["bits"], _num(r["mse"]), _num(r["mse_measured"]), _num(r["paper"]), _num(r["lower_bound"])]
        for r in data["distortion"]
    ]
    return (
        _table(["bits", "D_mse (exact codebook)", "measured", "paper", "lower bound 4^-b"], rows)
        + "\n"
        + _source(name, data)
        + "\n"
    )


def _attention(_: str) -> str:
    name = "turboquant_eval.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [
            f"`{r['name']}`",
            r["data"],
            r["head_dim"],
            r["bytes_per_token_head"],
            r["layout"].split(": ", 1)[-1].split(", ", 1)[-1].rsplit(", ", 1)[0],
            _num(r["attn_rel_err"], 3),
            f"{r['baseline']}: {_num(r['baseline_rel_err'], 3)}",
            f"{r['baseline_rel_err'] / max(r['attn_rel_err'], 1e-12):.2f}x",
        ]
        for r in data["formats"]
    ]
    header = ["budget", "data", "d", "B/token-head", "our layout", "ours", "uniform (KIVI-style)", "gain"]
    return _table(header, rows) + "\n" + _source(name, data) + "\n"


def _kernels(op: str) -> str:
    """Table of one kernel op: the newest results file that has rows for it (an op a later run did
    not time keeps the earlier file's rows, with that file named as the source).  CUDA-graph timings
    where the run has them (as vLLM replays decode), else the eager ones."""
    data = rows = None
    # kernels_h200.json is the newest run; it did not time extend, whose newest rows are the earlier run's.
    for name in ("kernels_h200.json", "kernels_h200_2026-11-28_extend.json"):
        data = _load(name)
        rows = [r for r in data["rows"] if r["op"] == op] if data else []
        if rows:
            break
    if not data or not rows:
        return _missing(f"kernels_h200.json (op {op})")
    graph = all("ms_graph" in r for r in rows)
    ms_key, base_key = ("ms_graph", "baseline_ms_graph") if graph else ("ms", "baseline_ms")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    formats = [f for f in PRESETS if any(r["format"] == f for r in rows)]
    by = {(r["shape"], r["format"]): r for r in rows}
    table = []
    for shape in shapes:
        base_ms = next(r[base_key] for r in rows if r["shape"] == shape)
        cells = [by.get((shape, f)) for f in formats]
        table.append(
            [f"`{shape}`", f"{base_ms:.3f}"]
            + ["-" if r is None else f"{r[ms_key]:.3f} ({r[base_key] / r[ms_key]:.2f}x)" for r in cells]
        )
    header = [
        "shape",
        f"baseline ms: {rows[0]['baseline']}",
        *[f"`{f}` ms (speed vs baseline)" for f in formats],
    ]
    note = (
        f"Copy bandwidth measured in the same run: {data['copy_gbps']:.0f} GB/s. "
        + ("Timings are CUDA-graph replays. " if graph else "Timings are eager calls. ")
        + "A speed below 1.00x means slower than the baseline."
    )
    return _table(header, table) + "\n" + _source(name, data) + " " + note + "\n"


def _headline(_: str) -> str:
    lines = []
    ev = _load("turboquant_eval.json")
    if ev is None:
        lines.append("- Distortion and attention error: not measured yet.")
    else:
        d4 = next(r for r in ev["distortion"] if r["bits"] == 4)
        syn = [r for r in ev["formats"] if r["data"] == "synthetic-outliers"]
        mini = [r for r in ev["formats"] if r["data"] == "minilm"]
        wins = sum(r["attn_rel_err"] < r["baseline_rel_err"] for r in mini)
        lines.append(
            f"- **Distortion** ({_date('turboquant_eval.json', ev)}, CPU): at 4 bits and d = 128 our "
            f"codebook gives D_mse = {d4['mse']:.5f} against the paper's {d4['paper']}."
        )
        lines.append(
            f"- **Attention error at equal bytes** (same file): on synthetic d = 128 keys with outlier "
            f"channels TurboQuant has {min(r['baseline_rel_err'] / r['attn_rel_err'] for r in syn):.2f}x to "
            f"{max(r['baseline_rel_err'] / r['attn_rel_err'] for r in syn):.2f}x lower error than a "
            f"KIVI-style uniform quantizer at each of the four budgets; on MiniLM activations (d = 32) it wins "
            f"at {wins} of {len(mini)} budgets."
        )
    kb = _load("kernels_h200.json")
    if kb is None:
        lines.append("- Kernels: not measured yet.")
    else:
        r = next((x for x in kb["rows"] if x["op"] == "decode" and x["format"] == "turboquant_4bit_nc"), None)
        if r is not None and "ms_graph" in r:
            ratio = r["baseline_ms_graph"] / r["ms_graph"]
            verdict = (
                f"**{ratio:.2f}x faster than bf16**"
                if ratio >= 1
                else f"**{1 / ratio:.2f}x slower than bf16**"
            )
            lines.append(
                f"- **Decode kernel** ({kb['date']}, {kb.get('gpu', 'GPU')}, `{r['shape']}`, "
                f"`turboquant_4bit_nc`, CUDA-graph timings): {r['ms_graph']:.3f} ms against "
                f"{r['baseline_ms_graph']:.3f} ms for {r['baseline']}, i.e. {verdict} at kernel level, "
                f"reading 3.8x fewer bytes (targets: 2.5x, and 70% of the copy bandwidth)."
            )
    lines.append(_headline_vllm())
    lines.append(_headline_hf())
    lines.append(_headline_quality())
    return "\n".join(lines) + "\n"


def _anchor_rows(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in data["rows"]}


def _headline_vllm() -> str:
    name = "vllm_anchor_h200.json"
    data = _load(name)
    if data is None:
        return "- **vLLM plugin throughput and capacity**: not measured yet."
    runs = _anchor_rows(data)
    bf16, fp8, ours, full, theirs = (
        runs.get(k) for k in ("bf16", "fp8", "ours-4bit", "ours-4bit-full", "vllm-4bit")
    )
    if not (bf16 and ours and theirs):
        return f"- **vLLM plugin**: see [Benchmarks](results/benchmarks.md) ({_date(name, data)})."
    text = (
        f"- **vLLM plugin** ({_date(name, data)}, {data.get('gpu', 'GPU')}, vLLM {data.get('vllm', '?')}, "
        f"Llama-8B shape with dummy weights, {bf16['nseq']} x {bf16['ctx'] // 1024}K prompts, {bf16['gen']} new "
        f"tokens): `turboquant_4bit_nc` holds **{ours['capacity_vs_bf16']:.1f}x the tokens of bf16** (the same as "
        f"vLLM's own TurboQuant backend)"
    )
    if full:
        text += f", {full['capacity_vs_bf16']:.1f}x in full-capacity mode"
    ratio = ours["decode_step_ms"] / bf16["decode_step_ms"]
    versus = (
        f"**{ratio:.2f}x bf16's step time**" if ratio < 1.1 else f"still **{ratio:.1f}x slower than bf16**"
    )
    text += (
        f". It decodes **{theirs['decode_step_ms'] / ours['decode_step_ms']:.1f}x faster than vLLM's own "
        f"`turboquant_4bit_nc`** ({ours['decode_step_ms']:.2f} against {theirs['decode_step_ms']:.2f} ms per "
        f"step), at {versus} ({bf16['decode_step_ms']:.2f} ms)"
    )
    if full:
        text += f"; {full['decode_step_ms']:.2f} ms in full-capacity mode"
    if fp8:
        text += f"; fp8 takes {fp8['decode_step_ms']:.1f} ms at {fp8['capacity_vs_bf16']:.1f}x capacity"
    return text + "."


def _headline_hf() -> str:
    name = "hf_h200.json"
    data = _load(name)
    if data is None:
        return "- **transformers cache**: not measured yet."
    ours = [r for r in data["rows"] if r["cache"] == "TurboQuantCache" and r["attn"] == "turboquant"]
    if not ours:
        return f"- **transformers cache**: see [Benchmarks](results/benchmarks.md) ({_date(name, data)})."
    kv = [r["kv_ratio_vs_dynamic"] for r in ours]
    speeds = ", ".join(f"{r['speedup_vs_dynamic_sdpa']:.2f}x at {r['context'] // 1024}K" for r in ours)
    return (
        f"- **transformers cache** ({_date(name, data)}, {data.get('gpu', 'GPU')}, Llama-8B shape, batch "
        f"{data.get('batch', 1)}): `TurboQuantCache` holds the KV cache in {min(kv):.2f}-{max(kv):.2f}x the "
        f"bytes of `DynamicCache`; decode speed with the fused `turboquant` attention relative to "
        f"`DynamicCache` + SDPA: {speeds} (short contexts are host-bound)."
    )


def _headline_quality() -> str:
    name = "quality.json"
    data = _load(name)
    if data is None:
        return "- **Model quality**: not measured yet."
    params = data.get("model", {}).get("parameters")
    size = f"{params / 1e6:.1f}M-parameter " if params else ""
    rows = {(r["engine"], r["kv"]): r for r in data["rows"]}
    parts = []
    ours_full, theirs_full = rows.get(("vllm", "ours-4bit_nc-full")), rows.get(("vllm", "vllm-4bit_nc-full"))
    if ours_full and theirs_full and ours_full.get("ppl_delta_pct") is not None:
        parts.append(
            f"every layer compressed at 134 B through vLLM, perplexity {_pct(ours_full['ppl_delta_pct'])}% "
            f"for ours against {_pct(theirs_full['ppl_delta_pct'])}% for vLLM's own preset"
        )
    hf = [rows.get(("hf", k)) for k in ("ours-4bit_nc", "ours-k3v4_nc")]
    if all(r and r.get("ppl_delta_pct") is not None for r in hf):
        parts.append(
            f"through transformers {_pct(hf[0]['ppl_delta_pct'])}% at 134 B and "
            f"{_pct(hf[1]['ppl_delta_pct'])}% at 118 B"
        )
    needle = [r.get("needle_acc") for r in data["rows"] if r.get("needle_acc") is not None]
    if needle and min(needle) == 1.0:
        parts.append("needle accuracy 1.0 at 2K-16K for every format, bf16 included")
    return (
        f"- **Model quality** ({_date(name, data)}, a {size}reference model trained on the H200): "
        + "; ".join(parts)
        + ". See [Quality](results/quality.md)."
    )


def _pct(x: float) -> str:
    return f"{x:+.2f}"


def _vllm_anchor(_: str) -> str:
    name = "vllm_anchor_h200.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [
            f"`{r['run']}`",
            f"`{r['kv']}`",
            r.get("backend") or "vLLM default",
            f"{r['decode_step_ms']:.2f}",
            f"{r['decode_vs_bf16']:.2f}x",
            f"{r['kv_capacity_tokens']:,}",
            f"{r['capacity_vs_bf16']:.2f}x",
            f"{r['prefill_s']:.2f}",
            f"{r['prefill_vs_bf16']:.2f}x",
        ]
        for r in data["rows"]
    ]
    header = [
        "run",
        "kv_cache_dtype",
        "backend",
        "decode ms/step",
        "decode time vs bf16",
        "KV capacity (tokens)",
        "capacity vs bf16",
        "prefill s",
        "prefill time vs bf16",
    ]
    note = "Times: lower is better (a ratio above 1.00x is slower than bf16). Capacity: higher is better."
    return (
        _table(header, rows) + "\n" + _source(name, data) + f" vLLM {data.get('vllm', '?')}. " + note + "\n"
    )


def _hf(_: str) -> str:
    name = "hf_h200.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    gib = 1024**3
    rows = [
        [
            f"{r['context'] // 1024}K",
            f"`{r['cache']}`",
            f"`{r['attn']}`",
            f"{r['decode_tok_s']:.1f}",
            f"{1000 / r['decode_tok_s']:.1f}",
            f"{r['speedup_vs_dynamic_sdpa']:.2f}x",
            f"{r['kv_bytes'] / gib:.2f}",
            f"{r['kv_ratio_vs_dynamic']:.2f}x",
            f"{r['peak_ratio_vs_dynamic']:.2f}x",
            r.get("fused_decode_calls", "-"),
        ]
        for r in data["rows"]
    ]
    header = [
        "context",
        "cache",
        "attention",
        "decode tok/s",
        "ms/step",
        "speed vs DynamicCache",
        "KV GiB",
        "KV bytes vs DynamicCache",
        "decode peak vs DynamicCache",
        "fused decode calls",
    ]
    versions = ", ".join(f"{k} {v}" for k, v in (data.get("versions") or {}).items())
    meta = (
        f"{data.get('model', '')}; batch {data.get('batch', '?')}; format `{data.get('format', '?')}`, "
        f"residual window {data.get('residual_length', '?')} tokens; {versions}."
    )
    return _table(header, rows) + "\n" + _source(name, data) + " " + meta + "\n"


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""


def _quality(_: str, name: str = "quality.json") -> str:
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [
            r["engine"],
            f"`{r['kv']}`",
            r["bytes_per_token_head"],
            f"{r['ppl']:.3f}",
            _pct(r["ppl_delta_pct"]) + _ci(r.get("ppl_delta_ci95")),
            "-" if r.get("needle_acc") is None else f"{r['needle_acc']:.2f}",
            "-"
            if r.get("token_agreement") is None
            else f"{r['token_agreement']:.3f} / {r['token_agreement_positionwise']:.3f}",
        ]
        for r in data["rows"]
        if "error" not in r
    ]
    header = [
        "engine",
        "config",
        "B/token-head",
        "ppl",
        "ppl change vs bf16 % [95% CI]",
        "needle acc",
        "agreement (prefix / positionwise)",
    ]
    out = [_table(header, rows), ""]
    targets = data.get("targets") or {}
    if targets:

        def show(v: Any) -> str:
            if isinstance(v, dict):
                return " ".join(f"{k}:{_num(x, 3)}" for k, x in v.items())
            return _num(v, 3)

        out.append("Targets as `report.py` checks them (ppl deltas in %):\n")
        out.append(
            _table(
                ["target", "ours", "theirs", "pass"],
                [[t, show(v.get("ours")), show(v.get("theirs")), v.get("pass")] for t, v in targets.items()],
            )
        )
    model = data.get("model") or {}
    params = model.get("parameters")
    meta = f"Model `{model.get('dir', '?')}`" + (f", {params / 1e6:.1f}M parameters." if params else ".")
    return "\n".join(out) + "\n" + _source(name, data) + " " + meta + "\n"


def _consistency(_: str) -> str:
    name = "vllm_consistency.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [
            r.get("name", "-"),
            f"`{r['kv']}`",
            r.get("backend", "-"),
            f"{r['identical']} of {r['sequences']}",
            ", ".join(str(x) for x in r.get("first_divergence", [])) or "-",
            sum(1 for x in r.get("cached_tokens_B", []) if x),
            r.get("num_gpu_blocks_B", "-"),
            r.get("preemptions_B", "-"),
        ]
        for r in data["rows"]
    ]
    header = [
        "run",
        "kv_cache_dtype",
        "backend",
        "identical sequences",
        "first divergent step of the others",
        "prefix-cache hits (run B)",
        "GPU blocks (run B)",
        "preemptions (run B)",
    ]
    return (
        _table(header, rows) + "\n" + _source(name, data) + f" {data.get('gen_tokens', '?')} greedy tokens.\n"
    )


def _plot(png: str) -> Callable[[str], str]:
    def render(page_uri: str) -> str:
        if not (RESULTS / png).is_file():
            return _missing(png)
        rel = posixpath.relpath(f"{ASSETS}/{png}", posixpath.dirname(page_uri) or ".")
        return f"![{png}]({rel})\n\n*Plot: `experiments/results/{png}`.*\n"

    return render


def _index(_: str) -> str:
    rows = []
    for path in sorted(RESULTS.iterdir()):
        if path.suffix != ".json":
            continue
        data = _load(path.name) or {}
        rows.append([f"`{path.name}`", _date(path.name, data), f"`{data.get('command', '-')}`"])
    return _table(["file", "date", "command"], rows)


def _attention_error_refmodel(_: str) -> str:
    name = "attention_error_refmodel.json"
    data = _load(name)
    if data is None:
        return _missing(name)
    rows = [
        [
            f"`{r['preset']}`",
            r["quantizer"],
            f"{r['rel_err_mean']:.4f}",
            f"{r['keys_only']:.4f}",
            f"{r['values_only']:.4f}",
        ]
        for r in data["rows"]
    ]
    header = ["preset", "quantizer", "attention-output error", "keys only", "values only"]
    meta = f"Model `{data.get('model', '?')}`, {data.get('seqs', '?')} held-out sequences of {data.get('len', '?')} tokens."
    return _table(header, rows) + "\n" + _source(name, data) + " " + meta + "\n"


RENDERERS: dict[str, Callable[[str], str]] = {
    "headline": _headline,
    "distortion": _distortion,
    "attention-error": _attention,
    "kernels-decode": lambda _: _kernels("decode"),
    "kernels-store": lambda _: _kernels("store"),
    "kernels-extend": lambda _: _kernels("extend"),
    "eval-plot": _plot("turboquant_eval.png"),
    "kernels-plot": _plot("kernels_decode.png"),
    "vllm-anchor": _vllm_anchor,
    "vllm-anchor-plot": _plot("vllm_anchor_h200.png"),
    "vllm-consistency": _consistency,
    "hf": _hf,
    "hf-decode-plot": _plot("hf_decode.png"),
    "hf-kv-plot": _plot("hf_kv.png"),
    "quality": _quality,
    "quality-plot": _plot("quality.png"),
    "quality-real-plot": _plot("quality_real.png"),
    "quality-refmodel8min": lambda uri: _quality(uri, "quality_refmodel8min.json"),
    "quality-refmodel8min-plot": _plot("quality_refmodel8min.png"),
    "quality-values-cpu": lambda uri: _quality(uri, "quality_values_cpu.json"),
    "attention-error-refmodel": _attention_error_refmodel,
    "index": _index,
}


def _prose_module() -> Any:
    # mkdocs loads hooks by path, so the sibling module is loaded the same way.
    name = "tq_docs_results_prose"
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("results_prose.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class _Loaders:
    """This module's loaders, looked up at call time (docs/tests replace them to see what was read)."""

    @staticmethod
    def _load(name: str) -> dict[str, Any] | None:
        return _load(name)

    @staticmethod
    def _read(name: str) -> str | None:
        return _read(name)


_prose = _prose_module()
RENDERERS.update(_prose.renderers(_Loaders))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    def replace(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in RENDERERS:
            raise ValueError(
                f"{page.file.src_uri}: unknown results marker {key!r}; known: {sorted(RENDERERS)}"
            )
        return RENDERERS[key](page.file.src_uri)

    return MARKER.sub(replace, markdown)


if __name__ == "__main__":
    raise SystemExit(_prose.main(sys.argv[1:], RENDERERS, ROOT))
